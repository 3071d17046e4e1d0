"""
nanoGPT's "poor man's configurator". A script defines its config as module-level globals and the list
`config_keys` of their names, then exec()s this file. Each positional argument is a config file: plain
Python, run with the current values in scope (`max_iters = max_iters // 2` works); its _private names and
imports are not keys. Each --key=value overrides one key, parsed with ast.literal_eval (the text as written
for a string key, or when it is no literal). An unknown key, or a value whose type differs from the
default's, is an error naming the key. Leaves `config_sources` {key: the file or 'command line' that set it}
and prints the keys that changed.
"""


def _apply_config(g, argv):
    import builtins
    import textwrap
    from ast import literal_eval
    keys, defaults, sources = g['config_keys'], {k: g[k] for k in g['config_keys']}, {}

    def check(key, value, source):
        if key not in keys:
            raise ValueError(f"unknown config key '{key}' (from {source}); valid keys: {', '.join(keys)}")
        default = defaults[key]
        if not (type(value) == type(default) or (type(default) == float and type(value) == int)):
            raise ValueError(f"config key '{key}' (from {source}) expects {type(default).__name__}, "
                             f"got {type(value).__name__}: {value!r}")
        sources[key] = source
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
            namespace = {k: g[k] for k in keys}  # the values so far, to build on
            exec(builtins.compile(source, arg, 'exec'), namespace)  # (a script's `compile` key shadows it)
            for key, value in namespace.items():
                if key.startswith('_') or type(value).__name__ in ('module', 'function', 'type'):
                    continue
                if key not in keys or value is not g[key]:  # an unknown name, or a key this file set
                    g[key] = check(key, value, arg)
        else:
            if '=' not in arg:
                raise ValueError(f"config override '{arg}' must look like --key=value")
            key, text = arg[2:].split('=', 1)
            try:
                value = literal_eval(text)
            except Exception:  # SyntaxError, ValueError, TypeError ({[1]: 2}), ...
                value = text
            if key in defaults and type(defaults[key]) == str and not isinstance(value, str):
                value = text  # a string key takes the text as written: --out_dir=2024, --tag=None
            g[key] = check(key, value, 'command line')
    changed = [k for k in keys if k in sources and g[k] != defaults[k]]
    for source in sorted(dict.fromkeys(sources[k] for k in changed), key=lambda s: s == 'command line'):
        items = ', '.join(f"{k}={g[k]!r}" for k in changed if sources[k] == source)
        print(textwrap.fill(f"config from {source}: {items}", 110, subsequent_indent='    '))
    g['config_sources'] = sources


_apply_config(globals(), __import__('sys').argv[1:])
del _apply_config
