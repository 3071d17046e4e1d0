"""
nanoGPT's "poor man's configurator". A script defines its config as module-level globals, then runs
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
Each positional argument is a config file (plain Python, executed with the current config values in scope, so
`max_iters = max_iters // 2` works; its _private names and imports are not keys) and each --key=value overrides
one global, parsed with ast.literal_eval (a plain string if that fails, or if the key is a string's). A key the
script does not define, or a value whose type differs from the default's, is an error naming the key and the
expected type.
"""


def _apply_config(g, argv):
    import builtins
    from ast import literal_eval
    config_types = (bool, int, float, str, tuple, list, dict)

    def is_config_key(key):
        # the script's config_keys list when it has one (its own config_keys / default_config are not keys),
        # else its lower-case globals of plain types; CONSTANTS and _private names are not keys
        if 'config_keys' in g:
            return key in g['config_keys']
        return key in g and key.islower() and not key.startswith('_') and isinstance(g[key], config_types)

    def check(key, value, source):
        if not is_config_key(key):
            raise ValueError(f"unknown config key '{key}' (from {source}); valid keys: "
                             + ", ".join(k for k in g if is_config_key(k)))
        default = g[key]
        ok = type(value) == type(default) or (type(default) == float and type(value) == int)
        if not ok:
            raise ValueError(f"config key '{key}' (from {source}) expects {type(default).__name__}, "
                             f"got {type(value).__name__}: {value!r}")
        return float(value) if type(default) == float else value

    for arg in argv:
        if not arg.startswith('--'):
            if '=' in arg:
                raise ValueError(f"config override '{arg}' must start with --")
            try:
                with open(arg) as f:
                    source = f.read()
            except OSError as e:
                raise FileNotFoundError(f"config file '{arg}' cannot be read: {e}") from None
            print(f"Overriding config with {arg}:\n{source}")
            namespace = {k: g[k] for k in g if is_config_key(k)}  # the values so far, to build on
            # the script's `compile` flag shadows the builtin
            exec(builtins.compile(source, arg, 'exec'), namespace)
            for key, value in namespace.items():
                if key.startswith('_') or type(value).__name__ in ('module', 'function', 'type'):
                    continue
                g[key] = check(key, value, arg)
        else:
            if '=' not in arg:
                raise ValueError(f"config override '{arg}' must look like --key=value")
            key, val = arg[2:].split('=', 1)
            try:
                value = literal_eval(val)
            except Exception:  # SyntaxError, ValueError, TypeError ({[1]: 2}), ...
                value = val  # a plain string
            if is_config_key(key) and type(g[key]) == str and not isinstance(value, str):
                value = val  # a string key takes the text as written: --out_dir=2024, --tag=None
            g[key] = check(key, value, 'command line')
            print(f"Overriding: {key} = {g[key]!r}")


_apply_config(globals(), __import__('sys').argv[1:])
del _apply_config
