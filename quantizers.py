"""
The vector quantizers of nanoVQ (VQ, RQ, FVQ's VQBridge, IBQ, VCQ's codebook sizes, VAR's multi-scale VQ),
each an nn.Module with
  forward(z (B, D, H, W)) -> z_q (B, D, H, W), loss (0-d), info {'indices': the codes, 0-d loss terms}
  lookup(indices) -> z_q;  codebook() -> the (K, D) codes used
  codebook_size (K), dim (D), codebook_sizes (VCQ's K_t (T,), or None),
  recent_codes (a RecentCodes: training forwards record their codes in it, for the usage statistics).
make_quantizer(kind, K, D, **options) builds one of QUANTIZERS; the options: its constructor's keyword-only
arguments (a new kind: such a class, one line in QUANTIZERS and a trainer default for each new option).
The arithmetic runs in float32 with autocast off: bf16 distances cannot separate 262k codes.
Codes are picked with index_select: its backward adds in index order, so CPU runs repeat.
"""
import inspect
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# plain VQ (LlamaGen) and residual VQ (RQ-VAE); FVQ is either behind a projector over the codebook
class VectorQuantizer(nn.Module):
    """Nearest-code VQ, straight-through, loss |z_q - sg z|^2 + beta |sg z_q - z|^2. l2_norm: unit codes at
    init, and without a projector unit z and codes in every forward (LlamaGen). rq_depth: RQ-VAE's depth."""

    def __init__(self, codebook_size, dim, *, beta=0.25, l2_norm=True, projector='vqbridge', chunk_size=0,
                 vcq_schedule='', vcq_k_min=2, vcq_seq_len=256, bridge_group_size=0, bridge_dim=256,
                 bridge_zero_init=True, rq_depth=4):
        super().__init__()
        K, D = codebook_size, dim
        if not (isinstance(rq_depth, int) and rq_depth >= 1):
            raise ValueError(f"rq_depth must be an int >= 1 (codes per position), got {rq_depth!r}")
        self.codebook_size, self.dim, self.rq_depth = K, D, rq_depth
        self.beta, self.l2_norm, self.chunk_size = beta, l2_norm, chunk_size
        embedding = torch.empty(K, D).uniform_(-1 / K, 1 / K)  # raw codebook
        self.embedding = nn.Parameter(F.normalize(embedding, dim=-1) if l2_norm else embedding)
        self.projector = make_projector(projector, K, D, bridge_group_size, bridge_dim, bridge_zero_init)
        # behind a projector l2_norm is init-time only (the release's --codebook-l2-norm)
        self.normalize_forward = l2_norm and self.projector is None
        self.recent_codes = RecentCodes(K)
        schedule = codebook_size_schedule(vcq_schedule, vcq_k_min, K, vcq_seq_len) if vcq_schedule else None
        self.register_buffer('codebook_sizes', schedule)  # VCQ's K_t (vcq_seq_len,), or None

    def codebook(self):
        if self.projector is not None:
            return self.projector(self.embedding).float()
        return F.normalize(self.embedding, dim=-1) if self.normalize_forward else self.embedding

    def lookup(self, indices):
        codes = self.codebook()[indices]  # (B, H, W, D), or (B, H, W, rq_depth, D): summed
        return (codes if self.rq_depth == 1 else codes.sum(-2)).permute(0, 3, 1, 2)

    def forward(self, z):
        B, D, H, W = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            # (K, D), once per forward; cosine VQ's gradient goes through the N picked codes only (below)
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.normalize_forward):
                codebook = self.codebook()
            z_flat = z.float().permute(0, 2, 3, 1).reshape(B * H * W, D)  # (N, D), raster order per image
            if self.normalize_forward:
                z_flat = F.normalize(z_flat, dim=-1)
            sizes = _token_codebook_sizes(self.codebook_sizes, B, H, W)
            # rq_depth codes, each nearest to what the previous ones left; the partial sums carry the gradient
            residual, indices, partial_sums = z_flat.detach(), [], []
            for depth in range(self.rq_depth):
                depth_indices = nearest_codes(residual, codebook.detach(), self.chunk_size, sizes)  # (N,)
                code = (F.normalize(self.embedding.index_select(0, depth_indices), dim=-1)
                        if self.normalize_forward else codebook.index_select(0, depth_indices))  # (N, D)
                residual = residual - code.detach()
                z_q = code if depth == 0 else z_q + code
                indices.append(depth_indices)
                partial_sums.append(z_q)
            # RQ-VAE's losses on every partial sum (FVQ's release, vq_model_qbridge_rqvae.py), averaged
            codebook_loss = torch.stack([F.mse_loss(q, z_flat.detach()) for q in partial_sums]).mean()
            commit_loss = torch.stack([F.mse_loss(q.detach(), z_flat) for q in partial_sums]).mean()
            loss = codebook_loss + self.beta * commit_loss
            z_q = z_flat + (z_q - z_flat).detach()  # straight-through: dz = dz_q
            indices = indices[0] if self.rq_depth == 1 else torch.stack(indices, dim=1)  # (N,) or (N, depth)
        info = _info(self, indices, B, H, W, codebook_loss=codebook_loss, commit_loss=commit_loss)
        return z_q.reshape(B, H, W, D).permute(0, 3, 1, 2), loss, info


def vq_reference(z, codebook, beta=0.25):
    # VQ with the whole (N, K) distances, as LlamaGen writes it: z (N, D) -> z_q (N, D), loss, indices
    dist = (z ** 2).sum(1, keepdim=True) + (codebook ** 2).sum(1) - 2 * z @ codebook.t()  # (N, K)
    indices = dist.argmin(1)
    z_q = codebook[indices]
    loss = F.mse_loss(z_q, z.detach()) + beta * F.mse_loss(z_q.detach(), z)
    return z + (z_q - z).detach(), loss, indices


# -----------------------------------------------------------------------------
# VQBridge (FVQ section 3.2): compress groups of codes -> ViT blocks -> expand back
def bridge_group_size_for(K):
    # the release's presets: 16 codes per bridge token at K = 16,384, 64 from 65,536 on; below 16k the
    # 1,024 bridge tokens are kept (smaller groups); always a p x p patch that tiles the sqrt K x sqrt K image
    side = math.isqrt(K)
    if side * side != K:
        raise ValueError(f"VQBridge: codebook size K={K} is not a square; the bridge lays the codes out as a "
                         f"sqrt K x sqrt K image, as FVQ's release: use K={side * side} or {(side + 1) ** 2}")
    preset = 64 if K > 65536 else max(1, K // 1024)
    return max(p * p for p in range(1, math.isqrt(preset) + 1) if side % p == 0)


def sincos_2d(grid_h, grid_w, dim):
    # MAE/DiT's 2D sin-cos embedding (grid_h * grid_w, dim), raster order, column first (the release's)
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing='ij')
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    angles = [positions.flatten().double()[:, None] * omega[None, :] for positions in (cols, rows)]
    return torch.cat([f(a).float() for a in angles for f in (torch.sin, torch.cos)], dim=1)


def modulate(x, shift, scale):
    # DiT's adaLN: a LayerNorm output shifted and scaled by the condition
    return x * (1 + scale) + shift


class BridgeBlock(nn.Module):
    """DiT block (adaLN-Zero) conditioned on one learned vector; zero gates: it starts as the identity."""

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
        q, k, v = self.qkv(h).reshape(T, 3, self.heads, -1).permute(1, 2, 0, 3)  # 3 x (heads, T, hd)
        h = F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(T, dim)
        x = x + gate_attn * self.proj(h)
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        return x + gate_mlp * self.fc2(F.gelu(self.fc1(h), approximate='tanh'))


class VQBridge(nn.Module):
    """Raw codebook (K, D) -> codes used: patches of codes -> linear (eq. 8) -> ViT blocks (eq. 9) -> linear
    back (eq. 10-11). As released (FVQ's qbridge.py): code i is pixel (i // sqrt K, i % sqrt K) of a sqrt K x
    sqrt K image, a token one p x p patch (group_size = p * p), 2D sin-cos positions; codes start at 0."""

    def __init__(self, K, D, group_size, dim=256, depth=2, heads=4, mlp_ratio=2.0, zero_init=True):
        super().__init__()
        working = bridge_group_size_for(K)  # (an error for a K that is not a square)
        side, patch = math.isqrt(K), math.isqrt(group_size)
        if group_size < 1 or patch * patch != group_size or side % patch != 0:
            raise ValueError(f"VQBridge: the group size g={group_size} (bridge_group_size) is not a p x p "
                             f"patch that tiles the {side} x {side} image of K={K} codes; use e.g. "
                             f"bridge_group_size={working}")
        if dim % heads != 0 or dim % 4 != 0:
            raise ValueError(f"VQBridge: bridge_dim={dim} must be divisible by 4 and by {heads} heads")
        self.K, self.D, self.group_size, self.side, self.patch = K, D, group_size, side, patch
        # eq. 8 prints a LayerNorm after this linear; the release has none, and neither has this.
        # Its input is a patch's codes slot by slot ((p, p, D)); the release's patch conv reads (D, p, p).
        self.compress = nn.Linear(group_size * D, dim)
        grid = side // patch  # T = grid * grid bridge tokens
        self.register_buffer('pos_embed', sincos_2d(grid, grid, dim), persistent=False)  # (T, dim)
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
        # slot s of every group is row block s of the expand layer; one still at its zero init maps every
        # group's slot-s code to 0 and learns only once a token picks such a code: usage <= live / g
        return (self.expand.weight.reshape(self.group_size, -1).abs().amax(1) > 0).sum()

    def forward(self, codes):
        return fused(VQBridge.map_codes, codes.device)(self, codes)  # compiled on a GPU

    def map_codes(self, codes):
        side, p, D = self.side, self.patch, self.D
        grid = side // p
        x = codes.reshape(grid, p, grid, p, D).permute(0, 2, 1, 3, 4)  # (grid, grid, p, p, D): patches
        x = self.compress(x.reshape(grid * grid, p * p * D)) + self.pos_embed  # (T, dim)
        c = F.silu(self.condition)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_modulation(c).chunk(2)
        x = self.expand(modulate(self.final_norm(x), shift, scale))  # (T, p*p*D)
        x = x.reshape(grid, grid, p, p, D).permute(0, 2, 1, 3, 4)  # (grid, p, grid, p, D): the image again
        return x.reshape(self.K, D)


def make_projector(projector, K, D, bridge_group_size=0, bridge_dim=256, bridge_zero_init=True):
    # raw codebook -> codes used: None for '', 'vqbridge' (FVQ), 'linear' (SimVQ), 'mlp5' (FVQ Table 5)
    if projector == '':
        return None
    if projector == 'vqbridge':
        return VQBridge(K, D, bridge_group_size or bridge_group_size_for(K), bridge_dim,
                        zero_init=bridge_zero_init)
    if projector == 'linear':
        return nn.Linear(D, D)
    if projector == 'mlp5':
        return nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D),
                             nn.ReLU(), nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D))
    raise ValueError(f"unknown projector '{projector}'; expected '', 'vqbridge', 'linear' or 'mlp5'")


# -----------------------------------------------------------------------------
# IBQ (IBQ section 3.2): straight-through on the one-hot index over softmax(z C^T), for every code
_ENTROPY_EPS = 1e-5  # as in MAGVIT-v2 / SEED-Voken compute_entropy_loss


class IndexBackpropQuantizer(nn.Module):
    """IBQ: z_q = Ind C, Ind = onehot(argmax) - sg(p) + p, p = softmax(z C^T); the double quantization loss
    and MAGVIT-v2's entropy penalty mean H(q_n) - H(mean q_n), q = softmax(z C^T / T) (SEED-Voken's)."""

    def __init__(self, codebook_size, dim, *, beta=0.25, l2_norm=False, entropy_weight=0.05,
                 entropy_temperature=0.01, chunk_size=0, vcq_schedule='', vcq_k_min=2, vcq_seq_len=256):
        super().__init__()
        K, D = codebook_size, dim
        self.codebook_size, self.dim = K, D
        self.beta, self.l2_norm, self.chunk_size = beta, l2_norm, chunk_size
        self.entropy_weight, self.entropy_temperature = entropy_weight, entropy_temperature
        self.embedding = nn.Parameter(torch.randn(K, D))  # N(0, 1): SEED-Voken keeps nn.Embedding's init
        self.recent_codes = RecentCodes(K)
        schedule = codebook_size_schedule(vcq_schedule, vcq_k_min, K, vcq_seq_len) if vcq_schedule else None
        self.register_buffer('codebook_sizes', schedule)  # VCQ's K_t (vcq_seq_len,), or None

    def codebook(self):
        return F.normalize(self.embedding, dim=-1) if self.l2_norm else self.embedding

    def lookup(self, indices):
        return self.codebook()[indices].permute(0, 3, 1, 2)  # (B, H, W) -> (B, D, H, W)

    def forward(self, z):
        B, D, H, W = z.shape
        # under a bf16 (fp16) autocast the chunked backward multiplies dL/dlogits with the codes and tokens in
        # that dtype, as the release trains (16-mixed); the logits stay float32
        backward_dtype = (torch.get_autocast_dtype(z.device.type) if torch.is_autocast_enabled(z.device.type)
                          else torch.float32)
        with torch.autocast(device_type=z.device.type, enabled=False):
            codebook = self.codebook().float()  # (K, D)
            z_flat = z.float().permute(0, 2, 3, 1).reshape(B * H * W, D)  # (N, D), raster order per image
            if self.l2_norm:
                z_flat = F.normalize(z_flat, dim=-1)
            sizes = _token_codebook_sizes(self.codebook_sizes, B, H, W)
            args = (z_flat, codebook, sizes, self.entropy_temperature)
            # the formula with whole (N, K) matrices while they fit one chunk's budget; chunked beyond
            rows = chunk_rows(self.chunk_size, self.codebook_size, IBQ_CHUNK_ELEMENTS, IBQ_MIN_ROWS)
            if len(z_flat) <= rows and len(z_flat) * self.codebook_size <= IBQ_CHUNK_ELEMENTS:
                z_q, sample_entropy, avg_entropy, indices = ibq_formula(*args)
            else:
                z_q, sample_entropy, avg_entropy, indices = ibq_chunked(*args, backward_dtype, rows)
            loss, terms = ibq_loss(z_flat, codebook, z_q, indices, self.beta)
            entropy_loss = sample_entropy - avg_entropy
            loss = loss + self.entropy_weight * entropy_loss
        info = _info(self, indices, B, H, W, **terms, entropy_loss=entropy_loss,
                     sample_entropy=sample_entropy, avg_entropy=avg_entropy)
        return z_q.reshape(B, H, W, D).permute(0, 3, 1, 2), loss, info


def ibq_formula(z, codebook, sizes, temperature):
    """IBQ with whole (N, K) matrices: z (N, D), codebook (K, D), VCQ sizes (N,) or None -> z_q (N, D),
    mean_n H(q_n), H(mean_n q_n), indices (N,)"""
    logits = z @ codebook.t()  # (N, K), eq. 3
    too_big = _too_big_codes(logits, sizes)
    if too_big is not None:
        logits = logits.masked_fill(too_big, float('-inf'))
    soft = logits.softmax(1)  # eq. 4
    indices = logits.argmax(1)
    hard = F.one_hot(indices, codebook.shape[0]).to(z.dtype)  # eq. 5
    z_q = (hard - soft.detach() + soft) @ codebook  # eq. 6-7
    log_probs = torch.log_softmax(logits / temperature, 1)  # MAGVIT-v2's entropy terms
    probs = log_probs.exp()
    if too_big is not None:
        log_probs = log_probs.masked_fill(too_big, 0.0)  # probs is 0 there: no 0 * -inf
    avg = probs.mean(0)
    return z_q, -(probs * log_probs).sum(1).mean(), -(avg * torch.log(avg + _ENTROPY_EPS)).sum(), indices


def ibq_loss(z, codebook, z_q, indices, beta):
    # the double quantization loss (eq. 12) as SEED-Voken computes it, z_q' = onehot C -> loss, terms
    z_q_hard = codebook.index_select(0, indices)  # (N, D) z_q' of eq. 11
    terms = dict(soft_loss=F.mse_loss(z_q, z), codebook_loss=F.mse_loss(z_q_hard, z.detach()),
                 commit_loss=F.mse_loss(z, z_q_hard.detach()))
    # beta on the codebook term |sg z - z_q'|^2 (SEED-Voken); eq. 12 prints it on the commitment term
    return terms['soft_loss'] + terms['commit_loss'] + beta * terms['codebook_loss'], terms


def ibq_reference(z, codebook, beta=0.25, entropy_weight=0.05, temperature=0.01, codebook_sizes=None):
    # the formula and loss with whole (N, K) matrices (bench.py's naive baseline) -> z_q, loss, indices
    z_q, sample_entropy, avg_entropy, indices = ibq_formula(z, codebook, codebook_sizes, temperature)
    loss = ibq_loss(z, codebook, z_q, indices, beta)[0]
    return z_q, loss + entropy_weight * (sample_entropy - avg_entropy), indices


# -----------------------------------------------------------------------------
# VCQ (VCQ section 3): token t may only use the first K_t codes of the one codebook
def codebook_size_schedule(kind, k_min, k_max, seq_len, gamma=2.5):
    # K_t for t = 0 .. seq_len-1: round(k_min + (k_max - k_min) * s(t / (seq_len - 1))) (VCQ Table 2)
    if not 1 <= k_min <= k_max:
        raise ValueError(f"codebook sizes need 1 <= vcq_k_min <= K, got vcq_k_min={k_min}, K={k_max}")
    x = torch.arange(seq_len, dtype=torch.float64) / max(seq_len - 1, 1)
    shapes = {'constant': torch.ones_like(x), 'linear': x, 'cosine': 1 - torch.cos(math.pi * x / 2),
              'power': x ** gamma}
    if kind not in shapes:
        raise ValueError(f"unknown codebook size schedule '{kind}'; expected one of {list(shapes)}")
    return torch.round(k_min + (k_max - k_min) * shapes[kind]).long()


def _too_big_codes(scores, sizes):
    # scores (n, K) of tokens of sizes K_t (n,) -> (n, K) bool, True where k >= K_t (None without VCQ)
    if sizes is None:
        return None
    return torch.arange(scores.shape[1], device=scores.device)[None, :] >= sizes[:, None]


def _token_codebook_sizes(codebook_sizes, B, H, W):
    # (H*W,) schedule in raster order -> (B*H*W,) size of every token of the batch, or None without VCQ
    if codebook_sizes is None:
        return None
    if H * W != codebook_sizes.numel():
        raise ValueError(f"VCQ schedule has {codebook_sizes.numel()} positions but the latent grid is "
                         f"{H}x{W} = {H * W} tokens; set vcq_seq_len to {H * W}")
    return codebook_sizes.repeat(B)


# -----------------------------------------------------------------------------
# VAR's multi-scale residual quantizer (FVQ Table 4's "680_10step")
VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # 1 + 4 + ... + 256 = 680 tokens at a 16 x 16 latent
VAR_PHI_RATIO, VAR_PHI_CONVS = 0.5, 4  # VAR's quant_resi and share_quant_resi


class MultiScaleQuantizer(nn.Module):
    """VAR's multi-scale VQ (FVQ's release var/model/quant.py): per scale, small to large, the residual's
    codes at s x s, upsampled and through phi, go to f_hat; the loss averages VQ's over the f_hat."""

    def __init__(self, codebook_size, dim, *, beta=0.25, l2_norm=False, projector='', chunk_size=0,
                 msvq_scales=VAR_SCALES, bridge_group_size=0, bridge_dim=256, bridge_zero_init=True):
        super().__init__()
        K, D = codebook_size, dim
        scales = tuple(msvq_scales)
        if not scales or scales[0] < 1 or list(scales) != sorted(set(scales)):
            raise ValueError(f"msvq_scales must be increasing ints >= 1 (the last = the latent grid's side), "
                             f"got {msvq_scales!r}")
        self.codebook_size, self.dim, self.scales = K, D, scales
        self.beta, self.l2_norm, self.chunk_size = beta, l2_norm, chunk_size
        self.embedding = nn.Parameter(torch.randn(K, D))  # N(0, 1): the release keeps nn.Embedding's init
        self.projector = make_projector(projector, K, D, bridge_group_size, bridge_dim, bridge_zero_init)
        self.phi = nn.ModuleList(nn.Conv2d(D, D, 3, padding=1) for _ in range(VAR_PHI_CONVS))
        # VAR's PhiPartiallyShared: scale si of S takes the conv of tick (1/3 margins) nearest si/(S-1)
        margin, S = 1 / 3 / VAR_PHI_CONVS, len(scales)
        ticks = torch.linspace(margin, 1 - margin, VAR_PHI_CONVS, dtype=torch.float64)
        self.phi_of_scale = [int((ticks - si / max(S - 1, 1)).abs().argmin()) for si in range(S)]
        self.recent_codes = RecentCodes(K)
        self.codebook_sizes = None  # no VCQ over scales

    def codebook(self):
        return self.embedding if self.projector is None else self.projector(self.embedding).float()

    def _upsampled(self, codes, si, H, W):
        # (B, D, s, s) codes of scale si, upsampled: h (B, D, H, W) -> phi(h) = (1 - r) h + r conv3x3(h)
        if codes.shape[-2:] != (H, W):
            codes = F.interpolate(codes, size=(H, W), mode='bicubic')
        return codes * (1 - VAR_PHI_RATIO) + self.phi[self.phi_of_scale[si]](codes) * VAR_PHI_RATIO

    def lookup(self, indices):
        # [(B, s, s) long per scale] -> f_hat (B, D, H, W)
        codebook, side = self.codebook(), self.scales[-1]
        return sum(self._upsampled(codebook[idx].permute(0, 3, 1, 2), si, side, side)
                   for si, idx in enumerate(indices))

    def forward(self, z):
        B, D, H, W = z.shape
        if H != W or H != self.scales[-1]:
            raise ValueError(f"the last of msvq_scales {self.scales} must be the latent's side, got {H}x{W}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            codebook = self.codebook()
            search_codes = F.normalize(codebook.detach(), dim=-1) if self.l2_norm else codebook.detach()
            z = z.float()
            residual, f_hat, indices, partial_sums = z.detach(), 0, [], []
            for si, side in enumerate(self.scales):
                rest = residual if side == H else F.interpolate(residual, size=(side, side), mode='area')
                rest = rest.permute(0, 2, 3, 1).reshape(B * side * side, D)  # (B*s*s, D)
                if self.l2_norm:
                    rest = F.normalize(rest, dim=-1)
                scale_indices = nearest_codes(rest, search_codes, self.chunk_size)  # (B*s*s,)
                codes = codebook.index_select(0, scale_indices).reshape(B, side, side, D).permute(0, 3, 1, 2)
                h = self._upsampled(codes, si, H, W)  # (B, D, H, W)
                f_hat = f_hat + h
                residual = residual - h.detach()
                indices.append(scale_indices.reshape(B, side, side))
                partial_sums.append(f_hat)
            codebook_loss = torch.stack([F.mse_loss(f, z.detach()) for f in partial_sums]).mean()
            commit_loss = torch.stack([F.mse_loss(f.detach(), z) for f in partial_sums]).mean()
            loss = codebook_loss + self.beta * commit_loss
            z_q = z + (f_hat - z).detach()  # straight-through
        # usage and perplexity over all scales' tokens; info['indices'] is the list per scale (VAR's order)
        info = _info(self, flat_codes(indices).flatten(), B, 1, -1, codebook_loss=codebook_loss,
                     commit_loss=commit_loss)
        info['indices'] = indices
        return z_q, loss, info


# -----------------------------------------------------------------------------
# FVQ export: the bridge is not needed at inference
def fvq_to_vq_checkpoint(checkpoint):
    """Tokenizer checkpoint with a projected codebook -> the same tokenizer with the mapped codes as its raw
    codebook and no projector ('fvq' becomes 'vq'), its EMA weights too. Optimiser states are dropped."""
    args = checkpoint['model_args']
    kind, options = args['quantizer'], args['quantizer_args']
    source = make_quantizer(kind, args['codebook_size'], args['code_dim'], **options)
    if getattr(source, 'projector', None) is None:
        raise ValueError(f"fvq_to_vq_checkpoint needs a checkpoint with a projected codebook ('fvq', or "
                         f"'rq' / 'msvq' with a projector), got quantizer={kind!r}, options {options}")
    target_options = {k: v for k, v in options.items() if k != 'projector' and not k.startswith('bridge_')}
    target_options.update({} if kind == 'fvq' else {'projector': ''})  # rq, msvq: their own codebook
    if kind != 'msvq':  # the mapped codes are used as they are (msvq's l2_norm is its cosine search, kept)
        target_options['l2_norm'] = False

    def export(state):
        source.load_state_dict({k[len('quantizer.'):]: v for k, v in state.items()
                                if k.startswith('quantizer.')})
        exported = {k: v for k, v in state.items() if not k.startswith('quantizer.projector.')}
        with torch.no_grad():
            exported['quantizer.embedding'] = source.codebook().float().clone()  # (K, D)
        return exported

    out = {k: v for k, v in checkpoint.items()
           if k not in ('model', 'model_args', 'ema') and 'optim' not in k}
    out.update({k: export(checkpoint[k]) for k in ('model', 'ema') if checkpoint.get(k) is not None})
    out['model_args'] = dict(args, quantizer='vq' if kind == 'fvq' else kind, quantizer_args=target_options)
    return out


# -----------------------------------------------------------------------------
# fast paths: the (tokens x K) matrices in chunks of tokens, and compiled element-wise work
FUSE_DEVICES = ('cuda',)  # where fused() compiles; () runs everything eagerly (the tests add 'cpu')
_fused_functions = {}


def fused(fn, device):
    # fn compiled on FUSE_DEVICES (the launch-bound bridge, IBQ's chunk work), as it is elsewhere
    if device.type not in FUSE_DEVICES or torch.compiler.is_compiling():
        return fn
    if fn not in _fused_functions:
        _fused_functions[fn] = torch.compile(fn, dynamic=False)
    return _fused_functions[fn]


# chunk_size = 0 (automatic): rows per (rows, K) block from an element budget (VQ's distances; IBQ
# keeps about four blocks alive), at least a floor below which re-reading the codebook dominates
VQ_CHUNK_ELEMENTS, IBQ_CHUNK_ELEMENTS = 2 ** 27, 2 ** 24
VQ_MIN_ROWS, IBQ_MIN_ROWS = 512, 1024


def chunk_rows(chunk_size, K, element_budget, min_rows):
    return chunk_size or max(min_rows, element_budget // K)


def _chunk_sizes(token_codebook_sizes, start, n):
    return None if token_codebook_sizes is None else token_codebook_sizes[start:start + n]


@torch.no_grad()
def nearest_codes(z_flat, codebook, chunk_size, token_codebook_sizes=None):
    # nearest code (N,) in codebook (K, D) of each row of z_flat (N, D) (below its VCQ K_t), by chunks
    N, K = z_flat.shape[0], codebook.shape[0]
    chunk_size = chunk_rows(chunk_size, K, VQ_CHUNK_ELEMENTS, VQ_MIN_ROWS)
    code_sq = (codebook * codebook).sum(1)  # (K,); |z|^2 is the same for every code, so it is left out
    indices = []
    for start in range(0, N, chunk_size):
        dist = torch.addmm(code_sq, z_flat[start:start + chunk_size], codebook.t(), alpha=-2.0)  # |c|^2-2z.c
        too_big = _too_big_codes(dist, _chunk_sizes(token_codebook_sizes, start, chunk_size))
        if too_big is not None:
            dist.masked_fill_(too_big, float('inf'))
        indices.append(dist.argmin(1))
        del dist  # before the next chunk's is allocated: one (chunk, K) block at a time, not two
    return indices[0] if len(indices) == 1 else torch.cat(indices)  # (N,)


class _IBQChunked(torch.autograd.Function):
    """ibq_formula with a few (chunk_size, K) blocks alive at most: the forward keeps the indices, four row
    statistics and the mean q (K,); the backward recomputes each chunk's logits (matmuls, one fused call)."""

    @staticmethod
    def forward(ctx, z, codebook, token_codebook_sizes, temperature, backward_dtype, chunk_size):
        N, stats = z.shape[0], fused(_ibq_chunk_stats, z.device)
        chunks = [stats(z[start:start + chunk_size] @ codebook.t(),
                        _chunk_sizes(token_codebook_sizes, start, chunk_size), temperature)
                  for start in range(0, N, chunk_size)]
        indices = torch.cat([chunk[0] for chunk in chunks])  # (N,)
        row_stats = torch.cat([chunk[1] for chunk in chunks], 1)  # (4, N) max, log s_p, log s_q, H(q)
        avg_probs = sum(chunk[2] for chunk in chunks) / N  # (K,)
        avg_entropy = -(avg_probs * torch.log(avg_probs + _ENTROPY_EPS)).sum()
        ctx.save_for_backward(z, codebook, token_codebook_sizes, indices, row_stats, avg_probs)
        ctx.temperature, ctx.chunk_size, ctx.backward_dtype = temperature, chunk_size, backward_dtype
        ctx.mark_non_differentiable(indices)
        # forward value of (onehot - sg p + p) C is onehot C = the selected codes
        return codebook[indices], row_stats[3].mean(), avg_entropy, indices

    @staticmethod
    def backward(ctx, grad_z_q, grad_sample_entropy, grad_avg_entropy, grad_indices):
        z, codebook, token_codebook_sizes, indices, row_stats, avg_probs = ctx.saved_tensors
        N, chunk_size, dtype = z.shape[0], ctx.chunk_size, ctx.backward_dtype
        grad_z = torch.empty_like(z)
        grad_codebook = torch.zeros_like(codebook).index_add_(0, indices, grad_z_q)  # one-hot part of Ind^T g
        # d(avg entropy)/d(avg_probs), a (K,) vector shared by all tokens
        d_avg = -(torch.log(avg_probs + _ENTROPY_EPS) + avg_probs / (avg_probs + _ENTROPY_EPS))
        # the entropy gradients' weights as 0-d tensors: one compiled graph whatever their values
        scale = N * ctx.temperature
        entropy_scales = (-grad_sample_entropy / scale, grad_avg_entropy / scale)
        codebook_low, z_low = codebook.to(dtype), z.to(dtype)  # the products' operands (no copy in float32)
        grads = fused(_ibq_chunk_grads, z.device)
        with torch.autocast(device_type=z.device.type, enabled=False):
            for start in range(0, N, chunk_size):
                rows = slice(start, start + chunk_size)
                # (n, K) logits and dL/dp through z_q = Ind C, then dL/dlogits
                grad_logits = grads(z[rows] @ codebook.t(), grad_z_q[rows] @ codebook.t(),
                                    _chunk_sizes(token_codebook_sizes, start, chunk_size), row_stats[:, rows],
                                    d_avg, ctx.temperature, *entropy_scales, dtype)
                grad_z[rows] = grad_logits @ codebook_low
                grad_codebook += grad_logits.t() @ z_low[rows]  # (K, D) in dtype, added in float32
                del grad_logits  # before the next chunk's blocks are allocated
        return grad_z, grad_codebook, None, None, None, None


@torch.compiler.disable  # a compiled tokenizer calls it as it is: its chunk functions compile on their own
def ibq_chunked(z, codebook, token_codebook_sizes, temperature, backward_dtype, chunk_size):
    return _IBQChunked.apply(z, codebook, token_codebook_sizes, temperature, backward_dtype, chunk_size)


def _ibq_chunk_stats(logits, sizes, temperature):
    # chunk logits (n, K) -> argmax (n,), row stats (4, n) max, log s_p, log s_q, H(q), sum of q (K,)
    too_big = _too_big_codes(logits, sizes)
    if too_big is not None:
        logits = logits.masked_fill(too_big, float('-inf'))
    row_max = logits.amax(1, keepdim=True)  # (n, 1)
    shifted = logits - row_max  # <= 0, -inf at masked codes
    log_s = torch.log(torch.exp(shifted).sum(1))  # (n,)
    e_t = torch.exp(shifted / temperature)  # 0 at masked codes
    s_t = e_t.sum(1, keepdim=True)
    if too_big is not None:
        shifted = shifted.masked_fill(too_big, 0.0)  # e_t is 0 there: no -inf * 0
    entropy = torch.log(s_t) - (e_t * shifted).sum(1, keepdim=True) / (temperature * s_t)  # H(e_t / s_t)
    stats = torch.cat([row_max, log_s[:, None], torch.log(s_t), entropy], 1).t()  # (4, n)
    return logits.argmax(1), stats, (e_t / s_t).sum(0)


def _ibq_chunk_grads(logits, grad_probs, sizes, row_stats, d_avg, temperature, sample_scale, avg_scale,
                     dtype):
    # chunk dL/dlogits: p (dp - <p, dp>) + sample_scale q (log q + H) + avg_scale q (a - <q, a>)
    row_max, log_s, log_s_t, entropy = row_stats[:, :, None]  # (n, 1) each
    too_big = _too_big_codes(logits, sizes)
    shifted = logits - row_max
    if too_big is not None:
        shifted = shifted.masked_fill(too_big, float('-inf'))  # p = q = 0 there
    probs = torch.exp(shifted - log_s)
    grad_logits = probs * (grad_probs - (probs * grad_probs).sum(1, keepdim=True))  # 0 at masked codes
    log_q = shifted / temperature - log_s_t
    probs_t = torch.exp(log_q)
    if too_big is not None:
        log_q = log_q.masked_fill(too_big, 0.0)  # q is 0 there: no -inf * 0
    grad_logits = grad_logits + sample_scale * probs_t * (log_q + entropy)
    grad_logits = grad_logits + avg_scale * probs_t * (d_avg - (probs_t * d_avg).sum(1, keepdim=True))
    return grad_logits.to(dtype)


# -----------------------------------------------------------------------------
# plumbing: usage counting, statistics, and the one constructor every script uses
def code_usage(counts):
    # counts (K,) of each code -> (fraction of codes used, perplexity exp(H)), 0-d float64, no host sync
    counts = counts.double()
    p = counts / counts.sum()
    return (counts > 0).double().mean(), torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum())


def flat_codes(indices):
    # codes as one sequence (B, T): raster order, rq's depths position by position, msvq's coarse first
    levels = indices if isinstance(indices, (list, tuple)) else [indices]
    return torch.cat([i.flatten(1) for i in levels], 1)


def code_levels(indices):
    # {level: (B, n) codes} per rq depth ('depth1', ...) or msvq scale ('scale1x1', ...), else {}
    if isinstance(indices, (list, tuple)):
        return {f'scale{i.shape[-1]}x{i.shape[-1]}': i.flatten(1) for i in indices}
    if indices.dim() == 4:
        return {f'depth{d + 1}': indices[..., d].flatten(1) for d in range(indices.shape[-1])}
    return {}


def _code_counts(codes, bins):
    # (bins,) histogram of the codes, any shape (index_add_ rather than bincount: no host sync on GPU)
    codes = codes.reshape(-1)
    ones = torch.ones(codes.numel(), device=codes.device)
    return torch.zeros(bins, device=codes.device).index_add_(0, codes, ones)


class RecentCodes(nn.Module):
    """The codes of the last `size` training tokens, oldest first: per rank (a checkpoint keeps rank 0's).
    The default size holds both of quantizer_stats' windows."""

    def __init__(self, K, size=0):
        super().__init__()
        size = size or max(65536, K + 1, 10 * K)
        self.K, self.size = K, size
        # slot value K marks an empty slot; it is counted in an extra last bin that is never read
        self.register_buffer('recent', torch.full((size,), K, dtype=torch.long), persistent=False)
        self.register_buffer('tokens_seen', torch.zeros((), dtype=torch.long), persistent=False)

    @torch.no_grad()
    def record(self, indices):
        # a shift rather than a ring buffer: no slot arithmetic; of a batch longer than the buffer, its last
        indices = indices.reshape(-1)[-self.size:]
        self.recent.copy_(torch.cat((self.recent[indices.numel():], indices)))
        self.tokens_seen += indices.numel()

    def usage(self, last=None):
        # the fraction of the K codes among the last `last` recorded (0-d tensor)
        return code_usage(_code_counts(self.recent[self.size - (last or self.size):], self.K + 1)[:-1])[0]


def _info(module, indices, B, H, W, **losses):
    # the forward's info: the indices and the 0-d loss terms; training forwards record the codes
    if module.training:
        module.recent_codes.record(indices)
    return {'indices': indices.reshape(B, H, W, *indices.shape[1:]),
            **{name: value.detach() for name, value in losses.items()}}


def quantizer_stats(quantizer, indices):
    # 0-d tensors, read once per log interval; perplexity: of `indices` (any flat_codes layout).
    # usage (in %): distinct codes among the last 10 K training tokens (1 - e^-10 of the K for uniform
    # codes); window_usage: among the last max(65536, K + 1), the release's (at most 1 - 1/e once K >= 65,536)
    recent, K = quantizer.recent_codes, quantizer.codebook_size
    stats = {'usage': 100 * recent.usage(10 * K), 'usage_tokens': recent.tokens_seen.clamp(max=10 * K),
             'window_usage': 100 * recent.usage(max(65536, K + 1)),
             'perplexity': code_usage(_code_counts(flat_codes(indices), K))[1]}
    if isinstance(getattr(quantizer, 'projector', None), VQBridge):
        stats['bridge_live_slots'] = quantizer.projector.live_slots()
    return stats


QUANTIZERS = {
    'vq': partial(VectorQuantizer, projector='', rq_depth=1),  # LlamaGen (l2-normalised by default)
    'fvq': partial(VectorQuantizer, rq_depth=1),  # VQ behind a projector: VQBridge, or 'linear' / 'mlp5'
    'rq': VectorQuantizer,  # RQ-VAE (projector='' for its own codebook), FVQ Table 4
    'ibq': IndexBackpropQuantizer,
    'msvq': MultiScaleQuantizer,  # VAR
}


def quantizer_options(kind):
    # the options of `kind`: its constructor's keyword-only arguments, less those its partial fixes
    if kind not in QUANTIZERS:
        raise ValueError(f"unknown quantizer '{kind}'; expected one of {list(QUANTIZERS)}")
    make = QUANTIZERS[kind]
    fixed = make.keywords if isinstance(make, partial) else {}
    parameters = inspect.signature(make.func if isinstance(make, partial) else make).parameters.values()
    return [p.name for p in parameters if p.kind == p.KEYWORD_ONLY and p.name not in fixed]


def make_quantizer(kind, codebook_size, dim, **options):
    valid = quantizer_options(kind)
    unknown = [name for name in options if name not in valid]
    if unknown:
        raise TypeError(f"option(s) {unknown} do not apply to quantizer '{kind}'; its options: {valid}")
    return QUANTIZERS[kind](codebook_size, dim, **options)
