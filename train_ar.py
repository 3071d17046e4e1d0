"""
The AR stage: a LlamaGen GPT (class-conditional, next-token prediction over a frozen tokenizer's codes)
and its training. The model section below is imported by sample.py and bench.py; the training section runs
only as a script. One GPU or CPU:
    python train_ar.py config/ar_smoke.py
DDP on one node (global batch split across ranks):
    torchrun --standalone --nproc_per_node=8 train_ar.py config/ar_gpt_b.py
The first run encodes the training images once into codes_dir (default out_dir/codes) as .npy memmaps;
later runs (and other GPT sizes pointed at the same codes_dir) reuse them.
"""
import json
import math
import os
import re
import time
from contextlib import nullcontext
from functools import lru_cache

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from quantizers import modulate  # DiT's adaLN modulation, shared with VQBridge

# -----------------------------------------------------------------------------
# LlamaGen GPT: pre-norm RMSNorm, SwiGLU, causal attention with 2D RoPE, no biases, class token as the prefix

GPT_PRESETS = {  # LlamaGen's GPT sizes (head dim 64); parameter counts at K = 16,384 and 1000 classes
    'B': dict(n_layer=12, n_head=12, n_embd=768),  # 111M
    'L': dict(n_layer=24, n_head=16, n_embd=1024),  # 343M
    'XL': dict(n_layer=36, n_head=20, n_embd=1280),  # 775M
    'XXL': dict(n_layer=48, n_head=24, n_embd=1536),  # 1.4B
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x_float = x.float()  # the mean square in fp32 even under bf16 autocast
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_2d_angles(grid_h, grid_w, head_dim, base=10000.0):
    """Rotation angles (T, head_dim // 2) for the T = grid_h * grid_w inputs of one sequence: the class
    token at input 0, then the codes in raster order (input i >= 1 holds code i - 1). Half the rotary pairs
    rotate with the row, half with the column. The class token sits at (row 0, col 0) and code (r, c) at
    (r + 1, c + 1): a proper position one step above-left of the grid. (LlamaGen instead gives the class
    token cos = sin = 0, which zeroes its q and k so no query can attend to it by content; we do not copy
    that.) Only the last code is never an input, so T rows."""
    if head_dim % 4 != 0:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = 1.0 / base ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (head_dim/4,) per axis
    codes = torch.arange(grid_h * grid_w - 1)
    rows = torch.cat([torch.zeros(1), (codes // grid_w + 1).double()])  # (T,)
    cols = torch.cat([torch.zeros(1), (codes % grid_w + 1).double()])
    return torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1).float()  # (T, head_dim/2)


def rope_1d_angles(seq_len, head_dim, base=10000.0):
    """Rotation angles (T, head_dim // 2) for a 1D token sequence (the 1D tokenizer's L codes): the class token
    at position 0, code i at position i + 1; every rotary pair rotates with the position."""
    half = head_dim // 2
    freqs = 1.0 / base ** (torch.arange(half, dtype=torch.float64) / half)  # (head_dim/2,)
    return (torch.arange(seq_len, dtype=torch.float64)[:, None] * freqs).float()  # (T, head_dim/2)


def apply_rope(x, cos, sin):
    # x (B, H, L, head_dim); adjacent channels (2i, 2i+1) form rotary pair i; cos/sin (L, head_dim/2)
    x_pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = x_pairs[..., 0], x_pairs[..., 1]
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, n_embd, n_head, dropout):
        super().__init__()
        self.n_head, self.head_dim = n_head, n_embd // n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)
        self.resid_dropout = nn.Dropout(dropout)
        # (B, H, max_len, head_dim) each while generating; buffers, so that a CUDA-graphed decode step sees
        # them at fixed addresses (never saved)
        self.register_buffer('k_cache', None, persistent=False)
        self.register_buffer('v_cache', None, persistent=False)

    def forward(self, x, cos, sin, start_pos=None):
        B, L, C = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.n_head, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if start_pos is None:  # training / full recompute: plain causal attention over the L inputs
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif isinstance(start_pos, torch.Tensor):  # decode_step: one token at a tensor position, static shapes
            self.k_cache.index_copy_(2, start_pos.view(1), k)
            self.v_cache.index_copy_(2, start_pos.view(1), v)
            visible = torch.arange(self.k_cache.shape[2], device=x.device) <= start_pos  # (max_len,) written keys
            y = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=visible[None, :])
        else:  # generation: write this step's keys/values into the static cache, attend to everything so far
            end = start_pos + L
            self.k_cache[:, :, start_pos:end] = k
            self.v_cache[:, :, start_pos:end] = v
            keys, values = self.k_cache[:, :, :end], self.v_cache[:, :, :end]
            mask = None
            if L > 1:  # a multi-token prefill: input i may see cache entries <= start_pos + i
                positions = torch.arange(end, device=x.device)
                mask = positions[None, :] <= positions[start_pos:, None]  # (L, end)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, L, C)  # (B, L, C)
        return self.resid_dropout(self.proj(y))


def ffn_hidden_size(n_embd, multiple_of=256):
    # LlamaGen/Llama SwiGLU: 2/3 of 4 * dim, rounded up to a multiple of 256
    hidden = int(2 * 4 * n_embd / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


class FeedForward(nn.Module):
    def __init__(self, n_embd, dropout):
        super().__init__()
        hidden = ffn_hidden_size(n_embd)
        self.w1 = nn.Linear(n_embd, hidden, bias=False)  # gate
        self.w3 = nn.Linear(n_embd, hidden, bias=False)  # value
        self.w2 = nn.Linear(hidden, n_embd, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    """Pre-norm transformer block. With adaln (IBQ section 4.2, DiT-style reading): the class embedding
    gives a per-block shift/scale after each RMSNorm and a gate on each residual branch; the modulation layer
    is zero-initialised, so each block starts as the identity (adaLN-Zero)."""
    def __init__(self, n_embd, n_head, dropout, adaln):
        super().__init__()
        self.attention_norm = RMSNorm(n_embd)
        self.attention = Attention(n_embd, n_head, dropout)
        self.ffn_norm = RMSNorm(n_embd)
        self.feed_forward = FeedForward(n_embd, dropout)
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(n_embd, 6 * n_embd)) if adaln else None

    def forward(self, x, cond, cos, sin, start_pos=None):
        if self.adaln is None:
            x = x + self.attention(self.attention_norm(x), cos, sin, start_pos)
            return x + self.feed_forward(self.ffn_norm(x))
        # (B, 1, C) each
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(cond)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attention(modulate(self.attention_norm(x), shift1, scale1), cos, sin, start_pos)
        return x + gate2 * self.feed_forward(modulate(self.ffn_norm(x), shift2, scale2))


class CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits (N, K) against targets (N,), computed in float32, that keeps for the backward
    only the logits in their own dtype (bf16 under autocast) and one log-normaliser per row. F.cross_entropy of
    float32 logits keeps a float32 log-softmax instead, and a compiled graph that returns float32 logits writes
    them out as well: 2 GiB more per step at GPT-B batch 64 (K = 16,384) than the 0.5 GiB kept here."""
    @staticmethod
    def forward(ctx, logits, targets):
        logits_float = logits.float()
        target_log_probs = F.log_softmax(logits_float, dim=-1).gather(1, targets[:, None]).squeeze(1)  # (N,)
        log_normalizer = logits_float.gather(1, targets[:, None]).squeeze(1) - target_log_probs  # logsumexp
        ctx.save_for_backward(logits, targets, log_normalizer)
        return -target_log_probs.mean()

    @staticmethod
    def backward(ctx, grad):
        logits, targets, log_normalizer = ctx.saved_tensors
        # d loss / d logits = (softmax - one_hot(targets)) / N
        grad_logits = (logits.float() - log_normalizer[:, None]).exp_()  # (N, K) softmax
        grad_logits.scatter_add_(1, targets[:, None], torch.full_like(log_normalizer[:, None], -1.0))
        return grad_logits.mul_(grad / len(targets)).to(logits.dtype), None


class GPT(nn.Module):
    """Class-conditional next-token model over codes 0..codebook_size-1 on a grid_h x grid_w raster.
    Inputs: [class embedding, code_0, ..., code_{T-2}] -> logits for code_0 .. code_{T-1},
    T = grid_h * grid_w. Class num_classes is the learned null class (used for label dropout in training and
    for CFG)."""
    def __init__(self, codebook_size, num_classes, grid_h, grid_w, n_layer=12, n_head=12, n_embd=768,
                 dropout=0.1, token_dropout=0.1, class_dropout=0.1, adaln=False, rope='2d'):
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd {n_embd} is not divisible by n_head {n_head}")
        self.codebook_size, self.num_classes, self.class_dropout = codebook_size, num_classes, class_dropout
        self.grid_h, self.grid_w, self.seq_len = grid_h, grid_w, grid_h * grid_w
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        self.class_embedding = nn.Embedding(num_classes, n_embd)
        # the null class is a separate 1-D parameter so that it is not weight-decayed (seen in 10% of batches)
        self.null_class_embedding = nn.Parameter(torch.empty(n_embd))
        self.tok_embeddings = nn.Embedding(codebook_size, n_embd)
        self.token_dropout = nn.Dropout(token_dropout)
        self.layers = nn.ModuleList([Block(n_embd, n_head, dropout, adaln) for _ in range(n_layer)])
        self.norm = RMSNorm(n_embd)
        self.final_adaln = nn.Sequential(nn.SiLU(), nn.Linear(n_embd, 2 * n_embd)) if adaln else None
        self.output = nn.Linear(n_embd, codebook_size, bias=False)  # untied from tok_embeddings
        if rope not in ('2d', '1d'):
            raise ValueError(f"rope must be '2d' (a code grid) or '1d' (a 1D tokenizer's sequence), got {rope!r}")
        angles = (rope_2d_angles(grid_h, grid_w, n_embd // n_head) if rope == '2d'
                  else rope_1d_angles(self.seq_len, n_embd // n_head))
        self.register_buffer('rope_cos', angles.cos(), persistent=False)  # (T, head_dim/2)
        self.register_buffer('rope_sin', angles.sin(), persistent=False)
        # LlamaGen's init: N(0, 0.02) for linear and embedding weights, zero output head; adaLN-Zero
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, 'bias', None) is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.null_class_embedding, std=0.02)
        nn.init.zeros_(self.output.weight)
        for adaln in [block.adaln for block in self.layers] + [self.final_adaln]:
            if adaln is not None:
                nn.init.zeros_(adaln[1].weight)
                nn.init.zeros_(adaln[1].bias)

    def embed_classes(self, labels):
        # labels (B,) in 0..num_classes (num_classes = null); training drops labels to null w.p. class_dropout
        if self.training and self.class_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.class_dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        # (num_classes + 1, C)
        table = torch.cat([self.class_embedding.weight, self.null_class_embedding[None]])
        return F.embedding(labels, table)  # (B, C)

    def forward(self, labels, codes=None, targets=None, start_pos=None):
        """labels (B,); codes (B, L) long or None. Without start_pos: the inputs are [class, codes] at
        positions 0..L, causal attention, returns float32 logits (B, L+1, K), or with targets (B, L+1) only
        the mean cross-entropy (training never materialises the logits in float32). With start_pos
        (generation, after setup_kv_cache): start_pos == 0 prefills the class token (and any codes);
        start_pos > 0 feeds codes at positions start_pos.. through the KV cache; logits for those inputs."""
        cond = self.embed_classes(labels)  # (B, C)
        x = self.tok_embeddings(codes) if codes is not None else cond[:, None][:, :0]  # (B, L, C)
        if isinstance(start_pos, torch.Tensor):  # decode_step: one code at a tensor position (no host sync)
            position = start_pos.view(1)  # index_select keeps the shape static (indexing would not)
            cos, sin = self.rope_cos.index_select(0, position), self.rope_sin.index_select(0, position)
        else:
            if start_pos is None or start_pos == 0:
                x = torch.cat([cond[:, None], x], dim=1)  # the class token is input 0
            first = start_pos or 0
            if first + x.shape[1] > self.seq_len:
                raise ValueError(f"{first + x.shape[1]} inputs exceed the model's sequence length "
                                 f"{self.seq_len}")
            cos, sin = self.rope_cos[first:first + x.shape[1]], self.rope_sin[first:first + x.shape[1]]
        x = self.token_dropout(x)
        for block in self.layers:
            x = block(x, cond, cos, sin, start_pos)
        x = self.norm(x)
        if self.final_adaln is not None:
            shift, scale = self.final_adaln(cond)[:, None].chunk(2, dim=-1)
            x = modulate(x, shift, scale)
        logits = self.output(x)  # (B, L', K), bf16 under autocast
        if targets is None:
            return logits.float()
        return CrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def setup_kv_cache(self, batch_size, dtype=None, device=None):
        """Preallocates a static (B, H, T, head_dim) key and value cache in every layer for one generation;
        zeroes the existing one instead when it has that shape (a CUDA graph keeps replaying on its memory)."""
        param = self.output.weight
        device = torch.device(device or param.device)
        if dtype is None:  # the dtype the keys come out in: autocast's when it is on
            on = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if on else param.dtype
        shape = (batch_size, self.n_head, self.seq_len, self.n_embd // self.n_head)
        for block in self.layers:
            attention = block.attention
            cache = attention.k_cache
            if cache is not None and cache.shape == shape and cache.dtype == dtype and cache.device == device:
                attention.k_cache.zero_()
                attention.v_cache.zero_()
            else:
                attention.k_cache = torch.zeros(shape, dtype=dtype, device=device)
                attention.v_cache = torch.zeros_like(attention.k_cache)

    def decode_step(self, labels, codes, position):
        """One generation step with static shapes, for CUDA graphs: codes (B, 1) at position `position`, a 0-d
        long tensor >= 1, after setup_kv_cache and the prefill self(labels, None, start_pos=0)
        -> logits (B, K)."""
        return self(labels, codes, start_pos=position)[:, -1]

    def clear_kv_cache(self):
        for block in self.layers:
            block.attention.k_cache = block.attention.v_cache = None

    def flops_per_token(self):
        """Training FLOPs (forward + backward = 3x the forward, 2 FLOPs per multiply-add) per input token,
        counting only the work done, with T = seq_len inputs, L layers, width C:
            6 x (weights of the per-token matmuls: attention qkv and proj, SwiGLU, the output head)
          + 6 x (adaLN weights) / T   the adaLN projections run once per sequence, on the class vector
          + 12 L C (T + 1) / 2        QK^T and AV: 2 x 2C forward FLOPs per key seen; causal flash/SDPA
                                      kernels skip the masked blocks, so a token sees (T + 1) / 2 keys
        Embedding tables are look-ups and RMSNorm weights elementwise: 0 FLOPs. (nanoGPT's 6N + 12 L C T,
        PaLM's convention, counts all N parameters per token and all T keys: a higher figure.)"""
        adaln = [block.adaln for block in self.layers] + [self.final_adaln]
        adaln_linears = {id(m[1]) for m in adaln if m is not None}
        linears = [m for m in self.modules() if isinstance(m, nn.Linear)]
        per_token = sum(m.weight.numel() for m in linears if id(m) not in adaln_linears)
        per_sequence = sum(m.weight.numel() for m in linears if id(m) in adaln_linears)
        T = self.seq_len
        return 6 * per_token + 6 * per_sequence / T + 12 * self.n_layer * self.n_embd * (T + 1) / 2


def gpt_model_args(codebook_size, num_classes, grid_h, grid_w, ar_model, n_layer=0, n_head=0, n_embd=0,
                   **options):
    """GPT(**args) for a preset name, with depth / heads / width overridden where given (0 = the preset's)."""
    if ar_model not in GPT_PRESETS:
        raise ValueError(f"unknown ar_model '{ar_model}'; expected one of {sorted(GPT_PRESETS)}")
    preset = GPT_PRESETS[ar_model]
    return dict(codebook_size=codebook_size, num_classes=num_classes, grid_h=grid_h, grid_w=grid_w,
                n_layer=n_layer or preset['n_layer'], n_head=n_head or preset['n_head'],
                n_embd=n_embd or preset['n_embd'], **options)


# dense bf16 peaks (no 2:4 sparsity) from the vendors' data sheets (A10G: AWS's figure). The first entry whose
# words all occur in the device name wins: 'H100 PCIe' and 'H100 NVL' before the plain (SXM) 'H100'
PEAK_BF16_FLOPS = ((('H100', 'PCIE'), 756e12), (('H100', 'NVL'), 835e12), (('H100',), 989e12),
                   (('H200',), 989e12), (('H800',), 989e12), (('A100',), 312e12), (('A800',), 312e12),
                   (('L40S',), 362e12), (('4090',), 165e12), (('A10G',), 70e12), (('A10',), 125e12))


def peak_bf16_flops_of(name):
    """Dense bf16 peak FLOP/s of a GPU named as torch.cuda.get_device_name does ('NVIDIA H100 PCIe',
    'NVIDIA A100-SXM4-80GB'), or 0 where unknown. Whole words only: 'A10' is not an 'A100' or an 'A10G'."""
    words = set(re.split(r'[\s_-]+', name.upper()))
    for keys, flops in PEAK_BF16_FLOPS:
        if all(key in words for key in keys):
            return flops
    return 0.0


def peak_bf16_flops(device):
    """The peak of the GPU `device` (for MFU), or 0 on the CPU and unknown GPUs."""
    if not str(device).startswith('cuda'):
        return 0.0
    return peak_bf16_flops_of(torch.cuda.get_device_name(device))


# -----------------------------------------------------------------------------
# the training script's data helpers (pure functions of their arguments)

def ten_crop_read_size(image_size):
    # LlamaGen's extract_codes_c2i.py: crop_size = int(image_size * crop_range), crop_range 1.1 (281 at 256)
    return int(image_size * 1.1)


def image_views(images, size, ten_crop, flip_augment):
    """(B, 3, S', S') -> (B * views, 3, size, size), the views of one image adjacent: LlamaGen's ten crops of
    images read at ten_crop_read_size (torchvision's TenCrop: the corner crops TL, TR, BL, BR and the centre crop,
    then the same five of the flipped image), or the image (and its horizontal flip)."""
    if not ten_crop:
        crops = [images] + ([images.flip(-1)] if flip_augment else [])
        return torch.stack(crops, dim=1).reshape(-1, 3, size, size)

    def five_crops(x):
        S1 = x.shape[-1]
        c = round((S1 - size) / 2)  # torchvision's centre crop offset (Python's round)
        return [x[..., :size, :size], x[..., :size, S1 - size:], x[..., S1 - size:, :size],
                x[..., S1 - size:, S1 - size:], x[..., c:c + size, c:c + size]]

    return torch.stack(five_crops(images) + five_crops(images.flip(-1)), dim=1).reshape(-1, 3, size, size)


def center_view(ten_crop):
    """Which of image_views' views of an image is its plain centre crop: view 4 of the ten crops (TenCrop
    order), else view 0 (the unflipped image)."""
    return 4 if ten_crop else 0


def encode_views(tokenizer, images, image_size, ten_crop, flip_augment):
    """(B, 3, S', S') images -> codes (B, views, T) long: image_views through the (float32) tokenizer, in
    float32 whatever autocast the caller runs under."""
    # autocast off: LlamaGen extracts in float32, and bf16 changes ~0.7% of the codes
    with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
        views = image_views(images.float(), image_size, ten_crop, flip_augment)
        codes = tokenizer.encode(views)  # (B * views, h, w)
    return codes.reshape(len(images), -1, codes[0].numel())


@lru_cache(maxsize=2)
def epoch_order(epoch, seed, num_valid, num_images, views_per_image):
    """Epoch `epoch` of the shuffled code stream: the order of the num_valid readable images (indices into
    them) and the view drawn for each of the num_images images. A function of the epoch only, so a resumed
    run continues exactly where it stopped."""
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_valid, generator=g)  # (num_valid,)
    views = torch.randint(views_per_image, (num_images,), generator=g)  # (num_images,)
    return order, views


if __name__ == '__main__':
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from tqdm import tqdm

    from tokenizer import (load_tokenizer, make_dataset, setup_device, autocast_context, atomic_save,
                           truncate_log, append_log, load_checkpoint, tokenizer_weights, state_fingerprint,
                           check_out_dir, check_resume_config, gather_rng_states, restore_rng_states,
                           atomic_write, leave_process_group)

    # -----------------------------------------------------------------------------
    # default config: LlamaGen GPT-B on ImageNet 256 codes (config/ar_gpt_b.py);
    # override with config files / --key=value
    # I/O
    out_dir = 'out-ar'
    ckpt_interval = 5000
    log_interval = 50
    init_from = 'scratch'  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
    overwrite = False  # True: a run from scratch may replace the checkpoint already in out_dir
    resume_allow = ''  # comma-separated config keys that may differ from the resumed checkpoint's
    seed = 1337
    # codes
    tokenizer_ckpt = ''  # tokenizer checkpoint (train_tokenizer.py's out_dir/ckpt.pt); required
    codes_dir = ''  # '' = out_dir/codes; share one folder between GPT sizes trained on the same tokenizer
    data_dir = ''  # ImageFolder root (root/<class>/*.JPEG); '' = the built-in procedural dataset, no download
    num_images = 0  # size of the built-in dataset (0 = its default)
    image_size = 0  # 0 = the tokenizer's training image_size
    ten_crop = True  # LlamaGen: centre crop at 1.1x, then ten crops (5 crops + flips) -> 10 views per image
    flip_augment = True  # without ten_crop: the image and its horizontal flip -> 2 views
    extract_batch_size = 16  # images per encoder batch and rank (x views per image)
    num_workers = 4
    num_classes = 0  # 0 = the dataset's; a label >= num_classes is an error
    # model
    ar_model = 'B'  # GPT_PRESETS key: 'B', 'L', 'XL', 'XXL'
    n_layer = 0  # 0 = the preset's
    n_head = 0
    n_embd = 0
    dropout = 0.1  # residual and FFN dropout
    token_dropout = 0.1
    class_dropout = 0.1  # label -> null class, for CFG
    ar_adaln = False  # IBQ: the class embedding is also the AdaLN condition of every block
    # optimisation (FVQ Table 6, generation column)
    batch_size = 256  # global batch, split across ranks and gradient_accumulation_steps
    gradient_accumulation_steps = 1
    max_iters = 300 * 1281167 // 256  # 300 ImageNet epochs
    learning_rate = 1e-4  # at base_batch_size; scaled by batch_size / base_batch_size
    base_batch_size = 256
    beta1 = 0.9
    beta2 = 0.95
    weight_decay = 0.05  # on weight matrices only (not norms, biases, the null class, AdaLN layers)
    lr_schedule = 'annealing'  # get_lr below: 'annealing' (FVQ Table 6), 'cosine' or 'constant'
    warmup_frac = 0.0  # linear warmup from 0.005x to 1x over this fraction of max_iters
    constant_frac = 0.05  # 'annealing': 1x for this fraction of the steps after warmup (Table 6's
    #                       "baselr(0.3)" = 0.3), then a linear decay to 0.01x at max_iters
    grad_clip = 1.0  # 0 = off
    # system
    device = 'auto'  # 'auto', 'cpu', 'cuda', 'cuda:1', ...
    dtype = 'bfloat16'  # autocast dtype on GPU ('bfloat16' or 'float32'); the CPU always runs float32
    compile = False
    # -----------------------------------------------------------------------------
    # the config keys: the lower-case globals of config types (the model section's GPT_PRESETS is not one)
    config_keys = [k for k, v in globals().items() if k.islower() and not k.startswith('_')
                   and isinstance(v, (bool, int, float, str, tuple, list, dict))]
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    config = {k: globals()[k] for k in config_keys}
    # -----------------------------------------------------------------------------

    ddp = int(os.environ.get('RANK', -1)) != -1
    device, rank, local_rank, world_size = setup_device(device)
    master = rank == 0
    if batch_size % (world_size * gradient_accumulation_steps) != 0:
        raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size} x "
                         f"gradient_accumulation_steps {gradient_accumulation_steps}")
    if lr_schedule not in ('annealing', 'cosine', 'constant'):
        raise ValueError(f"unknown lr_schedule '{lr_schedule}' "
                         f"(expected 'annealing', 'cosine' or 'constant')")
    micro_batch = batch_size // (world_size * gradient_accumulation_steps)
    lr = learning_rate * batch_size / base_batch_size
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    autocast = autocast_context(device, dtype)
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    log_path = os.path.join(out_dir, 'log.jsonl')  # a JSON line per log interval (evaluate.py --mode=curves)
    check_out_dir(ckpt_path, init_from, overwrite)
    if master:
        print(f"config: {config}")
        print(f"world_size {world_size}, micro batch {micro_batch}/rank, lr {lr:.3e}, device {device}")

    # -----------------------------------------------------------------------------
    # codes: encode the training images once (every view of every image), reuse on later runs

    if not tokenizer_ckpt:
        raise ValueError("tokenizer_ckpt is required (the checkpoint of a train_tokenizer.py run)")
    codes_dir = codes_dir or os.path.join(out_dir, 'codes')
    tokenizer_checkpoint = load_checkpoint(tokenizer_ckpt, 'tokenizer', mmap=True)
    image_size = image_size or tokenizer_checkpoint['config']['image_size']
    views_per_image = 10 if ten_crop else (2 if flip_augment else 1)
    # the codes belong to these exact weights: a tokenizer retrained in place (same path, same iteration)
    # differs in its fingerprint
    extraction = dict(tokenizer_ckpt=os.path.abspath(tokenizer_ckpt),
                      tokenizer_iter=tokenizer_checkpoint.get('iter_num', -1),
                      tokenizer_fingerprint=state_fingerprint(tokenizer_weights(tokenizer_checkpoint)),
                      data_dir=data_dir, num_images=num_images, image_size=image_size,
                      views_per_image=views_per_image,
                      # ten crops: the size read (codes of an older nanoVQ read round(1.1 x), not LlamaGen's int)
                      **({'read_size': ten_crop_read_size(image_size)} if ten_crop else {}))
    del tokenizer_checkpoint
    meta_path = os.path.join(codes_dir, 'meta.json')
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        differing = [k for k in extraction if meta.get(k) != extraction[k]]
        if differing:
            raise ValueError(f"{codes_dir} holds codes extracted with different settings: "
                             + ", ".join(f"{k} (codes {meta.get(k)!r}, now {extraction[k]!r})"
                                         for k in differing)
                             + "; delete that folder or set codes_dir to another one")
        if master:
            num_rows = len(np.load(os.path.join(codes_dir, 'codes.npy'), mmap_mode='r'))
            print(f"reusing {num_rows // views_per_image} x {views_per_image} code sequences in {codes_dir}")
    else:
        # float32 weights (and encode_views turns autocast off): bf16 changes ~0.7% of the codes
        tokenizer = load_tokenizer(tokenizer_ckpt, map_location=device).float()
        if getattr(tokenizer.quantizer, 'rq_depth', 1) > 1 or hasattr(tokenizer.quantizer, 'scales'):
            raise ValueError(f"'{tokenizer_ckpt}' is a multi-code tokenizer (quantizer 'rq' or 'msvq', FVQ Table 4, "
                             f"reconstruction only here); train_ar.py models one code per position")
        # the training images, without random augmentation: deterministic resize + centre crop;
        # ten_crop reads at 1.1x and takes the crops here, on the tensor
        dataset = make_dataset(data_dir, ten_crop_read_size(image_size) if ten_crop else image_size, train=True,
                               num_images=num_images, augment=False)
        N, K = len(dataset), tokenizer.quantizer.codebook_size
        grid_h, grid_w = tokenizer.token_grid(image_size)  # 1 x L for the 1D tokenizer
        T = grid_h * grid_w
        code_dtype = np.uint16 if K <= 65536 else np.int32
        os.makedirs(codes_dir, exist_ok=True)
        codes_path, labels_path = os.path.join(codes_dir, 'codes.npy'), os.path.join(codes_dir, 'labels.npy')
        if master:  # rank 0 creates the files, every rank fills its own images' rows
            num_rows = N * views_per_image
            np.lib.format.open_memmap(codes_path, mode='w+', dtype=code_dtype, shape=(num_rows, T)).flush()
            np.lib.format.open_memmap(labels_path, mode='w+', dtype=np.int64, shape=(num_rows,)).flush()
        if ddp:
            dist.barrier()
        codes_mm = np.lib.format.open_memmap(codes_path, mode='r+')
        labels_mm = np.lib.format.open_memmap(labels_path, mode='r+')
        my_images = list(range(rank, N, world_size))
        loader = torch.utils.data.DataLoader(dataset, batch_size=extract_batch_size, sampler=my_images,
                                             collate_fn=list, num_workers=num_workers)
        position, skipped = 0, 0
        for batch in tqdm(loader, desc=f'encoding views (rank {rank})', disable=not master):
            keys = my_images[position:position + len(batch)]
            position += len(batch)
            kept = [(key, item) for key, item in zip(keys, batch) if item is not None]
            for key, item in zip(keys, batch):
                if item is None:  # unreadable image (warned by the dataset): label -1 excludes its rows
                    labels_mm[key * views_per_image:(key + 1) * views_per_image] = -1
                    skipped += 1
            if not kept:
                continue
            images = torch.stack([item[0] for _, item in kept]).to(device)
            codes = encode_views(tokenizer, images, image_size, ten_crop, flip_augment)
            codes = codes.cpu().numpy().astype(code_dtype)  # (images, views_per_image, T)
            for (key, (_, label)), image_codes in zip(kept, codes):  # one row block per image
                codes_mm[key * views_per_image:(key + 1) * views_per_image] = image_codes
                labels_mm[key * views_per_image:(key + 1) * views_per_image] = label
        codes_mm.flush()
        labels_mm.flush()
        del codes_mm, labels_mm
        if ddp:
            dist.barrier()
        if master:
            codebook_sizes = tokenizer.quantizer.codebook_sizes
            if codebook_sizes is not None:  # VCQ: K_t travels with the codes, to the checkpoint and sampler
                if codebook_sizes.numel() != T:
                    raise ValueError(f"the tokenizer's VCQ schedule has {codebook_sizes.numel()} positions, "
                                     f"but {image_size}px images give {T} tokens")
                np.save(os.path.join(codes_dir, 'codebook_sizes.npy'),
                        codebook_sizes.cpu().numpy().astype(np.int64))
            # center_view and dataset_images (the images read; num_images is the setting, 0 = all) stay out
            # of `extraction`: folders written before they existed remain valid
            meta = dict(extraction, grid_h=grid_h, grid_w=grid_w, codebook_size=K, dataset_images=N,
                        tokenizer_type=tokenizer.tokenizer_type,
                        dataset_classes=dataset.num_classes, vcq=codebook_sizes is not None,
                        center_view=center_view(ten_crop))
            # written last: its presence marks complete codes
            atomic_write(meta_path, lambda f: json.dump(meta, f, indent=1), mode='w')
            print(f"encoded {N} images x {views_per_image} views into {codes_dir}"
                  + (f" (rank 0 skipped {skipped} unreadable images)" if skipped else ''))
        if ddp:
            dist.barrier()
        with open(meta_path) as f:
            meta = json.load(f)
        del tokenizer
        if device_type == 'cuda':
            torch.cuda.empty_cache()

    # -----------------------------------------------------------------------------
    # data: an endless shuffled stream of the codes, a random view of every readable image per epoch

    codes_mm = np.load(os.path.join(codes_dir, 'codes.npy'), mmap_mode='r')  # (N * views, T)
    labels_all = np.load(os.path.join(codes_dir, 'labels.npy'))  # (N * views,)
    codebook_sizes = None  # VCQ: K_t per position
    if meta['vcq']:
        codebook_sizes = np.load(os.path.join(codes_dir, 'codebook_sizes.npy')).tolist()
    num_classes = num_classes or meta['dataset_classes']
    image_labels = labels_all[::views_per_image]  # (N,)
    valid_images = torch.from_numpy(np.flatnonzero(image_labels >= 0))  # unreadable images are left out
    if len(valid_images) == 0:
        raise ValueError(f"{codes_dir} has no readable images")
    bad = image_labels[(image_labels >= num_classes)]
    if len(bad):
        raise ValueError(f"class id {int(bad.max())} in {codes_dir}/labels.npy is out of range for "
                         f"num_classes={num_classes} (valid ids 0..{num_classes - 1}; the null class "
                         f"{num_classes} is reserved)")

    def get_batch(step):
        """Micro-batch `step` of the stream, this rank's slice of it: codes (B, T) long, labels (B,) long on
        the device. It depends only on the micro-step, so a resumed run continues exactly where it stopped."""
        positions = step * micro_batch * world_size + rank * micro_batch + torch.arange(micro_batch)
        epochs = positions // len(valid_images)
        rows = torch.empty(micro_batch, dtype=torch.long)
        for epoch in epochs.unique().tolist():  # at most two epochs meet in one batch
            order, views = epoch_order(epoch, seed, len(valid_images), len(image_labels), views_per_image)
            here = epochs == epoch
            images = valid_images[order[positions[here] % len(valid_images)]]
            rows[here] = images * views_per_image + views[images]
        rows = rows.numpy()
        codes = torch.from_numpy(codes_mm[rows].astype(np.int64))
        labels = torch.from_numpy(labels_all[rows])
        if device_type == 'cuda':
            codes = codes.pin_memory().to(device, non_blocking=True)
            labels = labels.pin_memory().to(device, non_blocking=True)
        return codes, labels

    # -----------------------------------------------------------------------------
    # model and optimiser

    torch.manual_seed(seed)  # identical init on every rank (DDP also broadcasts rank 0's)
    model_args = gpt_model_args(meta['codebook_size'], num_classes, meta['grid_h'], meta['grid_w'], ar_model,
                                n_layer, n_head, n_embd, dropout=dropout, token_dropout=token_dropout,
                                class_dropout=class_dropout, adaln=ar_adaln,
                                # a 1D tokenizer's codes get 1D RoPE (2D grids keep the model_args they had)
                                **({'rope': '1d'} if meta.get('tokenizer_type') == 'titok' else {}))
    model = GPT(**model_args).to(device)
    decay = [p for name, p in model.named_parameters() if p.dim() >= 2 and 'adaln' not in name]
    no_decay = [p for name, p in model.named_parameters() if p.dim() < 2 or 'adaln' in name]
    optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                                   {'params': no_decay, 'weight_decay': 0.0}], lr=lr, betas=(beta1, beta2),
                                  fused=device_type == 'cuda')
    if master:
        print(f"GPT-{ar_model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
              f"({model.n_layer} layers, {model.n_head} heads, width {model.n_embd}), {model.seq_len} "
              f"tokens, K = {model.codebook_size}{' (VCQ)' if codebook_sizes else ''}, {num_classes} "
              f"classes, {len(valid_images)} images x {views_per_image} views")

    iter_num, rng_states = 0, None
    if init_from == 'resume':
        checkpoint = load_checkpoint(ckpt_path, 'gpt', device)
        check_resume_config(ckpt_path, checkpoint, model_args, config, resume_allow)
        model.load_state_dict(checkpoint['model'])
        optimizer.load_state_dict(checkpoint['optimizer'])
        iter_num = checkpoint['iter_num']
        rng_states = checkpoint['rng_states'][rank] if len(checkpoint['rng_states']) == world_size else None
        if master:
            truncate_log(log_path, iter_num)  # what the killed run logged after it is logged again
            print(f"resumed from {ckpt_path} at iter {iter_num}")
        del checkpoint
    elif init_from != 'scratch':
        raise ValueError(f"init_from must be 'scratch' or 'resume', got '{init_from}'")
    elif master and os.path.exists(log_path):
        os.remove(log_path)  # a fresh run starts a fresh log

    raw_model = model  # un-compiled, un-wrapped: what checkpoints hold
    if compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)
    restore_rng_states(rng_states, device_type, seed + rank + iter_num)  # per-rank streams (dropout)

    # -----------------------------------------------------------------------------
    # learning-rate schedule (FVQ Table 6's terms)

    def get_lr(it):
        """'annealing': linear warmup from 0.005x to 1x over warmup_frac of max_iters, 1x for constant_frac
        of the remaining steps, then linear decay to 0.01x at max_iters; 'cosine': the same warmup, then
        cosine from 1x to 0.01x; 'constant': 1x throughout."""
        if lr_schedule == 'constant':
            return lr
        warmup_iters = warmup_frac * max_iters
        if it < warmup_iters:
            return lr * (0.005 + (1 - 0.005) * it / warmup_iters)
        if lr_schedule == 'annealing':
            decay_start = warmup_iters + constant_frac * (max_iters - warmup_iters)
            if it < decay_start:
                return lr
            progress = min(1.0, (it - decay_start) / max(1.0, max_iters - decay_start))
            return lr * (1 + (0.01 - 1) * progress)
        progress = min(1.0, (it - warmup_iters) / max(1.0, max_iters - warmup_iters))  # cosine
        return lr * (0.01 + (1 - 0.01) * 0.5 * (1 + math.cos(math.pi * progress)))

    # -----------------------------------------------------------------------------
    # training loop

    if master:
        os.makedirs(out_dir, exist_ok=True)  # only now: a config or data error leaves no empty out_dir behind
    flops_per_iter = raw_model.flops_per_token() * raw_model.seq_len * batch_size
    peak_flops = peak_bf16_flops(device) * world_size
    t0, start_iter = time.time(), iter_num
    while True:
        if iter_num > start_iter and (iter_num % ckpt_interval == 0 or iter_num == max_iters):
            all_rng_states = gather_rng_states(device_type, ddp, world_size)
            if master:
                atomic_save({'kind': 'gpt', 'model': raw_model.state_dict(),
                             'optimizer': optimizer.state_dict(), 'model_args': model_args, 'config': config,
                             'iter_num': iter_num, 'data_step': iter_num * gradient_accumulation_steps,
                             'rng_states': all_rng_states, 'tokenizer_ckpt': os.path.abspath(tokenizer_ckpt),
                             # the weights that wrote the codes: sample.py decodes with them or refuses
                             'tokenizer_fingerprint': meta['tokenizer_fingerprint'],
                             'tokenizer_iter': meta['tokenizer_iter'],
                             'codebook_sizes': codebook_sizes, 'image_size': image_size}, ckpt_path)
                print(f"saved checkpoint to {ckpt_path} at iter {iter_num}", flush=True)
        if iter_num >= max_iters:
            break
        step_lr = get_lr(iter_num)
        for group in optimizer.param_groups:
            group['lr'] = step_lr
        loss_sum = torch.zeros((), device=device)  # read (a GPU sync) only when logging
        for micro_step in range(gradient_accumulation_steps):
            codes, labels = get_batch(iter_num * gradient_accumulation_steps + micro_step)
            last = micro_step == gradient_accumulation_steps - 1
            with (model.no_sync() if ddp and not last else nullcontext()), autocast:
                # inputs [class, x_0..x_{T-2}] -> targets x_0..x_{T-1}
                loss = model(labels, codes[:, :-1], targets=codes)
                (loss / gradient_accumulation_steps).backward()
            loss_sum += loss.detach() / gradient_accumulation_steps
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        if iter_num % log_interval == 0 and master:
            if device_type == 'cuda':
                torch.cuda.synchronize()
            dt = (time.time() - t0) / (iter_num - max(start_iter, iter_num - log_interval))
            t0 = time.time()
            record = {'iter': iter_num, 'split': 'train', 'loss': loss_sum.item(), 'lr': step_lr,
                      'tok_per_s': batch_size * raw_model.seq_len / dt, 'ms_per_iter': 1000 * dt,
                      'mfu': flops_per_iter / dt / peak_flops if peak_flops else None}
            append_log(log_path, record)
            mfu = f"{100 * record['mfu']:.2f}%" if peak_flops else 'n/a'
            print(f"iter {iter_num}: loss {record['loss']:.6f}, lr {step_lr:.3e}, "
                  f"{record['tok_per_s']:.0f} tok/s, {record['ms_per_iter']:.1f} ms/iter, MFU {mfu}",
                  flush=True)

    if ddp:
        del model  # the DDP wrapper holds the process group
        leave_process_group()
