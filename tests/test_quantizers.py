"""Tests of quantizers.py: plain VQ, IBQ (chunked autograd function vs the formula), FVQ / VQBridge, VCQ
schedules, usage counting, RQ and VAR's multi-scale VQ, the FVQ export, and adding a kind."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import graph_counter
import quantizers as Q


def grid(z_flat, H, W):
    # (B*H*W, D) tokens -> (B, D, H, W), the inverse of the quantizers' (B, D, H, W) -> (N, D)
    return z_flat.reshape(-1, H, W, z_flat.shape[1]).permute(0, 3, 1, 2)


# -----------------------------------------------------------------------------
# plain VQ

def test_vq_chunked_equals_unchunked():
    torch.manual_seed(0)
    z, codebook = torch.randn(1000, 16), torch.randn(300, 16)
    full = Q.nearest_codes(z, codebook, chunk_size=1000)
    reference = torch.cdist(z.double(), codebook.double()).argmin(1)  # float64: no ties on random data
    assert torch.equal(full, reference)
    for chunk_size in (3, 7, 128, 333, 999, 5000):
        assert torch.equal(Q.nearest_codes(z, codebook, chunk_size), full), chunk_size
    # and through the module, with several chunk sizes
    outputs = []
    for chunk_size in (13, 64, 4096):
        torch.manual_seed(1)
        q = Q.make_quantizer('vq', 300, 16, chunk_size=chunk_size, l2_norm=False)
        outputs.append(q(grid(z, 10, 10))[2]['indices'])
    assert all(torch.equal(o, outputs[0]) for o in outputs)


@pytest.mark.parametrize('l2_norm', [False, True])
def test_vq_module_equals_reference_formula_with_auto_chunks(l2_norm, monkeypatch):
    """VectorQuantizer with the automatic chunk size = vq_reference's whole (N, K) matrix in codes, loss and
    both gradients."""
    assert Q.chunk_rows(0, 16384, Q.VQ_CHUNK_ELEMENTS, Q.VQ_MIN_ROWS) == 8192
    assert Q.chunk_rows(0, 262144, Q.VQ_CHUNK_ELEMENTS, Q.VQ_MIN_ROWS) == 512
    assert Q.chunk_rows(0, 262144, Q.IBQ_CHUNK_ELEMENTS, Q.IBQ_MIN_ROWS) == 1024
    assert Q.chunk_rows(0, 16384, Q.IBQ_CHUNK_ELEMENTS, Q.IBQ_MIN_ROWS) == 1024
    assert Q.chunk_rows(500, 16384, 1, 1024) == 500  # a given chunk size is kept
    monkeypatch.setattr(Q, 'VQ_MIN_ROWS', 64)  # a small budget: 10 chunks of 64 tokens at K = 256
    monkeypatch.setattr(Q, 'VQ_CHUNK_ELEMENTS', 64 * 256)
    torch.manual_seed(0)
    q = Q.make_quantizer('vq', 256, 16, l2_norm=l2_norm)
    z = torch.randn(2, 16, 15, 20, requires_grad=True)
    z_q, loss, info = q(z)
    upstream = torch.randn_like(z_q)
    ((z_q * upstream).sum() + loss).backward()
    codebook_grad, q.embedding.grad = q.embedding.grad, None
    z_ref = z.detach().clone().requires_grad_(True)
    z_flat = z_ref.permute(0, 2, 3, 1).reshape(-1, 16)  # (B, D, H, W) -> (B*H*W, D)
    z_flat = F.normalize(z_flat, dim=-1) if l2_norm else z_flat
    z_q_ref, loss_ref, indices_ref = Q.vq_reference(z_flat, q.codebook(), 0.25)
    ((z_q_ref * upstream.permute(0, 2, 3, 1).reshape(-1, 16)).sum() + loss_ref).backward()
    assert torch.equal(info['indices'].reshape(-1), indices_ref)
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(z.grad, z_ref.grad)
    torch.testing.assert_close(codebook_grad, q.embedding.grad)


@pytest.mark.parametrize('kind', ['vq', 'ibq'])
def test_codebook_gradient_repeats_exactly_on_a_multithreaded_cpu(kind):
    """Many tokens on few codes, two threads: the codebook gradient is the same sum in the same order every
    run (indexing's backward, codebook[indices], adds in a thread-dependent order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        # ibq: the chunked function (its index_add_ backward)
        q = Q.make_quantizer(kind, 256, 256, l2_norm=False, chunk_size=512)
        # 1,024 tokens around 8 centres: few codes, and a different codebook-loss gradient from every token
        centres = torch.randn(8, 256)[torch.randint(0, 8, (1024,))]
        z = grid(centres + 0.01 * torch.randn(1024, 256), 32, 32)
        grads = []
        for _ in range(5):
            q.zero_grad()
            z_q, loss, info = q(z)
            loss.backward()
            grads.append(q.embedding.grad.clone())
        assert info['indices'].unique().numel() <= 8
        assert all(torch.equal(g, grads[0]) for g in grads)
    finally:
        torch.set_num_threads(threads)


def test_vq_hand_made_codes_loss_and_straight_through_gradient():
    q = Q.make_quantizer('vq', 3, 2, l2_norm=False, beta=0.25, chunk_size=2)
    with torch.no_grad():
        q.embedding.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    tokens = torch.tensor([[0.1, 0.2], [0.9, 0.1], [0.2, 0.7], [1.2, -0.1]])  # nearest: 0, 1, 2, 1
    z = grid(tokens, 2, 2).clone().requires_grad_(True)  # (1, 2, 2, 2)
    z_q, loss, info = q(z)
    assert info['indices'].reshape(-1).tolist() == [0, 1, 2, 1]
    codes = q.embedding.detach()[[0, 1, 2, 1]]
    assert torch.allclose(grid(codes, 2, 2), z_q)
    mse = ((codes - tokens) ** 2).mean()  # (0.05 + 0.02 + 0.13 + 0.05) / 8
    assert math.isclose(mse.item(), 0.25 / 8, rel_tol=1e-6)
    assert math.isclose(loss.item(), 1.25 * mse.item(), rel_tol=1e-6)
    assert math.isclose(info['codebook_loss'], mse.item(), rel_tol=1e-6)
    upstream = torch.randn_like(z_q)
    ((z_q * upstream).sum() + loss).backward()
    # straight-through: dz = upstream + beta * d mean((z - sg z_q)^2) / dz
    expected_dz = upstream + 0.25 * 2 * (z.detach() - z_q.detach()) / tokens.numel()
    assert torch.allclose(z.grad, expected_dz, atol=1e-7)
    # codebook: d mean((z_q - sg z)^2) / dc_k = sum over tokens using k of 2 (c_k - z) / numel
    expected_dc = torch.zeros(3, 2).index_add_(0, torch.tensor([0, 1, 2, 1]),
                                               2 * (codes - tokens) / tokens.numel())
    assert torch.allclose(q.embedding.grad, expected_dc, atol=1e-7)


def test_l2_norm():
    torch.manual_seed(0)
    q = Q.make_quantizer('vq', 50, 8)  # LlamaGen default: l2-normalised
    assert q.l2_norm and q.normalize_forward and not Q.make_quantizer('ibq', 50, 8).l2_norm
    assert not Q.make_quantizer('fvq', 64, 8, bridge_group_size=16).normalize_forward  # init-time only
    assert torch.allclose(q.codebook().norm(dim=1), torch.ones(50))
    z = torch.randn(2, 8, 3, 3)
    z_q, _, info = q(z)
    assert torch.allclose(z_q.norm(dim=1), torch.ones(2, 3, 3), atol=1e-6)  # normalised codes come out
    assert torch.allclose(z_q, q.lookup(info['indices']), atol=1e-6)
    scale = torch.rand(2, 1, 3, 3) * 10 + 0.1  # a positive per-token scale does not change the nearest code
    assert torch.equal(q(z * scale)[2]['indices'], info['indices'])
    q_raw = Q.make_quantizer('vq', 50, 8, l2_norm=False)
    assert not torch.allclose(q_raw.codebook().norm(dim=1), torch.ones(50))
    # IBQ with l2_norm: logits are cosine similarities
    q_ibq = Q.make_quantizer('ibq', 50, 8, l2_norm=True)
    z_q, _, info = q_ibq(z)
    assert torch.allclose(z_q.norm(dim=1), torch.ones(2, 3, 3), atol=1e-5)
    cos = F.normalize(z.permute(0, 2, 3, 1), dim=-1) @ F.normalize(q_ibq.embedding, dim=-1).t()
    assert torch.equal(info['indices'], cos.argmax(-1))


def test_llamagen_init_unit_norm_codes():
    torch.manual_seed(0)
    for kind, extra in (('vq', {}), ('fvq', {'bridge_group_size': 16, 'bridge_dim': 32})):
        # LlamaGen: uniform(+-1/K), then normalised
        q = Q.make_quantizer(kind, 16384, 8, l2_norm=True, **extra)
        assert torch.allclose(q.embedding.norm(dim=1), torch.ones(16384), atol=1e-6), kind
        raw = Q.make_quantizer(kind, 16384, 8, l2_norm=False, **extra)
        assert raw.embedding.abs().max() <= 1 / 16384 and raw.embedding.norm(dim=1).max() < 1e-3


def test_fvq_l2_norm_is_init_time_only_and_gradients_stay_finite():
    """The release's --codebook-l2-norm normalises the raw codes once; the mapped codes and z are never
    normalised in the forward (behind the zero-initialised bridge that would divide by ~0)."""
    torch.manual_seed(0)
    q = Q.make_quantizer('fvq', 576, 256, l2_norm=True)
    assert torch.allclose(q.embedding.norm(dim=1), torch.ones(576), atol=1e-6)
    assert torch.count_nonzero(q.codebook()) == 0  # the mapped codes at step 0: not normalised
    z = torch.randn(4, 256, 8, 8, requires_grad=True)
    z_q, loss, _ = q(z)
    assert torch.count_nonzero(z_q) == 0  # every token takes a (zero) mapped code at step 0
    ((z_q * torch.randn_like(z_q)).sum() + loss).backward()
    grads = [p.grad for p in q.parameters() if p.grad is not None] + [z.grad]
    assert all(torch.isfinite(g).all() for g in grads)
    assert max(g.abs().max().item() for g in grads) < 10
    assert q.projector.expand.weight.grad.abs().sum() > 0  # the bridge starts learning at once


# -----------------------------------------------------------------------------
# IBQ: the formula with whole (N, K) matrices == the chunked autograd function

def ibq_step(q, z, upstream):
    # one forward + backward -> z_q, loss, indices, entropy terms, dL/dz, dL/dcodebook
    z.grad, q.embedding.grad = None, None
    z_q, loss, info = q(z)
    ((z_q.float() * upstream).sum() + loss).backward()
    entropies = torch.stack([info['sample_entropy'], info['avg_entropy']])
    return z_q.detach(), loss.detach(), info['indices'], entropies, z.grad.clone(), q.embedding.grad.clone()


@pytest.mark.parametrize('entropy_weight,temperature,use_schedule',
                         [(0.3, 0.01, False), (0.3, 1.0, True), (0.0, 0.5, True), (0.0, 0.5, False)])
def test_ibq_chunked_function_equals_the_formula(entropy_weight, temperature, use_schedule, monkeypatch):
    """The module's forward is the formula while the (N, K) block fits one chunk's budget, the chunked
    autograd function beyond it: the same values and gradients, with and without VCQ's mask and the entropy
    terms; ibq_reference is the formula with its loss."""
    calls, chunked = [], Q.ibq_chunked

    def counted(*args):
        calls.append(args[-1])  # the chunk size
        return chunked(*args)

    monkeypatch.setattr(Q, 'ibq_chunked', counted)
    N, K, D, H, W = 300, 97, 16, 10, 30
    schedule = dict(vcq_schedule='cosine', vcq_k_min=2, vcq_seq_len=H * W) if use_schedule else {}
    upstream = torch.randn(1, D, H, W)
    results = []
    for chunk_size in (0, 7, 128):  # 0: 300 x 97 fits the budget (the formula); 7, 128: chunks
        torch.manual_seed(1)
        q = Q.make_quantizer('ibq', K, D, chunk_size=chunk_size, entropy_weight=entropy_weight,
                             entropy_temperature=temperature, **schedule)
        z = grid(torch.randn(N, D), H, W).requires_grad_(True)
        results.append(ibq_step(q, z, upstream))
    assert calls == [7, 128]
    whole = results[0]
    for chunked_result in results[1:]:
        assert torch.equal(whole[2], chunked_result[2])
        for a, b in zip(whole[:2] + whole[3:], chunked_result[:2] + chunked_result[3:]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item() + 1e-7)
    assert whole[-1].abs().sum(1).gt(0).all()  # IBQ: every code gets a gradient
    if use_schedule:
        assert torch.all(whole[2] < q.codebook_sizes.reshape(1, H, W))
    sizes = q.codebook_sizes if use_schedule else None  # (every q and z above: the same values)
    z_q, loss, indices = Q.ibq_reference(z.detach().permute(0, 2, 3, 1).reshape(N, D), q.embedding.detach(),
                                         0.25, entropy_weight, temperature, sizes)
    assert torch.equal(indices, whole[2].reshape(-1))
    torch.testing.assert_close(loss, whole[1], rtol=1e-4, atol=1e-6)


def test_ibq_loss_is_the_release_line():
    """SEED-Voken's double quantization loss, beta on the codebook term, values and both gradients; eq. 12
    as printed (beta on the commitment term) has the same value but moves z and the codes differently."""

    def release_loss(z, codebook, beta, eq_12=False):
        soft = (z @ codebook.t()).softmax(1)
        hard = F.one_hot((z @ codebook.t()).argmax(1), codebook.shape[0]).float()
        z_q, z_q_2 = (hard - soft.detach() + soft) @ codebook, hard @ codebook
        if eq_12:  # |z_q - z|^2 + |sg[z] - z_q'|^2 + beta |z - sg[z_q']|^2
            return (((z_q - z) ** 2).mean() + ((z.detach() - z_q_2) ** 2).mean()
                    + beta * ((z - z_q_2.detach()) ** 2).mean())
        # torch.mean((z_q - z)**2) + torch.mean((z_q_2.detach()-z)**2)
        #     + beta * torch.mean((z_q_2 - z.detach()) ** 2)
        return (((z_q - z) ** 2).mean() + ((z_q_2.detach() - z) ** 2).mean()
                + beta * ((z_q_2 - z.detach()) ** 2).mean())

    torch.manual_seed(0)
    for chunk_size in (0, 9):  # the formula and the chunked function
        q = Q.make_quantizer('ibq', 40, 8, chunk_size=chunk_size, entropy_weight=0.0, beta=0.25)
        z = torch.randn(50, 8, requires_grad=True)
        z_q, loss, _ = q(grid(z, 5, 10))
        loss.backward()
        grads = z.grad.clone(), q.embedding.grad.clone()
        z.grad, q.embedding.grad = None, None
        loss_ref = release_loss(z, q.embedding, 0.25)
        loss_ref.backward()
        torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(grads, (z.grad, q.embedding.grad), rtol=0, atol=1e-6)
    z.grad = None
    release_loss(z, q.embedding, 0.25, eq_12=True).backward()
    assert not torch.allclose(grads[0], z.grad, atol=1e-4)


@pytest.mark.parametrize('chunk_size', [0, 64])  # the formula, the chunked function
def test_ibq_backward_under_bf16_autocast_multiplies_in_bf16(chunk_size):
    """Under a bf16 autocast (the release's 16-mixed) IBQ's forward (logits, argmax, z_q, loss) stays float32
    exactly and its backward products take bf16: gradients within bf16 rounding of float32's (the chunked
    function's as the release's 16-mixed, the formula's by the autocast around backward())."""
    torch.manual_seed(0)
    q = Q.make_quantizer('ibq', 97, 16, chunk_size=chunk_size, entropy_weight=0.3, entropy_temperature=0.5)
    z = torch.randn(1, 16, 10, 30, requires_grad=True)
    upstream = torch.randn(1, 16, 10, 30)
    full = ibq_step(q, z, upstream)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = ibq_step(q, z, upstream)
    for a, b in zip(full[:4], low[:4]):
        assert torch.equal(a, b)
    for a, b in zip(full[4:], low[4:]):
        assert not torch.equal(a, b)
        assert (a - b).norm() < 1e-2 * a.norm()


@pytest.mark.parametrize('kind', ['fvq', 'ibq'])
def test_fused_pieces_compile_to_what_they_compute_eagerly(kind, monkeypatch):
    """On a GPU the bridge and IBQ's chunk functions run compiled (fused); here they are compiled on the CPU
    (dynamo + AOTAutograd, the aot_eager backend: the same graphs and backward, no kernel build) and must
    give the eager values and gradients, VCQ masks included."""
    torch.manual_seed(0)
    options = dict(bridge_zero_init=False, bridge_dim=32) if kind == 'fvq' else dict(chunk_size=64)
    q = Q.make_quantizer(kind, 64, 8, vcq_schedule='cosine', vcq_k_min=2, vcq_seq_len=100, **options)
    z = torch.randn(3, 8, 10, 10, requires_grad=True)
    upstream = torch.randn(3, 8, 10, 10)

    def step():
        z.grad = None
        q.zero_grad(set_to_none=True)
        z_q, loss, info = q(z)
        ((z_q * upstream).sum() + loss).backward()
        return [z_q, loss, info['indices'], z.grad] + [p.grad for p in q.parameters()]

    eager = step()
    monkeypatch.setattr(Q, 'FUSE_DEVICES', ('cpu',))
    monkeypatch.setattr(Q, '_fused_functions', {})
    compile_ = torch.compile
    monkeypatch.setattr(torch, 'compile', lambda fn, **kw: compile_(fn, backend='aot_eager', **kw))
    compiled = step()
    expected = {'fvq': [Q.VQBridge.map_codes], 'ibq': [Q._ibq_chunk_stats, Q._ibq_chunk_grads]}[kind]
    assert list(Q._fused_functions) == expected
    for a, b in zip(eager, compiled):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)


class RecordShapes(TorchDispatchMode):
    """Records the shape of every tensor any aten op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize('kind', ['vq', 'ibq', 'fvq'])
def test_no_tokens_by_codes_matrix_beyond_chunk(kind):
    torch.manual_seed(0)
    K, D, chunk_size = 400, 16, 64  # 600 tokens; K*D and N*D are both smaller than chunk_size*K
    extra = {'bridge_group_size': 16, 'bridge_dim': 32} if kind == 'fvq' else {}
    q = Q.make_quantizer(kind, K, D, chunk_size=chunk_size, **extra)
    z = torch.randn(1, D, 20, 30, requires_grad=True)
    recorder = RecordShapes()
    with recorder:
        z_q, loss, _ = q(z)
        ((z_q * torch.randn_like(z_q)).sum() + loss).backward()
    matrices = [shape for shape in recorder.shapes if len(shape) == 2]  # (not the 1-D usage record)
    by_codes = [shape for shape in matrices if K in shape and shape != (K, D)]
    assert by_codes and max(shape[0] if shape[1] == K else shape[1] for shape in by_codes) <= chunk_size
    assert max(math.prod(shape) for shape in matrices) <= chunk_size * K


def test_cosine_vq_backward_touches_only_the_picked_codes():
    """LlamaGen's cosine VQ: the gradient reaches the codebook only through the N picked codes, so the
    backward makes (K, D) tensors only for the codebook's gradient, and it equals the gradient through the
    whole normalised codebook."""
    torch.manual_seed(0)
    K, D = 4096, 8
    q = Q.make_quantizer('vq', K, D)  # l2_norm=True
    z = torch.randn(1, D, 4, 8, requires_grad=True)
    z_q, loss, info = q(z)
    upstream = torch.randn_like(z_q)
    recorder = RecordShapes()
    with recorder:
        ((z_q * upstream).sum() + loss).backward()
    assert sum(shape == (K, D) for shape in recorder.shapes) <= 3  # the gradient's zeros, index_add, detach
    codebook_grad, q.embedding.grad = q.embedding.grad, None
    z_flat = F.normalize(z.detach().permute(0, 2, 3, 1).reshape(-1, D), dim=-1)
    z_q_ref, loss_ref, indices_ref = Q.vq_reference(z_flat, q.codebook(), 0.25)  # normalised in autograd
    ((z_q_ref * upstream.permute(0, 2, 3, 1).reshape(-1, D)).sum() + loss_ref).backward()
    assert torch.equal(info['indices'].reshape(-1), indices_ref)
    torch.testing.assert_close(codebook_grad, q.embedding.grad)


# -----------------------------------------------------------------------------
# FVQ / VQBridge

def test_vqbridge_shapes_and_groups():
    torch.manual_seed(0)
    q = Q.make_quantizer('fvq', 256, 8, bridge_group_size=16, bridge_dim=32, chunk_size=5)
    assert isinstance(q.projector, Q.VQBridge) and q.projector.pos_embed.shape == (16, 32)
    assert q.codebook().shape == (256, 8)
    assert torch.count_nonzero(q.codebook()) == 0  # zero-initialised final layer, as DiT / the release
    assert Q.bridge_group_size_for(16384) == 16 and Q.bridge_group_size_for(65536) == 64  # QBridge-L/4, L/8
    assert Q.bridge_group_size_for(262144) == 64 and Q.bridge_group_size_for(256) == 1
    assert Q.bridge_group_size_for(4096) == 4 and Q.bridge_group_size_for(1024) == 1
    assert Q.bridge_group_size_for(10000) == 4  # 9 = 3 x 3 does not tile the 100 x 100 image: 2 x 2
    for projector in ('linear', 'mlp5'):
        assert Q.make_quantizer('fvq', 100, 8, projector=projector).codebook().shape == (100, 8)
    with pytest.raises(ValueError, match=r'g=16.*bridge_group_size=1'):  # 4 x 4 does not tile 10 x 10
        Q.make_quantizer('fvq', 100, 8, bridge_group_size=16)
    with pytest.raises(ValueError, match=r'K=128 is not a square.*K=121'):
        Q.make_quantizer('fvq', 128, 8)


@pytest.mark.parametrize('K,group_size', [(64, 4), (256, 16), (1024, 1)])
def test_vqbridge_tokens_are_the_release_patches(K, group_size):
    """The release's layout (yfChang-cv/FVQ): codebook (K, D) -> image (D, sqrt K, sqrt K) -> p x p patches in
    raster order; bridge token t holds the codes of patch t, and expanding puts them back (a round trip)."""
    torch.manual_seed(0)
    D, side, p = 4, math.isqrt(K), math.isqrt(group_size)
    bridge = Q.VQBridge(K, D, group_size, dim=group_size * D, heads=1)
    bridge.compress, bridge.expand, bridge.final_norm = nn.Identity(), nn.Identity(), nn.Identity()
    bridge.blocks, bridge.pos_embed = nn.ModuleList(), torch.zeros_like(bridge.pos_embed)  # bridge = identity
    seen = {}
    bridge.compress.register_forward_hook(lambda module, inputs, output: seen.update(tokens=output))
    codes = torch.randn(K, D)
    image = codes.T.reshape(D, side, side)
    grid = side // p
    patches = torch.stack([image[:, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(1, 2, 0).reshape(-1)
                           for r in range(grid) for c in range(grid)])  # (T, p*p*D), slot by slot
    with torch.no_grad():
        mapped = bridge.map_codes(codes)
    torch.testing.assert_close(seen['tokens'], patches, rtol=0, atol=0)
    torch.testing.assert_close(mapped, codes, rtol=0, atol=0)


def test_fvq_bridge_runs_once_per_forward_and_trains():
    torch.manual_seed(0)
    q = Q.make_quantizer('fvq', 64, 8, bridge_group_size=16, bridge_dim=32, chunk_size=4)
    torch.nn.init.normal_(q.projector.expand.weight, std=0.1)  # as after some training: distinct mapped codes
    calls = []
    q.projector.register_forward_hook(lambda *args: calls.append(1))
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    z_q, loss, info = q(z)  # 32 tokens in 8 chunks
    assert len(calls) == 1
    upstream = torch.randn_like(z_q)
    ((z_q * upstream).sum() + loss).backward()
    assert q.embedding.grad.abs().sum() > 0 and q.projector.compress.weight.grad.abs().sum() > 0
    assert torch.allclose(z_q, q.lookup(info['indices']), atol=1e-6)  # forward value = mapped codes
    mapped = q.codebook().detach()
    z_flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 8)
    assert torch.equal(info['indices'].reshape(-1), torch.cdist(z_flat.double(), mapped.double()).argmin(1))


# -----------------------------------------------------------------------------
# VCQ

def test_schedule_means_match_vcq_table_2():
    # VCQ Table 2, K-bar column: all K_min = 2, T = 256
    for kind, k_max, k_bar in (('linear', 16384, 8193), ('cosine', 16384, 5964), ('power', 16384, 4696),
                               ('cosine', 11264, 4100)):
        sizes = Q.codebook_size_schedule(kind, 2, k_max, 256, gamma=2.5)
        assert sizes.dtype == torch.long and sizes.shape == (256,)
        assert sizes[0] == 2 and sizes[-1] == k_max and torch.all(sizes[1:] >= sizes[:-1])
        assert round(sizes.double().mean().item()) == k_bar, kind
    assert torch.equal(Q.codebook_size_schedule('constant', 2, 512, 10), torch.full((10,), 512))
    with pytest.raises(ValueError, match='schedule'):
        Q.codebook_size_schedule('quadratic', 2, 512, 10)
    with pytest.raises(ValueError, match='vcq_k_min'):
        Q.codebook_size_schedule('linear', 600, 512, 10)


@pytest.mark.parametrize('kind', ['vq', 'ibq', 'fvq'])
def test_vcq_never_returns_index_beyond_k_t(kind):
    torch.manual_seed(0)
    K, H, W = 64, 4, 4
    extra = {'bridge_group_size': 16, 'bridge_dim': 32} if kind == 'fvq' else {}
    plain = Q.make_quantizer(kind, K, 8, chunk_size=50, **extra)
    q = Q.make_quantizer(kind, K, 8, chunk_size=50, vcq_schedule='linear', vcq_k_min=2, vcq_seq_len=H * W,
                         **extra)
    if kind == 'fvq':
        torch.nn.init.normal_(q.projector.expand.weight, std=0.1)
    plain.load_state_dict(q.state_dict(), strict=False)
    assert plain.codebook_sizes is None and q.codebook_sizes.shape == (H * W,)
    assert 'codebook_sizes' in q.state_dict() and 'codebook_sizes' not in plain.state_dict()
    z = torch.randn(16, 8, H, W) * 3
    _, _, info = q(z)
    limit = q.codebook_sizes.reshape(1, H, W)
    assert torch.all(info['indices'] < limit)
    assert torch.any(plain(z)[2]['indices'] >= limit)  # without the schedule some would be out of range
    with pytest.raises(ValueError, match='4x5'):
        q(torch.randn(1, 8, 4, 5))


# -----------------------------------------------------------------------------
# usage counting, perplexity, the kinds and their options

def test_recent_codes_semantics():
    counter = Q.RecentCodes(10, 8)
    counter.record(torch.tensor([0, 1, 2]))
    assert counter.usage().item() == pytest.approx(0.3) and counter.tokens_seen.item() == 3
    counter.record(torch.tensor([3, 4, 5, 6, 7]))
    assert counter.usage().item() == pytest.approx(0.8)
    counter.record(torch.tensor([8, 8]))
    assert counter.usage().item() == pytest.approx(0.7)  # the window: 2..8, 0 and 1 fell out
    counter.record(torch.arange(10))
    assert counter.usage().item() == pytest.approx(0.8)  # a batch longer than the window: its last 8
    # usage(n) = distinct codes among the last n recorded, after many shifts, for every n <= size
    stream = [2, 3, 4, 5, 6, 7, 8, 9]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        batch = torch.randint(0, 10, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g)
        counter.record(batch)
        stream += batch.tolist()
        for n in (1, 3, 8):
            assert counter.usage(n).item() == pytest.approx(len(set(stream[-n:])) / 10)
    q = Q.make_quantizer('vq', 1000, 4)
    assert q.recent_codes.size == 65536  # max(65536, K + 1) (the release's window) and 10 K (usage)
    assert Q.make_quantizer('vq', 7000, 2).recent_codes.size == 70000
    assert not any(k.startswith('recent_codes.') for k in q.state_dict())


def test_usage_can_reach_100_percent_where_the_window_cannot():
    """A perfectly uniform code stream over K = 65,536 codes: the release's window (max(65536, K + 1) tokens)
    shows about 1 - 1/e, the 10 K-token count about all of them."""
    K = 65536
    counter = Q.RecentCodes(K, 10 * K)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        counter.record(torch.randint(0, K, (K,), generator=g))
    assert 0.62 < counter.usage(K + 1).item() < 0.64
    assert counter.usage(10 * K).item() > 0.999


def test_info_usage_and_perplexity():
    q = Q.make_quantizer('vq', 8, 2, l2_norm=False)
    with torch.no_grad():
        q.embedding.copy_(torch.tensor([[float(k), 0.0] for k in range(8)]))
    # 4 codes, equally often
    tokens = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]).repeat(4, 1)
    _, _, info = q(grid(tokens, 4, 4))
    stats = Q.quantizer_stats(q, info['indices'])
    assert torch.is_tensor(stats['usage']) and stats['usage'].item() == pytest.approx(50.0)
    assert stats['usage_tokens'].item() == 16 and stats['window_usage'].item() == pytest.approx(50.0)
    assert stats['perplexity'].item() == pytest.approx(4.0, rel=1e-5) and 'bridge_live_slots' not in stats
    assert info['indices'].dtype == torch.long and info['indices'].shape == (1, 4, 4)
    assert set(info) == {'indices', 'codebook_loss', 'commit_loss'} and info['commit_loss'].ndim == 0
    window = q.recent_codes.recent.clone()
    q.eval()  # eval forwards (held-out evaluation, code extraction) read the counts but do not write them
    _, _, info = q(grid(torch.tensor([[7.0, 0.0]]).repeat(16, 1), 4, 4))
    stats = Q.quantizer_stats(q, info['indices'])
    assert torch.equal(q.recent_codes.recent, window) and stats['usage'].item() == pytest.approx(50.0)
    assert stats['perplexity'].item() == pytest.approx(1.0)  # the perplexity is the given batch's
    fvq = Q.make_quantizer('fvq', 64, 4)
    _, _, info = fvq(torch.randn(1, 4, 4, 4))
    live_slots = Q.quantizer_stats(fvq, info['indices'])['bridge_live_slots']
    assert torch.equal(live_slots, fvq.projector.live_slots())


@pytest.mark.parametrize('kind', ['vq', 'msvq'])  # (vq, ibq, fvq inside a tokenizer: test_tokenizer.py)
def test_compiled_quantizer_does_not_recompile_from_step_to_step(kind):
    """The usage records change at every training step; nothing torch.compile treats as a constant may (a
    Python int that moved would make a compiled tokenizer recompile at every step)."""
    counting_backend, graphs = graph_counter()
    scales = {'msvq_scales': (1, 2, 4)} if kind == 'msvq' else {}
    q = Q.make_quantizer(kind, 64, 8, **scales)
    q.recent_codes = Q.RecentCodes(64, 40)  # a 40-token record: the oldest drop out from the third step
    compiled = torch.compile(q, backend=counting_backend)
    for _ in range(4):
        z_q, loss, _ = compiled(torch.randn(1, 8, 4, 4, requires_grad=True))
        (z_q.sum() + loss).backward()
    compiles = len(graphs)
    for _ in range(3):
        _, _, info = compiled(torch.randn(1, 8, 4, 4, requires_grad=True))
    assert compiles > 0 and len(graphs) == compiles
    per_step = 1 + 4 + 16 if kind == 'msvq' else 16  # msvq: the codes of its three scales
    assert q.recent_codes.tokens_seen.item() == 7 * per_step
    last = Q.flat_codes(info['indices']).reshape(-1)
    assert torch.equal(q.recent_codes.recent[-per_step:], last)  # the newest records: the last step's codes


def test_kinds_options_and_errors():
    assert Q.quantizer_options('ibq') == ['beta', 'l2_norm', 'entropy_weight', 'entropy_temperature',
                                          'chunk_size', 'vcq_schedule', 'vcq_k_min', 'vcq_seq_len']
    vq, fvq, rq = (set(Q.quantizer_options(kind)) for kind in ('vq', 'fvq', 'rq'))
    assert fvq - vq == {'projector'} and rq - fvq == {'rq_depth'}  # the partials' fixed keywords
    assert 'vcq_schedule' not in Q.quantizer_options('msvq') and 'msvq_scales' in Q.quantizer_options('msvq')
    with pytest.raises(TypeError, match=r"\['entropy_wieght'\].*'entropy_weight'"):
        Q.make_quantizer('ibq', 64, 8, entropy_wieght=0.1)
    with pytest.raises(TypeError, match='projector'):
        Q.make_quantizer('vq', 64, 8, projector='linear')  # 'vq' fixes it: use 'fvq'
    with pytest.raises(TypeError, match="'rq_depth'"):
        Q.make_quantizer('vq', 64, 8, rq_depth=2)
    with pytest.raises(ValueError, match="unknown quantizer 'lfq'.*'vq'"):
        Q.make_quantizer('lfq', 64, 8)
    with pytest.raises(ValueError, match='rq_depth'):
        Q.make_quantizer('rq', 64, 8, rq_depth=0)


class ToyScalarQuantizer(torch.nn.Module):
    """A new kind: one scalar per position (D = 1), tanh-bounded and rounded to one of K levels (FSQ-like)."""

    def __init__(self, codebook_size, dim, *, sharpness=1.0):
        super().__init__()
        self.codebook_size, self.dim, self.codebook_sizes = codebook_size, dim, None
        self.sharpness = sharpness
        self.recent_codes = Q.RecentCodes(codebook_size, 10 * codebook_size)

    def codebook(self):
        return torch.linspace(-1, 1, self.codebook_size)[:, None]  # (K, 1)

    def lookup(self, indices):
        return self.codebook()[indices].permute(0, 3, 1, 2)  # (B, H, W) -> (B, 1, H, W)

    def forward(self, z):
        bounded = torch.tanh(self.sharpness * z)  # (B, 1, H, W)
        indices = torch.round((bounded[:, 0] + 1) / 2 * (self.codebook_size - 1)).long()  # (B, H, W)
        if self.training:
            self.recent_codes.record(indices)
        z_q = bounded + (self.lookup(indices) - bounded).detach()  # straight-through
        return z_q, (z_q.detach() - bounded).square().mean(), {'indices': indices}


def test_a_new_kind_is_one_class_and_one_line(monkeypatch):
    from tokenizer import Tokenizer
    monkeypatch.setitem(Q.QUANTIZERS, 'toy', ToyScalarQuantizer)
    q = Q.make_quantizer('toy', 16, 1, sharpness=2.0)
    assert isinstance(q, ToyScalarQuantizer) and q.sharpness == 2.0
    assert Q.quantizer_options('toy') == ['sharpness']
    with pytest.raises(TypeError, match=r"\['beta'\].*\['sharpness'\]"):
        Q.make_quantizer('toy', 16, 1, beta=0.25)
    torch.manual_seed(0)
    model = Tokenizer(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, quantizer='toy', codebook_size=16,
                      code_dim=1, quantizer_args={'sharpness': 2.0})
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, loss, info = model(images)
    (recon.square().mean() + loss).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # through the straight-through estimator
    codes = model.eval().encode(images)  # (eval: not recorded)
    assert codes.shape == (2, 8, 8) and torch.equal(codes, info['indices'])
    assert torch.allclose(model.decode(codes), recon, atol=1e-5)
    assert Q.quantizer_stats(model.quantizer, codes)['usage_tokens'].item() == 2 * 64


# -----------------------------------------------------------------------------
# FVQ checkpoint -> plain VQ checkpoint

@pytest.mark.parametrize('kind, options, exported_kind', [
    ('fvq', {}, 'vq'),
    ('rq', {'rq_depth': 3}, 'rq'),
    ('msvq', {'projector': 'vqbridge', 'msvq_scales': (1, 2, 4, 8), 'l2_norm': True}, 'msvq')])
def test_fvq_export_to_plain_vq_gives_identical_indices_and_reconstructions(kind, options, exported_kind):
    from tokenizer import Tokenizer
    torch.manual_seed(0)
    model_args = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, dropout=0.0, quantizer=kind,
                      codebook_size=64, code_dim=8,
                      quantizer_args={'bridge_group_size': 16, 'bridge_dim': 32, 'chunk_size': 7, **options})
    fvq_model = Tokenizer(**model_args).eval()
    torch.nn.init.normal_(fvq_model.quantizer.projector.expand.weight, std=0.1)  # distinct mapped codes
    ckpt = {'model': fvq_model.state_dict(), 'model_args': model_args, 'config': {'image_size': 16},
            'optimizer': {'state': {}}, 'iter_num': 3}
    vq_ckpt = Q.fvq_to_vq_checkpoint(ckpt)
    assert (vq_ckpt['model_args']['quantizer'] == exported_kind and 'optimizer' not in vq_ckpt
            and vq_ckpt['iter_num'] == 3)
    assert not any('projector' in k for k in vq_ckpt['model'])
    vq_model = Tokenizer(**vq_ckpt['model_args'])
    vq_model.load_state_dict(vq_ckpt['model'])
    vq_model.eval()
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    indices = fvq_model.encode(images)
    flat = Q.flat_codes(indices)
    assert len(flat.unique()) > 1
    assert torch.equal(Q.flat_codes(vq_model.encode(images)), flat)
    assert torch.allclose(vq_model.decode(indices), fvq_model.decode(indices), atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(vq_model(images)[0], fvq_model(images)[0], atol=1e-6)
    with pytest.raises(ValueError, match='projected codebook'):
        Q.fvq_to_vq_checkpoint(vq_ckpt)


def test_code_usage():
    usage, perplexity = Q.code_usage(torch.tensor([5, 5, 0, 5, 5, 0, 0, 0]))
    assert usage.item() == 0.5 and abs(perplexity.item() - 4.0) < 1e-12
    usage, perplexity = Q.code_usage(torch.tensor([1, 0, 0, 0]))
    assert usage.item() == 0.25 and perplexity.item() == 1.0


# -----------------------------------------------------------------------------
# RQ (residual VQ over one shared codebook; FVQ Table 4)

def test_rq_depth_one_is_plain_vq_and_shapes():
    torch.manual_seed(0)
    rq = Q.make_quantizer('rq', 64, 8, rq_depth=1, projector='', l2_norm=False)
    vq = Q.make_quantizer('vq', 64, 8, l2_norm=False)
    vq.load_state_dict(rq.state_dict())
    z = torch.randn(2, 8, 3, 5)
    (zq_r, loss_r, info_r), (zq_v, loss_v, info_v) = rq(z), vq(z)
    assert torch.equal(zq_r, zq_v) and torch.equal(loss_r, loss_v)
    assert torch.equal(info_r['indices'], info_v['indices']) and info_r['indices'].shape == (2, 3, 5)
    deep = Q.make_quantizer('rq', 64, 8, projector='', l2_norm=False)  # RQ-VAE's depth 4 by default
    z_q, loss, info = deep(z)
    assert info['indices'].shape == (2, 3, 5, 4)
    assert Q.quantizer_stats(deep, info['indices'])['usage_tokens'].item() == 2 * 3 * 5 * 4  # all depths
    torch.testing.assert_close(deep.lookup(info['indices']), z_q)  # the codes of a position add up to z_q
    assert list(Q.code_levels(info['indices'])) == ['depth1', 'depth2', 'depth3', 'depth4']


def test_rq_error_never_grows_with_depth_and_chunks_do_not_matter():
    """Each level takes the code nearest to what the previous ones left; with the zero vector among the codes
    the residual can only shrink. The chunk size changes nothing."""
    torch.manual_seed(0)
    z = torch.randn(2, 16, 6, 7)
    errors = []
    for depth in (1, 2, 4, 6):
        outputs = []
        for chunk_size in (5, 1000):
            torch.manual_seed(1)
            q = Q.make_quantizer('rq', 128, 16, rq_depth=depth, chunk_size=chunk_size, projector='',
                                 l2_norm=False)
            with torch.no_grad():
                q.embedding.mul_(200.0)[0] = 0.0  # codes of the scale of z (not +-1/K), one of them zero
            outputs.append(q(z))
        assert torch.equal(outputs[0][2]['indices'], outputs[1][2]['indices'])
        assert torch.equal(outputs[0][1], outputs[1][1])
        errors.append((outputs[0][0] - z).pow(2).mean().item())
    assert all(b <= a + 1e-7 for a, b in zip(errors, errors[1:])) and errors[-1] < 0.8 * errors[0], errors


def test_rq_gradients_reach_the_raw_codebook_through_the_bridge():
    torch.manual_seed(0)
    q = Q.make_quantizer('rq', 64, 8, projector='vqbridge', bridge_group_size=4, bridge_dim=32,
                         bridge_zero_init=False)
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    z_q, loss, info = q(z)
    ((z_q * torch.randn_like(z_q)).sum() + loss).backward()
    assert q.embedding.grad is not None and q.embedding.grad.abs().sum() > 0
    assert z.grad.abs().sum() > 0 and info['indices'].shape == (2, 4, 4, 4)


# -----------------------------------------------------------------------------
# msvq (VAR's multi-scale residual VQ; FVQ Table 4)

def test_msvq_at_one_scale_is_plain_vq_up_to_phi():
    torch.manual_seed(0)
    z = torch.randn(2, 8, 4, 4)
    vq = Q.make_quantizer('vq', 64, 8, l2_norm=False)
    ms = Q.make_quantizer('msvq', 64, 8, msvq_scales=(4,))
    with torch.no_grad():
        vq.embedding.copy_(ms.embedding)
    (zq_m, loss_m, info_m), (zq_v, loss_v, info_v) = ms(z), vq(z)
    assert len(info_m['indices']) == 1 and torch.equal(info_m['indices'][0], info_v['indices'])
    torch.testing.assert_close(zq_m, ms._upsampled(zq_v, 0, 4, 4))  # f_hat = phi(VQ's z_q)
    # l2_norm (VAR's using_znorm): the code of largest cosine similarity, as VQ with l2_norm picks it
    ms = Q.make_quantizer('msvq', 64, 8, msvq_scales=(4,), l2_norm=True)
    cosine = F.normalize(z.permute(0, 2, 3, 1), dim=-1) @ F.normalize(ms.embedding, dim=-1).t()  # (B,H,W,K)
    assert torch.equal(ms(z)[2]['indices'][0], cosine.argmax(-1))


def test_msvq_shapes_token_count_lookup_and_chunking():
    torch.manual_seed(0)
    z = torch.randn(2, 8, 16, 16)
    outputs = []
    for chunk_size in (97, 0):
        torch.manual_seed(1)
        q = Q.make_quantizer('msvq', 64, 8, chunk_size=chunk_size)  # VAR's 10 scales
        outputs.append(q(z))
    (z_q, loss, info), (z_q2, loss2, info2) = outputs
    assert [i.shape for i in info['indices']] == [(2, s, s) for s in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]
    assert Q.flat_codes(info['indices']).shape == (2, 680)
    assert q.recent_codes.tokens_seen.item() == 2 * 680
    assert torch.equal(z_q, z_q2) and torch.equal(loss, loss2)
    assert all(torch.equal(a, b) for a, b in zip(info['indices'], info2['indices']))
    torch.testing.assert_close(q.lookup(info['indices']), z_q)  # the scales' codes add up to z_q
    assert list(Q.code_levels(info['indices'])) == [f'scale{s}x{s}' for s in Q.VAR_SCALES]
    with pytest.raises(ValueError, match='last of msvq_scales'):
        q(torch.randn(1, 8, 8, 8))
    with pytest.raises(ValueError, match='msvq_scales'):
        Q.make_quantizer('msvq', 64, 8, msvq_scales=(4, 2))
    with pytest.raises(TypeError, match='vcq_schedule'):
        Q.make_quantizer('msvq', 64, 8, vcq_schedule='cosine')


def test_msvq_phi_choice_matches_var():
    """VAR's PhiPartiallyShared (4 convolutions) picks, for scale si of S, the phi whose tick is nearest
    si / (S - 1); transcribed with numpy."""
    import numpy as np
    ticks = np.linspace(1 / 3 / 4, 1 - 1 / 3 / 4, 4)
    for scales in (Q.VAR_SCALES, (1, 2, 4)):
        q = Q.make_quantizer('msvq', 16, 4, msvq_scales=scales)
        S = len(scales)
        assert q.phi_of_scale == [int(np.argmin(np.abs(ticks - si / (S - 1)))) for si in range(S)]


def test_msvq_gradients_reach_the_raw_codebook_through_the_bridge_and_phi():
    torch.manual_seed(0)
    q = Q.make_quantizer('msvq', 64, 8, projector='vqbridge', bridge_group_size=4, bridge_dim=32,
                         bridge_zero_init=False, msvq_scales=(1, 2, 4))
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    z_q, loss, info = q(z)
    ((z_q * torch.randn_like(z_q)).sum() + loss).backward()
    assert q.embedding.grad is not None and q.embedding.grad.abs().sum() > 0
    used = set(q.phi_of_scale)  # 3 scales of 4 convs: one is unused
    assert len(used) == 3 and all((q.phi[i].weight.grad is not None) == (i in used) for i in range(4))
    assert all(q.phi[i].weight.grad.abs().sum() > 0 for i in used)
    assert z.grad.abs().sum() > 0
