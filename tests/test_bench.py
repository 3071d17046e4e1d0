"""bench.py runs each benchmark on the CPU at tiny sizes; its last line's figures parse and are positive."""
import os
import re
import runpy
import sys

import pytest
import torch

from conftest import ROOT

# time_steps' figures: rate, ms/iter, peak memory (none on the CPU), the first call's time
FIGURES = r'([0-9.]+) (?:tok|img)/s, ([0-9.]+) ms/iter, peak n/a, first step ([0-9.e-]+) s'


def run_bench(args, capsys, monkeypatch):
    # the script run as __main__ in this process (saves a torch import per case) -> (last line, its globals)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, 'argv', ['bench.py', '--warmup_steps=0', '--steps=1', *args])
    namespace = runpy.run_path(os.path.join(ROOT, 'bench.py'), run_name='__main__')
    return capsys.readouterr().out.strip().splitlines()[-1], namespace


def positive_figures(match, first_group=1):
    values = [float(match.group(first_group + i)) for i in range(3)]
    assert all(value > 0 for value in values), match.group(0)
    return values


# cosine VQ (tokens in one row of an image); IBQ; FVQ through its VQBridge
@pytest.mark.parametrize('kind, tokens', [('vq', 300), ('ibq', 512), ('fvq', 512)])
def test_quantizer_bench_and_its_naive_baseline(kind, tokens, capsys, monkeypatch):
    line, bench = run_bench(['--what=quantizer', f'--kind={kind}', '--codebook_size=256', '--dim=16',
                             f'--tokens={tokens}', '--baseline=naive'], capsys, monkeypatch)
    match = re.fullmatch(rf'quantizer kind={kind} K=256 D=16 N={tokens} device=cpu: {FIGURES}; '
                         rf'naive {FIGURES}; naive/nanoVQ ([0-9.]+)x', line)
    assert match, line
    ms, naive_ms = positive_figures(match)[1], positive_figures(match, 4)[1]
    assert float(match.group(7)) == pytest.approx(naive_ms / ms, rel=0.05, abs=0.01)
    # the naive baseline computes what the quantizer computes
    quantizer, z = bench['quantizer'], bench['z']
    z_q, loss = quantizer(z)[:2]
    naive_z_q, naive_loss = bench['naive_quantize'](quantizer, z)
    torch.testing.assert_close(naive_z_q, z_q, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(naive_loss, loss, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('args, message', [(['--what=nothing'], "what must be one of"),
                                           (['--baseline=nave'], "baseline must be .*got 'nave'"),
                                           (['--kind=rq', '--baseline=naive'], "not rq or msvq"),
                                           (['--steps=0'], 'steps must be >= 1')])
def test_bad_options_are_refused_before_any_timing(args, message, capsys, monkeypatch):
    with pytest.raises(ValueError, match=message):
        run_bench(['--what=quantizer', '--codebook_size=64', '--dim=8', *args], capsys, monkeypatch)
    assert 'ms/iter' not in capsys.readouterr().out


@pytest.mark.parametrize('config', ['smoke_1d', 'gan'])  # the 1D tokenizer with VCQ; the VQGAN with its D
def test_tokenizer_bench_last_line(config, tmp_path, capsys, monkeypatch):
    path = f'config/{config}.py'
    if config == 'gan':
        path = tmp_path / 'gan.py'
        with open(os.path.join(ROOT, 'config', 'smoke.py')) as f:
            path.write_text(f.read() + 'disc_weight = 0.5\n')
    line, bench = run_bench(['--what=tokenizer', f'--tokenizer_config={path}', '--tokenizer_batch=2'],
                            capsys, monkeypatch)
    match = re.fullmatch(rf'tokenizer config={re.escape(str(path))} batch=2 32px device=cpu: {FIGURES}', line)
    assert match, line
    positive_figures(match)
    assert (bench['disc'] is not None) == (config == 'gan') and bench['lpips_model'] is None  # as configured
    if config == 'smoke_1d':  # the schedule spans the L = 32 latent tokens, as train_tokenizer.py sets it
        assert bench['model'].quantizer.codebook_sizes.shape == (32,)


def test_ar_and_sample_bench_last_lines(capsys, monkeypatch):
    import train_ar
    gpt = ['--ar_model=B', '--n_layer=2', '--n_embd=48', '--ar_batch=2', '--codebook_size=64', '--ar_grid=4']
    # with a made-up peak (the CPU has none), MFU is train_ar's FLOPs per token x tok/s / peak
    monkeypatch.setattr(train_ar, 'peak_bf16_flops', lambda device: 1e9)
    line, bench = run_bench(['--what=ar', *gpt], capsys, monkeypatch)
    match = re.fullmatch(rf'ar preset=B batch=2 device=cpu: {FIGURES}, MFU ([0-9.]+)%', line)
    assert match, line
    tokens_per_s = float(match.group(1))
    positive_figures(match)
    expected = bench['model'].flops_per_token() * tokens_per_s / 1e9
    assert float(match.group(4)) / 100 == pytest.approx(expected, rel=0.01)
    line, _ = run_bench(['--what=sample', *gpt], capsys, monkeypatch)
    match = re.fullmatch(rf'sample preset=B batch=2 cfg=2.0 device=cpu: {FIGURES}', line)
    assert match, line
    positive_figures(match)
