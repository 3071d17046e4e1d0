import ast
import json
import math
import os
import re
import runpy
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import quantizers
from conftest import ROOT, make_image_folder

pytestmark = pytest.mark.slow  # every test here runs train_tokenizer.py, in this process or a subprocess

# a tiny tokenizer on 32x32 built-in images; LPIPS off
TINY = ['--image_size=32', '--ch=32', '--ch_mult=(1,2)', '--num_res_blocks=1', '--z_channels=32',
        '--codebook_size=64', '--code_dim=8', '--perceptual_weight=0.0', '--num_workers=0', '--device=cpu',
        '--log_interval=1', '--eval_images=4', '--learning_rate=1e-3', '--base_batch_size=8']


def tiny(out_dir, *extra):
    return [*TINY, f'--out_dir={out_dir}', *extra]


def run(cmd, check=True, env=None):
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def train(monkeypatch, *argv):
    """train_tokenizer.py as __main__ in this process (no interpreter start-up per run)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, 'argv', ['train_tokenizer.py', *argv])
    runpy.run_path(os.path.join(ROOT, 'train_tokenizer.py'), run_name='__main__')


def train_fails(monkeypatch, *argv):
    """The error of an in-process run that must fail."""
    with pytest.raises(Exception) as error:
        train(monkeypatch, *argv)
    return str(error.value)


def ckpt(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), map_location='cpu', weights_only=False)


def read_log(out_dir, split=None):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [r for r in map(json.loads, f) if split in (None, r['split'])]


def logged_losses(stdout):
    matches = re.finditer(r'^iter (\d+): .*?, loss ([^,]+),', stdout, re.M)
    return {int(m.group(1)): m.group(2) for m in matches}


@pytest.mark.parametrize('gan', [
    ['--lecam_weight=0.1', '--ema_decay=0.9'],  # LlamaGen / FVQ order (G, then D), LeCAM, weight EMA
    # IBQ's release order, VCQ's pieces
    ['--lecam_weight=0.1', '--disc_first=True', '--gen_loss=non_saturating_per_image', '--disc_augment=True',
     '--disc_loss_weight=1.0', '--weight_decay=0.01'],
])
def test_kill_and_resume_equals_uninterrupted(gan, tmp_path):
    args = ['--max_iters=4', '--eval_interval=2', '--batch_size=4', '--disc_start=1',
            '--lr_schedule=annealing', '--warmup_frac=0.3', '--constant_frac=0.3', *gan]
    cmd = [sys.executable, 'train_tokenizer.py', *TINY, *args]
    full = run([*cmd, f'--out_dir={tmp_path / "full"}'])
    # a second run is killed (SIGKILL, no clean-up) right after its iter-2 checkpoint, then resumed
    proc = subprocess.Popen([*cmd, f'--out_dir={tmp_path / "killed"}'], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    first_half = ''
    for line in proc.stdout:
        first_half += line
        if line.startswith('saved checkpoint') and 'at iter 2' in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed = run([*cmd, f'--out_dir={tmp_path / "killed"}', '--init_from=resume'])
    assert 'resumed from' in resumed.stdout
    full_losses = logged_losses(full.stdout)
    assert sorted(full_losses) == [1, 2, 3, 4]
    assert {**logged_losses(first_half), **logged_losses(resumed.stdout)} == full_losses
    a, b = ckpt(tmp_path / 'full'), ckpt(tmp_path / 'killed')
    assert a['iter_num'] == b['iter_num'] == 4
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
    assert os.path.exists(tmp_path / 'full' / 'recon_0000004.png')
    # log.jsonl: the resumed run continued the file, each iteration once, with the uninterrupted run's values
    log_full, log_resumed = read_log(tmp_path / 'full'), read_log(tmp_path / 'killed')
    order = [(r['iter'], r['split']) for r in log_full]
    assert order == [(0, 'config'), (0, 'eval'), (1, 'train'), (2, 'train'), (2, 'eval'), (3, 'train'),
                     (4, 'train'), (4, 'eval')]
    assert [(r['iter'], r['split']) for r in log_resumed] == order
    for r_full, r_resumed in zip(log_full, log_resumed):
        # usage: the checkpoint keeps the record of recent codes, so the resumed run counts on
        for key in ('loss', 'rec', 'quant', 'gan', 'disc', 'psnr', 'lr', 'usage', 'window_usage',
                    'usage_tokens'):
            assert (key in r_full) == (key in r_resumed), (r_full['iter'], key)
            if key in r_full:
                assert r_full[key] == pytest.approx(r_resumed[key], rel=1e-6), (r_full['iter'], key)
    assert {'usage', 'window_usage', 'usage_tokens', 'perplexity', 'lr', 'img_per_s', 'gan', 'disc',
            'q_codebook_loss'} <= set(log_full[-2])


def test_lecam_ema_moves_once_per_discriminator_step(tmp_path, monkeypatch):
    """With 2 micro-steps per iteration the EMA (decay 0.999) of D's mean logits takes one update per D step,
    from the mean over its micro-batches (SEED-Voken updates it once per step), not one per micro-batch."""
    import tokenizer
    seen = []  # per micro-step: D's mean logit on real and reconstructed images, the EMA it regularises with
    lecam_loss = tokenizer.lecam_loss

    def spy(logits_real, logits_fake, ema_real, ema_fake):
        seen.append([logits_real.mean().item(), logits_fake.mean().item(), ema_real.item(), ema_fake.item()])
        return lecam_loss(logits_real, logits_fake, ema_real, ema_fake)

    monkeypatch.setattr(tokenizer, 'lecam_loss', spy)
    train(monkeypatch, *tiny(tmp_path, '--max_iters=2', '--batch_size=4', '--gradient_accumulation_steps=2',
                             '--disc_start=0', '--lecam_weight=0.1', '--eval_interval=100'))
    seen = torch.tensor(seen, dtype=torch.float64)
    assert seen.shape == (4, 4)
    ema = torch.zeros(2, dtype=torch.float64)
    for first, last in seen.view(2, 2, 4):  # per iteration: its two micro-steps
        ema = 0.999 * ema + 0.001 * (first[:2] + last[:2]) / 2
        assert torch.allclose(last[2:], ema, rtol=1e-4, atol=1e-9)
    assert torch.allclose(ckpt(tmp_path)['lecam_ema'].double(), ema[None], rtol=1e-4, atol=1e-9)  # (ranks, 2)


def test_ddp_resume_with_lecam_equals_uninterrupted(tmp_path):
    """Each rank's LeCAM EMA follows its own D logits; the checkpoint keeps every rank's, so a resumed 2-rank
    run with LeCAM continues exactly (constant lr: a 2-iteration run is the first half of a 4-iteration
    one)."""
    args = ['--eval_interval=2', '--batch_size=8', '--disc_start=0', '--lecam_weight=0.1']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                'train_tokenizer.py']
    run([*torchrun, *tiny(tmp_path / 'full', *args, '--max_iters=4')], env=env)
    run([*torchrun, *tiny(tmp_path / 'resumed', *args, '--max_iters=2')], env=env)
    halfway = ckpt(tmp_path / 'resumed')['lecam_ema']
    assert halfway.shape == (2, 2) and not torch.equal(halfway[0], halfway[1])  # the ranks' EMAs differ
    run([*torchrun, *tiny(tmp_path / 'resumed', *args, '--max_iters=4', '--init_from=resume',
                          '--resume_allow=max_iters')], env=env)
    a, b = ckpt(tmp_path / 'full'), ckpt(tmp_path / 'resumed')
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
    # IBQ's multi-step decay, after the same warmup
    ('step', ['--warmup_frac=0.2', '--lr_milestones=(0.5,0.8)'],
     [0.005, 0.5025] + [1] * 3 + [0.1] * 3 + [0.01] * 2),
    ('constant', ['--warmup_frac=0.2'], [0.005, 0.5025] + [1] * 8),  # warmup_frac=0 (the default): flat
])
def test_get_lr_schedules(schedule, extra, expected, tmp_path, monkeypatch):
    """The lr each iteration trained with (log.jsonl's iter k holds the lr of step k - 1), as a multiple of
    the batch-scaled learning rate."""
    train(monkeypatch, *tiny(tmp_path, '--max_iters=10', '--batch_size=2', '--disc_weight=0.0',
                             '--image_size=16', '--eval_images=1', '--eval_interval=100',
                             f'--lr_schedule={schedule}', *extra))
    lrs = [r['lr'] for r in read_log(tmp_path, 'train')]
    peak = 1e-3 * 2 / 8  # learning_rate x batch_size / base_batch_size
    assert lrs == pytest.approx([peak * m for m in expected], rel=1e-9)


def test_weight_ema_update_and_loading(tmp_path, monkeypatch):
    """ema_decay d: after one step EMA = d * init + (1 - d) * weights; load_tokenizer returns the EMA
    weights."""
    args = ['--batch_size=2', '--disc_weight=0.0']
    train(monkeypatch, *tiny(tmp_path, '--max_iters=1', *args, '--ema_decay=0.9'))
    saved = ckpt(tmp_path)
    torch.manual_seed(1337)  # the script's seed: this is the untrained model
    from tokenizer import Tokenizer, load_tokenizer
    initial = Tokenizer(**saved['model_args']).state_dict()
    moved = 0
    for name, value in saved['ema'].items():
        expected = 0.9 * initial[name] + 0.1 * saved['model'][name]
        assert torch.allclose(value, expected, atol=1e-7), name
        moved += (value - initial[name]).abs().sum().item()
    assert moved > 0
    tokenizer = load_tokenizer(str(tmp_path / 'ckpt.pt'))
    assert torch.equal(tokenizer.encoder.conv_in.weight, saved['ema']['encoder.conv_in.weight'])
    raw = load_tokenizer(str(tmp_path / 'ckpt.pt'), ema=False)
    assert torch.equal(raw.encoder.conv_in.weight, saved['model']['encoder.conv_in.weight'])
    # resuming with a different EMA setting, or into another model, is refused
    error = train_fails(monkeypatch, *tiny(tmp_path, '--max_iters=2', *args, '--init_from=resume'))
    assert 'ema_decay (checkpoint 0.9, now 0.0)' in error
    error = train_fails(monkeypatch, *tiny(tmp_path, '--max_iters=2', *args, '--ema_decay=0.9',
                                           '--init_from=resume', '--ch=16', '--codebook_size=36'))
    assert ('differing model keys: ch (checkpoint 32, config 16), codebook_size (checkpoint 64, '
            'config 36)') in error


def test_ddp_two_processes_equal_one_process(tmp_path, monkeypatch):
    """2 gloo ranks x 4 images == 1 process x 8 images == 1 process x 2 micro-steps of 4 (no GAN: its
    BatchNorm statistics are per rank by design). ch=64 so that no GroupNorm group holds a single channel: a
    conv bias in front of such a group has an exactly-zero gradient, which Adam turns into +-lr steps of
    noise."""
    args = ['--max_iters=3', '--eval_interval=100', '--batch_size=8', '--disc_weight=0.0', '--ch=64']
    run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         'train_tokenizer.py', *tiny(tmp_path / 'ddp', *args)], env={**os.environ, 'OMP_NUM_THREADS': '1'})
    train(monkeypatch, *tiny(tmp_path / 'single', *args))
    train(monkeypatch, *tiny(tmp_path / 'accum', *args, '--gradient_accumulation_steps=2'))
    single = ckpt(tmp_path / 'single')
    torch.manual_seed(1337)  # the script's seed: this is the untrained model
    from tokenizer import Tokenizer
    initial = Tokenizer(**single['model_args']).state_dict()
    for other in ('ddp', 'accum'):
        saved = ckpt(tmp_path / other)
        assert saved['iter_num'] == 3
        diffs = torch.cat([(saved['model'][k] - v).abs().flatten() for k, v in single['model'].items()])
        moved = torch.cat([(initial[k] - v).abs().flatten() for k, v in single['model'].items()])
        # 3 Adam steps of lr 1e-3 move parameters by ~1e-3; a sharding or averaging error shows at that scale
        assert moved.median() > 1e-4, 'the model did not train'
        assert diffs.max() < 2e-4 and diffs.median() < 1e-6, (other, diffs.max().item(),
                                                               diffs.median().item())


def test_flat_quantizer_options_reach_the_model_and_the_checkpoint(tmp_path, monkeypatch):
    """config/smoke.py with VCQ switched on from the command line: K_t starts at vcq_k_min over the grid's
    tokens, and the checkpoint records every resolved quantizer option."""
    train(monkeypatch, 'config/smoke.py', '--vcq_schedule=cosine', '--vcq_k_min=4', '--max_iters=1',
          '--batch_size=2', '--eval_images=2', f'--out_dir={tmp_path}')
    saved = ckpt(tmp_path)
    args = saved['model_args']['quantizer_args']
    assert saved['model_args']['quantizer'] == 'fvq'
    assert args == {'l2_norm': False, 'projector': 'vqbridge', 'vcq_schedule': 'cosine', 'vcq_k_min': 4,
                    'vcq_seq_len': 64, 'bridge_group_size': 1, 'bridge_dim': 64, 'bridge_zero_init': True}
    sizes = saved['model']['quantizer.codebook_sizes']
    assert len(sizes) == 64 and sizes[0] == 4 and sizes[-1] == 256


def test_other_quantizers_options_are_ignored_from_a_file_refused_typed(tmp_path, monkeypatch, capsys):
    """--quantizer=ibq over a config written for FVQ: the FVQ-only keys the file changed are named in one
    note and ignored (a key left at its default is not); typed on the command line, such a key is an error."""
    config = tmp_path / 'fvq_config.py'
    config.write_text("exec(open('config/smoke.py').read())\n"
                      "bridge_dim = 64\nprojector = 'linear'\nbridge_zero_init = True\n")
    args = [str(config), '--quantizer=ibq', '--max_iters=1', '--batch_size=2', '--eval_images=2']
    train(monkeypatch, *args, f'--out_dir={tmp_path / "ibq"}')
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith('ignored')]
    assert len(notes) == 1 and 'bridge_zero_init' not in notes[0] and 'l2_norm' not in notes[0], notes
    saved = ckpt(tmp_path / 'ibq')
    assert saved['model_args']['quantizer_args'] == {'l2_norm': False, 'vcq_schedule': '', 'vcq_k_min': 2}
    error = train_fails(monkeypatch, *args, '--bridge_dim=32', f'--out_dir={tmp_path / "typed"}')
    assert 'bridge_dim' in error and 'projector' not in error and not os.path.exists(tmp_path / 'typed')


class Toy(nn.Module):
    """A 1-D scalar quantizer (FSQ-like): each position's channel mean, squashed by tanh, rounds to one of K
    evenly spaced levels; the code is that level on every channel, with a straight-through gradient."""

    def __init__(self, codebook_size, dim, *, l2_norm=False):
        super().__init__()
        self.codebook_size, self.dim, self.codebook_sizes, self.l2_norm = codebook_size, dim, None, l2_norm
        self.recent_codes = quantizers.RecentCodes(codebook_size, max(65536, 10 * codebook_size))
        self.register_buffer('levels', torch.linspace(-1, 1, codebook_size))

    def codebook(self):
        return self.levels[:, None].expand(-1, self.dim)  # (K, D)

    def lookup(self, indices):
        return self.codebook()[indices].permute(0, 3, 1, 2)  # (B, H, W) -> (B, D, H, W)

    def forward(self, z):
        z = z.float()
        indices = torch.round((torch.tanh(z.mean(1)) + 1) / 2 * (self.codebook_size - 1)).long()  # (B, H, W)
        z_q = self.lookup(indices)
        commit_loss = F.mse_loss(z, z_q)
        if self.training:
            self.recent_codes.record(indices)
        return z + (z_q - z).detach(), commit_loss, {'indices': indices, 'commit_loss': commit_loss.detach()}


def test_a_new_quantizer_kind_is_one_class_and_one_dispatch_line(tmp_path, monkeypatch):
    """A quantizer defined here, added to quantizers.QUANTIZERS, trains through the whole script: its options
    come from its signature, the usage statistics from its recent codes, the encoder's gradient through it."""
    monkeypatch.setitem(quantizers.QUANTIZERS, 'toy', Toy)
    train(monkeypatch, 'config/smoke.py', '--quantizer=toy', '--max_iters=2', '--batch_size=4',
          '--eval_images=2', '--eval_interval=2', '--log_interval=1', f'--out_dir={tmp_path}')
    saved = ckpt(tmp_path)
    assert saved['iter_num'] == 2 and saved['model_args']['quantizer_args'] == {'l2_norm': False}
    log = read_log(tmp_path, 'train')
    assert [r['usage_tokens'] for r in log] == [4 * 64, 8 * 64] and 0 < log[-1]['usage'] <= 100
    assert all(math.isfinite(r['loss']) and r['q_commit_loss'] > 0 for r in log)
    assert read_log(tmp_path, 'eval')[-1]['usage_tokens'] == 2 * 64
    torch.manual_seed(1337)  # the script's seed: this is the untrained model
    from tokenizer import Tokenizer
    initial = Tokenizer(**saved['model_args']).state_dict()
    assert not torch.equal(initial['encoder.conv_in.weight'], saved['model']['encoder.conv_in.weight'])


def test_corrupt_image_is_skipped_and_counted(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / 'data', per_class=3, size=36)
    (root / 'b' / 'bad.JPEG').write_bytes(b'\x00' * 100)
    with pytest.warns(UserWarning, match='bad.JPEG'):
        train(monkeypatch, *tiny(tmp_path / 'out', f'--data_dir={root}', '--eval_images=1', '--batch_size=6',
                                 '--max_iters=2', '--disc_weight=0.0'))
    # the unreadable image fell into both batches (seed 1337)
    assert [r['skipped_images'] for r in read_log(tmp_path / 'out', 'train')] == [1, 2]


def test_a_fresh_start_does_not_overwrite_and_a_resume_checks_the_config(tmp_path, monkeypatch):
    args = ['--batch_size=2', '--disc_weight=0.0']
    train(monkeypatch, *tiny(tmp_path, '--max_iters=2', *args))
    before = ckpt(tmp_path)
    error = train_fails(monkeypatch, *tiny(tmp_path, '--max_iters=2', *args))
    assert f"{tmp_path / 'ckpt.pt'} already exists" in error
    assert '--init_from=resume' in error and '--overwrite=True' in error
    assert torch.equal(ckpt(tmp_path)['model']['encoder.conv_in.weight'],
                       before['model']['encoder.conv_in.weight'])
    # a resume that changes the experiment is refused, listing every changed key
    error = train_fails(monkeypatch, *tiny(tmp_path, '--max_iters=4', '--batch_size=4', '--disc_weight=0.0',
                                           '--init_from=resume', '--num_images=64'))
    assert ('another config: batch_size (checkpoint 2, now 4), max_iters (checkpoint 2, now 4), num_images '
            '(checkpoint 0, now 64)') in error
    assert '--resume_allow=batch_size,max_iters,num_images' in error
    # watching it differently is fine, and an explicitly allowed change goes through
    train(monkeypatch, *tiny(tmp_path, '--max_iters=4', *args, '--init_from=resume', '--log_interval=2',
                             '--eval_interval=100', '--resume_allow=max_iters'))
    assert ckpt(tmp_path)['iter_num'] == 4
    assert [r['iter'] for r in read_log(tmp_path)] == [0, 0, 1, 2, 2, 4, 4]  # the config record first
    train(monkeypatch, *tiny(tmp_path, '--max_iters=1', *args, '--overwrite=True'))
    assert ckpt(tmp_path)['iter_num'] == 1 and [r['iter'] for r in read_log(tmp_path)] == [0, 0, 1, 1]


def test_data_and_config_errors_are_clear_and_leave_no_out_dir(tmp_path, monkeypatch):
    root = tmp_path / 'data'
    os.makedirs(root / 'a')
    for i in range(6):
        (root / 'a' / f'{i}.png').write_bytes(b'not an image')
    error = train_fails(monkeypatch, *tiny(tmp_path / 'run', f'--data_dir={root}', '--eval_images=1',
                                           '--batch_size=2', '--max_iters=2', '--disc_weight=0.0'))
    assert 'none of the 1 held-out images could be read' in error
    # errors before training (config, data folder) leave no out_dir behind
    out = tmp_path / 'out'
    for bad, message in [([f'--data_dir={root}', '--eval_images=10'], 'eval_images = 10 must be between 1'),
                         (['--eval_images=0'], 'eval_images must be >= 1, got 0'),
                         (['--data_dir=/nonexistent/imagenet'], "data_dir '/nonexistent/imagenet' is not a"),
                         (['--quantizer=lfq'], "unknown quantizer 'lfq'"),
                         (['--lr_schedule=exponential'], "lr_schedule must be one of ('annealing', 'cosine'"),
                         (['--init_from=resum'], "init_from must be 'scratch' or 'resume'"),
                         (['--disc_strat=5'], "unknown config key 'disc_strat'")]:
        assert message in train_fails(monkeypatch, *tiny(out, '--max_iters=1', *bad)), bad
        assert not os.path.exists(out), bad


@pytest.mark.parametrize('bad', [
    '--batch_size=0', '--code_dim=-5', '--eval_interval=0', '--log_interval=0', '--max_iters=-1',
    '--warmup_frac=1.5', '--constant_frac=-0.1', '--learning_rate=0.0', '--learning_rate=1e999',
    '--gradient_accumulation_steps=0', '--base_batch_size=0', '--lr_milestones=(0.5,2)', '--codebook_size=0',
    '--image_size=13', '--gen_loss=hinge2', '--rec_loss=l3', '--init_from=resum',
    '--gradient_accumulation_steps=3'])  # batch_size 2 over 1 rank x 3 micro-steps
def test_every_range_is_checked_before_anything_is_built_or_written(bad, tmp_path, monkeypatch):
    """One error naming the key, its allowed values and its value, before a model exists or out_dir is."""
    import tokenizer
    monkeypatch.setattr(tokenizer.Tokenizer, '__init__', lambda *args, **kwargs: 1 / 0)  # never built
    key, value = bad[2:].split('=') if 'steps=3' not in bad else ('batch_size', '2')
    value = value if value.isidentifier() else ast.literal_eval(value)  # as configurator.py reads it
    error = train_fails(monkeypatch, *tiny(tmp_path / 'out', '--max_iters=2', '--batch_size=2', bad))
    assert error.startswith(f"{key} must be ") and error.endswith(f", got {value!r}"), error
    assert not os.path.exists(tmp_path / 'out')


def test_a_second_run_into_a_busy_out_dir_stops_at_once_naming_the_first(tmp_path, monkeypatch):
    """Two processes: the first holds out_dir's lock, so the second stops before it writes, naming the first's
    pid and command; a kill -9 of the first frees the lock."""
    args = tiny(tmp_path, '--batch_size=2', '--disc_weight=0.0', '--eval_interval=1000')
    first = subprocess.Popen([sys.executable, 'train_tokenizer.py', *args, '--max_iters=1000'], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try:
        lock = tmp_path / '.lock'
        while f'pid {first.pid}:' not in (lock.read_text() if lock.exists() else ''):
            assert first.poll() is None, 'the first run ended'
            time.sleep(0.05)
        error = train_fails(monkeypatch, *args, '--max_iters=1', '--seed=7')
        assert error.startswith(f'{tmp_path} is in use by another run (pid {first.pid}: train_tokenizer.py ')
        assert 'seed=7' not in lock.read_text()
    finally:
        first.kill()  # SIGKILL: no clean-up; the OS lets go of the lock
        first.wait(timeout=60)
    train(monkeypatch, *args, '--max_iters=1', '--seed=7')
    assert [(r['iter'], r['split']) for r in read_log(tmp_path)] == [(0, 'config'), (0, 'eval'), (1, 'train'),
                                                                     (1, 'eval')]


def test_a_non_finite_loss_stops_the_run_and_the_last_checkpoint_stays(tmp_path, monkeypatch):
    """The quantizer loss turns NaN from the third training step: the log of iteration 3 stops the run,
    naming the iteration and the terms; a resume that logs less often stops at the save of iteration 4 (the
    weights are NaN by then). Neither replaces the iteration-2 checkpoint."""
    import tokenizer
    forward, steps = tokenizer.Tokenizer.forward, []

    def nan_from_the_third_step(self, images):
        recon, quant_loss, info = forward(self, images)
        steps.extend([1] if self.training else [])
        return recon, quant_loss * (math.nan if len(steps) >= 3 else 1.0), info
    monkeypatch.setattr(tokenizer.Tokenizer, 'forward', nan_from_the_third_step)
    args = tiny(tmp_path, '--max_iters=6', '--eval_interval=2', '--batch_size=2', '--disc_weight=0.0')
    error = train_fails(monkeypatch, *args)
    assert error.startswith('non-finite loss at iteration 3: quant, loss;'), error
    assert 'learning_rate below 0.001' in error
    saved = (tmp_path / 'ckpt.pt').read_bytes()
    assert ckpt(tmp_path)['iter_num'] == 2 and [r['iter'] for r in read_log(tmp_path, 'train')] == [1, 2]
    error = train_fails(monkeypatch, *args, '--init_from=resume', '--log_interval=10')
    assert error.startswith('non-finite weights at iteration 4: model.') and '.weight' in error, error
    assert (tmp_path / 'ckpt.pt').read_bytes() == saved


def test_torchrun_shows_the_error_as_its_root_cause(tmp_path):
    result = run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1',
                  'train_tokenizer.py', *tiny(tmp_path, '--data_dir=/nonexistent/imagenet')],
                 check=False, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode != 0
    # torchrun's summary of the failed ranks closes its output; the rank's error file fills its Root Cause
    root_cause = result.stderr[result.stderr.rindex('Root Cause'):]
    assert ("error_file: " in root_cause and "FileNotFoundError: data_dir '/nonexistent/imagenet' is not a "
            "directory (expected root/<class>/<image files>)" in root_cause), root_cause


@pytest.mark.parametrize('name', ['study_vq', 'study_ibq', 'study_fvq', 'study_vcq', 'study_cpu_vq',
                                  'study_cpu_ibq', 'study_cpu_fvq', 'study_cpu_vcq'])
def test_study_configs_run(name, tmp_path, monkeypatch):
    """Each study config as written (quantizer, K, code dim, schedule) for 2 iterations, shrunk in width,
    batch and image count, on a tiny ImageFolder so that the suite needs no ../shared data: every quantizer
    kind (VQ, IBQ, FVQ, FVQ + VCQ) through a short training run."""
    root = make_image_folder(tmp_path / 'data', per_class=4, size=40)
    train(monkeypatch, f'config/{name}.py', f'--data_dir={root}', '--ch=16', '--z_channels=16',
          '--image_size=32', '--device=cpu', '--batch_size=2', '--base_batch_size=2', '--max_iters=2',
          '--eval_images=2', '--eval_interval=2', '--log_interval=1', '--num_workers=0',
          f'--out_dir={tmp_path / "out"}')
    saved = ckpt(tmp_path / 'out')
    args = saved['model_args']
    assert saved['iter_num'] == 2 and args['code_dim'] == 256
    assert args['codebook_size'] == (4096 if name.startswith('study_cpu') else 16384)
    assert (args['quantizer_args']['vcq_schedule'] == 'cosine') == name.endswith('vcq')
    log = read_log(tmp_path / 'out')
    assert [(r['iter'], r['split']) for r in log] == [(0, 'config'), (0, 'eval'), (1, 'train'), (2, 'train'),
                                                      (2, 'eval')]
    assert all(0 < r['usage'] <= 100 for r in log[1:]), log


def test_smoke_config_keeps_the_codebook_in_use_and_learns(tmp_path, monkeypatch):
    """config/smoke.py exactly as written (the README's main job): FVQ keeps the codebook in use and the
    held-out reconstructions reach the README's bar of 18 dB. Asserted on the mean PSNR of the 32 held-out
    images and the 10 K-token count, not on single-batch losses, with margins for other CPUs (whose kernels
    round differently)."""
    train(monkeypatch, 'config/smoke.py', f'--out_dir={tmp_path}')
    evals = {r['iter']: r for r in read_log(tmp_path, 'eval')}
    train_log = read_log(tmp_path, 'train')
    assert sorted(evals) == [0, 250, 500, 750, 1000]
    assert [r['iter'] for r in train_log] == list(range(50, 1001, 50))
    assert evals[1000]['psnr'] > 18.0 and evals[1000]['psnr'] > evals[0]['psnr'] + 8, evals
    assert train_log[-1]['usage_tokens'] == 10 * 256 and train_log[-1]['usage'] > 70, train_log[-1]
    assert evals[1000]['usage'] > 60 and evals[1000]['usage_tokens'] == 32 * 64, evals[1000]
    assert os.path.exists(tmp_path / 'ckpt.pt') and os.path.exists(tmp_path / 'recon_0001000.png')
    setting = read_log(tmp_path, 'config')  # the log's first record: the resolved config, no module constants
    assert len(setting) == 1 and setting[0]['device'] == 'cpu'
    assert setting[0]['config'] == json.loads(json.dumps(ckpt(tmp_path)['config']))  # (tuples as lists)
    assert setting[0]['config']['max_iters'] == 1000 and all(k.islower() for k in setting[0]['config'])


@pytest.mark.parametrize('kind', ['rq', 'msvq'])
@pytest.mark.parametrize('projector', ['', 'vqbridge'])
def test_multi_code_tokenizer_trains_with_and_without_the_bridge(kind, projector, tmp_path, monkeypatch):
    """RQ-VAE's residual quantizer (4 codes per position), VAR's multi-scale one (680 codes at 16x16) and
    FVQ's versions of them (a VQBridge over the shared codebook, FVQ Table 4) through a short training run:
    usage over all depths / scales is logged (K = 1024: its last 10 K tokens hold all of them)."""
    train(monkeypatch, *tiny(tmp_path, f'--quantizer={kind}', f'--projector={projector}', '--bridge_dim=32',
                             '--codebook_size=1024', '--l2_norm=False', '--max_iters=2', '--batch_size=2',
                             '--disc_weight=0.0', '--eval_interval=2'))
    saved = ckpt(tmp_path)
    options = saved['model_args']['quantizer_args']
    assert options.get('rq_depth') == (4 if kind == 'rq' else None)
    assert options.get('msvq_scales') == ((1, 2, 3, 4, 5, 6, 8, 10, 13, 16) if kind == 'msvq' else None)
    assert any('projector' in k for k in saved['model']) == (projector == 'vqbridge')
    per_image = 16 * 16 * 4 if kind == 'rq' else 680
    last = read_log(tmp_path, 'train')[-1]
    assert 0 < last['usage'] <= 100 and last['usage_tokens'] == 2 * 2 * per_image  # 2 steps x 2 images
    assert read_log(tmp_path, 'eval')[-1]['usage_tokens'] == 4 * per_image  # held-out: eval_images 4
