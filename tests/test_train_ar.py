import json
import math
import os
import runpy
import sys

import numpy as np
import pytest
import torch

from tokenizer import CHECKPOINT_FORMAT
import torch.nn.functional as F

from conftest import ROOT, graph_counter
from tokenizer import Tokenizer, atomic_save
from train_ar import (GPT, GPT_PRESETS, gpt_model_args, rope_2d_angles, ffn_hidden_size, image_views,
                      peak_bf16_flops)
from sample import generate, sample_tokens

TINY_TOKENIZER = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, quantizer='vq',
                      codebook_size=64, code_dim=8)


def save_tiny_tokenizer(path, quantizer_args=None, image_size=32, seed=0):
    """A random tiny tokenizer checkpoint (32px -> 16x16 codes, K = 64), as train_tokenizer.py writes it."""
    torch.manual_seed(seed)
    model_args = dict(TINY_TOKENIZER, quantizer_args=quantizer_args)
    model = Tokenizer(**model_args)
    atomic_save({'kind': 'tokenizer', 'format': CHECKPOINT_FORMAT,
                 'model': model.state_dict(), 'model_args': model_args, 'iter_num': 0,
                 'config': {'image_size': image_size, 'data_dir': ''}}, str(path))
    return str(path)


def run_in_process(monkeypatch, script, *args):
    """A script as __main__ in this process (no interpreter and torch start-up per script)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, 'argv', [script, *args])
    runpy.run_path(os.path.join(ROOT, script), run_name='__main__')


pytestmark = pytest.mark.usefixtures('one_torch_thread')


def tiny_gpt(adaln=False, K=64, grid=4, seed=0, rope='2d'):
    torch.manual_seed(seed)
    grid_h, grid_w = (grid, grid) if rope == '2d' else (1, grid * grid)  # 1D: a sequence of T codes
    model = GPT(K, 10, grid_h, grid_w, n_layer=2, n_head=2, n_embd=32, adaln=adaln, rope=rope).eval()
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


def llamagen_freqs_cis(grid_h, grid_w, head_dim, rope='2d'):
    """LlamaGen's RoPE table as complex numbers (1 + T, head_dim // 2): a zero row for the class token (cos =
    sin = 0), then precompute_freqs_cis_2d's grid, code (r, c) at (r, c) with the row's frequencies first, or
    precompute_freqs_cis's code i at i; its frequencies, float32, as LlamaGen's."""
    if rope == '2d':
        half = head_dim // 2
        freqs = 1.0 / (10000 ** (torch.arange(0, half, 2)[: (half // 2)].float() / half))
        rows = torch.outer(torch.arange(grid_h), freqs)[:, None, :].expand(-1, grid_w, -1)
        cols = torch.outer(torch.arange(grid_w), freqs)[None, :, :].expand(grid_h, -1, -1)
        angles = torch.cat([rows, cols], dim=-1).flatten(0, 1)  # (grid_h * grid_w, head_dim // 2)
    else:
        freqs = 1.0 / (10000 ** (torch.arange(0, head_dim, 2)[: (head_dim // 2)].float() / head_dim))
        angles = torch.outer(torch.arange(grid_h * grid_w), freqs)
    return torch.cat([torch.zeros(1, head_dim // 2), torch.cos(angles)]) + 1j * torch.cat(
        [torch.zeros(1, head_dim // 2), torch.sin(angles)])


def llamagen_forward(state, labels, codes, n_head, freqs_cis):
    """LlamaGen's c2i GPT forward in eval mode (autoregressive/models/gpt.py), written out from its state_dict
    in float64: RMSNorm, wqkv, RoPE as the complex rotation of adjacent channel pairs by freqs_cis, causal
    attention, SwiGLU w2(silu(w1 x) * w3 x), norm, output -> logits (B, L + 1, K) of [class, codes (B, L)]."""
    state = {k: v.double() for k, v in state.items()}
    C = state['tok_embeddings.weight'].shape[1]
    head_dim, n_layer = C // n_head, 1 + max(int(k.split('.')[1]) for k in state if k.startswith('layers.'))

    def rms_norm(x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * state[name + '.weight']

    def rotate(t):  # (B, L, H, head_dim): the adjacent pairs (2i, 2i + 1) as complex numbers, turned
        pairs = torch.view_as_complex(t.reshape(*t.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(pairs * freqs_cis[:t.shape[1], None].to(torch.complex128)).flatten(-2)

    x = torch.cat([state['cls_embedding.embedding_table.weight'][labels][:, None],
                   state['tok_embeddings.weight'][codes]], dim=1)  # (B, L + 1, C)
    B, L = x.shape[:2]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    for i in range(n_layer):
        layer = lambda name: state[f'layers.{i}.{name}.weight']
        h = rms_norm(x, f'layers.{i}.attention_norm')
        q, k, v = (h @ layer('attention.wqkv').T).reshape(B, L, 3, n_head, head_dim).unbind(2)
        q, k, v = rotate(q).transpose(1, 2), rotate(k).transpose(1, 2), v.transpose(1, 2)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(head_dim)).masked_fill(~causal, float('-inf'))
        x = x + (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, C) @ layer('attention.wo').T
        h = rms_norm(x, f'layers.{i}.ffn_norm')
        x = x + (F.silu(h @ layer('feed_forward.w1').T) * (h @ layer('feed_forward.w3').T)) @ layer(
            'feed_forward.w2').T
    return rms_norm(x, 'norm') @ state['output.weight'].T


def llamagen_state_dict(model):
    # a nanoVQ GPT's weights under LlamaGen's names: wqkv, wo, the class table with the null class as last row
    state = {k.replace('.qkv.', '.wqkv.').replace('.proj.', '.wo.'): v for k, v in model.state_dict().items()}
    classes, null = state.pop('class_embedding.weight'), state.pop('null_class_embedding')
    return {**state, 'cls_embedding.embedding_table.weight': torch.cat([classes, null[None]])}


@pytest.mark.parametrize('rope', ['2d', '1d'])
def test_gpt_forward_is_llamagen_s(rope):
    """GPT's RoPE table is LlamaGen's (the class token's rows cos = sin = 0, code (r, c) at (r, c); 1D: code i
    at i), and its logits are LlamaGen's forward. The old table (class token at position 0, codes one further)
    fails both: its table differs, and the class token's identity rotation changes the logits (a shift of the
    codes alone is invisible to attention: it only sees differences of the codes' positions)."""
    model = tiny_gpt(rope=rope, seed=1)
    freqs_cis = llamagen_freqs_cis(model.grid_h, model.grid_w, 16, rope)  # (17, 8): head dim 16
    assert torch.equal(model.rope_cos, freqs_cis.real[:16])
    assert torch.equal(model.rope_sin, freqs_cis.imag[:16])
    if rope == '2d':  # code 6 at (1, 2): rows then columns, LlamaGen's frequencies 10000^(-2j / 8)
        freqs = 10000 ** -(torch.arange(4) / 4)
        torch.testing.assert_close(rope_2d_angles(4, 4, 16)[6], torch.cat([1 * freqs, 2 * freqs]))
    labels, codes = torch.tensor([0, 4, 10]), torch.randint(0, 64, (3, 15))  # 10 = the null class
    with torch.no_grad():
        logits = model(labels, codes)
    state = llamagen_state_dict(model)
    torch.testing.assert_close(logits, llamagen_forward(state, labels, codes, 2, freqs_cis).float(),
                               rtol=1e-5, atol=1e-5)
    old = torch.cat([torch.ones(1, 8), freqs_cis[1:]])  # the old class row: position 0, no rotation
    assert (logits - llamagen_forward(state, labels, codes, 2, old).float()).abs().max() > 1e-2


def test_ibq_adaln_is_seed_voken_s():
    """IBQ's adaLN as SEED-Voken's llama.py: per block one linear -> gamma1, gamma2, scale1, scale2, shift1,
    shift2; x + gamma1 * attention(norm(x) * (1 + scale1) + shift1), then the FFN's; a final adaLN (scale,
    shift) after the last norm; init N(0, 0.02) with the gamma rows x adaln_gamma, scale / shift x 0.5."""
    torch.manual_seed(0)
    C = 32
    model = GPT(64, 10, 4, 4, n_layer=2, n_head=2, n_embd=C, adaln=True, adaln_gamma=1e-3).eval()
    block = model.layers[0]
    weight, bias = block.adaln[1].weight, block.adaln[1].bias
    assert weight.shape == (6 * C, C) and not bias.any() and not model.final_adaln[1].bias.any()
    assert 1.5e-5 < weight[:2 * C].std() < 2.5e-5 and 0.8e-2 < weight[2 * C:].std() < 1.2e-2
    assert 0.8e-2 < model.final_adaln[1].weight.std() < 1.2e-2
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, cond = torch.randn(2, 16, C), model.embed_classes(torch.tensor([1, 10]))
    gamma1, gamma2, scale1, scale2, shift1, shift2 = (
        torch.nn.functional.linear(torch.nn.functional.silu(cond), weight, bias)[:, None].chunk(6, dim=-1))
    cos, sin = model.rope_cos, model.rope_sin
    h = x + block.attention(block.attention_norm(x) * (1 + scale1) + shift1, cos, sin) * gamma1
    expected = h + block.feed_forward(block.ffn_norm(h) * (1 + scale2) + shift2) * gamma2
    with torch.no_grad():
        torch.testing.assert_close(block(x, cond, cos, sin), expected)
        scale, shift = model.final_adaln(cond)[:, None].chunk(2, dim=-1)
        labels, codes = torch.tensor([1, 10]), torch.randint(0, 64, (2, 15))
        features = model.tok_embeddings(codes)
        hidden = torch.cat([cond[:, None], features], 1)
        for b in model.layers:
            hidden = b(hidden, cond, cos, sin)
        expected = model.output(model.norm(hidden) * (1 + scale) + shift)
        torch.testing.assert_close(model(labels, codes), expected)


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


@pytest.mark.parametrize('adaln, rope, cfg_scale', [(False, '2d', 1.0), (False, '2d', 3.0), (True, '2d', 1.0),
                                                     (True, '2d', 3.0), (False, '1d', 2.0)])
def test_kv_cache_greedy_equals_full_recompute(adaln, rope, cfg_scale):
    """The KV-cached decode (the class token, then one code per step at a tensor position) picks the codes a
    full recompute of the whole prefix picks, with and without adaLN and CFG, on a grid (2D RoPE) and on a 1D
    tokenizer's sequence (1D RoPE)."""
    model = tiny_gpt(adaln=adaln, rope=rope)
    if rope == '1d':  # rotary pair 0 turns 1 rad per position: the class token's row 0, code i at i
        assert torch.equal(model.rope_cos[:, 0], torch.cat([torch.zeros(1), torch.cos(torch.arange(15.0))]))
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


@pytest.mark.parametrize('cfg_scale', [1.0, 2.5])
def test_kept_kv_cache_is_zeroed_and_reused(cfg_scale):
    """sample.py's compiled decode step keeps the KV cache between batches: each batch zeroes and refills it
    in place and draws the codes of a fresh cache, for the same seed."""
    model = tiny_gpt(adaln=True)
    labels = torch.tensor([0, 3, 9, 5])
    weights = torch.full((model.seq_len,), cfg_scale) if cfg_scale != 1.0 else None
    fresh = sample_tokens(model, labels, weights, temperature=1.5, generator=torch.Generator().manual_seed(1))
    assert model.layers[0].attention.k_cache is None  # the eager path frees it
    kept = [sample_tokens(model, labels, weights, temperature=1.5, generator=torch.Generator().manual_seed(1),
                          decode_step=model.decode_step) for _ in range(2)]
    assert model.layers[0].attention.k_cache is not None  # kept for the next batch
    assert torch.equal(kept[0], fresh) and torch.equal(kept[1], fresh) and len(fresh.unique()) > 5
    model.clear_kv_cache()


def test_decode_step_compiles_to_one_graph_for_every_position():
    """What compile_decode_step hands to CUDA graphs: one full graph (no graph break, no host sync) that
    serves every position, and draws the eager codes."""
    backend, graphs = graph_counter()
    model = tiny_gpt(adaln=True)
    labels = torch.tensor([0, 3, 9])
    step = torch.compile(model.decode_step, backend=backend, fullgraph=True, dynamic=False)
    eager = generate(model, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    compiled = generate(model, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(0),
                        decode_step=step)
    torch._dynamo.reset()
    model.clear_kv_cache()
    assert torch.equal(eager, compiled) and len(graphs) == 1


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


def test_peak_bf16_flops_of_device_names(monkeypatch):
    expected = {'NVIDIA H100 80GB HBM3': 989e12, 'NVIDIA H100 PCIe': 756e12, 'NVIDIA H100 NVL': 835e12,
                'NVIDIA H200': 989e12, 'NVIDIA H800': 989e12, 'NVIDIA A100-SXM4-80GB': 312e12,
                'NVIDIA A100 80GB PCIe': 312e12, 'NVIDIA A800-SXM4-80GB': 312e12, 'NVIDIA L40S': 362e12,
                'NVIDIA GeForce RTX 4090': 165e12, 'NVIDIA A10G': 70e12, 'NVIDIA A10': 125e12,
                'NVIDIA GeForce RTX 3090': 0.0, 'NVIDIA RTX A1000': 0.0}
    found = {}
    for name in expected:
        monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device: name)
        found[name] = peak_bf16_flops('cuda:0')
    assert found == expected
    assert peak_bf16_flops('cpu') == 0.0  # no MFU on the CPU


# -----------------------------------------------------------------------------
# code extraction

def test_views_are_the_image_and_its_flip_without_ten_crop():
    images = torch.randn(2, 3, 32, 32)
    views = image_views(images, 32, False).reshape(2, 2, 3, 32, 32)
    assert torch.equal(views[:, 0], images) and torch.equal(views[:, 1], images.flip(-1))  # centre view 0


def test_ten_crops_are_llamagen_s():
    """LlamaGen reads at int(1.1 x size) (35 at 32, meta.json's read_size) and takes torchvision's TenCrop:
    five crops of the image, then the same five of the flipped image (whose corners are the other side's, and
    whose centre crop shifts by a pixel when the margin is odd); round() for the centre offset."""
    images = torch.randn(2, 3, 35, 35)
    views = image_views(images, 32, True).reshape(2, 10, 3, 32, 32)
    flipped = images.flip(-1)
    for i, image in enumerate((images, flipped)):  # margin 3: centre offset round(1.5) = 2
        expected = [image[..., :32, :32], image[..., :32, 3:], image[..., 3:, :32], image[..., 3:, 3:],
                    image[..., 2:34, 2:34]]
        for j, crop in enumerate(expected):
            assert torch.equal(views[:, 5 * i + j], crop), (i, j)
    assert torch.equal(views[:, 5], images[..., :32, 3:].flip(-1))  # flip of the top-right crop


# -----------------------------------------------------------------------------
# the training script

@pytest.fixture(scope='module')
def codes_setup(tmp_path_factory):
    """Tiny tokenizer + its codes (20 built-in images x 2 flip views), extracted once by train_ar.py
    (max_iters=0)."""
    root = tmp_path_factory.mktemp('ar')
    tok = save_tiny_tokenizer(root / 'tok.pt')
    codes_dir = str(root / 'codes')
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_in_process(monkeypatch, 'train_ar.py', f'--tokenizer_ckpt={tok}', f'--codes_dir={codes_dir}',
                       f'--out_dir={root / "x"}', '--device=cpu', '--num_images=20', '--ten_crop=False',
                       '--num_workers=0', '--max_iters=0')
    return root, tok, codes_dir


TINY_RUN = ['--device=cpu', '--ar_model=B', '--n_layer=2', '--n_head=2', '--n_embd=32', '--batch_size=4',
            '--learning_rate=3e-3', '--base_batch_size=4', '--num_workers=0', '--log_interval=1']


@pytest.mark.slow
def test_codes_extraction(codes_setup, monkeypatch):
    root, tok, codes_dir = codes_setup
    codes = np.load(os.path.join(codes_dir, 'codes.npy'))
    labels = np.load(os.path.join(codes_dir, 'labels.npy'))
    meta = json.load(open(os.path.join(codes_dir, 'meta.json')))
    assert codes.dtype == np.uint16 and codes.shape == (40, 256) and labels.shape == (40,)
    assert meta['grid_h'] == meta['grid_w'] == 16 and meta['codebook_size'] == 64 and not meta['vcq']
    assert meta['center_view'] == 0 and meta['read_size'] == 32  # the unflipped image of (image, flip)
    assert meta['dataset_images'] == 20  # the images read (evaluate.py counts rows with it)
    assert not os.path.exists(os.path.join(codes_dir, 'codebook_sizes.npy'))
    np.testing.assert_array_equal(labels, np.repeat(np.arange(20) % 10, 2))
    # the views are the image and its flip: encode image 3 here and compare
    from tokenizer import load_tokenizer, make_dataset
    tokenizer = load_tokenizer(tok)
    image = make_dataset('', 32, train=True, num_images=20, augment=False)[3][0][None]
    both = tokenizer.encode(torch.cat([image, image.flip(-1)])).reshape(2, 256)
    np.testing.assert_array_equal(codes[6:8], both.numpy())
    # other settings against the same folder are refused, and so is a meta.json without a key that defines
    # the codes (a folder of an older nanoVQ)
    meta_path = os.path.join(codes_dir, 'meta.json')
    json.dump({k: v for k, v in meta.items() if k != 'read_size'}, open(meta_path, 'w'))
    with pytest.raises(ValueError, match=r'num_images \(codes 20, now 30\), read_size \(codes None, now 32'):
        run_in_process(monkeypatch, 'train_ar.py', f'--tokenizer_ckpt={tok}', f'--codes_dir={codes_dir}',
                       '--num_images=30', f'--out_dir={root / "y"}', '--device=cpu', '--ten_crop=False',
                       '--max_iters=0')
    json.dump(meta, open(meta_path, 'w'))


@pytest.mark.slow
def test_resume_equals_uninterrupted(codes_setup, tmp_path, monkeypatch, capsys):
    root, tok, codes_dir = codes_setup
    common = ['train_ar.py', f'--tokenizer_ckpt={tok}', f'--codes_dir={codes_dir}', '--ten_crop=False',
              '--num_images=20', '--lr_schedule=constant', *TINY_RUN]
    run_in_process(monkeypatch, *common, f'--out_dir={tmp_path / "full"}', '--max_iters=6')
    run_in_process(monkeypatch, *common, f'--out_dir={tmp_path / "half"}', '--max_iters=3')
    capsys.readouterr()
    run_in_process(monkeypatch, *common, f'--out_dir={tmp_path / "half"}', '--max_iters=6',
                   '--init_from=resume', '--resume_allow=max_iters')
    assert 'resumed from' in capsys.readouterr().out
    # log.jsonl: the resumed run continued the file, each iteration once, with the uninterrupted run's losses
    logs = [[json.loads(line) for line in open(tmp_path / d / 'log.jsonl')][1:] for d in ('full', 'half')]
    assert [r['iter'] for r in logs[0]] == [r['iter'] for r in logs[1]] == [1, 2, 3, 4, 5, 6]
    assert [r['loss'] for r in logs[0]] == [r['loss'] for r in logs[1]]
    assert logs[0][-1]['loss'] < logs[0][0]['loss']  # it learns
    assert {r['lr'] for r in logs[0]} == {3e-3}  # 'constant' without warmup
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
    resume = [*common, f'--out_dir={tmp_path / "half"}', '--max_iters=8', '--init_from=resume']
    with pytest.raises(ValueError, match='n_embd'):
        run_in_process(monkeypatch, *resume, '--n_embd=64')
    # a changed experiment is refused unless allowed; where the run is watched from may change
    with pytest.raises(ValueError, match='batch_size') as error:
        run_in_process(monkeypatch, *resume, '--batch_size=8', '--log_interval=5')
    assert 'log_interval' not in str(error.value)
    # and a run from scratch does not overwrite the checkpoint
    with pytest.raises(FileExistsError, match='--init_from=resume'):
        run_in_process(monkeypatch, *common, f'--out_dir={tmp_path / "half"}', '--max_iters=6')
    assert torch.load(tmp_path / 'half' / 'ckpt.pt', weights_only=False)['iter_num'] == 6


@pytest.mark.slow
def test_annealing_lr_schedule_is_logged(codes_setup, tmp_path, monkeypatch):
    """FVQ Table 6's annealing: warmup from 0.005x over warmup_frac of max_iters, 1x for constant_frac of the
    steps AFTER warmup, then linear decay to 0.01x at max_iters. log.jsonl's record for iter i holds the lr
    of iteration i - 1."""
    root, tok, codes_dir = codes_setup
    run_in_process(monkeypatch, 'train_ar.py', f'--tokenizer_ckpt={tok}', f'--codes_dir={codes_dir}',
                   '--ten_crop=False', '--num_images=20', f'--out_dir={tmp_path}', *TINY_RUN, '--n_layer=1',
                   '--max_iters=8', '--lr_schedule=annealing', '--warmup_frac=0.25', '--constant_frac=0.5')
    records = [json.loads(line) for line in open(tmp_path / 'log.jsonl')][1:]  # after the config record
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


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_and_the_last_checkpoint_stays(codes_setup, tmp_path, monkeypatch):
    """The loss turns NaN from the third step: the log of iteration 3 stops the run, naming the iteration; a
    resume that logs less often stops at the save of iteration 4 (NaN weights by then). The iteration-2
    checkpoint stays as it was."""
    root, tok, codes_dir = codes_setup
    log_softmax, calls = F.log_softmax, []

    def nan_from_the_third_step(x, *args, **kwargs):
        calls.append(1)
        return log_softmax(x, *args, **kwargs) * (math.nan if len(calls) >= 3 else 1.0)
    monkeypatch.setattr(F, 'log_softmax', nan_from_the_third_step)
    run = ['train_ar.py', f'--tokenizer_ckpt={tok}', f'--codes_dir={codes_dir}', '--ten_crop=False',
           '--num_images=20', f'--out_dir={tmp_path}', *TINY_RUN, '--max_iters=6', '--ckpt_interval=2']
    with pytest.raises(FloatingPointError, match='non-finite loss at iteration 3: loss;.* learning_rate bel'):
        run_in_process(monkeypatch, *run)
    saved = (tmp_path / 'ckpt.pt').read_bytes()
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=False)['iter_num'] == 2
    with pytest.raises(FloatingPointError, match='non-finite weights at iteration 4: '):
        run_in_process(monkeypatch, *run, '--init_from=resume', '--log_interval=10')
    assert (tmp_path / 'ckpt.pt').read_bytes() == saved


@pytest.mark.parametrize('bad, key', [
    ('--batch_size=0', 'batch_size'), ('--max_iters=-1', 'max_iters'), ('--log_interval=0', 'log_interval'),
    ('--ckpt_interval=0', 'ckpt_interval'), ('--warmup_frac=1.5', 'warmup_frac'),
    ('--learning_rate=-1.0', 'learning_rate'), ('--lr_schedule=step', 'lr_schedule'),
    ('--n_head=5', 'n_embd'),  # 32 channels over 5 heads
    ('--n_embd=40', 'n_embd'),  # 4 heads of 10 channels: 2D RoPE turns 5 pairs, not half per axis
    ('--ar_model=M', 'ar_model')])
def test_every_range_is_checked_before_the_codes_are_extracted(bad, key, tmp_path, monkeypatch):
    import tokenizer
    monkeypatch.setattr(tokenizer, 'load_tokenizer', lambda *args, **kwargs: 1 / 0)  # never extracts
    tok = save_tiny_tokenizer(tmp_path / 'tok.pt')
    with pytest.raises(ValueError) as error:
        run_in_process(monkeypatch, 'train_ar.py', f'--tokenizer_ckpt={tok}', f'--out_dir={tmp_path / "out"}',
                       *TINY_RUN, '--n_head=4', '--max_iters=2', bad)
    assert str(error.value).startswith((f"{key} must be ", f"unknown {key} ")), error.value
    assert not os.path.exists(tmp_path / 'out')


def test_codes_of_a_retrained_tokenizer_are_not_reused(tmp_path, monkeypatch):
    """A tokenizer retrained in place (same path, same iteration, another seed) has other weights: the codes
    extracted from the old one are refused, naming the fingerprint."""
    tok = save_tiny_tokenizer(tmp_path / 'tok.pt')
    ar = ['train_ar.py', f'--tokenizer_ckpt={tok}', f'--codes_dir={tmp_path / "codes"}', '--num_images=2',
          '--ten_crop=False', '--num_workers=0', '--device=cpu', '--max_iters=0',
          f'--out_dir={tmp_path / "ar"}']
    run_in_process(monkeypatch, *ar)
    run_in_process(monkeypatch, *ar)  # same tokenizer: the codes are reused
    save_tiny_tokenizer(tmp_path / 'tok.pt', seed=7)  # retrained in place, same iteration
    with pytest.raises(ValueError, match='tokenizer_fingerprint'):
        run_in_process(monkeypatch, *ar)


def test_a_checkpoint_of_the_other_kind_is_named(tmp_path, monkeypatch):
    tok = save_tiny_tokenizer(tmp_path / 'tok.pt')
    gpt = str(tmp_path / 'gpt.pt')
    atomic_save({'kind': 'gpt', 'format': CHECKPOINT_FORMAT, 'model': {}, 'model_args': {}}, gpt)
    with pytest.raises(ValueError, match="is a gpt checkpoint"):
        run_in_process(monkeypatch, 'train_ar.py', f'--tokenizer_ckpt={gpt}', f'--out_dir={tmp_path / "x"}',
                       *TINY_RUN)
    assert not os.path.exists(tmp_path / 'x')  # nothing was created for a run that could not start
    with pytest.raises(ValueError, match='is a tokenizer checkpoint'):
        run_in_process(monkeypatch, 'sample.py', f'--ckpt={tok}', '--device=cpu')


@pytest.mark.slow
def test_whole_chain_tokenizer_codes_gpt_samples(tmp_path, monkeypatch, capsys):
    """tokenizer checkpoint -> ten-crop codes -> train_ar.py -> sample.py -> evaluate.py --mode=gen, all on
    CPU."""
    tok = save_tiny_tokenizer(tmp_path / 'tok.pt')
    out = tmp_path / 'ar'
    run_in_process(monkeypatch, 'train_ar.py', f'--tokenizer_ckpt={tok}', f'--out_dir={out}',
                   '--num_images=10', *TINY_RUN, '--max_iters=4')
    assert capsys.readouterr().out.count('MFU n/a') == 4
    codes = np.load(out / 'codes' / 'codes.npy', mmap_mode='r')
    assert codes.shape == (100, 256)  # 10 images x 10 crops
    meta = json.load(open(out / 'codes' / 'meta.json'))
    assert meta['center_view'] == 4 and meta['read_size'] == 35  # TenCrop's centre crop; int(1.1 x 32)
    checkpoint = torch.load(out / 'ckpt.pt', weights_only=False)
    assert checkpoint['codebook_sizes'] is None and checkpoint['tokenizer_ckpt'] == tok
    run_in_process(monkeypatch, 'sample.py', f'--ckpt={out / "ckpt.pt"}', '--num_samples=5', '--batch_size=5',
                   '--cfg_scale=2.0', '--cfg_schedule=cosine', '--cfg_power=1.5', '--top_k=20',
                   '--grid_classes=(1, 4)', '--grid_per_class=2', '--device=cpu')
    with np.load(out / 'samples.npz') as f:
        assert f['arr_0'].shape == (5, 32, 32, 3) and f['arr_0'].dtype == np.uint8
        np.testing.assert_array_equal(f['arr_1'], np.arange(5) % 10)
    from PIL import Image
    assert Image.open(out / 'samples_grid.png').size == (2 * 128, 2 * 128)  # enlarged 4x
    if os.path.isfile(os.path.join(ROOT, 'evaluate.py')):
        import evaluate
        torch.manual_seed(0)
        torch.save(evaluate.FIDInceptionV3().state_dict(), tmp_path / 'inception_random.pth')
        run_in_process(monkeypatch, 'evaluate.py', '--mode=gen', f'--samples={out / "samples.npz"}',
                       f'--ref={out / "samples.npz"}',
                       f'--inception_weights={tmp_path / "inception_random.pth"}',
                       f'--out_dir={tmp_path / "eval"}', '--device=cpu')
        results = json.load(open(tmp_path / 'eval' / 'eval_gen.json'))
        assert results['num_samples'] == 5 and np.isfinite(results['fid'])


@pytest.mark.slow
def test_1d_tokenizer_chain_tokenizer_codes_gpt_samples_entropy(tmp_path, monkeypatch, capsys):
    """config/smoke_1d.py (1D tokenizer, FVQ + cosine VCQ over 32 latent tokens) -> train_ar.py on its codes
    (1D RoPE) -> sample.py (K_t masking, codebook-size-aware CFG, 1D decoder) -> evaluate.py entropy, each a
    few iterations on the CPU."""
    tok, ar = tmp_path / 'tok', tmp_path / 'ar'
    run_in_process(monkeypatch, 'train_tokenizer.py', 'config/smoke_1d.py', f'--out_dir={tok}',
                   '--max_iters=3', '--eval_interval=3', '--log_interval=1', '--num_images=64',
                   '--eval_images=8', '--batch_size=8', '--base_batch_size=8')
    run_in_process(monkeypatch, 'train_ar.py', 'config/ar_smoke_1d.py', f'--tokenizer_ckpt={tok / "ckpt.pt"}',
                   f'--out_dir={ar}', '--num_images=12', '--max_iters=3', '--batch_size=4',
                   '--log_interval=1', '--ckpt_interval=3')
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
    model_args = dict(TINY_TOKENIZER, quantizer='msvq', quantizer_args={'msvq_scales': (1, 4, 16)})
    atomic_save({'kind': 'tokenizer', 'format': CHECKPOINT_FORMAT,
                 'model': Tokenizer(**model_args).state_dict(), 'model_args': model_args,
                 'iter_num': 0, 'config': {'image_size': 32, 'data_dir': ''}}, str(tmp_path / 'tok.pt'))
    with pytest.raises(ValueError, match="tokenizer_ckpt must be one code per position, not a multi-code"):
        run_in_process(monkeypatch, 'train_ar.py', f'--tokenizer_ckpt={tmp_path / "tok.pt"}',
                       f'--codes_dir={tmp_path / "codes"}', f'--out_dir={tmp_path / "out"}', *TINY_RUN)
    assert not os.path.exists(tmp_path / 'out') and not os.path.exists(tmp_path / 'codes')
