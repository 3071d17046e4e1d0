"""bench.py runs on the CPU at tiny sizes and prints its documented last line."""
import os
import re
import runpy
import subprocess
import sys

import pytest

from conftest import ROOT


def bench_output_in_process(args, capsys, monkeypatch):
    # the script run as __main__ in this process (saves a torch import per case); its stdout lines
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, 'argv', ['bench.py', *args])
    runpy.run_path(os.path.join(ROOT, 'bench.py'), run_name='__main__')
    return capsys.readouterr().out.strip().splitlines()


def run_bench_in_process(args, capsys, monkeypatch):
    # its last stdout line
    return bench_output_in_process(args, capsys, monkeypatch)[-1]


def test_quantizer_bench_command_line():
    cmd = [sys.executable, 'bench.py', '--what=quantizer', '--kind=ibq', '--codebook_size=256', '--dim=16',
           '--tokens=300', '--chunk_size=64', '--warmup_steps=1', '--steps=2', '--device=cpu']
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    line = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r'quantizer kind=ibq K=256 D=16 N=300 device=cpu: fwd\+bwd (\d+\.\d) ms, peak n/a',
                         line)
    assert match and float(match.group(1)) > 0, line


@pytest.mark.parametrize('kind', ['vq', 'fvq'])
def test_quantizer_bench_last_line(kind, capsys, monkeypatch):
    extra = ['--bridge_dim=32'] if kind == 'fvq' else []
    line = run_bench_in_process(['--what=quantizer', f'--kind={kind}', '--codebook_size=256', '--dim=16',
                                 '--tokens=512', '--chunk_size=100', '--warmup_steps=1', '--steps=1', *extra],
                                capsys, monkeypatch)
    match = re.fullmatch(rf'quantizer kind={kind} K=256 D=16 N=512 device=cpu: fwd\+bwd (\d+\.\d) ms, '
                         r'peak n/a', line)
    assert match and float(match.group(1)) > 0, line


@pytest.mark.parametrize('kind', ['ibq', 'vq'])
def test_quantizer_bench_naive_baseline_ratio(kind, capsys, monkeypatch):
    line = run_bench_in_process(['--what=quantizer', f'--kind={kind}', '--codebook_size=256', '--dim=16',
                                 '--tokens=512', '--warmup_steps=1', '--steps=1', '--baseline=naive'],
                                capsys, monkeypatch)
    match = re.fullmatch(rf'quantizer kind={kind} K=256 D=16 N=512 device=cpu: fwd\+bwd (\d+\.\d) ms, '
                         r'peak n/a; naive (\d+\.\d) ms, peak n/a; naive/nanoVQ (\d+\.\d\d)x', line)
    assert match, line
    ms, naive_ms, ratio = (float(g) for g in match.groups())
    assert ms > 0 and naive_ms > 0 and ratio == pytest.approx(naive_ms / ms, abs=0.01 + 0.06 * ratio)


def test_naive_baseline_is_refused_for_multi_code_quantizers(capsys, monkeypatch):
    with pytest.raises(ValueError, match="no plain formula for kind 'rq'"):
        run_bench_in_process(['--what=quantizer', '--kind=rq', '--codebook_size=256', '--dim=16',
                              '--baseline=naive'], capsys, monkeypatch)


def test_bridge_flops_counts_the_projector(capsys, monkeypatch):
    line = run_bench_in_process(['--what=bridge_flops', '--codebook_size=256', '--dim=16',
                                 '--projector=linear'], capsys, monkeypatch)
    assert line == f'bridge projector=linear K=256 D=16: {2 * 256 * 16 * 16} FLOPs = 0.00 GMACs', line
    # VQBridge, K=256 codes of D=16 in groups of 16 -> T=16 tokens of width 32, 2 blocks, 4 heads, MLP
    # ratio 2; multiply-accumulates per layer, attention (QK^T and AV) included:
    T, d, gD = 16, 32, 16 * 16
    # qkv, attention, proj, mlp, adaLN
    block = T * d * 3 * d + 2 * T * T * d + T * d * d + 2 * T * d * 2 * d + d * 6 * d
    macs = T * gD * d + 2 * block + d * 2 * d + T * d * gD  # compress, blocks, final adaLN, expand
    line = run_bench_in_process(['--what=bridge_flops', '--codebook_size=256', '--dim=16',
                                 '--projector=vqbridge', '--bridge_group_size=16', '--bridge_dim=32'],
                                capsys, monkeypatch)
    assert line == f'bridge projector=vqbridge K=256 D=16: {2 * macs} FLOPs = 0.00 GMACs', line


def test_unknown_what_is_an_error(capsys, monkeypatch):
    with pytest.raises(ValueError, match="unknown --what='nothing'"):
        run_bench_in_process(['--what=nothing'], capsys, monkeypatch)
    # option errors come before any timing (a typo'd baseline used to surface after the whole nanoVQ run)
    for args, message in ((['--baseline=nave'], "unknown --baseline='nave'"),
                          (['--steps=0'], 'steps must be >= 1 and warmup_steps >= 0, got 0 and 2')):
        with pytest.raises(ValueError, match=message):
            run_bench_in_process(['--what=quantizer', '--kind=vq', '--codebook_size=64', '--dim=8', *args],
                                 capsys, monkeypatch)
        assert 'fwd+bwd' not in capsys.readouterr().out


@pytest.mark.parametrize('config', ['smoke', 'smoke_1d'])  # the VQGAN, and the 1D tokenizer with VCQ
def test_tokenizer_bench_last_line(config, capsys, monkeypatch):
    line = run_bench_in_process(['--what=tokenizer', f'--tokenizer_config=config/{config}.py',
                                 '--tokenizer_batch=2', '--warmup_steps=1', '--steps=1'], capsys, monkeypatch)
    match = re.fullmatch(rf'tokenizer config=config/{config}.py batch=2 32px device=cpu: (\d+\.\d\d) img/s, '
                         r'(\d+\.\d) ms/iter, peak n/a, first step (\d+\.\d) s', line)
    assert match and float(match.group(1)) > 0, line


def test_tokenizer_memory_adds_up_by_part_and_resolution(capsys, monkeypatch):
    lines = bench_output_in_process(['--what=tokenizer_memory', '--tokenizer_config=config/smoke.py',
                                     '--tokenizer_batch=2', '--dtype=bfloat16'], capsys, monkeypatch)
    match = re.fullmatch(r'tokenizer_memory config=config/smoke.py batch=2 32px device=cpu: saved for backward '
                         r'([0-9.]+) MB \(([0-9.]+) MB per image\), largest (.+) ([0-9.]+)%', lines[-1])
    assert match, lines[-1]
    total, per_image = float(match.group(1)), float(match.group(2))
    rows = [re.fullmatch(r'  (.+?) +([0-9.]+) MB +([0-9.]+)%', line) for line in lines if line.startswith('  ')]
    parts = {row.group(1): float(row.group(2)) for row in rows}
    assert per_image == pytest.approx(total / 2, abs=0.1) and sum(parts.values()) == pytest.approx(total, abs=0.1)
    # every part of the step saved something, and the VQGAN's blocks are counted by their input's resolution
    assert {'quantizer', 'lpips', 'disc', 'encoder 32px', 'decoder 32px', 'decoder 8px'} <= set(parts)
    assert min(parts.values()) > 0 and match.group(3) == max(parts, key=parts.get)


def test_profile_prints_the_top_ops_before_the_last_line(capsys, monkeypatch):
    lines = bench_output_in_process(['--what=quantizer', '--kind=vq', '--codebook_size=256', '--dim=16',
                                     '--tokens=512', '--warmup_steps=1', '--steps=2', '--profile=True'],
                                    capsys, monkeypatch)
    out = '\n'.join(lines)
    assert 'torch.profiler, 2 steps:' in out and 'aten::addmm' in out and 'Self CPU' in out
    # then the time per step by kind, which adds up to the profiled total
    summary = re.fullmatch(r'per step, CPU ops \(self time\): (\d+\.\d+) ms of the unprofiled \d+\.\d+ ms/iter; '
                           r'(.*); largest other: .*', lines[-2])
    kinds = {kind: float(t) for kind, t in re.findall(r'([a-z ]+) (\d+\.\d+) ms \(\d+%\)', summary.group(2))}
    assert sum(kinds.values()) == pytest.approx(float(summary.group(1)), abs=0.05) and kinds['matmul'] > 0
    assert re.fullmatch(r'quantizer kind=vq K=256 D=16 N=512 device=cpu: fwd\+bwd (\d+\.\d) ms, peak n/a',
                        lines[-1])


def test_profile_kinds_count_each_gpu_kernel_once(monkeypatch):
    # kernel names from a GPT-B step profiled on an H100; on CUDA only the kernels count, not the ranges that
    # annotate them (their device time would count the same kernels again) nor the profiler's overhead records
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, 'argv', ['bench.py', '--what=bridge_flops', '--codebook_size=64', '--dim=8',
                                      '--bridge_group_size=16', '--bridge_dim=8', '--bridge_heads=2'])
    bench = runpy.run_path(os.path.join(ROOT, 'bench.py'), run_name='__main__')
    kinds = {'nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT': 'matmul',
             'cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26': 'attention',
             'fmha_cutlassB_f16_aligned_64x64_k64_sm80': 'attention',
             'triton_per_fused__to_copy__unsafe_view_add_mean_mul_native_dropout_0': 'compiled kernels',
             'triton_poi_fused__scaled_dot_product_flash_attention_1': 'compiled kernels',
             'triton_tem_fused_mm_2': 'matmul',
             'void at::native::(anonymous namespace)::multi_tensor_apply_kernel<a': 'optimizer',
             'Memcpy HtoD (Pageable -> Device)': 'copies', 'aten::addmm_': 'matmul',
             'void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float> >': 'other'}
    assert {name: bench['kind_of'](name) for name in kinds} == kinds
    kernel = FunctionEvent(0, 'nvjet_sm90_tst_96x128_64x6_2x1_v_bz_NTN', 0, 10, 98, device_type=DeviceType.CUDA,
                           activity_type='kernel')
    annotation = FunctionEvent(1, 'Optimizer.step#AdamW.step', 0, 5, 200, device_type=DeviceType.CUDA,
                               is_user_annotation=True, activity_type='gpu_user_annotation')
    overhead = FunctionEvent(2, 'Command Buffer Full', 0, 0, 14, device_type=DeviceType.CUDA,
                             activity_type='overhead')
    cpu_op = FunctionEvent(3, 'aten::mm', 0, 0, 40)
    assert bench['time_by_name']([kernel, annotation, overhead, cpu_op], cuda=True) == {kernel.name: 88}


def test_inception_bench_last_line(capsys, monkeypatch):
    line = run_bench_in_process(['--what=inception', '--inception_batch=2', '--warmup_steps=0', '--steps=1'],
                                capsys, monkeypatch)
    match = re.fullmatch(r'inception batch=2 device=cpu: (\d+\.\d\d) features/s', line)
    assert match and float(match.group(1)) > 0, line


def test_ar_and_sample_bench_last_lines(capsys, monkeypatch):
    import torch
    import train_ar
    args = ['--what=ar', '--ar_model=B', '--n_layer=2', '--n_embd=48', '--ar_batch=2', '--codebook_size=64',
            '--warmup_steps=1', '--steps=2', '--device=cpu']
    # with a made-up peak (the CPU has none), MFU is train_ar's FLOPs per token x tok/s / peak
    monkeypatch.setattr(train_ar, 'peak_bf16_flops', lambda device: 1e9)
    line = run_bench_in_process(args, capsys, monkeypatch)
    match = re.fullmatch(r'ar preset=B batch=2 device=cpu: (\d+) tok/s, [0-9.]+ ms/iter, MFU ([0-9.]+)%, '
                         r'peak n/a, first step [0-9.]+ s', line)
    assert match, line
    with torch.device('meta'):
        model = train_ar.GPT(**train_ar.gpt_model_args(64, 1000, 16, 16, 'B', n_layer=2, n_embd=48))
    expected = model.flops_per_token() * int(match.group(1)) / 1e9
    assert float(match.group(2)) / 100 == pytest.approx(expected, rel=1e-2)
    line = run_bench_in_process(['--what=sample', '--ar_model=B', '--n_layer=2', '--n_embd=48',
                                 '--ar_batch=2', '--codebook_size=64', '--ar_tokens=16', '--warmup_steps=0',
                                 '--steps=1', '--device=cpu'], capsys, monkeypatch)
    assert re.match(r'sample preset=B batch=2 cfg=2.0 tokens=16 device=cpu: [0-9.]+ images/s', line), line
