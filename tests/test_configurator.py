import os
import sys

import pytest

from conftest import ROOT

CONFIGURATOR = open(os.path.join(ROOT, 'configurator.py')).read()


def run_configurator(monkeypatch, argv, **defaults):
    """Executes configurator.py as a script would, over a namespace holding `defaults` as its globals
    (every one a config key)."""
    namespace = dict(defaults, config_keys=list(defaults))
    monkeypatch.setattr(sys, 'argv', ['train.py'] + argv)
    exec(CONFIGURATOR, namespace)
    return namespace


def test_overrides_parse_and_keep_types(monkeypatch):
    ns = run_configurator(monkeypatch, ['--lr=3e-4', '--iters=10', '--name=run1', '--mult=(1,2)',
                                        '--flag=True', '--scale=2'],
                          lr=1e-4, iters=5, name='x', mult=(1, 1), flag=False, scale=1.0)
    assert ns['lr'] == 3e-4 and ns['iters'] == 10 and ns['name'] == 'run1'
    assert ns['mult'] == (1, 2) and ns['flag'] is True
    assert ns['scale'] == 2.0 and type(ns['scale']) is float  # an int is accepted for a float key
    assert '_apply_config' not in ns  # the configurator leaves no names behind


def test_unknown_key_is_an_error(monkeypatch):
    with pytest.raises(ValueError, match="unknown config key 'lerning_rate'.*valid keys: learning_rate$"):
        run_configurator(monkeypatch, ['--lerning_rate=1e-3'], learning_rate=1e-4)
    # a script's config_keys list is the key set: its other globals (constants, bookkeeping) are not keys
    namespace = dict(learning_rate=1e-4, GPT_PRESETS={'B': 12}, config_keys=['learning_rate'])
    monkeypatch.setattr(sys, 'argv', ['train.py', '--GPT_PRESETS=1'])
    with pytest.raises(ValueError, match="unknown config key 'GPT_PRESETS'"):
        exec(CONFIGURATOR, namespace)


def test_a_string_key_takes_the_text_as_written(monkeypatch):
    ns = run_configurator(monkeypatch, ['--out_dir=2024', '--tag=None', "--name='quoted'", '--note={[1]: 2}'],
                          out_dir='out', tag='', name='', note='')
    assert (ns['out_dir'], ns['tag'], ns['name'], ns['note']) == ('2024', 'None', 'quoted', '{[1]: 2}')
    with pytest.raises(ValueError, match="'iters'.*expects int, got str"):  # not a literal at all
        run_configurator(monkeypatch, ['--iters={[1]: 2}'], iters=1)


def test_wrong_type_names_key_and_expected_type(monkeypatch):
    with pytest.raises(ValueError, match="'max_iters'.*expects int, got float"):
        run_configurator(monkeypatch, ['--max_iters=1.5'], max_iters=10)
    with pytest.raises(ValueError, match="'compile'.*expects bool, got str"):
        run_configurator(monkeypatch, ['--compile=yes'], compile=False)


def test_config_file_applies_and_is_checked(monkeypatch, tmp_path):
    good = tmp_path / 'good.py'
    good.write_text("import math\nbatch_size = 4\nlr = 2 * math.pi\n")
    ns = run_configurator(monkeypatch, [str(good), '--batch_size=8'], batch_size=128, lr=1.0)
    assert ns['batch_size'] == 8 and abs(ns['lr'] - 6.283185307) < 1e-6  # later arguments win
    bad = tmp_path / 'bad.py'
    bad.write_text("batch_sise = 4\n")
    with pytest.raises(ValueError, match="unknown config key 'batch_sise'.*bad.py"):
        run_configurator(monkeypatch, [str(bad)], batch_size=128)
    with pytest.raises(FileNotFoundError, match="missing.py"):
        run_configurator(monkeypatch, [str(tmp_path / 'missing.py')], batch_size=128)
    # a config file builds on the values so far (as nanoGPT's); its _private helpers are not keys
    derived = tmp_path / 'derived.py'
    derived.write_text("_scale = 4\nbatch_size = batch_size // _scale\nlr = lr * _scale\n")
    ns = run_configurator(monkeypatch, [str(good), str(derived)], batch_size=128, lr=1.0)
    assert ns['batch_size'] == 1 and abs(ns['lr'] - 4 * 6.283185307) < 1e-6 and '_scale' not in ns


def test_config_sources_name_the_file_or_the_command_line(monkeypatch, tmp_path):
    """config_sources says where each set key came from (train_tokenizer.py ignores a config file's keys that
    the chosen quantizer does not take, but refuses them from the command line)."""
    config = tmp_path / 'c.py'
    config.write_text("batch_size = 4\nlr = 2.0\n")
    ns = run_configurator(monkeypatch, [str(config), '--seed=3'], batch_size=128, lr=1.0, seed=0, name='x')
    assert ns['config_sources'] == {'batch_size': str(config), 'lr': str(config), 'seed': 'command line'}
    assert run_configurator(monkeypatch, [], batch_size=1)['config_sources'] == {}


def script_defaults(script):
    """The config globals a script defines: its top-level constant assignments (also inside a top-level
    `if __name__ == '__main__':` block), evaluated without running the script."""
    import ast
    tree = ast.parse(open(os.path.join(ROOT, script)).read())
    body = list(tree.body)
    for node in tree.body:
        if isinstance(node, ast.If):
            body += node.body
    defaults = {}
    for node in body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:  # constants and constant arithmetic such as 40 * 1281167 // 128
                defaults[node.targets[0].id] = eval(compile(ast.Expression(node.value), script, 'eval'),
                                                    {'__builtins__': {}})
            except Exception:
                pass
    return defaults


def test_every_shipped_config_only_sets_known_keys(monkeypatch):
    """Each config/*.py applies cleanly (known keys, right types) to the defaults of the script it is for."""
    monkeypatch.chdir(ROOT)  # a near-copy includes its base by a path relative to the repository root
    for name in sorted(os.listdir(os.path.join(ROOT, 'config'))):
        if not name.endswith('.py'):
            continue
        script = 'train_ar.py' if name.startswith('ar_') else 'train_tokenizer.py'
        run_configurator(monkeypatch, [os.path.join(ROOT, 'config', name)], **script_defaults(script))


def test_near_copy_configs_compose(monkeypatch):
    """A config that includes its base (first code line exec(open('config/<base>.py').read()))
    resolves the same alone as after its base (train_tokenizer.py config/fvq_16k.py
    config/fvq_262k.py), and sets its own out_dir."""
    import re
    monkeypatch.chdir(ROOT)
    derived = 0
    for name in sorted(os.listdir(os.path.join(ROOT, 'config'))):
        if not name.endswith('.py'):
            continue
        path = os.path.join('config', name)
        base = re.search(r"^exec\(open\('(config/\w+\.py)'\)\.read\(\)\)", open(path).read(), re.M)
        if not base:
            continue
        derived += 1
        defaults = script_defaults('train_ar.py' if name.startswith('ar_') else 'train_tokenizer.py')
        resolved = [{k: ns[k] for k in defaults} for ns in (
            run_configurator(monkeypatch, [path], **defaults),
            run_configurator(monkeypatch, [base.group(1), path], **defaults),
            run_configurator(monkeypatch, [base.group(1)], **defaults))]
        assert resolved[0] == resolved[1], name
        assert resolved[0]['out_dir'] != resolved[2]['out_dir'], name
    assert derived > 0
