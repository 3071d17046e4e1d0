"""
All vector quantizers of nanoVQ in one file:
  - plain VQ (LlamaGen): nearest code by squared Euclidean distance, straight-through estimator.
  - FVQ (VQBridge): plain VQ against a codebook mapped by a small transformer (or a linear / MLP-5 projector).
  - IBQ (Index Backpropagation Quantization): straight-through on the one-hot index over softmax(z . C^T), so
    every code gets a gradient.
  - VCQ: any of them with a per-position codebook size K_t (token t may only use the first K_t codes).
Every quantizer maps z (B, D, H, W) -> (z_q (B, D, H, W), loss scalar, info dict) and counts the codes of its
recent training tokens to report codebook usage; info holds tensors (no host sync inside the training step:
read them once per log interval). The (tokens x K) distance / logit matrices only ever exist for `chunk_size`
tokens at a time, so K = 262,144 with 8,192 tokens never materialises the whole (8192 x 262144) matrix.
The quantization arithmetic runs in float32 with autocast off: bf16 distances cannot separate 262k codes
(IBQ's backward alone multiplies its dL/dlogits in the autocast dtype, as the release trains).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# VCQ codebook-size schedule (VCQ paper section 3; means checked against its Table 2)

def codebook_size_schedule(kind, k_min, k_max, seq_len, gamma=2.5):
    """K_t for t = 0 .. seq_len-1: K_t = round(k_min + (k_max - k_min) * s(t / (seq_len - 1)))."""
    if not 1 <= k_min <= k_max:
        raise ValueError(f"codebook_size_schedule needs 1 <= k_min <= k_max, "
                         f"got k_min={k_min}, k_max={k_max}")
    if seq_len < 1:
        raise ValueError(f"codebook_size_schedule needs seq_len >= 1, got {seq_len}")
    x = torch.arange(seq_len, dtype=torch.float64) / max(seq_len - 1, 1)
    if kind == 'constant':
        s = torch.ones_like(x)
    elif kind == 'linear':
        s = x
    elif kind == 'cosine':
        s = 1 - torch.cos(math.pi * x / 2)
    elif kind == 'power':
        s = x ** gamma
    else:
        raise ValueError(f"unknown codebook size schedule '{kind}'; "
                         f"expected 'constant', 'linear', 'cosine' or 'power'")
    return torch.round(k_min + (k_max - k_min) * s).long()


# -----------------------------------------------------------------------------
# pieces shared by all quantizers

FUSE_DEVICES = ('cuda',)  # where fused() compiles; () runs everything eagerly (the tests add 'cpu')
_fused_functions = {}


def fused(fn, device):
    """fn compiled by torch.compile (static shapes) on the devices of FUSE_DEVICES, fn itself elsewhere and
    inside an enclosing torch.compile (which traces it into its own graph). For the launch-bound and the
    memory-bound pieces: the bridge (~300 small ops over 1,024 tokens, CPU-bound on a GPU when run op by op)
    and IBQ's element-wise chunk work (one pass over the (n, K) block per op when eager)."""
    if device.type not in FUSE_DEVICES or torch.compiler.is_compiling():
        return fn
    if fn not in _fused_functions:
        _fused_functions[fn] = torch.compile(fn, dynamic=False)
    return _fused_functions[fn]


def _check_input(z, dim):
    if z.dim() != 4 or z.shape[1] != dim:
        raise ValueError(f"quantizer expects z of shape (B, {dim}, H, W), got {tuple(z.shape)}")


def _tokens_first(z):
    # (B, D, H, W) -> (B*H*W, D), raster order within each image
    B, D, H, W = z.shape
    return z.permute(0, 2, 3, 1).reshape(B * H * W, D)


def _channels_first(z_flat, B, H, W):
    # (B*H*W, D) -> (B, D, H, W)
    return z_flat.reshape(B, H, W, -1).permute(0, 3, 1, 2)


def _too_big_codes(scores, sizes):
    # VCQ section 3: token t may only use the first K_t codes. scores (n, K) of n tokens whose sizes K_t are
    # sizes (n,) -> (n, K) bool, True where code k is beyond its token's size; None without VCQ (sizes None).
    # Every quantizer's search (and IBQ's softmax) masks with this.
    if sizes is None:
        return None
    return torch.arange(scores.shape[1], device=scores.device)[None, :] >= sizes[:, None]


# chunk_size = 0 (auto): rows of the (rows, K) blocks of the chunked loops from an element budget per block
# (VQ's distances: 2^27 = 512 MB in float32; IBQ keeps ~4 such blocks alive: 2^24), but at least a floor of
# rows below which re-reading the (K, D) codebook once per chunk costs about as much as the block itself.
# K = 262,144, N = 8,192 on an H100 (README): VQ 512 rows (a 512 MB block; 1.1 GB peak), IBQ 1,024 rows
# (bf16 backward 43.7 ms, 3.5 GB; 2,048 rows: 41.6 ms, 6.0 GB; before the saved row statistics, float32 512 rows:
# 60.7 ms, 2.4 GB, 1,024 rows: 56.7 ms)
VQ_CHUNK_ELEMENTS, IBQ_CHUNK_ELEMENTS = 2 ** 27, 2 ** 24
VQ_MIN_ROWS, IBQ_MIN_ROWS = 512, 1024


def chunk_rows(chunk_size, K, element_budget, min_rows):
    return chunk_size or max(min_rows, element_budget // K)


def _chunk_sizes(token_codebook_sizes, start, n):
    # the VCQ sizes K_t of tokens start .. start + n - 1 of a chunked loop, or None without VCQ
    return None if token_codebook_sizes is None else token_codebook_sizes[start:start + n]


@torch.no_grad()
def nearest_codes(z_flat, codebook, chunk_size, token_codebook_sizes=None):
    """Index of the nearest code (squared Euclidean) for each row of z_flat (N, D) among codebook (K, D).
    Works on chunk_size tokens at a time (0: chunk_rows' choice for K) so at most (chunk_size, K) distances
    exist at once. token_codebook_sizes (N,) long (VCQ): token n may only pick codes < token_codebook_sizes[n]."""
    N, K = z_flat.shape[0], codebook.shape[0]
    chunk_size = chunk_rows(chunk_size, K, VQ_CHUNK_ELEMENTS, VQ_MIN_ROWS)
    code_sq = (codebook * codebook).sum(1)  # (K,); |z|^2 is the same for every code, so it is left out
    indices = []
    for start in range(0, N, chunk_size):
        z_chunk = z_flat[start:start + chunk_size]  # (n, D)
        dist = torch.addmm(code_sq, z_chunk, codebook.t(), alpha=-2.0)  # (n, K) = |c|^2 - 2 z.c
        too_big = _too_big_codes(dist, _chunk_sizes(token_codebook_sizes, start, chunk_size))
        if too_big is not None:
            dist.masked_fill_(too_big, float('inf'))
        indices.append(dist.argmin(1))
        del dist  # before the next chunk's is allocated: one (chunk, K) block at a time, not two
    return indices[0] if len(indices) == 1 else torch.cat(indices)  # (N,)


def code_usage(counts):
    """counts (K,) of each code over a set of tokens -> (fraction of the K codes used, perplexity exp(H) of
    the code distribution), as 0-d float64 tensors on counts' device (no host sync)."""
    counts = counts.double()
    p = counts / counts.sum()
    return (counts > 0).double().mean(), torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum())


def flat_codes(indices):
    """An image's codes as one sequence (B, T): (B, h, w) grids and 1D (B, L) codes in raster order,
    rq's (B, h, w, depth) position by position, msvq's per-scale list [(B, s, s)] coarse to fine (VAR's)."""
    if isinstance(indices, (list, tuple)):
        return torch.cat([i.flatten(1) for i in indices], 1)
    return indices.flatten(1)


def code_levels(indices):
    """{level name: (B, n) codes} for multi-code quantizers, one entry per rq depth ('depth1', ...) or msvq scale
    ('scale1x1', ...); {} for single-code maps. For usage per level (evaluate.py --mode=recon)."""
    if isinstance(indices, (list, tuple)):
        return {f'scale{i.shape[-1]}x{i.shape[-1]}': i.flatten(1) for i in indices}
    if indices.dim() == 4:
        return {f'depth{d + 1}': indices[..., d].flatten(1) for d in range(indices.shape[-1])}
    return {}


def _code_counts(codes, bins):
    # (bins,) histogram of the codes, any shape (index_add_ rather than bincount: no host sync on GPU)
    codes = codes.reshape(-1)
    return torch.zeros(bins, device=codes.device).index_add_(0, codes, torch.ones(codes.numel(), device=codes.device))


def _perplexity(indices, K):
    # the batch's code histogram -> its perplexity
    return code_usage(_code_counts(indices, K))[1]


class RecentCodes(nn.Module):
    """The codes of the most recent `size` training tokens, oldest first, shifted in place (a concatenation and
    a copy per step, no host sync). usage(n) = fraction of the K codes seen at least once among the last
    n <= size of them, counted only when read (once per log interval). Only training forwards record; eval
    forwards (held-out evaluation, code extraction) leave it alone. Not saved in checkpoints
    (persistent=False): usage is a running statistic, and it is per rank under DDP."""

    def __init__(self, K, size):
        super().__init__()
        self.K, self.size = K, size
        # slot value K marks an empty slot; it is counted in an extra last bin that is never read
        self.register_buffer('recent', torch.full((size,), K, dtype=torch.long), persistent=False)
        self.register_buffer('tokens_seen', torch.zeros((), dtype=torch.long), persistent=False)

    @torch.no_grad()
    def record(self, indices):
        # the shift passes over the buffer twice (tens of MB at K = 262,144: microseconds on a GPU) and saves
        # the 5 kernel launches per step of a ring buffer's slot arithmetic; a batch longer than the buffer:
        # only its last `size` are kept
        indices = indices.reshape(-1)[-self.size:]
        self.recent.copy_(torch.cat((self.recent[indices.numel():], indices)))
        self.tokens_seen += indices.numel()

    def counts(self, last):
        # (K,) histogram of the last `last` recorded codes
        return _code_counts(self.recent[self.size - last:], self.K + 1)[:-1]

    def usage(self, last=None):
        return code_usage(self.counts(last or self.size))[0]  # 0-d tensor

    def window_tokens(self, last=None):
        return self.tokens_seen.clamp(max=last or self.size)  # tokens the usage is counted over


def _check_common(chunk_size, vcq_schedule):
    if not (isinstance(chunk_size, int) and chunk_size >= 0):
        raise ValueError(f"chunk_size must be an int >= 0 (tokens per chunk; 0 = chosen from K), "
                         f"got {chunk_size!r}")
    if not isinstance(vcq_schedule, str):
        raise ValueError(f"vcq_schedule must be a string ('' for none), got {vcq_schedule!r}")


def _setup_schedule(module, K, vcq_schedule, vcq_k_min, vcq_seq_len, vcq_gamma):
    # VCQ: registers q.codebook_sizes (seq_len,) long, or sets it to None when no schedule is asked for
    if vcq_schedule == '':
        module.codebook_sizes = None
    else:
        module.register_buffer('codebook_sizes',
                               codebook_size_schedule(vcq_schedule, vcq_k_min, K, vcq_seq_len, vcq_gamma))


def _token_codebook_sizes(codebook_sizes, B, H, W):
    # (H*W,) schedule in raster order -> (B*H*W,) size for every token of the batch, or None without VCQ
    if codebook_sizes is None:
        return None
    if H * W != codebook_sizes.numel():
        raise ValueError(f"VCQ schedule has {codebook_sizes.numel()} positions but the latent grid is "
                         f"{H}x{W} = {H * W} tokens; set vcq_seq_len to {H * W}")
    return codebook_sizes.repeat(B)


def _setup_usage(module, K, usage_window, usage_tokens):
    # window_usage: the release's statistic (distinct codes among the last max(65536, K + 1) tokens), which
    # cannot exceed 1 - 1/e ~ 63% for a perfectly uniform code distribution once K >= 65,536; usage: counted
    # over the last usage_tokens tokens (default 10 K), where a uniform distribution shows ~100% (1 - e^-10)
    # one buffer of the codes of the last max(both) training tokens; each statistic counts its own tail of it
    module.window_tokens, module.usage_tokens = usage_window or max(65536, K + 1), usage_tokens or 10 * K
    module.recent_codes = RecentCodes(K, max(module.window_tokens, module.usage_tokens))


def _info(module, indices, B, H, W, **losses):
    # the forward's info: indices, loss terms, the VCQ sizes. Training forwards record the codes; the usage
    # statistics are computed from the records only when read (quantizer_stats), once per log interval
    if module.training:
        module.recent_codes.record(indices)
    info = {'indices': indices.reshape(B, H, W, *indices.shape[1:])}
    info.update({name: value.detach() for name, value in losses.items()})
    if module.codebook_sizes is not None:
        info['codebook_sizes'] = module.codebook_sizes
    return info


def quantizer_stats(quantizer, indices):
    """A quantizer's usage statistics as 0-d tensors (no host sync; the caller reads them once per log
    interval): usage over its last usage_tokens training tokens and their number, the release's window_usage,
    the perplexity of the codes `indices` (info['indices'] of a forward; any layout flat_codes takes) and, with
    a VQBridge, its live slots."""
    recent, n = quantizer.recent_codes, quantizer.usage_tokens
    stats = {'usage': recent.usage(n), 'usage_tokens': recent.window_tokens(n),
             'window_usage': recent.usage(quantizer.window_tokens),
             'perplexity': _perplexity(flat_codes(indices), quantizer.codebook_size)}
    if isinstance(getattr(quantizer, 'projector', None), VQBridge):
        stats['bridge_live_slots'] = quantizer.projector.live_slots()
    return stats


# -----------------------------------------------------------------------------
# VQBridge (FVQ paper section 3.2): compress groups of codes -> ViT blocks -> expand back

def sincos_1d(positions, dim):
    # fixed sin-cos embedding (P, dim) of float positions (P,), as MAE/DiT's get_1d_sincos_pos_embed_from_grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None, :]  # (P, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()


def sincos_2d(grid_h, grid_w, dim):
    # MAE/DiT's get_2d_sincos_pos_embed over a grid_h x grid_w grid, raster order: the first half of the
    # channels encodes the column, the second half the row (the release's order) -> (grid_h * grid_w, dim)
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing='ij')
    return torch.cat([sincos_1d(cols.flatten(), dim // 2), sincos_1d(rows.flatten(), dim // 2)], dim=1)


def bridge_group_size_for(K):
    """The release's presets: p x p = 16 codes per bridge token at K = 16,384 (QBridge-L/4), 64 at 65,536 and
    262,144 (QBridge-L/8). Both 16k and 65k give 1,024 tokens; below 16k (no preset) we keep those 1,024
    tokens, so a smaller codebook gets smaller groups (K = 4,096 -> 4, K <= 1,024 -> 1 code per token), as FVQ
    section 4.2 scales the patch with the codebook. A K that this choice does not divide is an error that
    names a group size that does."""
    group_size = 64 if K > 65536 else max(1, K // 1024)
    if K % group_size != 0:
        divisor = max(g for g in range(1, group_size + 1) if K % g == 0)
        raise ValueError(f"VQBridge: codebook size K={K} is not divisible by the automatic group size "
                         f"g={group_size} (bridge_group_size=0 picks 64 above K = 65,536, else K // 1024); set "
                         f"bridge_group_size to a divisor of K, e.g. {divisor}")
    return group_size


def modulate(x, shift, scale):
    # DiT's adaLN: a LayerNorm output shifted and scaled by the condition
    return x * (1 + scale) + shift


class BridgeBlock(nn.Module):
    """DiT block (adaLN-Zero). In the bridge the condition is one learned vector, so the modulation is a
    learned shift/scale/gate per block whose gates start at zero: the block starts as the identity,
    as in the release."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)
        self.modulation = nn.Linear(dim, 6 * dim)

    def forward(self, x, c):
        # x (T, dim) group tokens, c (dim,) SiLU of the learned condition vector
        T, dim = x.shape
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = self.modulation(c).chunk(6)
        h = modulate(self.norm1(x), shift_attn, scale_attn)
        # 3 x (heads, T, hd)
        q, k, v = self.qkv(h).reshape(T, 3, self.heads, dim // self.heads).permute(1, 2, 0, 3)
        h = F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(T, dim)
        x = x + gate_attn * self.proj(h)
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        x = x + gate_mlp * self.fc2(F.gelu(self.fc1(h), approximate='tanh'))
        return x


class VQBridge(nn.Module):
    """Maps the raw codebook (K, D) to the codebook used for quantization (K, D): groups of group_size
    consecutive codes -> linear to dim (eq. 8) -> depth adaLN-Zero ViT blocks (eq. 9) -> LayerNorm + linear
    back to group_size*D (eq. 10) -> reshape (eq. 11).
    As released (yfChang-cv/FVQ qbridge.py, the code behind Table 3): the codebook is a sqrt(K) x sqrt(K)
    image of D channels cut into p x p patches (p*p = group_size); our 1D groups of p*p consecutive codes are
    those patches up to a fixed permutation of code indices, so group t gets the 2D sin-cos embedding of patch
    t's grid position. The release's patch embedding has no LayerNorm; eq. 8 as printed has one
    (compress_norm=True). The blocks are DiT's, conditioned on one learned vector; the final layer is
    zero-initialised, so every mapped code starts at 0 and the codes separate as the expand layer learns."""

    def __init__(self, K, D, group_size, dim=256, depth=2, heads=4, mlp_ratio=2.0, compress_norm=False,
                 zero_init=True):
        super().__init__()
        if group_size < 1 or K % group_size != 0:
            raise ValueError(f"VQBridge: codebook size K={K} is not divisible by the group size "
                             f"g={group_size} (bridge_group_size); pick a g that divides K, "
                             f"e.g. a power of two for K = 2^n")
        if dim % heads != 0 or dim % 4 != 0:
            raise ValueError(f"VQBridge: bridge_dim={dim} must be divisible by 4 and by bridge_heads={heads}")
        self.K, self.D, self.group_size = K, D, group_size
        self.compress = nn.Linear(group_size * D, dim)
        self.compress_norm = nn.LayerNorm(dim) if compress_norm else nn.Identity()
        T = K // group_size
        # the grid is square when T is (the release's Ks)
        grid_h = max(h for h in range(1, math.isqrt(T) + 1) if T % h == 0)
        self.register_buffer('pos_embed', sincos_2d(grid_h, T // grid_h, dim), persistent=False)  # (T, dim)
        self.condition = nn.Parameter(torch.randn(dim) * 0.02)  # DiT's label embedding with a single class
        self.blocks = nn.ModuleList([BridgeBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(dim, 2 * dim)
        self.expand = nn.Linear(dim, group_size * D)
        # DiT initialisation: xavier linears with zero bias, zero adaLN modulations, zero final layer
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for linear in [block.modulation for block in self.blocks] + [self.final_modulation] + (
                [self.expand] if zero_init else []):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    @torch.no_grad()
    def live_slots(self):
        # slot s of every group is row block s of the expand layer; a block still at its zero init
        # maps every group's slot-s code to 0, and it gets a gradient only once some token picks such
        # a zero code: usage <= live / g
        return (self.expand.weight.reshape(self.group_size, -1).abs().amax(1) > 0).sum()

    def forward(self, codes):
        # codes (K, D) -> mapped codes (K, D); compiled on a GPU (fused)
        return fused(VQBridge.map_codes, codes.device)(self, codes)

    def map_codes(self, codes):
        x = codes.reshape(self.K // self.group_size, self.group_size * self.D)  # (T, g*D), T = K/g
        x = self.compress_norm(self.compress(x)) + self.pos_embed  # (T, dim)
        c = F.silu(self.condition)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_modulation(c).chunk(2)
        x = self.expand(modulate(self.final_norm(x), shift, scale))  # (T, g*D)
        return x.reshape(self.K, self.D)


def make_projector(projector, K, D, bridge_group_size=0, bridge_dim=256, bridge_depth=2, bridge_heads=4,
                   bridge_mlp_ratio=2.0, bridge_compress_norm=False, bridge_zero_init=True):
    """The map from the raw (K, D) codebook to the codes used: None for the raw codes, 'vqbridge' (FVQ),
    'linear' (SimVQ's single D -> D layer) or 'mlp5' (5 linear layers with ReLU), the baselines of FVQ Tables
    5 and 10."""
    if projector == '':
        return None
    if projector == 'vqbridge':
        return VQBridge(K, D, bridge_group_size or bridge_group_size_for(K), bridge_dim, bridge_depth,
                        bridge_heads, bridge_mlp_ratio, bridge_compress_norm, bridge_zero_init)
    if projector == 'linear':
        return nn.Linear(D, D)
    if projector == 'mlp5':
        return nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D), nn.ReLU(),
                             nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D))
    raise ValueError(f"unknown projector '{projector}'; expected '', 'vqbridge', 'linear' or 'mlp5'")


# -----------------------------------------------------------------------------
# plain VQ (LlamaGen) and FVQ (VQ against a mapped codebook)

def pick(codebook, indices):
    """codebook (K, D), indices (N,) -> codebook rows (N, D). index_select, whose backward is a zero fill and one
    index_add: F.embedding's CUDA backward first sorts the indices (at N = 8,192 on an H100: 8 sort kernels,
    0.1 ms of GPU and ~0.5 ms of CPU time per step under torch.profiler), and indexing's backward adds in a
    thread-dependent order on a multi-core CPU, where index_add adds in index order (on CUDA it adds with
    atomics, as other GPU backwards do: not bit-repeatable there)."""
    return codebook.index_select(0, indices)


def _mean(terms):
    # mean of a list of 0-d loss terms (a single term as it is: no extra ops in the common one-code case)
    return terms[0] if len(terms) == 1 else torch.stack(terms).mean()


class VectorQuantizer(nn.Module):
    """Nearest-code VQ with a straight-through estimator; loss = |z_q - sg z|^2 + beta |sg z_q - z|^2 (means).
    The raw codebook starts uniform(-1/K, 1/K) and, with l2_norm, is l2-normalised once at init (LlamaGen,
    FVQ). Without a projector (plain VQ, LlamaGen) l2_norm also normalises z and the codes in every forward.
    With projector != '' (FVQ) the codes used are projector(raw codebook), computed once per forward, and are
    never normalised (the release's --codebook-l2-norm is init-time only, and its scripts leave it off); the
    raw codebook then gets gradients only through the projector (make_projector: 'vqbridge', 'linear', 'mlp5').
    rq_depth > 1: residual VQ (RQ-VAE), rq_depth codes per position from the one codebook."""

    def __init__(self, codebook_size, dim, *, beta=0.25, l2_norm=False, projector='', chunk_size=0,
                 usage_window=0, usage_tokens=0, vcq_schedule='', vcq_k_min=2, vcq_seq_len=256, vcq_gamma=2.5,
                 bridge_group_size=0, bridge_dim=256, bridge_depth=2, bridge_heads=4, bridge_mlp_ratio=2.0,
                 bridge_compress_norm=False, bridge_zero_init=True, rq_depth=1):
        super().__init__()
        K, D = codebook_size, dim
        _check_common(chunk_size, vcq_schedule)
        if not (isinstance(rq_depth, int) and rq_depth >= 1):
            raise ValueError(f"rq_depth must be an int >= 1 (codes per position), got {rq_depth!r}")
        self.codebook_size, self.dim, self.rq_depth = K, D, rq_depth
        self.beta, self.l2_norm, self.chunk_size = beta, l2_norm, chunk_size
        embedding = torch.empty(K, D).uniform_(-1 / K, 1 / K)  # raw codebook
        self.embedding = nn.Parameter(F.normalize(embedding, dim=-1) if l2_norm else embedding)
        self.projector = make_projector(projector, K, D, bridge_group_size, bridge_dim, bridge_depth, bridge_heads,
                                        bridge_mlp_ratio, bridge_compress_norm, bridge_zero_init)
        self.normalize_forward = l2_norm and self.projector is None  # never behind a projector
        _setup_usage(self, K, usage_window, usage_tokens)
        _setup_schedule(self, K, vcq_schedule, vcq_k_min, vcq_seq_len, vcq_gamma)

    def codebook(self):
        # (K, D) codes used for lookup
        if self.projector is not None:
            return self.projector(self.embedding).float()
        return F.normalize(self.embedding, dim=-1) if self.normalize_forward else self.embedding

    def lookup(self, indices):
        # (B, H, W) long, or (B, H, W, rq_depth) for residual codes (summed) -> (B, D, H, W)
        codes = self.codebook()[indices]
        return (codes if self.rq_depth == 1 else codes.sum(-2)).permute(0, 3, 1, 2)

    def picked_codes(self, codebook, indices):
        # (N,) -> the codes (N, D), with their gradient to the raw codebook / projector; cosine VQ normalises
        # the N picked raw codes again (the same values as codebook's rows), so its backward stays (N, D)
        if self.normalize_forward:
            return F.normalize(pick(self.embedding, indices), dim=-1)
        return pick(codebook, indices)

    def forward(self, z):
        _check_input(z, self.dim)
        B, D, H, W = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            # (K, D), once per forward (the bridge is not cheap). Cosine VQ's gradient reaches the codebook only
            # through the picked codes (picked_codes), so its normalisation of all K codes needs no autograd
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.normalize_forward):
                codebook = self.codebook()
            z_flat = _tokens_first(z.float())  # (N, D)
            if self.normalize_forward:
                z_flat = F.normalize(z_flat, dim=-1)
            sizes = _token_codebook_sizes(self.codebook_sizes, B, H, W)
            # rq_depth codes per position, each the nearest to what the previous ones left (RQ-VAE; depth 1 is
            # plain VQ). The partial sums carry the gradient to the codebook / projector
            residual, indices, partial_sums = z_flat.detach(), [], []
            for depth in range(self.rq_depth):
                depth_indices = nearest_codes(residual, codebook.detach(), self.chunk_size, sizes)  # (N,)
                code = self.picked_codes(codebook, depth_indices)  # (N, D)
                if depth + 1 < self.rq_depth:
                    residual = residual - code.detach()
                z_q = code if depth == 0 else z_q + code
                indices.append(depth_indices)
                partial_sums.append(z_q)
            # RQ-VAE's losses on every partial sum (FVQ's release, vq_model_qbridge_rqvae.py), averaged
            codebook_loss = _mean([F.mse_loss(q, z_flat.detach()) for q in partial_sums])
            commit_loss = _mean([F.mse_loss(q.detach(), z_flat) for q in partial_sums])
            loss = codebook_loss + self.beta * commit_loss
            z_q = z_flat + (z_q - z_flat).detach()  # straight-through: dz = dz_q
            indices = indices[0] if self.rq_depth == 1 else torch.stack(indices, dim=1)  # (N,) or (N, depth)
        info = _info(self, indices, B, H, W, codebook_loss=codebook_loss, commit_loss=commit_loss)
        return _channels_first(z_q, B, H, W), loss, info


# -----------------------------------------------------------------------------
# VAR's multi-scale residual quantizer (FVQ Table 4's "680_10step")

VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # 1 + 4 + ... + 256 = 680 tokens at a 16 x 16 latent


class MultiScaleQuantizer(nn.Module):
    """VAR's multi-scale VQ (Tian et al. 2024; FVQ's release var/model/quant.py). For each scale s (small to
    large): the residual is area-downsampled to s x s, each of its s*s vectors takes its nearest code, the code
    map is upsampled (bicubic) to H x W, passed through phi, added to the running sum f_hat and subtracted
    from the residual. phi(h) = (1 - phi_ratio) h + phi_ratio conv3x3(h), one of msvq_phi_convs convolutions
    chosen by the scale's place in the sequence (VAR's quant_resi = 0.5, share_quant_resi = 4; 1 = one shared
    phi, len(scales) = one per scale). loss = mean over scales of |f_hat_s - sg z|^2 + beta |sg f_hat_s - z|^2,
    z_q = f_hat with a straight-through estimator; phi is trained by the first term only, as in VAR.
    Codes come from one shared codebook, raw or through a projector (FVQ: 'vqbridge'). l2_norm: VAR's
    using_znorm, the nearest code by cosine similarity (the codes themselves are used as they are)."""

    def __init__(self, codebook_size, dim, *, beta=0.25, l2_norm=False, projector='', chunk_size=0, usage_window=0,
                 usage_tokens=0, msvq_scales=VAR_SCALES, msvq_phi_ratio=0.5, msvq_phi_convs=4, **bridge_options):
        super().__init__()
        K, D = codebook_size, dim
        _check_common(chunk_size, '')
        scales = tuple(msvq_scales)
        if not scales or any(not isinstance(s, int) or s < 1 for s in scales) or list(scales) != sorted(set(scales)):
            raise ValueError(f"msvq_scales must be increasing ints >= 1 (the last = the latent grid's side), "
                             f"got {msvq_scales!r}")
        if not (isinstance(msvq_phi_convs, int) and msvq_phi_convs >= 1):
            raise ValueError(f"msvq_phi_convs must be an int >= 1, got {msvq_phi_convs!r}")
        self.codebook_size, self.dim, self.scales = K, D, scales
        self.beta, self.l2_norm, self.chunk_size, self.phi_ratio = beta, l2_norm, chunk_size, abs(msvq_phi_ratio)
        self.embedding = nn.Parameter(torch.randn(K, D))  # N(0, 1): the release keeps nn.Embedding's init
        self.projector = make_projector(projector, K, D, **bridge_options)
        self.phi = nn.ModuleList(nn.Conv2d(D, D, 3, padding=1) for _ in range(msvq_phi_convs)) \
            if self.phi_ratio > 1e-6 else None
        # VAR's Phi{Shared, PartiallyShared, NonShared}: scale si at si / (S - 1) uses the conv whose tick is
        # nearest (ticks spread over [0, 1]; VAR's 1/3 margins for 4 convs)
        n = msvq_phi_convs
        margin = 1 / 3 / n if n == 4 else 1 / 2 / n
        ticks = torch.linspace(margin, 1 - margin, n, dtype=torch.float64)
        self.phi_of_scale = [int((ticks - si / max(len(scales) - 1, 1)).abs().argmin()) for si in range(len(scales))]
        _setup_usage(self, K, usage_window, usage_tokens)
        self.codebook_sizes = None  # no VCQ over scales

    def codebook(self):
        # (K, D) codes used for lookup
        return self.embedding if self.projector is None else self.projector(self.embedding).float()

    def _phi(self, h, si):
        if self.phi is None:
            return h
        return h * (1 - self.phi_ratio) + self.phi[self.phi_of_scale[si]](h) * self.phi_ratio

    def _upsampled(self, codes, si, H, W):
        # (B, D, s, s) code map of scale si -> its phi'd contribution (B, D, H, W) to f_hat
        if codes.shape[-2:] != (H, W):
            codes = F.interpolate(codes, size=(H, W), mode='bicubic')
        return self._phi(codes, si)

    def lookup(self, indices):
        # [(B, s, s) long per scale] -> f_hat (B, D, H, W)
        codebook, side = self.codebook(), self.scales[-1]
        return sum(self._upsampled(codebook[idx].permute(0, 3, 1, 2), si, side, side)
                   for si, idx in enumerate(indices))

    def forward(self, z):
        _check_input(z, self.dim)
        B, D, H, W = z.shape
        if H != W or H != self.scales[-1]:
            raise ValueError(f"msvq's last scale must be the latent grid's side: scales {self.scales}, "
                             f"latent {H}x{W}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            codebook = self.codebook()
            search_codes = F.normalize(codebook.detach(), dim=-1) if self.l2_norm else codebook.detach()
            z = z.float()
            residual, f_hat, indices, codebook_losses, commit_losses = z.detach(), 0, [], [], []
            for si, side in enumerate(self.scales):
                rest = residual if side == H else F.interpolate(residual, size=(side, side), mode='area')
                rest = _tokens_first(rest)  # (B*s*s, D)
                if self.l2_norm:
                    rest = F.normalize(rest, dim=-1)
                scale_indices = nearest_codes(rest, search_codes, self.chunk_size)  # (B*s*s,)
                codes = _channels_first(pick(codebook, scale_indices), B, side, side)  # (B, D, s, s)
                h = self._upsampled(codes, si, H, W)  # (B, D, H, W)
                f_hat = f_hat + h
                residual = residual - h.detach()
                indices.append(scale_indices.reshape(B, side, side))
                codebook_losses.append(F.mse_loss(f_hat, z.detach()))
                commit_losses.append(F.mse_loss(f_hat.detach(), z))
            codebook_loss, commit_loss = _mean(codebook_losses), _mean(commit_losses)
            loss = codebook_loss + self.beta * commit_loss
            z_q = z + (f_hat - z).detach()  # straight-through
        # usage and perplexity over all scales' tokens; info['indices'] is the list per scale (VAR's order)
        info = _info(self, flat_codes(indices).flatten(), B, 1, -1, codebook_loss=codebook_loss,
                     commit_loss=commit_loss)
        info['indices'] = indices
        return z_q, loss, info


def fvq_to_vq_checkpoint(checkpoint):
    """Tokenizer checkpoint with a projected codebook (quantizer 'fvq', or 'rq' / 'msvq' with a projector) ->
    the same tokenizer whose raw codebook is the mapped codebook and which has no projector, so the bridge is
    not needed at inference: 'fvq' becomes plain 'vq', 'rq' / 'msvq' keep their kind (and msvq its phi
    convolutions). Optimiser entries are dropped (they refer to the bridge's parameters); the EMA weights, when
    present, are exported the same way."""
    args = checkpoint['model_args']
    kind, options = args.get('quantizer'), dict(args.get('quantizer_args') or {})
    projector = options.get('projector', default_projector(kind))
    if kind not in BRIDGED or projector == '':
        raise ValueError(f"fvq_to_vq_checkpoint needs a checkpoint with a projected codebook (quantizer 'fvq', "
                         f"or 'rq' / 'msvq' with a projector), got quantizer={kind!r}, projector={projector!r}")
    source = make_quantizer(kind, args['codebook_size'], args['code_dim'], **options)
    target_kind = 'vq' if kind == 'fvq' else kind  # rq and msvq have no projector by default
    target_options = {k: v for k, v in options.items() if k != 'projector' and k in quantizer_options(
        target_kind, '', options.get('vcq_schedule', ''))}
    if target_kind != 'msvq':  # (msvq's l2_norm is its cosine search, kept as it was)
        target_options['l2_norm'] = False  # the mapped codes are used as they are (no forward normalisation)
    target_keys = make_quantizer(target_kind, args['codebook_size'], args['code_dim'], **target_options).state_dict()
    prefix = 'quantizer.'

    def export(state):
        source.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        with torch.no_grad():
            mapped = source.codebook().float().clone()  # (K, D)
        exported = {k: v for k, v in state.items() if not k.startswith(prefix) or k[len(prefix):] in target_keys}
        exported[prefix + 'embedding'] = mapped
        return exported

    out = {k: v for k, v in checkpoint.items()
           if k not in ('model', 'model_args', 'ema') and 'optim' not in k}
    out['model'] = export(checkpoint['model'])
    if checkpoint.get('ema') is not None:
        out['ema'] = export(checkpoint['ema'])
    out['model_args'] = {**args, 'quantizer': target_kind, 'quantizer_args': target_options}
    return out


# -----------------------------------------------------------------------------
# IBQ (IBQ paper section 3.2), chunked over tokens in forward and backward

class _IBQChunked(torch.autograd.Function):
    """z_q = (onehot - sg(p) + p) C with p = softmax(z C^T) over the allowed codes, plus the MAGVIT-v2 entropy
    terms of q = softmax(z C^T / temperature). The forward keeps the (N,) indices, four (N,) row statistics
    (each row's max logit, the log-normalisers of p and q, and H(q)) and the (K,) batch-averaged q; the
    backward recomputes each chunk's logits, so at most a few (chunk_size, K) matrices exist, and with the
    saved statistics it needs no max or normaliser pass over them. Per chunk the matmuls are cuBLAS calls and
    the element-wise / row-reduction work between them is one function (_ibq_chunk_stats, _ibq_chunk_grads),
    compiled into a few kernels on a GPU (fused). backward_dtype: the dtype of the backward's two products
    with dL/dlogits (bfloat16 under a bf16 autocast, see IndexBackpropQuantizer); the logits and their
    argmax are float32 always. Returns z_q (N, D), sample entropy, batch (average) entropy, indices (N,)."""

    @staticmethod
    def forward(ctx, z, codebook, token_codebook_sizes, temperature, chunk_size, with_entropy, backward_dtype):
        N, K = z.shape[0], codebook.shape[0]
        chunk_size = chunk_rows(chunk_size, K, IBQ_CHUNK_ELEMENTS, IBQ_MIN_ROWS)
        indices = torch.empty(N, dtype=torch.long, device=z.device)
        row_stats = torch.zeros(4, N, dtype=z.dtype, device=z.device)  # max, log s_p, log s_q, H(q) per row
        prob_sum = torch.zeros(K, dtype=z.dtype, device=z.device)
        stats = fused(_ibq_chunk_stats, z.device)
        for start in range(0, N, chunk_size):
            z_chunk = z[start:start + chunk_size]  # (n, D)
            chunk_indices, chunk_stats, chunk_prob_sum = stats(
                z_chunk @ codebook.t(), _chunk_sizes(token_codebook_sizes, start, chunk_size), temperature,
                with_entropy)
            indices[start:start + chunk_size] = chunk_indices
            row_stats[:, start:start + chunk_size] = chunk_stats
            if with_entropy:
                prob_sum += chunk_prob_sum
        avg_probs = prob_sum / N  # (K,)
        sample_entropy = row_stats[3].mean()
        avg_entropy = -(avg_probs * torch.log(avg_probs + _ENTROPY_EPS)).sum()
        ctx.save_for_backward(z, codebook, token_codebook_sizes, indices, row_stats, avg_probs)
        ctx.temperature, ctx.chunk_size, ctx.with_entropy = temperature, chunk_size, with_entropy
        ctx.backward_dtype = backward_dtype
        ctx.mark_non_differentiable(indices)
        # forward value of (onehot - sg p + p) C is onehot C = the selected codes
        return codebook[indices], sample_entropy, avg_entropy, indices

    @staticmethod
    def backward(ctx, grad_z_q, grad_sample_entropy, grad_avg_entropy, grad_indices):
        z, codebook, token_codebook_sizes, indices, row_stats, avg_probs = ctx.saved_tensors
        N, chunk_size, dtype = z.shape[0], ctx.chunk_size, ctx.backward_dtype
        grad_z = torch.empty_like(z)
        grad_codebook = torch.zeros_like(codebook)
        grad_codebook.index_add_(0, indices, grad_z_q)  # the hard one-hot part of Ind^T g
        # d(avg entropy)/d(avg_probs), a (K,) vector shared by all tokens
        d_avg = -(torch.log(avg_probs + _ENTROPY_EPS) + avg_probs / (avg_probs + _ENTROPY_EPS))
        # the entropy gradients' weights as 0-d tensors: one compiled graph whatever their values
        entropy_scales = (-grad_sample_entropy / (N * ctx.temperature), grad_avg_entropy / (N * ctx.temperature))
        codebook_low, z_low = codebook.to(dtype), z.to(dtype)  # the products' operands (no copy in float32)
        grads = fused(_ibq_chunk_grads, z.device)
        with torch.autocast(device_type=z.device.type, enabled=False):
            for start in range(0, N, chunk_size):
                rows = slice(start, start + chunk_size)
                # (n, K) logits and dL/dp through z_q = Ind C, then dL/dlogits
                grad_logits = grads(z[rows] @ codebook.t(), grad_z_q[rows] @ codebook.t(),
                                    _chunk_sizes(token_codebook_sizes, start, chunk_size), row_stats[:, rows],
                                    d_avg, ctx.temperature, *entropy_scales, ctx.with_entropy, dtype)
                grad_z[rows] = grad_logits @ codebook_low
                if dtype == torch.float32:
                    grad_codebook.addmm_(grad_logits.t(), z[rows])
                else:
                    grad_codebook += grad_logits.t() @ z_low[rows]  # (K, D) in dtype, added in float32
                del grad_logits  # before the next chunk's blocks are allocated
        return grad_z, grad_codebook, None, None, None, None, None


@torch.compiler.disable  # a compiled tokenizer calls it as it is: its chunk functions are compiled on their own
def ibq_chunked(z, codebook, token_codebook_sizes, temperature, chunk_size, with_entropy, backward_dtype):
    return _IBQChunked.apply(z, codebook, token_codebook_sizes, temperature, chunk_size, with_entropy,
                             backward_dtype)


_ENTROPY_EPS = 1e-5  # as in MAGVIT-v2 / SEED-Voken compute_entropy_loss


def _ibq_chunk_stats(logits, sizes, temperature, with_entropy):
    """One chunk's forward: logits (n, K) -> argmax (n,), the row statistics (4, n) the backward reuses (max
    logit m, log s_p, log s_q, H(q) with p = softmax(logits), q = softmax(logits / temperature) over the
    allowed codes; log s_q and H(q) are 0 without the entropy terms) and the sum over the chunk of q (K,)
    (None without them). Three passes over the block: max and argmax, the row sums, the column sums of q."""
    too_big = _too_big_codes(logits, sizes)
    if too_big is not None:
        logits = logits.masked_fill(too_big, float('-inf'))
    row_max = logits.amax(1, keepdim=True)  # (n, 1)
    shifted = logits - row_max  # <= 0, -inf at masked codes
    log_s = torch.log(torch.exp(shifted).sum(1))  # (n,)
    if not with_entropy:
        zeros = torch.zeros_like(log_s)
        return logits.argmax(1), torch.stack([row_max[:, 0], log_s, zeros, zeros]), None
    e_t = torch.exp(shifted / temperature)  # 0 at masked codes
    s_t = e_t.sum(1, keepdim=True)
    if too_big is not None:
        shifted = shifted.masked_fill(too_big, 0.0)  # e_t is 0 there: no -inf * 0
    entropy = torch.log(s_t) - (e_t * shifted).sum(1, keepdim=True) / (temperature * s_t)  # H(e_t / s_t)
    stats = torch.cat([row_max, log_s[:, None], torch.log(s_t), entropy], 1).t()  # (4, n)
    return logits.argmax(1), stats, (e_t / s_t).sum(0)


def _ibq_chunk_grads(logits, grad_probs, sizes, row_stats, d_avg, temperature, sample_scale, avg_scale,
                     with_entropy, dtype):
    """One chunk's backward from its logits (n, K), dL/dp (n, K) and the forward's row statistics (4, n)
    -> dL/dlogits (n, K) in dtype: the softmax backward p (dp - <p, dp>) plus, with the entropy terms
    (q = softmax(logits / T)), dH(q)/dx = -q (log q + H) weighted by sample_scale and
    d(sum_k a_k q_k)/dx = q (a - <q, a>), a = d_avg, weighted by avg_scale (x = logits / T). Two passes: the
    row sums <p, dp> and <q, a>, then the element-wise result."""
    row_max, log_s, log_s_t, entropy = row_stats[:, :, None]  # (n, 1) each
    too_big = _too_big_codes(logits, sizes)
    shifted = logits - row_max
    if too_big is not None:
        shifted = shifted.masked_fill(too_big, float('-inf'))  # p = q = 0 there
    probs = torch.exp(shifted - log_s)
    grad_logits = probs * (grad_probs - (probs * grad_probs).sum(1, keepdim=True))  # 0 at masked codes
    if with_entropy:
        log_q = shifted / temperature - log_s_t
        probs_t = torch.exp(log_q)
        if too_big is not None:
            log_q = log_q.masked_fill(too_big, 0.0)  # q is 0 there: no -inf * 0
        grad_logits = grad_logits + sample_scale * probs_t * (log_q + entropy)
        grad_logits = grad_logits + avg_scale * probs_t * (d_avg - (probs_t * d_avg).sum(1, keepdim=True))
    return grad_logits.to(dtype)


# Under a bf16 (fp16) autocast IBQ's backward multiplies dL/dlogits with the codes and the tokens in that dtype
# (the release trains with precision 16-mixed, where the logits einsum and its backward run in fp16); the
# logits, their argmax and the softmax stay float32. K = 262,144, 8,192 tokens on an H100: 43.7 ms instead of
# 51.3 (README). False: float32 products under autocast too.
IBQ_BACKWARD_AUTOCAST = True


class IndexBackpropQuantizer(nn.Module):
    """IBQ. logits = z C^T; Ind = onehot(argmax) - sg(softmax) + softmax; z_q = Ind C (no straight-through on
    z: the encoder gets the decoder's gradient through the softmax).
    Double quantization loss with z_q' = onehot C (means):
    ibq_beta_term='codebook' (TencentARC/SEED-Voken, the code behind IBQ Tables 1-5; the default):
        |z_q - z|^2 + |z - sg z_q'|^2 + beta |sg z - z_q'|^2
    ibq_beta_term='commit' (eq. 12 as printed): |z_q - z|^2 + |sg z - z_q'|^2 + beta |z - sg z_q'|^2
    plus the MAGVIT-v2 entropy penalty entropy_weight * (mean_n H(p_n) - H(mean_n p_n)),
    p = softmax(logits / T). The readable (N, K) formula is ibq_reference() below; this module computes
    the same in chunks of tokens."""

    # defaults from TencentARC/SEED-Voken configs/IBQ/gpu/imagenet_ibqgan_{16384,262144}.yaml: beta 0.25,
    # entropy_loss_weight 0.05, entropy_temperature 0.01, l2_normalize False
    def __init__(self, codebook_size, dim, *, beta=0.25, ibq_beta_term='codebook', l2_norm=False,
                 entropy_weight=0.05, entropy_temperature=0.01, chunk_size=0, usage_window=0,
                 usage_tokens=0, vcq_schedule='', vcq_k_min=2, vcq_seq_len=256, vcq_gamma=2.5):
        super().__init__()
        K, D = codebook_size, dim
        _check_common(chunk_size, vcq_schedule)
        if entropy_temperature <= 0:
            raise ValueError(f"entropy_temperature must be > 0, got {entropy_temperature}")
        if ibq_beta_term not in ('codebook', 'commit'):
            raise ValueError(f"ibq_beta_term must be 'codebook' (SEED-Voken) or 'commit' (eq. 12), "
                             f"got {ibq_beta_term!r}")
        self.codebook_size, self.dim = K, D
        self.beta, self.ibq_beta_term = beta, ibq_beta_term
        self.l2_norm, self.chunk_size = l2_norm, chunk_size
        self.entropy_weight, self.entropy_temperature = entropy_weight, entropy_temperature
        # N(0, 1): SEED-Voken keeps nn.Embedding's default init
        self.embedding = nn.Parameter(torch.randn(K, D))
        _setup_usage(self, K, usage_window, usage_tokens)
        _setup_schedule(self, K, vcq_schedule, vcq_k_min, vcq_seq_len, vcq_gamma)

    def codebook(self):
        return F.normalize(self.embedding, dim=-1) if self.l2_norm else self.embedding

    def lookup(self, indices):
        # (B, H, W) long -> (B, D, H, W)
        return self.codebook()[indices].permute(0, 3, 1, 2)

    def forward(self, z):
        _check_input(z, self.dim)
        B, D, H, W = z.shape
        device_type = z.device.type
        backward_dtype = (torch.get_autocast_dtype(device_type) if IBQ_BACKWARD_AUTOCAST
                          and torch.is_autocast_enabled(device_type) else torch.float32)
        with torch.autocast(device_type=device_type, enabled=False):
            codebook = self.codebook().float()  # (K, D)
            z_flat = _tokens_first(z.float())  # (N, D)
            if self.l2_norm:
                z_flat = F.normalize(z_flat, dim=-1)
            with_entropy = self.entropy_weight != 0
            z_q, sample_entropy, avg_entropy, indices = ibq_chunked(
                z_flat, codebook, _token_codebook_sizes(self.codebook_sizes, B, H, W),
                self.entropy_temperature, self.chunk_size, with_entropy, backward_dtype)
            z_q_hard = pick(codebook, indices)  # (N, D) z_q' of eq. 11
            soft_loss = F.mse_loss(z_q, z_flat)
            codebook_loss = F.mse_loss(z_q_hard, z_flat.detach())
            commit_loss = F.mse_loss(z_flat, z_q_hard.detach())
            entropy_loss = sample_entropy - avg_entropy
            if self.ibq_beta_term == 'codebook':
                loss = soft_loss + commit_loss + self.beta * codebook_loss
            else:
                loss = soft_loss + codebook_loss + self.beta * commit_loss
            loss = loss + self.entropy_weight * entropy_loss
        info = _info(self, indices, B, H, W, soft_loss=soft_loss, codebook_loss=codebook_loss,
                     commit_loss=commit_loss, entropy_loss=entropy_loss, sample_entropy=sample_entropy,
                     avg_entropy=avg_entropy)
        return _channels_first(z_q, B, H, W), loss, info


def vq_reference(z, codebook, beta=0.25):
    """VQ written plainly with the whole (N, K) distance matrix, as LlamaGen writes it: the formula
    VectorQuantizer computes in chunks. z (N, D), codebook (K, D) -> z_q (N, D) (straight-through), loss,
    indices (N,)"""
    dist = (z ** 2).sum(1, keepdim=True) + (codebook ** 2).sum(1) - 2 * z @ codebook.t()  # (N, K)
    indices = dist.argmin(1)
    z_q = codebook[indices]
    loss = F.mse_loss(z_q, z.detach()) + beta * F.mse_loss(z_q.detach(), z)
    return z + (z_q - z).detach(), loss, indices


def ibq_reference(z, codebook, beta=0.25, ibq_beta_term='codebook', entropy_weight=0.05, temperature=0.01,
                  codebook_sizes=None):
    """IBQ written as the paper writes it, with whole (N, K) matrices: the formula IndexBackpropQuantizer
    computes in chunks (tests check both give the same values and gradients). z (N, D), codebook (K, D),
    codebook_sizes (N,) or None. -> z_q (N, D), loss, indices (N,)"""
    K = codebook.shape[0]
    logits = z @ codebook.t()  # (N, K), eq. 3
    masked = _too_big_codes(logits, codebook_sizes)
    if masked is not None:  # VCQ section 3: token n may only use the first K_n codes
        logits = logits.masked_fill(masked, float('-inf'))
    soft = logits.softmax(1)  # eq. 4
    indices = logits.argmax(1)
    hard = F.one_hot(indices, K).to(z.dtype)  # eq. 5
    z_q = (hard - soft.detach() + soft) @ codebook  # eq. 6-7
    z_q_hard = hard @ codebook  # eq. 11
    codebook_term = ((z.detach() - z_q_hard) ** 2).mean()
    commit_term = ((z - z_q_hard.detach()) ** 2).mean()
    loss = ((z_q - z) ** 2).mean() + (commit_term + beta * codebook_term if ibq_beta_term == 'codebook'
                                      else codebook_term + beta * commit_term)
    log_probs = torch.log_softmax(logits / temperature, 1)  # MAGVIT-v2 entropy penalty
    probs = log_probs.exp()
    if masked is not None:
        log_probs = log_probs.masked_fill(masked, 0.0)
    sample_entropy = -(probs * log_probs).sum(1).mean()
    avg = probs.mean(0)
    avg_entropy = -(avg * torch.log(avg + _ENTROPY_EPS)).sum()
    return z_q, loss + entropy_weight * (sample_entropy - avg_entropy), indices


# -----------------------------------------------------------------------------
# options, and the one constructor every script uses

# every make_quantizer option: the kinds it applies to
# (the projector and VCQ options apply conditionally, below)
VQ_KINDS = ('vq', 'fvq', 'ibq', 'rq')  # one code (or rq_depth) per latent position: VCQ's K_t apply
ALL_KINDS = VQ_KINDS + ('msvq',)
BRIDGED = ('fvq', 'rq', 'msvq')  # those with a projector over their codebook
QUANTIZER_OPTIONS = {
    'beta': ALL_KINDS, 'l2_norm': ALL_KINDS, 'chunk_size': ALL_KINDS, 'usage_window': ALL_KINDS,
    'usage_tokens': ALL_KINDS,
    'ibq_beta_term': ('ibq',), 'entropy_weight': ('ibq',), 'entropy_temperature': ('ibq',),
    'projector': BRIDGED, 'bridge_group_size': BRIDGED, 'bridge_dim': BRIDGED, 'bridge_depth': BRIDGED,
    'bridge_heads': BRIDGED, 'bridge_mlp_ratio': BRIDGED, 'bridge_compress_norm': BRIDGED,
    'bridge_zero_init': BRIDGED,
    'rq_depth': ('rq',),
    'msvq_scales': ('msvq',), 'msvq_phi_ratio': ('msvq',), 'msvq_phi_convs': ('msvq',),
    'vcq_schedule': VQ_KINDS, 'vcq_k_min': VQ_KINDS, 'vcq_seq_len': VQ_KINDS, 'vcq_gamma': VQ_KINDS,
}


def quantizer_options(kind, projector='vqbridge', vcq_schedule=''):
    """Names of the make_quantizer options that take effect for this kind: the bridge_* options only with
    projector='vqbridge', vcq_k_min / vcq_seq_len only with a VCQ schedule, vcq_gamma only with 'power'."""
    if kind not in ALL_KINDS:
        raise ValueError(f"unknown quantizer kind '{kind}'; expected 'vq', 'ibq', 'fvq', 'rq' or 'msvq'")
    names = [name for name, kinds in QUANTIZER_OPTIONS.items() if kind in kinds]
    if kind in BRIDGED and projector != 'vqbridge':
        names = [name for name in names if not name.startswith('bridge_')]
    if vcq_schedule == '':
        names = [name for name in names if name not in ('vcq_k_min', 'vcq_seq_len', 'vcq_gamma')]
    elif vcq_schedule != 'power':
        names = [name for name in names if name != 'vcq_gamma']
    return names


def options_from_config(kind, config, defaults):
    """make_quantizer options from a script's flat config dict (keys named like the options): those that take
    effect for `kind`. A key that would have no effect but differs from the script's default is an error
    naming it (it would be silently ignored otherwise, e.g. vcq_k_min without a vcq_schedule)."""
    applicable = quantizer_options(kind, config.get('projector', 'vqbridge'), config.get('vcq_schedule', ''))
    ignored = [k for k in QUANTIZER_OPTIONS
               if k in config and k not in applicable and config[k] != defaults[k]]
    if ignored:
        raise ValueError(f"config key(s) {ignored} have no effect with quantizer='{kind}'"
                         + (f", projector={config['projector']!r}" if kind in BRIDGED else '')
                         + f", vcq_schedule={config.get('vcq_schedule', '')!r}; "
                           f"remove them or change the quantizer")
    return {k: config[k] for k in applicable if k in config}


def default_projector(kind):
    # fvq is VQ behind a VQBridge; rq and msvq use their raw codebook unless a projector is asked for
    return 'vqbridge' if kind == 'fvq' else ''


def make_quantizer(kind, codebook_size, dim, **options):
    """kind 'vq' (LlamaGen: l2-normalised codes by default), 'fvq' (VQBridge-mapped codebook; options
    projector= 'linear' | 'mlp5' give the FVQ Table 5 baselines), 'ibq', 'rq' (residual VQ, rq_depth codes per
    position) or 'msvq' (VAR's multi-scale VQ); rq and msvq take any projector over their shared codebook, none
    by default ('vqbridge' = FVQ Table 4's). options: any of
    quantizer_options(kind, ...); one that would have no effect for this kind is an error naming it."""
    if not (isinstance(codebook_size, int) and codebook_size >= 2 and isinstance(dim, int) and dim >= 1):
        raise ValueError(f"codebook_size must be an int >= 2 and dim an int >= 1, "
                         f"got {codebook_size!r}, {dim!r}")
    valid = quantizer_options(kind, options.get('projector', default_projector(kind)), options.get('vcq_schedule', ''))
    unknown = [name for name in options if name not in valid]
    if unknown:
        raise TypeError(f"option(s) {unknown} do not apply to quantizer '{kind}'"
                        + (f" with projector={options['projector']!r}" if 'projector' in options else '')
                        + (f" with vcq_schedule={options.get('vcq_schedule', '')!r}" if any(
                            name.startswith('vcq_') for name in unknown) else '')
                        + f"; options that apply: {valid}")
    if kind == 'vq':
        return VectorQuantizer(codebook_size, dim, **{'l2_norm': True, **options})
    if kind == 'rq':  # RQ-VAE: 4 codes per position from one shared codebook; projector='vqbridge' is FVQ's
        return VectorQuantizer(codebook_size, dim, **{'rq_depth': 4, **options})
    if kind == 'msvq':
        return MultiScaleQuantizer(codebook_size, dim, **options)
    if kind == 'fvq':
        if options.get('projector', 'vqbridge') == '':
            raise ValueError("quantizer 'fvq' needs a projector ('vqbridge', 'linear' or 'mlp5'); "
                             "use 'vq' for none")
        return VectorQuantizer(codebook_size, dim, **{'projector': 'vqbridge', **options})
    return IndexBackpropQuantizer(codebook_size, dim, **options)
