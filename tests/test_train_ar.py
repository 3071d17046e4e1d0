import json
import os
import re
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from tokenizer import Tokenizer, atomic_save
from train_ar import (GPT, GPT_PRESETS, gpt_model_args, rope_2d_angles, ffn_hidden_size, image_views,
                      ten_crop_read_size, center_view, encode_views, peak_bf16_flops, peak_bf16_flops_of)
from sample import generate, sample_tokens, sample_from_logits

TINY_TOKENIZER = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, quantizer='vq',
                      codebook_size=64, code_dim=8)


def save_tiny_tokenizer(path, quantizer_args=None, image_size=32):
    """A random tiny tokenizer checkpoint (32px -> 16x16 codes, K = 64), as train_tokenizer.py writes it."""
    torch.manual_seed(0)
    model_args = dict(TINY_TOKENIZER, quantizer_args=quantizer_args)
    model = Tokenizer(**model_args)
    atomic_save({'model': model.state_dict(), 'model_args': model_args, 'iter_num': 0,
                 'config': {'image_size': image_size, 'data_dir': ''}}, str(path))
    return str(path)


def run_script(*args, check=True):
    # one thread per script: the models are tiny, and CI's 2 cores are shared with the pytest process
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


pytestmark = pytest.mark.usefixtures('one_torch_thread')


def tiny_gpt(adaln=False, K=64, grid=4, seed=0):
    torch.manual_seed(seed)
    model = GPT(K, 10, grid, grid, n_layer=2, n_head=2, n_embd=32, adaln=adaln).eval()
    # the zero-initialised head (and adaLN-Zero) would make every logit 0 and every argmax 0: randomise them
    torch.nn.init.normal_(model.output.weight, std=1.0)
    for name, p in model.named_parameters():
        if 'adaln' in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


# -----------------------------------------------------------------------------
# the model

def test_presets_match_llamagen_sizes():
    expected = {'B': 111e6, 'L': 343e6, 'XL': 775e6, 'XXL': 1.4e9}  # LlamaGen's counts at K = 16,384
    for name, count in expected.items():
        with torch.device('meta'):
            model = GPT(**gpt_model_args(16384, 1000, 16, 16, name, dropout=0.1))
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - count) / count < 0.02, (name, n)
        assert model.n_embd // model.n_head == 64
    # 2/3 * 4 * dim, rounded up to a multiple of 256
    assert ffn_hidden_size(768) == 2048 and ffn_hidden_size(1280) == 3584


@pytest.mark.parametrize('name', sorted(GPT_PRESETS))
@pytest.mark.parametrize('adaln', [False, True])
def test_shapes_for_every_preset(name, adaln):
    torch.manual_seed(0)
    heads = GPT_PRESETS[name]['n_head']
    model = GPT(**gpt_model_args(50, 7, 3, 4, name, n_layer=2, n_embd=4 * heads, adaln=adaln))
    assert model.n_head == heads and len(model.layers) == 2
    codes = torch.randint(0, 50, (3, 12))
    labels = torch.tensor([0, 6, 7])  # 7 = the null class
    logits, loss = model(labels, codes[:, :-1]), model(labels, codes[:, :-1], targets=codes)
    assert logits.shape == (3, 12, 50) and loss.ndim == 0
    assert torch.isclose(loss, torch.tensor(np.log(50.0), dtype=loss.dtype), atol=1e-4)  # zero head: uniform
    loss.backward()
    assert model.tok_embeddings.weight.grad is not None
    # no biases (but adaLN's)
    assert all(not n.endswith('bias') or 'adaln' in n for n, _ in model.named_parameters())


def test_training_loss_is_cross_entropy_and_keeps_only_bf16_logits_for_the_backward():
    """The training forward's loss (train_ar.CrossEntropy) and its gradients equal F.cross_entropy of the
    logits; compiled under a bf16 autocast, with the partitioner torch.compile uses, its forward hands the
    backward no float32 (B, T, K) tensor (F.cross_entropy of float32 logits saves a float32 log-softmax)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    model = tiny_gpt(K=512)
    model.train()
    codes, labels = torch.randint(0, 512, (3, 16)), torch.tensor([1, 2, 10])

    def loss_and_grads(loss_fn):
        torch.manual_seed(1)  # the same dropout masks for both
        loss = loss_fn()
        return [loss] + list(torch.autograd.grad(loss, list(model.parameters())))

    ours = loss_and_grads(lambda: model(labels, codes[:, :-1], targets=codes))
    reference = loss_and_grads(lambda: torch.nn.functional.cross_entropy(
        model(labels, codes[:, :-1]).reshape(-1, 512), codes.reshape(-1)))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # float32, summed in another order

    forward_outputs = []

    def record_outputs(gm, example_inputs):  # forward graph outputs: the loss and what the backward keeps
        output = gm.graph.find_nodes(op='output')[0]
        forward_outputs.extend(n.meta['val'] for n in output.args[0] if isinstance(n, torch.fx.Node))
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=record_outputs, bw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                           partition_fn=min_cut_rematerialization_partition)
    torch._dynamo.reset()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = torch.compile(model, backend=backend)(labels, codes[:, :-1], targets=codes)
    loss.backward()
    torch._dynamo.reset()
    logit_sized = [(t.dtype, tuple(t.shape)) for t in forward_outputs if t.numel() == 3 * 16 * 512]
    assert logit_sized and all(dtype == torch.bfloat16 for dtype, _ in logit_sized), logit_sized


def test_causal_mask():
    model = tiny_gpt()
    labels = torch.tensor([1, 2])
    codes = torch.randint(0, 64, (2, 15))
    logits = model(labels, codes)  # (2, 16, K): input i holds code i-1
    changed = codes.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 64  # codes 7.. are inputs 8..
    logits2 = model(labels, changed)
    assert torch.equal(logits[:, :8], logits2[:, :8])
    assert not torch.allclose(logits[:, 8], logits2[:, 8])


def test_class_token_has_a_real_position():
    angles = rope_2d_angles(3, 4, 16)  # (12, 8): 4 row frequencies then 4 column frequencies
    # the class token at (0, 0): no rotation
    assert angles.shape == (12, 8) and torch.equal(angles[0], torch.zeros(8))
    freqs = angles[1, :4]  # code 0 sits at (1, 1)
    r, c = divmod(6, 4)  # code 6 = input 7
    torch.testing.assert_close(angles[7, :4], (r + 1) * freqs)
    torch.testing.assert_close(angles[7, 4:], (c + 1) * freqs)
    model = tiny_gpt()  # the class token's output depends on its own key: it is not zeroed as in LlamaGen
    block = model.layers[0].attention
    x = torch.randn(1, 1, 32)
    q, k, _ = block.qkv(x).reshape(1, 1, 3, 2, 16).permute(2, 0, 3, 1, 4)
    from train_ar import apply_rope
    assert torch.equal(apply_rope(k, model.rope_cos[:1], model.rope_sin[:1]), k) and k.abs().sum() > 0


def test_class_dropout_uses_null_class():
    model = tiny_gpt()
    model.train()
    model.class_dropout = 1.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    codes = torch.randint(0, 64, (2, 15))
    dropped = model(torch.tensor([3, 4]), codes)
    model.eval()
    null = model(torch.tensor([10, 10]), codes)
    assert torch.equal(dropped, null)


@pytest.mark.parametrize('adaln', [False, True])
@pytest.mark.parametrize('cfg_scale', [1.0, 3.0])
def test_kv_cache_greedy_equals_full_recompute(adaln, cfg_scale):
    model = tiny_gpt(adaln=adaln)
    labels = torch.tensor([0, 3, 9])
    cached = generate(model, labels, cfg_scale=cfg_scale, top_k=1)
    codes = torch.empty(3, 0, dtype=torch.long)
    with torch.no_grad():
        for t in range(model.seq_len):  # recompute the whole prefix at every step
            logits = model(labels, codes)[:, -1]
            if cfg_scale != 1.0:
                uncond = model(torch.full_like(labels, 10), codes)[:, -1]
                logits = uncond + cfg_scale * (logits - uncond)
            codes = torch.cat([codes, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, codes)
    assert len(codes.unique()) > 1  # a non-trivial sequence


@pytest.mark.parametrize('adaln', [False, True])
def test_kv_cache_multi_token_steps_equal_full_forward(adaln):
    model = tiny_gpt(adaln=adaln)
    labels = torch.tensor([4, 10])
    codes = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        full = model(labels, codes)  # (2, 13, K)
        model.setup_kv_cache(2)
        prefill = model(labels, codes[:, :5], start_pos=0)  # class token + 5 codes: inputs 0..5
        middle = model(labels, codes[:, 5:9], start_pos=6)  # inputs 6..9, a masked block through the cache
        last = model(labels, codes[:, 9:12], start_pos=10)
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat([prefill, middle, last], dim=1), full, atol=1e-5, rtol=1e-5)


def test_flops_per_token_counts_what_is_computed():
    """Against torch's FLOP counter on one forward + backward. The CPU's math attention computes all T x T
    scores, the causal GPU kernels only the (T + 1) / 2 per token that flops_per_token counts: that term is
    swapped analytically. A large codebook and adaLN make a per-token count of the embeddings or of the
    once-per-sequence adaLN projections miss by far more than the tolerance."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    K, L, C, B = 4096, 2, 32, 3
    torch.manual_seed(0)
    model = GPT(K, 10, 4, 4, n_layer=L, n_head=2, n_embd=C, adaln=True)
    T = model.seq_len
    codes = torch.randint(0, K, (B, T))
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        loss = model(torch.tensor([1, 2, 10]), codes[:, :-1], targets=codes)
        loss.backward()
    full_attention = 12 * L * C * T  # per token: every one of the T keys
    causal_attention = 12 * L * C * (T + 1) / 2
    counted = counter.get_total_flops() / (B * T)
    assert model.flops_per_token() - causal_attention + full_attention == pytest.approx(counted, rel=1e-9)
    # by hand: the block linears and the head per token, the adaLN projections once per sequence
    per_token = L * (4 * C * C + 3 * C * ffn_hidden_size(C)) + C * K
    adaln = L * 6 * C * C + 2 * C * C
    assert model.flops_per_token() == 6 * per_token + 6 * adaln / T + causal_attention


def test_peak_bf16_flops_of_device_names():
    expected = {'NVIDIA H100 80GB HBM3': 989e12, 'NVIDIA H100 PCIe': 756e12, 'NVIDIA H100 NVL': 835e12,
                'NVIDIA H200': 989e12, 'NVIDIA H800': 989e12, 'NVIDIA A100-SXM4-80GB': 312e12,
                'NVIDIA A100 80GB PCIe': 312e12, 'NVIDIA A800-SXM4-80GB': 312e12, 'NVIDIA L40S': 362e12,
                'NVIDIA GeForce RTX 4090': 165e12, 'NVIDIA A10G': 70e12, 'NVIDIA A10': 125e12,
                'NVIDIA GeForce RTX 3090': 0.0, 'NVIDIA RTX A1000': 0.0}
    assert {name: peak_bf16_flops_of(name) for name in expected} == expected
    assert peak_bf16_flops('cpu') == 0.0  # no MFU on the CPU


# -----------------------------------------------------------------------------
# code extraction

@pytest.mark.parametrize('ten_crop, flip_augment, views',
                         [(True, True, 10), (False, True, 2), (False, False, 1)])
def test_center_view_is_the_centre_crop(ten_crop, flip_augment, views):
    images = torch.randn(2, 3, 36, 36) if ten_crop else torch.randn(2, 3, 32, 32)
    crops = image_views(images, 32, ten_crop, flip_augment).reshape(2, views, 3, 32, 32)
    expected = images[..., 2:34, 2:34] if ten_crop else images  # (36 - 32) / 2 = 2 pixels off each side
    assert torch.equal(crops[:, center_view(ten_crop)], expected)


def test_ten_crops_are_llamagen_s():
    """LlamaGen reads at int(1.1 x size) and takes torchvision's TenCrop: five crops of the image, then the same
    five of the flipped image (whose corners are the other side's, and whose centre crop shifts by a pixel
    when the margin is odd); round() for the centre offset."""
    assert (ten_crop_read_size(256), ten_crop_read_size(32)) == (281, 35)
    images = torch.randn(2, 3, 35, 35)
    views = image_views(images, 32, True, True).reshape(2, 10, 3, 32, 32)
    flipped = images.flip(-1)
    for i, image in enumerate((images, flipped)):  # margin 3: centre offset round(1.5) = 2
        expected = [image[..., :32, :32], image[..., :32, 3:], image[..., 3:, :32], image[..., 3:, 3:],
                    image[..., 2:34, 2:34]]
        for j, crop in enumerate(expected):
            assert torch.equal(views[:, 5 * i + j], crop), (i, j)
    assert torch.equal(views[:, 5], images[..., :32, 3:].flip(-1))  # flip of the top-right crop


def test_encode_views_is_float32_under_bf16_autocast():
    torch.manual_seed(0)
    tokenizer = Tokenizer(**TINY_TOKENIZER).eval()
    images = torch.rand(1, 3, 35, 35) * 2 - 1  # ten crops of 32px from a 1.1x image (CPU bf16 is slow)
    plain = tokenizer.encode(image_views(images, 32, True, True)).reshape(1, 10, 256)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        codes = encode_views(tokenizer, images, 32, True, True)
        bf16 = tokenizer.encode(image_views(images, 32, True, True)).reshape(1, 10, 256)
    assert torch.equal(codes, plain)
    assert not torch.equal(bf16, plain)  # the caller's bf16 autocast, unguarded, does change codes


# -----------------------------------------------------------------------------
# the training script

@pytest.fixture(scope='module')
def codes_setup(tmp_path_factory):
    """Tiny tokenizer + its codes (20 built-in images x 2 flip views), extracted once by train_ar.py
    (max_iters=0)."""
    root = tmp_path_factory.mktemp('ar')
    tok = save_tiny_tokenizer(root / 'tok.pt')
    codes_dir = str(root / 'codes')
    run_script('train_ar.py', f'--tokenizer_ckpt={tok}', f'--codes_dir={codes_dir}',
               f'--out_dir={root / "x"}', '--device=cpu', '--num_images=20', '--ten_crop=False',
               '--num_workers=0', '--max_iters=0')
    return root, tok, codes_dir


TINY_RUN = ['--device=cpu', '--ar_model=B', '--n_layer=2', '--n_head=2', '--n_embd=32', '--batch_size=4',
            '--learning_rate=3e-3', '--base_batch_size=4', '--num_workers=0', '--log_interval=1']


def losses_of(stdout):
    return [float(x) for x in re.findall(r'loss ([0-9.]+)', stdout)]


@pytest.mark.slow
def test_codes_extraction(codes_setup):
    root, tok, codes_dir = codes_setup
    codes = np.load(os.path.join(codes_dir, 'codes.npy'))
    labels = np.load(os.path.join(codes_dir, 'labels.npy'))
    meta = json.load(open(os.path.join(codes_dir, 'meta.json')))
    assert codes.dtype == np.uint16 and codes.shape == (40, 256) and labels.shape == (40,)
    assert meta['grid_h'] == meta['grid_w'] == 16 and meta['codebook_size'] == 64 and not meta['vcq']
    assert meta['center_view'] == 0  # the unflipped image of each (image, flip) pair
    assert meta['dataset_images'] == 20  # the images read (evaluate.py counts rows with it)
    assert not os.path.exists(os.path.join(codes_dir, 'codebook_sizes.npy'))
    np.testing.assert_array_equal(labels, np.repeat(np.arange(20) % 10, 2))
    # the views are the image and its flip: encode image 3 here and compare
    from tokenizer import load_tokenizer, make_dataset
    tokenizer = load_tokenizer(tok)
    image = make_dataset('', 32, train=True, num_images=20, augment=False)[3][0][None]
    both = tokenizer.encode(torch.cat([image, image.flip(-1)])).reshape(2, 256)
    np.testing.assert_array_equal(codes[6:8], both.numpy())
    # other settings against the same folder are refused
    result = run_script('train_ar.py', f'--tokenizer_ckpt={tok}', f'--codes_dir={codes_dir}',
                        '--num_images=30', f'--out_dir={root / "y"}', '--device=cpu', '--ten_crop=False',
                        '--max_iters=0', check=False)
    assert result.returncode != 0 and 'num_images' in result.stderr and 'different settings' in result.stderr


@pytest.mark.slow
def test_resume_equals_uninterrupted(codes_setup, tmp_path):
    root, tok, codes_dir = codes_setup
    common = [f'--tokenizer_ckpt={tok}', f'--codes_dir={codes_dir}', '--ten_crop=False', '--num_images=20',
              '--lr_schedule=constant', *TINY_RUN]
    full = run_script('train_ar.py', *common, f'--out_dir={tmp_path / "full"}', '--max_iters=6')
    first = run_script('train_ar.py', *common, f'--out_dir={tmp_path / "half"}', '--max_iters=3')
    resumed = run_script('train_ar.py', *common, f'--out_dir={tmp_path / "half"}', '--max_iters=6',
                         '--init_from=resume', '--resume_allow=max_iters')
    assert 'resumed from' in resumed.stdout and len(losses_of(resumed.stdout)) == 3
    assert losses_of(full.stdout) == losses_of(first.stdout) + losses_of(resumed.stdout)
    assert losses_of(full.stdout)[-1] < losses_of(full.stdout)[0]  # it learns
    # log.jsonl: the resumed run continued the file, each iteration once, with the uninterrupted run's losses
    logs = [[json.loads(line) for line in open(tmp_path / d / 'log.jsonl')] for d in ('full', 'half')]
    assert [r['iter'] for r in logs[0]] == [r['iter'] for r in logs[1]] == [1, 2, 3, 4, 5, 6]
    assert [r['loss'] for r in logs[0]] == pytest.approx([r['loss'] for r in logs[1]], rel=1e-6)
    assert {'lr', 'tok_per_s', 'ms_per_iter'} <= set(logs[0][0])
    a = torch.load(tmp_path / 'full' / 'ckpt.pt', weights_only=False)
    b = torch.load(tmp_path / 'half' / 'ckpt.pt', weights_only=False)
    assert a['iter_num'] == b['iter_num'] == 6
    for key in a['model']:
        assert torch.equal(a['model'][key], b['model'][key]), key
    assert not any(k.startswith(('_orig_mod.', 'module.')) for k in a['model'])
    # the optimiser decays matrices only: the null class, norms and adaLN are in the no-decay group
    groups = a['optimizer']['param_groups']
    assert groups[0]['weight_decay'] == 0.05 and groups[1]['weight_decay'] == 0.0
    assert len(groups[1]['params']) == 2 * 2 + 1 + 1  # 2 norms per block, final norm, null class
    # a different model is refused, naming the differing keys
    bad = run_script('train_ar.py', *common, f'--out_dir={tmp_path / "half"}', '--max_iters=8',
                     '--init_from=resume', '--n_embd=64', check=False)
    assert bad.returncode != 0 and 'n_embd' in bad.stderr and 'differing model keys' in bad.stderr
    # a changed experiment is refused unless allowed; where the run is watched from may change
    bad = run_script('train_ar.py', *common, f'--out_dir={tmp_path / "half"}', '--max_iters=8',
                     '--init_from=resume', '--batch_size=8', '--log_interval=5', check=False)
    assert bad.returncode != 0 and 'another config: batch_size (checkpoint 4, now 8), max_iters ' \
        '(checkpoint 6, now 8)' in bad.stderr and '--resume_allow=batch_size,max_iters' in bad.stderr
    # and a run from scratch does not overwrite the checkpoint
    bad = run_script('train_ar.py', *common, f'--out_dir={tmp_path / "half"}', '--max_iters=6', check=False)
    assert bad.returncode != 0 and 'ckpt.pt already exists' in bad.stderr
    assert '--init_from=resume' in bad.stderr
    assert torch.load(tmp_path / 'half' / 'ckpt.pt', weights_only=False)['iter_num'] == 6


@pytest.mark.slow
@pytest.mark.slow
def test_annealing_lr_schedule_is_logged(codes_setup, tmp_path):
    """FVQ Table 6's annealing: warmup from 0.005x over warmup_frac of max_iters, 1x for constant_frac of the
    steps AFTER warmup, then linear decay to 0.01x at max_iters. log.jsonl's record for iter i holds the lr
    of iteration i - 1."""
    root, tok, codes_dir = codes_setup
    run_script('train_ar.py', f'--tokenizer_ckpt={tok}', f'--codes_dir={codes_dir}', '--ten_crop=False',
               '--num_images=20', f'--out_dir={tmp_path}', *TINY_RUN, '--max_iters=8',
               '--lr_schedule=annealing', '--warmup_frac=0.25', '--constant_frac=0.5')
    records = [json.loads(line) for line in open(tmp_path / 'log.jsonl')]
    assert [r['iter'] for r in records] == list(range(1, 9))
    base_lr = 3e-3  # learning_rate at batch_size == base_batch_size
    warmup = 0.25 * 8  # iterations 0, 1 warm up
    decay_start = warmup + 0.5 * (8 - warmup)  # 1x for half of the 6 post-warmup steps: iterations 2, 3, 4
    expected = []
    for it in range(8):
        if it < warmup:
            expected.append(base_lr * (0.005 + 0.995 * it / warmup))
        elif it < decay_start:
            expected.append(base_lr)
        else:
            expected.append(base_lr * (1 - 0.99 * (it - decay_start) / (8 - decay_start)))
    assert [r['lr'] for r in records] == pytest.approx(expected, rel=1e-9)
    # the same numbers spelled out (constant_frac of all max_iters would still give 1x at iteration 6)
    multipliers = [0.005, 0.5025, 1, 1, 1, 1, 1 - 0.99 / 3, 1 - 0.99 * 2 / 3]
    assert [r['lr'] for r in records] == pytest.approx([base_lr * m for m in multipliers], rel=1e-9)


def test_codes_of_a_retrained_tokenizer_are_not_reused(tmp_path, monkeypatch):
    """A tokenizer retrained in place (same path, same iteration, another seed) has other weights: the codes
    extracted from the old one are refused, naming the fingerprint."""
    tiny = ['--image_size=32', '--ch=16', '--ch_mult=(1,2)', '--num_res_blocks=1', '--z_channels=16',
            '--codebook_size=64', '--code_dim=8', '--perceptual_weight=0.0', '--disc_weight=0.0',
            '--num_workers=0', '--device=cpu', '--batch_size=2', '--base_batch_size=2', '--max_iters=2',
            '--eval_images=2', f'--out_dir={tmp_path / "tok"}']
    run_in_process(monkeypatch, 'train_tokenizer.py', *tiny)
    ar = ['train_ar.py', f'--tokenizer_ckpt={tmp_path / "tok" / "ckpt.pt"}',
          f'--codes_dir={tmp_path / "codes"}', '--num_images=4', '--ten_crop=False', '--num_workers=0',
          '--device=cpu', '--max_iters=0', f'--out_dir={tmp_path / "ar"}']
    run_in_process(monkeypatch, *ar)
    run_in_process(monkeypatch, *ar)  # same tokenizer: the codes are reused
    # retrained in place, same iteration
    run_in_process(monkeypatch, 'train_tokenizer.py', *tiny, '--seed=7', '--overwrite=True')
    with pytest.raises(ValueError, match='different settings') as error:
        run_in_process(monkeypatch, *ar)
    assert 'tokenizer_fingerprint' in str(error.value)


@pytest.mark.slow  # codes_setup runs train_ar.py in a subprocess
def test_a_checkpoint_of_the_other_kind_is_named(codes_setup, tmp_path, monkeypatch):
    root, tok, codes_dir = codes_setup
    run_in_process(monkeypatch, 'train_ar.py', f'--tokenizer_ckpt={tok}', f'--codes_dir={codes_dir}',
                   '--ten_crop=False', '--num_images=20', f'--out_dir={tmp_path}', *TINY_RUN, '--max_iters=1')
    gpt = str(tmp_path / 'ckpt.pt')
    with pytest.raises(ValueError) as error:
        run_in_process(monkeypatch, 'train_ar.py', f'--tokenizer_ckpt={gpt}', f'--out_dir={tmp_path / "x"}',
                       *TINY_RUN)
    assert str(error.value) == (f"'{gpt}' is a gpt checkpoint (written by train_ar.py), but a tokenizer "
                                "checkpoint (written by train_tokenizer.py) is expected here")
    assert not os.path.exists(tmp_path / 'x')  # nothing was created for a run that could not start
    with pytest.raises(ValueError, match='is a tokenizer checkpoint'):
        run_in_process(monkeypatch, 'sample.py', f'--ckpt={tok}', '--device=cpu')


@pytest.mark.slow
def test_class_id_out_of_range_is_an_error(codes_setup, tmp_path):
    root, tok, codes_dir = codes_setup
    result = run_script('train_ar.py', f'--tokenizer_ckpt={tok}', f'--codes_dir={codes_dir}',
                        '--ten_crop=False', '--num_images=20', '--num_classes=5', f'--out_dir={tmp_path}',
                        *TINY_RUN, '--max_iters=1', check=False)
    assert result.returncode != 0 and 'class id 9' in result.stderr and 'out of range' in result.stderr


@pytest.mark.slow
def test_whole_chain_tokenizer_codes_gpt_samples(tmp_path):
    """tokenizer checkpoint -> ten-crop codes -> train_ar.py -> sample.py -> evaluate.py --mode=gen, all on
    CPU."""
    tok = save_tiny_tokenizer(tmp_path / 'tok.pt')
    out = tmp_path / 'ar'
    train = run_script('train_ar.py', f'--tokenizer_ckpt={tok}', f'--out_dir={out}', '--num_images=10',
                       *TINY_RUN, '--max_iters=4')
    assert len(losses_of(train.stdout)) == 4 and 'MFU n/a' in train.stdout
    codes = np.load(out / 'codes' / 'codes.npy', mmap_mode='r')
    assert codes.shape == (100, 256)  # 10 images x 10 crops
    assert json.load(open(out / 'codes' / 'meta.json'))['center_view'] == 4  # TenCrop's centre crop
    checkpoint = torch.load(out / 'ckpt.pt', weights_only=False)
    assert checkpoint['codebook_sizes'] is None and checkpoint['tokenizer_ckpt'] == tok
    run_script('sample.py', f'--ckpt={out / "ckpt.pt"}', '--num_samples=5', '--batch_size=5',
               '--cfg_scale=2.0', '--cfg_schedule=cosine', '--cfg_power=1.5', '--top_k=20',
               '--grid_classes=(1, 4)', '--grid_per_class=2', '--device=cpu')
    with np.load(out / 'samples.npz') as f:
        assert f['arr_0'].shape == (5, 32, 32, 3) and f['arr_0'].dtype == np.uint8
        np.testing.assert_array_equal(f['arr_1'], np.arange(5) % 10)
    from PIL import Image
    assert Image.open(out / 'samples_grid.png').size == (2 * 32, 2 * 32)
    if os.path.isfile(os.path.join(ROOT, 'evaluate.py')):
        import evaluate
        torch.manual_seed(0)
        torch.save(evaluate.FIDInceptionV3().state_dict(), tmp_path / 'inception_random.pth')
        result = run_script('evaluate.py', '--mode=gen', f'--samples={out / "samples.npz"}',
                            f'--ref={out / "samples.npz"}',
                            f'--inception_weights={tmp_path / "inception_random.pth"}',
                            f'--out_dir={tmp_path / "eval"}', '--device=cpu', '--ref_cache=False')
        results = json.load(open(tmp_path / 'eval' / 'eval_gen.json'))
        assert results['num_samples'] == 5 and np.isfinite(results['fid']), result.stdout


@pytest.mark.parametrize('cfg_scale', [1.0, 2.5])
def test_static_decode_step_samples_the_codes_of_the_dynamic_cache_path(cfg_scale):
    """sample.py's decode step (static shapes, a tensor position: what CUDA graphs replay) draws the same codes
    as feeding the KV cache at Python-int positions, for the same seed; a kept cache (the compiled path) is
    zeroed and reused by the next batch with the same result."""
    model = tiny_gpt(adaln=True)
    labels = torch.tensor([0, 3, 9, 5])
    weights = torch.full((model.seq_len,), cfg_scale) if cfg_scale != 1.0 else None
    static = sample_tokens(model, labels, weights, temperature=1.5,
                           generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)
    batch = torch.cat([labels, torch.full_like(labels, 10)]) if weights is not None else labels
    codes = torch.empty(4, 0, dtype=torch.long)
    with torch.no_grad():
        model.setup_kv_cache(len(batch))
        for t in range(model.seq_len):
            previous = None if t == 0 else codes[:, -1:]
            if previous is not None and weights is not None:
                previous = torch.cat([previous, previous])
            logits = model(batch, previous, start_pos=t)[:, -1]
            if weights is not None:
                cond, uncond = logits.chunk(2)
                logits = uncond + cfg_scale * (cond - uncond)
            codes = torch.cat([codes, sample_from_logits(logits, 1.5, generator=generator)[:, None]], 1)
        model.clear_kv_cache()
    assert torch.equal(static, codes) and len(codes.unique()) > 5
    kept = [sample_tokens(model, labels, weights, temperature=1.5, generator=torch.Generator().manual_seed(1),
                          decode_step=model.decode_step) for _ in range(2)]
    assert model.layers[0].attention.k_cache is not None  # kept for the next batch
    assert torch.equal(kept[0], static) and torch.equal(kept[1], static)
    model.clear_kv_cache()


def test_kv_cache_greedy_equals_full_recompute_with_1d_rope():
    """A 1D tokenizer's codes: 1D RoPE (every rotary pair turns with the position), the KV cache and the
    static decode step give what a full recompute gives."""
    torch.manual_seed(0)
    model = GPT(64, 10, 1, 16, n_layer=2, n_head=2, n_embd=32, rope='1d').eval()
    torch.nn.init.normal_(model.output.weight, std=1.0)
    assert torch.equal(model.rope_cos[:, 0], torch.cos(torch.arange(16.0)))  # pair 0 turns 1 rad per position
    labels = torch.tensor([0, 3, 9])
    cached = generate(model, labels, cfg_scale=2.0, top_k=1)
    codes = torch.empty(3, 0, dtype=torch.long)
    with torch.no_grad():
        for t in range(model.seq_len):
            logits = model(labels, codes)[:, -1]
            uncond = model(torch.full_like(labels, 10), codes)[:, -1]
            codes = torch.cat([codes, (uncond + 2.0 * (logits - uncond)).argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, codes) and len(codes.unique()) > 1
    with pytest.raises(ValueError, match="rope must be '2d'"):
        GPT(64, 10, 1, 16, n_layer=1, n_head=2, n_embd=32, rope='3d')


def run_in_process(monkeypatch, script, *args):
    """A script as __main__ in this process (no ~5 s interpreter and torch start-up per script)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, 'argv', [script, *args])
    runpy.run_path(os.path.join(ROOT, script), run_name='__main__')


@pytest.mark.slow
def test_1d_tokenizer_chain_tokenizer_codes_gpt_samples_entropy(tmp_path, monkeypatch, capsys):
    """config/smoke_1d.py (1D tokenizer, FVQ + cosine VCQ over 32 latent tokens) -> train_ar.py on its codes
    (1D RoPE) -> sample.py (K_t masking, codebook-size-aware CFG, 1D decoder) -> evaluate.py entropy, each a
    few iterations on the CPU."""
    tok, ar = tmp_path / 'tok', tmp_path / 'ar'
    run_in_process(monkeypatch, 'train_tokenizer.py', 'config/smoke_1d.py', f'--out_dir={tok}', '--max_iters=3',
                   '--eval_interval=3', '--log_interval=1', '--num_images=64', '--eval_images=8', '--batch_size=8',
                   '--base_batch_size=8')
    run_in_process(monkeypatch, 'train_ar.py', 'config/ar_smoke_1d.py', f'--tokenizer_ckpt={tok / "ckpt.pt"}',
                   f'--out_dir={ar}', '--num_images=12', '--max_iters=3', '--batch_size=4', '--log_interval=1',
                   '--ckpt_interval=3')
    meta = json.load(open(ar / 'codes' / 'meta.json'))
    assert meta['tokenizer_type'] == 'titok' and (meta['grid_h'], meta['grid_w']) == (1, 32)
    codes = np.load(ar / 'codes' / 'codes.npy')
    sizes = np.load(ar / 'codes' / 'codebook_sizes.npy')
    assert codes.shape == (24, 32) and sizes[0] == 2 and sizes[-1] == 256  # 12 images x {image, flip}
    assert (codes < sizes[None, :]).all()  # VCQ on 1D: position t never holds a code >= K_t
    checkpoint = torch.load(ar / 'ckpt.pt', weights_only=False)
    assert checkpoint['model_args']['rope'] == '1d' and checkpoint['iter_num'] == 3
    run_in_process(monkeypatch, 'sample.py', f'--ckpt={ar / "ckpt.pt"}', '--num_samples=4', '--batch_size=4',
                   '--cfg_scale=2.0', '--cfg_schedule=codebook_size_aware', '--grid_classes=(0, 1)',
                   '--grid_per_class=1', '--device=cpu')
    with np.load(ar / 'samples.npz') as f:
        assert f['arr_0'].shape == (4, 32, 32, 3) and f['arr_0'].dtype == np.uint8
    import evaluate
    config = {k: getattr(evaluate, k) for k in evaluate.config_keys}
    result = evaluate.run_entropy({**config, 'codes': str(ar / 'codes' / 'codes.npy'),
                                   'out_dir': str(tmp_path / 'eval')})
    assert result['num_sequences'] == 12 and result['seq_len'] == 32  # one view per image
    assert result['codebook_sizes'] == sizes.tolist() and result['t_star'] > 2  # K_1 = K_2 = 2: 1 bit each
    capsys.readouterr()


def test_multi_code_tokenizers_are_refused_by_name(tmp_path, monkeypatch):
    """rq / msvq tokenizers (FVQ Table 4) give several codes per position; the GPT models one."""
    from tokenizer import Tokenizer
    model_args = dict(TINY_TOKENIZER, quantizer='msvq', quantizer_args={'msvq_scales': (1, 4, 16)})
    atomic_save({'model': Tokenizer(**model_args).state_dict(), 'model_args': model_args, 'iter_num': 0,
                 'config': {'image_size': 32, 'data_dir': ''}}, str(tmp_path / 'tok.pt'))
    with pytest.raises(ValueError, match="multi-code tokenizer"):
        run_in_process(monkeypatch, 'train_ar.py', f'--tokenizer_ckpt={tmp_path / "tok.pt"}',
                       f'--codes_dir={tmp_path / "codes"}', f'--out_dir={tmp_path / "out"}', *TINY_RUN)
