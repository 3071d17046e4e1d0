import json
import math
import os
import re
import runpy
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_image_folder

pytestmark = pytest.mark.slow  # every test here runs train_tokenizer.py in a subprocess

# a tiny tokenizer on 32x32 built-in images; LPIPS off, GAN from iter 2 so the discriminator path is covered
TINY = ['--image_size=32', '--ch=32', '--ch_mult=(1,2)', '--num_res_blocks=1', '--z_channels=32',
        '--codebook_size=64', '--code_dim=8', '--perceptual_weight=0.0', '--num_workers=0', '--device=cpu',
        '--log_interval=1', '--eval_images=4', '--learning_rate=1e-3', '--base_batch_size=8']


def train_cmd(out_dir, *extra):
    return [sys.executable, 'train_tokenizer.py', *TINY, f'--out_dir={out_dir}', *extra]


def run(cmd, check=True, env=None):
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def fails_in_process(monkeypatch, out_dir, *extra):
    """train_tokenizer.py as __main__ in this process, for a run that must fail before it trains: the error
    (a subprocess would cost ~5 s of start-up for the same check)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, 'argv', ['train_tokenizer.py', *TINY, f'--out_dir={out_dir}', *extra])
    with pytest.raises(Exception) as error:
        runpy.run_path(os.path.join(ROOT, 'train_tokenizer.py'), run_name='__main__')
    return str(error.value)


def runs_in_process(monkeypatch, out_dir, *extra):
    """train_tokenizer.py as __main__ in this process, for a short run whose log and checkpoint are checked."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, 'argv', ['train_tokenizer.py', *TINY, f'--out_dir={out_dir}', *extra])
    runpy.run_path(os.path.join(ROOT, 'train_tokenizer.py'), run_name='__main__')


def logged_losses(stdout):
    return {int(m.group(1)): m.group(2) for m in re.finditer(r'^iter (\d+): loss (-?[\d.]+)', stdout, re.M)}


def params(out_dir):
    ckpt = torch.load(os.path.join(out_dir, 'ckpt.pt'), map_location='cpu', weights_only=False)
    return ckpt


def read_log(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize('gan', [
    ['--lecam_weight=0.1', '--ema_decay=0.9'],  # LlamaGen / FVQ order (G, then D), LeCAM, weight EMA
    # IBQ's release order, VCQ's pieces
    ['--lecam_weight=0.1', '--disc_first=True', '--gen_loss=non_saturating_per_image', '--disc_augment=True',
     '--disc_loss_weight=1.0', '--optimizer=adamw', '--weight_decay=0.01'],
])
def test_kill_and_resume_equals_uninterrupted(gan, tmp_path):
    args = ['--max_iters=6', '--eval_interval=3', '--batch_size=4', '--disc_start=2',
            '--lr_schedule=annealing', '--warmup_frac=0.3', '--constant_frac=0.3', *gan]
    full = run(train_cmd(tmp_path / 'full', *args))
    # a second run is killed (SIGKILL, no clean-up) right after its iter-3 checkpoint, then resumed
    proc = subprocess.Popen(train_cmd(tmp_path / 'killed', *args), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    first_half = ''
    for line in proc.stdout:
        first_half += line
        if line.startswith('saved checkpoint') and 'at iter 3' in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed = run(train_cmd(tmp_path / 'killed', *args, "--init_from=resume"))
    assert 'resumed from' in resumed.stdout
    full_losses = logged_losses(full.stdout)
    assert sorted(full_losses) == [1, 2, 3, 4, 5, 6]
    # printed to 5 decimals
    assert {**logged_losses(first_half), **logged_losses(resumed.stdout)} == full_losses
    a, b = params(tmp_path / 'full'), params(tmp_path / 'killed')
    assert a['iter_num'] == b['iter_num'] == 6
    for key in ('model', 'disc') + (('ema',) if '--ema_decay=0.9' in gan else ()):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    assert torch.equal(a['lecam_ema'], b['lecam_ema']) and a['lecam_ema'].abs().sum() > 0
    assert not any(k.startswith(('_orig_mod.', 'module.')) for k in a['model'])
    # weight decay on matrices and kernels only: biases, norms and the codebook are in the no-decay group
    for key, net in (('optimizer', 'model'), ('disc_optimizer', 'disc')):
        decay, no_decay = a[key]['param_groups']
        matrices = [n for n, t in a[net].items() if t.dim() >= 2 and n.endswith('.weight')]
        assert len(decay['params']) == len(matrices) and len(no_decay['params']) > 0
        assert decay['weight_decay'] == (0.01 if '--weight_decay=0.01' in gan else 0.0)
        assert no_decay['weight_decay'] == 0.0
    assert 'quantizer.embedding' in a['model']  # the codebook: not a '.weight', so never decayed
    assert not os.path.exists(tmp_path / 'full' / 'ckpt.pt.tmp')
    assert os.path.exists(tmp_path / 'full' / 'recon_0000006.png')
    assert re.search(r'usage [\d.]+%', full.stdout) and re.search(r'eval iter 6: psnr [\d.]+ dB', full.stdout)
    # log.jsonl: the resumed run continued the file, each iteration once, with the uninterrupted run's losses
    log_full, log_resumed = read_log(tmp_path / 'full'), read_log(tmp_path / 'killed')
    order = [(r['iter'], r['split']) for r in log_full]
    assert order == [(0, 'eval'), (1, 'train'), (2, 'train'), (3, 'train'), (3, 'eval'), (4, 'train'),
                     (5, 'train'), (6, 'train'), (6, 'eval')]
    assert [(r['iter'], r['split']) for r in log_resumed] == order
    for r_full, r_resumed in zip(log_full, log_resumed):
        for key in ('loss', 'rec', 'quant', 'gan', 'disc', 'psnr'):
            assert r_full.get(key) == pytest.approx(r_resumed.get(key), rel=1e-6), (r_full['iter'], key)
    assert {'usage', 'window_usage', 'usage_tokens', 'perplexity', 'lr', 'img_per_s',
            'q_codebook_loss'} <= set(log_full[1])


def test_lecam_ema_moves_once_per_discriminator_step(tmp_path, monkeypatch):
    """With 2 micro-steps per iteration the EMA of D's mean logits takes one update per D step, from the mean
    over its micro-batches (SEED-Voken updates it once per step), not one per micro-batch."""
    import tokenizer
    seen = []  # per micro-step: D's mean logit on real and reconstructed images, the EMA it regularises with
    lecam_loss = tokenizer.lecam_loss

    def spy(logits_real, logits_fake, ema_real, ema_fake):
        seen.append([logits_real.mean().item(), logits_fake.mean().item(), ema_real.item(), ema_fake.item()])
        return lecam_loss(logits_real, logits_fake, ema_real, ema_fake)

    monkeypatch.setattr(tokenizer, 'lecam_loss', spy)
    runs_in_process(monkeypatch, tmp_path, '--max_iters=3', '--batch_size=4', '--gradient_accumulation_steps=2',
                    '--disc_start=0', '--lecam_weight=0.1', '--lecam_decay=0.9', '--eval_interval=100')
    seen = torch.tensor(seen, dtype=torch.float64)
    assert seen.shape == (6, 4)
    ema = torch.zeros(2, dtype=torch.float64)
    for first, last in seen.view(3, 2, 4):  # per iteration: its two micro-steps
        ema = 0.9 * ema + 0.1 * (first[:2] + last[:2]) / 2
        assert torch.allclose(last[2:], ema, atol=1e-6)
    assert torch.allclose(params(tmp_path)['lecam_ema'].double(), ema[None], atol=1e-6)  # (ranks, 2)


def test_ddp_resume_with_lecam_equals_uninterrupted(tmp_path):
    """Each rank's LeCAM EMA follows its own D logits; the checkpoint keeps every rank's, so a resumed 2-rank
    run with LeCAM continues exactly (constant lr: a 2-iteration run is the first half of a 4-iteration one)."""
    args = ['--eval_interval=2', '--batch_size=8', '--disc_start=0', '--lecam_weight=0.1', '--lecam_decay=0.9']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    run([*torchrun, *train_cmd(tmp_path / 'full', *args, '--max_iters=4')[1:]], env=env)
    run([*torchrun, *train_cmd(tmp_path / 'resumed', *args, '--max_iters=2')[1:]], env=env)
    halfway = params(tmp_path / 'resumed')['lecam_ema']
    assert halfway.shape == (2, 2) and not torch.equal(halfway[0], halfway[1])  # the ranks' EMAs differ
    run([*torchrun, *train_cmd(tmp_path / 'resumed', *args, '--max_iters=4', '--init_from=resume',
                               '--resume_allow=max_iters')[1:]], env=env)
    a, b = params(tmp_path / 'full'), params(tmp_path / 'resumed')
    assert a['iter_num'] == b['iter_num'] == 4 and torch.equal(a['lecam_ema'], b['lecam_ema'])
    for key in ('model', 'disc'):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"


@pytest.mark.parametrize('schedule,extra,expected', [
    # FVQ Table 6 over 10 steps: warmup(0.2) from 0.005x, baselr(0.25) of the 8 remaining steps, linear decay
    # to 0.01x
    ('annealing', ['--warmup_frac=0.2', '--constant_frac=0.25'],
     [0.005, 0.5025, 1, 1, 1, 1 - 0.99 / 6, 1 - 0.99 * 2 / 6, 1 - 0.99 * 3 / 6, 1 - 0.99 * 4 / 6,
      1 - 0.99 * 5 / 6]),
    ('cosine', ['--warmup_frac=0.2'],
     [0.005, 0.5025] + [0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (it - 2) / 8)) for it in range(2, 10)]),
    ('step', ['--lr_milestones=(0.5,0.8)'], [1] * 5 + [0.1] * 3 + [0.01] * 2),  # IBQ's multi-step decay
    ('constant', ['--warmup_frac=0.2'], [0.005, 0.5025] + [1] * 8),  # warmup_frac=0 (the default): flat
])
def test_get_lr_schedules(schedule, extra, expected, tmp_path, monkeypatch):
    """The lr each iteration trained with (log.jsonl's iter k holds the lr of step k - 1), as a multiple of
    the batch-scaled learning rate."""
    runs_in_process(monkeypatch, tmp_path, '--max_iters=10', '--batch_size=2', '--disc_weight=0.0',
                    '--eval_interval=100', f'--lr_schedule={schedule}', *extra)
    lrs = [r['lr'] for r in read_log(tmp_path) if r['split'] == 'train']
    peak = 1e-3 * 2 / 8  # learning_rate x batch_size / base_batch_size
    assert lrs == pytest.approx([peak * m for m in expected], rel=1e-9)


def test_unknown_lr_schedule_is_an_error(tmp_path, monkeypatch):
    error = fails_in_process(monkeypatch, tmp_path / 'out', '--lr_schedule=exponential')
    assert "unknown lr_schedule 'exponential'" in error and not os.path.exists(tmp_path / 'out')


def test_weight_ema_update_and_loading(tmp_path, monkeypatch):
    """ema_decay d: after one step EMA = d * init + (1 - d) * weights; load_tokenizer returns the EMA
    weights."""
    runs_in_process(monkeypatch, tmp_path, '--max_iters=1', '--batch_size=2', '--disc_weight=0.0', '--ema_decay=0.9')
    ckpt = params(tmp_path)
    assert [r['lr'] for r in read_log(tmp_path) if r['split'] == 'train'] == [1e-3 * 2 / 8]  # 'constant'
    torch.manual_seed(1337)  # the script's seed: this is the untrained model
    from tokenizer import Tokenizer, load_tokenizer
    initial = Tokenizer(**ckpt['model_args']).state_dict()
    moved = 0
    for name, value in ckpt['ema'].items():
        expected = 0.9 * initial[name] + 0.1 * ckpt['model'][name]
        assert torch.allclose(value, expected, atol=1e-7), name
        moved += (value - initial[name]).abs().sum().item()
    assert moved > 0
    tokenizer = load_tokenizer(str(tmp_path / 'ckpt.pt'))
    assert torch.equal(tokenizer.encoder.conv_in.weight, ckpt['ema']['encoder.conv_in.weight'])
    raw = load_tokenizer(str(tmp_path / 'ckpt.pt'), ema=False)
    assert torch.equal(raw.encoder.conv_in.weight, ckpt['model']['encoder.conv_in.weight'])
    # resuming with a different EMA setting is refused
    assert 'ema_decay' in fails_in_process(monkeypatch, tmp_path, '--max_iters=2', '--batch_size=2',
                                           '--disc_weight=0.0', '--init_from=resume')


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path, monkeypatch):
    run(train_cmd(tmp_path, '--max_iters=1', '--batch_size=2', '--disc_weight=0.0'))
    error = fails_in_process(monkeypatch, tmp_path, '--max_iters=2', '--batch_size=2', '--disc_weight=0.0',
                             '--init_from=resume', '--ch=16', '--codebook_size=32')
    assert ('differing model keys: ch (checkpoint 32, config 16), codebook_size (checkpoint 64, '
            'config 32)') in error


def test_ddp_two_processes_equal_one_process(tmp_path):
    """2 gloo ranks x 4 images == 1 process x 8 images == 1 process x 2 micro-steps of 4 (no GAN: its
    BatchNorm statistics are per rank by design). ch=64 so that no GroupNorm group holds a single channel: a
    conv bias in front of such a group has an exactly-zero gradient, which Adam turns into +-lr steps of
    noise."""
    args = ['--max_iters=3', '--eval_interval=100', '--batch_size=8', '--disc_weight=0.0', '--ch=64']
    run(train_cmd(tmp_path / 'single', *args))
    run(train_cmd(tmp_path / 'accum', *args, '--gradient_accumulation_steps=2'))
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         'train_tokenizer.py', *TINY, f'--out_dir={tmp_path / "ddp"}', *args], env=env)
    single = params(tmp_path / 'single')
    torch.manual_seed(1337)  # the script's seed: this is the untrained model
    from tokenizer import Tokenizer
    initial = Tokenizer(**single['model_args']).state_dict()
    for other in ('ddp', 'accum'):
        ckpt = params(tmp_path / other)
        assert ckpt['iter_num'] == 3
        diffs = torch.cat([(ckpt['model'][k] - v).abs().flatten() for k, v in single['model'].items()])
        moved = torch.cat([(initial[k] - v).abs().flatten() for k, v in single['model'].items()])
        # 3 Adam steps of lr 1e-3 move parameters by ~1e-3; a sharding or averaging error shows at that scale
        assert moved.median() > 1e-4, 'the model did not train'
        assert diffs.max() < 2e-4 and diffs.median() < 1e-6, (other, diffs.max().item(),
                                                               diffs.median().item())


def test_flat_quantizer_options_reach_the_model_and_the_checkpoint(tmp_path):
    """config/smoke.py with VCQ switched on from the command line: K_t starts at vcq_k_min, and the checkpoint
    records every resolved quantizer option."""
    result = run([sys.executable, 'train_tokenizer.py', 'config/smoke.py', '--quantizer=fvq',
                  '--vcq_schedule=cosine', '--vcq_k_min=4', '--max_iters=2', '--eval_images=2',
                  f'--out_dir={tmp_path}'])
    ckpt = params(tmp_path)
    args = ckpt['model_args']['quantizer_args']
    assert ckpt['model_args']['quantizer'] == 'fvq'
    # 8x8 grid
    assert args['vcq_schedule'] == 'cosine' and args['vcq_k_min'] == 4 and args['vcq_seq_len'] == 64
    assert args['bridge_group_size'] == 1 and args['projector'] == 'vqbridge' and 'entropy_weight' not in args
    sizes = ckpt['model']['quantizer.codebook_sizes']
    assert sizes[0] == 4 and sizes[-1] == ckpt['model_args']['codebook_size'] and 'iter 2:' in result.stdout


@pytest.mark.parametrize('bad,named', [(['--quantizer=vq', '--bridge_dim=32'], 'bridge_dim'),
                                       (['--vcq_k_min=4'], 'vcq_k_min'),
                                       (['--quantizer=fvq', '--entropy_weight=0.1'], 'entropy_weight')])
def test_an_option_the_quantizer_ignores_is_an_error(bad, named, tmp_path, monkeypatch):
    assert f"['{named}'] have no effect" in fails_in_process(monkeypatch, tmp_path, '--max_iters=1', *bad)


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    root = make_image_folder(tmp_path / 'data', per_class=3, size=36)
    (root / 'b' / 'bad.JPEG').write_bytes(b'\x00' * 100)
    result = run(train_cmd(tmp_path / 'out', f'--data_dir={root}', '--eval_images=1', '--batch_size=6',
                           '--max_iters=2', '--disc_weight=0.0'))
    assert 'bad.JPEG' in result.stderr
    assert 'skipped 1 unreadable images' in result.stdout


def test_a_fresh_start_does_not_overwrite_and_a_resume_checks_the_config(tmp_path, monkeypatch):
    run(train_cmd(tmp_path, '--max_iters=2', '--batch_size=2', '--disc_weight=0.0'))
    before = params(tmp_path)
    error = fails_in_process(monkeypatch, tmp_path, '--max_iters=2', '--batch_size=2', '--disc_weight=0.0')
    assert f"{tmp_path / 'ckpt.pt'} already exists" in error
    assert '--init_from=resume' in error and '--overwrite=True' in error
    assert torch.equal(params(tmp_path)['model']['encoder.conv_in.weight'],
                       before['model']['encoder.conv_in.weight'])
    # a resume that changes the experiment is refused, listing every changed key
    error = fails_in_process(monkeypatch, tmp_path, '--max_iters=4', '--batch_size=4', '--disc_weight=0.0',
                             '--init_from=resume', '--num_images=64')
    assert ('another config: batch_size (checkpoint 2, now 4), max_iters (checkpoint 2, now 4), num_images '
            '(checkpoint 0, now 64)') in error
    assert '--resume_allow=batch_size,max_iters,num_images' in error
    # watching it differently is fine, and an explicitly allowed change goes through
    ok = run(train_cmd(tmp_path, '--max_iters=4', '--batch_size=2', '--disc_weight=0.0', '--init_from=resume',
                       '--log_interval=2', '--eval_interval=100', '--resume_allow=max_iters'))
    assert 'resumed from' in ok.stdout and params(tmp_path)['iter_num'] == 4
    run(train_cmd(tmp_path, '--max_iters=1', '--batch_size=2', '--disc_weight=0.0', '--overwrite=True'))
    assert params(tmp_path)['iter_num'] == 1


def test_unreadable_data_and_config_errors_are_clear_and_leave_no_out_dir(tmp_path, monkeypatch):
    root = tmp_path / 'data'
    os.makedirs(root / 'a')
    for i in range(6):
        (root / 'a' / f'{i}.png').write_bytes(b'not an image')
    result = run(train_cmd(tmp_path / 'run', f'--data_dir={root}', '--eval_images=1', '--batch_size=2',
                           '--max_iters=2', '--disc_weight=0.0'), check=False)
    assert result.returncode != 0 and 'none of the 1 held-out images could be read' in result.stderr
    # errors before training (config, data folder) leave no out_dir behind
    out = tmp_path / 'out'
    errors = {}
    for bad in ([f'--data_dir={root}', '--eval_images=10'], ['--vcq_k_min=3'], ['--quantizer=lfq'],
                ['--data_dir=/nonexistent'], ['--eval_images=0']):
        errors[bad[-1]] = fails_in_process(monkeypatch, out, '--max_iters=1', *bad)
        assert not os.path.exists(out), bad
    assert 'eval_images = 10 must be between 1 and' in errors['--eval_images=10']
    assert 'eval_images = 0: the held-out evaluation needs at least 1 image' in errors['--eval_images=0']


def test_torchrun_repeats_the_error_as_rank_0s_last_line(tmp_path):
    result = run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1',
                  'train_tokenizer.py', *TINY, '--data_dir=/nonexistent/imagenet', f'--out_dir={tmp_path}'],
                 check=False, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode != 0
    # torchrun may prefix the child's lines with [rank0]:; torchrun's own summary follows them
    lines = [line.removeprefix('[rank0]: ') for line in result.stderr.splitlines()]
    summary = [i for i, line in enumerate(lines) if line.startswith('error (rank 0)')]
    assert len(summary) == 1 and lines[summary[0]] == (
        "error (rank 0): FileNotFoundError: data_dir '/nonexistent/imagenet' is not a directory "
        "(expected root/<class>/<image files>)")


def test_missing_data_dir_is_a_clear_error(tmp_path, monkeypatch):
    error = fails_in_process(monkeypatch, tmp_path, '--data_dir=/nonexistent/imagenet', '--max_iters=1')
    assert "data_dir '/nonexistent/imagenet' is not a directory" in error


def test_unknown_config_key_is_a_clear_error(tmp_path, monkeypatch):
    assert "unknown config key 'disc_strat'" in fails_in_process(monkeypatch, tmp_path, '--disc_strat=5')


@pytest.mark.parametrize('name', ['study_vq', 'study_ibq', 'study_fvq', 'study_vcq', 'study_cpu_vq',
                                  'study_cpu_ibq', 'study_cpu_fvq', 'study_cpu_vcq'])
def test_study_configs_run(name, tmp_path, monkeypatch, capsys):
    """Each study config as written (quantizer, K, code dim, schedule) for 2 iterations, shrunk in width,
    batch and image count, on a tiny ImageFolder so that the suite needs no ../shared data: every quantizer
    kind (VQ, IBQ, FVQ, FVQ + VCQ) through a short training run (in this process: no 5-s start-up each)."""
    root = make_image_folder(tmp_path / 'data', per_class=4, size=40)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, 'argv', [
        'train_tokenizer.py', f'config/{name}.py', f'--data_dir={root}', '--device=cpu', '--ch=16',
        '--z_channels=16', '--image_size=32', '--batch_size=2', '--base_batch_size=2', '--max_iters=2',
        '--eval_images=2', '--eval_interval=2', '--log_interval=1', '--num_workers=0',
        f'--out_dir={tmp_path / "out"}'])
    runpy.run_path(os.path.join(ROOT, 'train_tokenizer.py'), run_name='__main__')
    stdout = capsys.readouterr().out
    ckpt = params(tmp_path / 'out')
    args = ckpt['model_args']
    assert ckpt['iter_num'] == 2 and args['code_dim'] == 256
    assert args['codebook_size'] == (4096 if name.startswith('study_cpu') else 16384)
    assert (args['quantizer_args']['vcq_schedule'] == 'cosine') == name.endswith('vcq')
    # eval 0, 1, 2, eval 2
    assert 'eval iter 2: psnr' in stdout and len(read_log(tmp_path / 'out')) == 4
    usages = [float(u) for u in re.findall(r'usage ([0-9.]+)%', stdout)]
    assert usages and all(0 < u <= 100 for u in usages), stdout[-2000:]


def test_smoke_config_keeps_the_codebook_in_use_and_learns(tmp_path):
    """config/smoke.py exactly as written (the README's main job, ~64 s on 2 cores): FVQ keeps the codebook in
    use and the reconstructions improve. Measured on a 2-core CPU at seeds 1337 / 1 / 2: usage over the last
    10 K tokens 82 / 86 / 82 %, held-out usage 79 / 82 / 71 %, held-out PSNR gain 5.2 / 3.8 / 3.4 dB
    (plain VQ: 3.5% usage). Asserted on the held-out evaluation and the 10 K-token count, not on single-batch
    losses, with margins for other CPUs (whose kernels round differently)."""
    result = run([sys.executable, 'train_tokenizer.py', 'config/smoke.py', f'--out_dir={tmp_path}'])
    log = read_log(tmp_path)
    evals = {r['iter']: r for r in log if r['split'] == 'eval'}
    train = [r for r in log if r['split'] == 'train']
    assert sorted(evals) == [0, 100, 200, 300] and [r['iter'] for r in train] == list(range(25, 301, 25))
    assert evals[300]['psnr'] > evals[0]['psnr'] + 2.5, evals
    assert train[-1]['usage_tokens'] == 10 * 256 and train[-1]['usage'] > 0.7, train[-1]
    assert evals[300]['usage'] > 0.6 and evals[300]['usage_tokens'] == 32 * 64, evals[300]
    assert 'eval iter 300: psnr' in result.stdout
    assert os.path.exists(tmp_path / 'ckpt.pt') and os.path.exists(tmp_path / 'recon_0000300.png')


@pytest.mark.parametrize('kind', ['rq', 'msvq'])
@pytest.mark.parametrize('projector', ['', 'vqbridge'])
def test_multi_code_tokenizer_trains_with_and_without_the_bridge(kind, projector, tmp_path, monkeypatch, capsys):
    """RQ-VAE's residual quantizer (4 codes per position), VAR's multi-scale one (680 codes at 16x16) and FVQ's
    versions of them (a VQBridge over the shared codebook, FVQ Table 4) through a short training run, in this
    process: usage over all depths / scales is logged."""
    monkeypatch.chdir(ROOT)
    bridge = ['--bridge_dim=32'] if projector else []  # (a bridge option without a bridge is an error)
    monkeypatch.setattr(sys, 'argv', ['train_tokenizer.py', *TINY, f'--quantizer={kind}', f'--projector={projector}',
                                      *bridge, '--l2_norm=False', '--max_iters=2', '--batch_size=2',
                                      '--disc_weight=0.0', '--eval_interval=2', '--usage_tokens=100000',
                                      f'--out_dir={tmp_path}'])
    runpy.run_path(os.path.join(ROOT, 'train_tokenizer.py'), run_name='__main__')
    stdout = capsys.readouterr().out
    ckpt = params(tmp_path)
    options = ckpt['model_args']['quantizer_args']
    assert options.get('rq_depth') == (4 if kind == 'rq' else None)
    assert options.get('msvq_scales') == ((1, 2, 3, 4, 5, 6, 8, 10, 13, 16) if kind == 'msvq' else None)
    assert ('projector' in options) and (any('projector' in k for k in ckpt['model']) == (projector == 'vqbridge'))
    usage, tokens = re.findall(r'usage ([0-9.]+)% \(last (\d+) tokens\)', stdout)[-1]
    per_image = 16 * 16 * 4 if kind == 'rq' else 680
    assert 0 < float(usage) <= 100 and int(tokens) == 2 * 2 * per_image  # 2 steps x 2 images, all depths / scales
    evals = [r for r in read_log(tmp_path) if r['split'] == 'eval']
    assert evals[-1]['usage_tokens'] == 4 * per_image  # held-out: eval_images 4
