"""
The AR stage: a LlamaGen GPT (class-conditional next-token prediction over a frozen tokenizer's codes),
imported by sample.py and bench.py, and its training, which first encodes the training images into codes_dir:
    python train_ar.py config/ar_smoke.py
    torchrun --standalone --nproc_per_node=8 train_ar.py config/ar_gpt_b.py   (DDP: the global batch split)
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
    """LlamaGen's precompute_freqs_cis_2d without its class rows: angles (grid_h * grid_w, head_dim // 2) of
    the codes, code i at (row i // grid_w, col i % grid_w); the first head_dim/4 rotary pairs turn with the
    row, the rest with the column, pair j at base^(-2j / (head_dim/2)) rad per step (float32, as LlamaGen)."""
    freqs = 1.0 / base ** (torch.arange(0, head_dim // 2, 2).float() / (head_dim // 2))  # (head_dim/4,)
    codes = torch.arange(grid_h * grid_w)
    return torch.cat([torch.outer(codes // grid_w, freqs), torch.outer(codes % grid_w, freqs)], dim=1)


def rope_1d_angles(seq_len, head_dim, base=10000.0):
    # LlamaGen's precompute_freqs_cis without its class rows: angles (seq_len, head_dim // 2), code i at i
    freqs = 1.0 / base ** (torch.arange(0, head_dim, 2)[:head_dim // 2].float() / head_dim)
    return torch.outer(torch.arange(seq_len), freqs)


def apply_rope(x, cos, sin):
    # x (B, H, L, head_dim); adjacent channels (2i, 2i+1) form rotary pair i; cos/sin (L, head_dim/2)
    x0, x1 = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)  # (B, H, L, head_dim/2) each
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, n_embd, n_head, dropout):
        super().__init__()
        self.n_head, self.head_dim = n_head, n_embd // n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)
        self.resid_dropout = nn.Dropout(dropout)
        # (B, H, T, head_dim) each while generating: buffers, at fixed addresses for CUDA graphs
        self.register_buffer('k_cache', None, persistent=False)
        self.register_buffer('v_cache', None, persistent=False)

    def forward(self, x, cos, sin, start_pos=None):
        B, L, C = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.n_head, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if start_pos is None:  # training / full recompute: causal attention over the L inputs
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # one input at the position tensor start_pos (1,): index_copy_ keeps every shape static
            self.k_cache.index_copy_(2, start_pos, k)
            self.v_cache.index_copy_(2, start_pos, v)
            written = torch.arange(self.k_cache.shape[2], device=x.device) <= start_pos  # (T,)
            y = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=written[None, :])
        y = y.transpose(1, 2).reshape(B, L, C)  # (B, L, C)
        return self.resid_dropout(self.proj(y))


def ffn_hidden_size(n_embd, multiple_of=256):
    # LlamaGen/Llama SwiGLU: 2/3 of 4 * dim, rounded up to a multiple of 256
    return multiple_of * math.ceil(int(2 * 4 * n_embd / 3) / multiple_of)


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
    """Pre-norm transformer block. With adaln (IBQ section 4.2, as SEED-Voken's IBQ llama.py, VAR's AdaLN):
    one linear of the class embedding gives gamma1, gamma2, scale1, scale2, shift1, shift2 (in that order),
    and x + gamma1 * attention(norm(x) * (1 + scale1) + shift1), then the same for the FFN with the 2s."""
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
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.adaln(cond)[:, None].chunk(6, dim=-1)
        x = x + self.attention(modulate(self.attention_norm(x), shift1, scale1), cos, sin, start_pos) * gamma1
        return x + self.feed_forward(modulate(self.ffn_norm(x), shift2, scale2)) * gamma2


class CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits (N, K) against targets (N,), computed in float32, that keeps for the
    backward only the logits in their own dtype (bf16 under autocast) and one log-normaliser per row, where
    F.cross_entropy of float32 logits would keep a float32 log-softmax."""
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
    """Class-conditional next-token model over the T = grid_h * grid_w codes of a raster: inputs [class,
    code_0, ..., code_{T-2}] -> logits of code_0 .. code_{T-1}. Class num_classes is the null class."""
    def __init__(self, codebook_size, num_classes, grid_h, grid_w, n_layer=12, n_head=12, n_embd=768,
                 dropout=0.1, token_dropout=0.1, class_dropout=0.1, adaln=False, adaln_gamma=1e-3,
                 rope='2d'):
        super().__init__()
        self.codebook_size, self.num_classes, self.class_dropout = codebook_size, num_classes, class_dropout
        self.grid_h, self.grid_w, self.seq_len = grid_h, grid_w, grid_h * grid_w
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        self.class_embedding = nn.Embedding(num_classes, n_embd)
        # the null class is a separate 1-D parameter so that it is not weight-decayed
        self.null_class_embedding = nn.Parameter(torch.empty(n_embd))
        self.tok_embeddings = nn.Embedding(codebook_size, n_embd)
        self.token_dropout = nn.Dropout(token_dropout)
        self.layers = nn.ModuleList([Block(n_embd, n_head, dropout, adaln) for _ in range(n_layer)])
        self.norm = RMSNorm(n_embd)
        self.final_adaln = nn.Sequential(nn.SiLU(), nn.Linear(n_embd, 2 * n_embd)) if adaln else None
        self.output = nn.Linear(n_embd, codebook_size, bias=False)  # untied from tok_embeddings
        angles = (rope_1d_angles(self.seq_len, n_embd // n_head) if rope == '1d'
                  else rope_2d_angles(grid_h, grid_w, n_embd // n_head))[:-1]  # the input codes 0..T-2
        # (T, head_dim/2): LlamaGen's cos = sin = 0 for the class token (rotated q, k = 0), then the codes
        self.register_buffer('rope_cos', F.pad(angles.cos(), (0, 0, 1, 0)), persistent=False)
        self.register_buffer('rope_sin', F.pad(angles.sin(), (0, 0, 1, 0)), persistent=False)
        # LlamaGen's init: N(0, 0.02) for linear and embedding weights, zero output head
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, 'bias', None) is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.null_class_embedding, std=0.02)
        nn.init.zeros_(self.output.weight)
        if adaln:  # SEED-Voken's (VAR's init_adaln): gamma rows x adaln_gamma, scale / shift rows x 0.5
            for weight in [block.adaln[1].weight.data for block in self.layers]:
                weight[:2 * n_embd] *= adaln_gamma  # SEED-Voken's alng: 1e-3 (B, L), 1e-4 (XL), 1e-5 (XXL)
                weight[2 * n_embd:] *= 0.5
            self.final_adaln[1].weight.data *= 0.5

    def embed_classes(self, labels):
        # labels (B,) in 0..num_classes (num_classes = null); training drops labels to null w.p. class_dropout
        if self.training and self.class_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.class_dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        table = torch.cat([self.class_embedding.weight, self.null_class_embedding[None]])  # (classes + 1, C)
        return F.embedding(labels, table)  # (B, C)

    def forward(self, labels, codes=None, targets=None, start_pos=None):
        """labels (B,). Without start_pos: inputs [class, codes (B, L)] at positions 0..L, causal attention
        -> float32 logits (B, L+1, K), or with targets (B, L+1) only the mean cross-entropy. With start_pos
        (0-d long, after setup_kv_cache): the class token (codes None) or codes (B, 1) -> logits (B, 1, K)."""
        cond = self.embed_classes(labels)  # (B, C)
        if start_pos is None:
            x = torch.cat([cond[:, None], self.tok_embeddings(codes)], dim=1)  # (B, L+1, C)
            cos, sin = self.rope_cos[:x.shape[1]], self.rope_sin[:x.shape[1]]
        else:
            start_pos = start_pos.view(1)  # index_select keeps the shape static (indexing would not)
            x = cond[:, None] if codes is None else self.tok_embeddings(codes)  # (B, 1, C)
            cos, sin = self.rope_cos.index_select(0, start_pos), self.rope_sin.index_select(0, start_pos)
        x = self.token_dropout(x)
        for block in self.layers:
            x = block(x, cond, cos, sin, start_pos)
        x = self.norm(x)
        if self.final_adaln is not None:  # SEED-Voken's AdaLNBeforeHead
            scale, shift = self.final_adaln(cond)[:, None].chunk(2, dim=-1)
            x = modulate(x, shift, scale)
        logits = self.output(x)  # (B, L', K), bf16 under autocast
        if targets is None:
            return logits.float()
        return CrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def setup_kv_cache(self, batch_size):
        """A static (B, H, T, head_dim) key and value cache in every layer, in the dtype the keys come out in
        (autocast's when on); one of that shape and dtype is zeroed in place (a CUDA graph replays on it)."""
        device = self.output.weight.device
        on = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if on else self.output.weight.dtype
        shape = (batch_size, self.n_head, self.seq_len, self.n_embd // self.n_head)
        for attention in [block.attention for block in self.layers]:
            cache = attention.k_cache
            if cache is not None and cache.shape == shape and cache.dtype == dtype:
                attention.k_cache.zero_()
                attention.v_cache.zero_()
            else:
                attention.k_cache = torch.zeros(shape, dtype=dtype, device=device)
                attention.v_cache = torch.zeros_like(attention.k_cache)

    def decode_step(self, labels, codes, position):
        """One generation step with static shapes (what CUDA graphs replay): codes (B, 1), or None for the
        class token, at `position`, a 0-d long tensor -> logits (B, K)."""
        return self(labels, codes, start_pos=position)[:, -1]

    def clear_kv_cache(self):
        for block in self.layers:
            block.attention.k_cache = block.attention.v_cache = None

    def flops_per_token(self):
        """Training FLOPs (3x the forward) per input token, of the work done: 6 x the per-token matmul
        weights, 6 x the adaLN weights / T (run once per sequence), 12 L C (T + 1) / 2 for QK^T and AV
        (causal kernels skip masked blocks). Embedding look-ups and norms count 0."""
        linears = [(name, m.weight.numel()) for name, m in self.named_modules() if isinstance(m, nn.Linear)]
        per_sequence = sum(n for name, n in linears if 'adaln' in name)
        per_token = sum(n for _, n in linears) - per_sequence
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


# dense bf16 peaks (no 2:4 sparsity) from the vendors' data sheets (A10G: AWS's figure); the first name found
# as whole words in the device's name wins ('H100 PCIe' before the SXM 'H100'; 'A10' is no 'A100' or 'A10G')
PEAK_BF16_FLOPS = {'H100 PCIe': 756e12, 'H100 NVL': 835e12, 'H100': 989e12, 'H200': 989e12,
                   'H800': 989e12, 'A100': 312e12, 'A800': 312e12, 'L40S': 362e12, '4090': 165e12,
                   'A10G': 70e12, 'A10': 125e12}


def peak_bf16_flops(device):
    # for MFU; 0 on the CPU and unknown GPUs
    name = torch.cuda.get_device_name(device) if str(device).startswith('cuda') else ''
    found = [flops for key, flops in PEAK_BF16_FLOPS.items() if re.search(rf'\b{key}\b', name, re.I)]
    return found[0] if found else 0.0


# -----------------------------------------------------------------------------
# the training script's views of an image and order of the codes

def image_views(images, size, ten_crop):
    """(B, 3, S', S') -> (B * views, 3, size, size), an image's views adjacent: LlamaGen's ten crops
    (torchvision's TenCrop: corners TL, TR, BL, BR and the centre, then the same five of the flipped image) of
    images read at 1.1x, or the image and its horizontal flip."""
    if not ten_crop:
        return torch.stack([images, images.flip(-1)], dim=1).reshape(-1, 3, size, size)

    def five_crops(x):
        S1 = x.shape[-1]
        c = round((S1 - size) / 2)  # torchvision's centre crop offset (Python's round)
        return [x[..., :size, :size], x[..., :size, S1 - size:], x[..., S1 - size:, :size],
                x[..., S1 - size:, S1 - size:], x[..., c:c + size, c:c + size]]

    return torch.stack(five_crops(images) + five_crops(images.flip(-1)), dim=1).reshape(-1, 3, size, size)


@lru_cache(maxsize=2)
def epoch_order(epoch, seed, num_valid, num_images, views_per_image):
    """Epoch `epoch` of the shuffled code stream: the order of the num_valid readable images and the view
    drawn for each of the num_images images: a function of the epoch only (resumed runs continue exactly)."""
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_valid, generator=g)  # (num_valid,)
    return order, torch.randint(views_per_image, (num_images,), generator=g)  # views (num_images,)


if __name__ == '__main__':
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from tqdm import tqdm

    from tokenizer import (load_tokenizer, make_dataset, setup_device, autocast_context, atomic_save,
                           truncate_log, append_log, load_checkpoint, tokenizer_checkpoint, tokenizer_weights,
                           state_fingerprint, check_resume_config, gather_rng_states, restore_rng_states,
                           atomic_write, leave_process_group, check_config, stop_if_not_finite, lock_out_dir,
                           CHECKPOINT_FORMAT)

    # -----------------------------------------------------------------------------
    # default config: LlamaGen GPT-B, ImageNet 256 (config/ar_gpt_b.py); override: config files, --key=value
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
    ten_crop = True  # LlamaGen: read at 1.1x, ten crops (5 + their flips); False: the image and its flip
    num_workers = 4
    # model (LlamaGen's dropouts 0.1 are the GPT's defaults; the classes are the dataset's)
    ar_model = 'B'  # GPT_PRESETS key: 'B', 'L', 'XL', 'XXL'
    n_layer = 0  # 0 = the preset's
    n_head = 0
    n_embd = 0
    ar_adaln = False  # IBQ: the class embedding is also the adaLN condition of every block
    ar_adaln_gamma = 1e-3  # IBQ's init of the adaLN gammas (SEED-Voken's alng: 1e-4 for XL, 1e-5 for XXL)
    # optimisation (FVQ Table 6, generation column; AdamW betas (0.9, 0.95))
    batch_size = 256  # global batch, split across ranks and gradient_accumulation_steps
    gradient_accumulation_steps = 1
    max_iters = 300 * 1281167 // 256  # 300 ImageNet epochs
    learning_rate = 1e-4  # at base_batch_size; scaled by batch_size / base_batch_size
    base_batch_size = 256
    weight_decay = 0.05  # on weight matrices only (not norms, biases, the null class, adaLN layers)
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
    barrier = dist.barrier if ddp else lambda: None
    device, rank, local_rank, world_size = setup_device(device)
    master = rank == 0
    if not tokenizer_ckpt:
        raise ValueError("tokenizer_ckpt is required (the checkpoint of a train_tokenizer.py run)")
    tokenizer_record = tokenizer_checkpoint(tokenizer_ckpt)  # nanoVQ's or a released tokenizer's
    tokenizer_args = tokenizer_record['model_args']
    # the GPT's sizes before the codes are extracted: RoPE turns channel pairs, 2D RoPE half of them per axis
    sizes = gpt_model_args(0, 0, 0, 0, ar_model, n_layer, n_head, n_embd)  # the preset's where 0
    rope_parts = 2 if tokenizer_args.get('tokenizer_type') == 'titok' else 4
    check_config(config, [
        ('tokenizer_ckpt', tokenizer_args['quantizer'] not in ('rq', 'msvq')
         or (tokenizer_args['quantizer_args'] or {}).get('rq_depth', 4) == 1,  # rq's default depth: 4
         "one code per position, not a multi-code tokenizer (rq, msvq: FVQ Table 4)"),
        *[(k, config[k] >= 0, ">= 0") for k in ('max_iters', 'num_images', 'image_size', 'n_layer', 'n_head',
                                                 'n_embd')],  # max_iters 0: the codes only; sizes 0: defaults
        ('ckpt_interval', ckpt_interval >= 1, ">= 1"),
        ('lr_schedule', lr_schedule in ('annealing', 'cosine', 'constant'), "annealing, cosine or constant"),
        ('n_embd', sizes['n_embd'] % (rope_parts * sizes['n_head']) == 0,
         f"a multiple of {rope_parts} x n_head = {rope_parts * sizes['n_head']} for RoPE (0: the preset's "
         f"{sizes['n_embd']})")], world_size)
    micro_batch = batch_size // (world_size * gradient_accumulation_steps)
    lr = learning_rate * batch_size / base_batch_size
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    autocast = autocast_context(device, dtype)
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    log_path = os.path.join(out_dir, 'log.jsonl')  # a JSON line per log interval (evaluate.py --mode=curves)
    lock_out_dir(out_dir, rank, keep=ckpt_path if init_from == 'scratch' and not overwrite else '')
    if master:
        print(f"world_size {world_size}, micro batch {micro_batch}/rank, lr {lr:.3e}, device {device}")

    # -----------------------------------------------------------------------------
    # codes: every view of every training image, encoded once; reused while the extraction record matches
    codes_dir = codes_dir or os.path.join(out_dir, 'codes')
    image_size = image_size or tokenizer_record['config']['image_size']
    V = 10 if ten_crop else 2  # views per image
    # everything that defines the codes; the fingerprint tells apart a tokenizer retrained in place
    extraction = dict(tokenizer_ckpt=os.path.abspath(tokenizer_ckpt),
                      tokenizer_iter=tokenizer_record['iter_num'],
                      tokenizer_fingerprint=state_fingerprint(tokenizer_weights(tokenizer_record)),
                      data_dir=data_dir, num_images=num_images, image_size=image_size,
                      # LlamaGen's extract_codes_c2i.py reads at int(image_size * 1.1) for the ten crops
                      read_size=int(image_size * 1.1) if ten_crop else image_size, views_per_image=V,
                      center_view=4 if ten_crop else 0)  # the plain centre crop: TenCrop's 5th, or the image
    meta_path = os.path.join(codes_dir, 'meta.json')
    if not os.path.isfile(meta_path):
        tokenizer = load_tokenizer(tokenizer_record, map_location=device).float()  # as LlamaGen extracts
        grid_h, grid_w = tokenizer.token_grid(image_size)  # 1 x L for the 1D tokenizer
        T, K = grid_h * grid_w, tokenizer.quantizer.codebook_size
        dataset = make_dataset(data_dir, extraction['read_size'], train=True, num_images=num_images,
                               augment=False)  # a deterministic resize + centre crop
        N = len(dataset)
        os.makedirs(codes_dir, exist_ok=True)
        codes_path, labels_path = os.path.join(codes_dir, 'codes.npy'), os.path.join(codes_dir, 'labels.npy')
        if master:  # rank 0 creates the files, every rank fills its own images' rows
            code_dtype = np.uint16 if K <= 65536 else np.int32
            np.lib.format.open_memmap(codes_path, mode='w+', dtype=code_dtype, shape=(N * V, T)).flush()
            np.save(labels_path, np.full(N * V, -1, dtype=np.int64))  # -1 stays on an unreadable image's rows
        barrier()
        codes_mm, labels_mm = np.load(codes_path, mmap_mode='r+'), np.load(labels_path, mmap_mode='r+')
        my_images = list(range(rank, N, world_size))
        batches = [my_images[i:i + 16] for i in range(0, len(my_images), 16)]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=list,
                                             num_workers=num_workers)
        for keys, batch in zip(batches, tqdm(loader, desc=f'encoding (rank {rank})', disable=not master)):
            kept = [(key, item) for key, item in zip(keys, batch) if item is not None]  # None: unreadable
            if not kept:
                continue
            images = torch.stack([image for _, (image, _) in kept]).to(device)
            with torch.no_grad():
                codes = tokenizer.encode(image_views(images, image_size, ten_crop))  # (images * V, h, w)
            for (key, (_, label)), image_codes in zip(kept, codes.reshape(len(kept), V, T).cpu().numpy()):
                codes_mm[key * V:(key + 1) * V] = image_codes
                labels_mm[key * V:(key + 1) * V] = label
        codes_mm.flush()
        labels_mm.flush()
        barrier()
        if master:  # meta.json written last: its presence marks complete codes
            codebook_sizes = tokenizer.quantizer.codebook_sizes  # VCQ: K_t, to the checkpoint and the sampler
            if codebook_sizes is not None:
                np.save(os.path.join(codes_dir, 'codebook_sizes.npy'), codebook_sizes.cpu().numpy())
            meta = dict(extraction, grid_h=grid_h, grid_w=grid_w, codebook_size=K, dataset_images=N,
                        tokenizer_type=tokenizer.tokenizer_type, dataset_classes=dataset.num_classes,
                        vcq=codebook_sizes is not None)
            atomic_write(meta_path, lambda f: json.dump(meta, f, indent=1), mode='w')
            print(f"encoded {N} images x {V} views into {codes_dir}")
        barrier()
        del tokenizer
        if device_type == 'cuda':
            torch.cuda.empty_cache()
    del tokenizer_record  # (the tokenizer's weights; the GPT trains on the codes alone)
    with open(meta_path) as f:
        meta = json.load(f)
    differing = [k for k in extraction if meta.get(k) != extraction[k]]
    if differing:
        raise ValueError(f"{codes_dir} holds codes extracted with other settings (or by an older nanoVQ): "
                         + ", ".join(f"{k} (codes {meta.get(k)!r}, now {extraction[k]!r})" for k in differing)
                         + "; delete that folder (train_ar.py extracts them anew) or set another codes_dir")

    # -----------------------------------------------------------------------------
    # data: an endless shuffled stream of the codes, a random view of every readable image per epoch
    codes_mm = np.load(os.path.join(codes_dir, 'codes.npy'), mmap_mode='r')  # (N * V, T)
    labels_all = np.load(os.path.join(codes_dir, 'labels.npy'))  # (N * V,)
    codebook_sizes = np.load(os.path.join(codes_dir, 'codebook_sizes.npy')).tolist() if meta['vcq'] else None
    image_labels = labels_all[::V]  # (N,)
    valid_images = torch.from_numpy(np.flatnonzero(image_labels >= 0))  # unreadable images are left out
    if len(valid_images) == 0:
        raise ValueError(f"{codes_dir} has no readable images")

    def get_batch(step):
        """This rank's slice of micro-batch `step` of the stream: codes (B, T), labels (B,) on the device; a
        function of the micro-step only, so a resumed run continues exactly where it stopped."""
        positions = step * micro_batch * world_size + rank * micro_batch + torch.arange(micro_batch)
        epochs = positions // len(valid_images)
        rows = torch.empty(micro_batch, dtype=torch.long)
        for epoch in epochs.unique().tolist():  # at most two epochs meet in one batch
            order, views = epoch_order(epoch, seed, len(valid_images), len(image_labels), V)
            here = epochs == epoch
            images = valid_images[order[positions[here] % len(valid_images)]]
            rows[here] = images * V + views[images]
        rows = rows.numpy()
        batch = [torch.from_numpy(codes_mm[rows].astype(np.int64)), torch.from_numpy(labels_all[rows])]
        if device_type == 'cuda':
            batch = [t.pin_memory().to(device, non_blocking=True) for t in batch]
        return batch  # codes, labels

    # -----------------------------------------------------------------------------
    # model, optimiser, resume
    torch.manual_seed(seed)  # identical init on every rank (DDP also broadcasts rank 0's)
    model_args = gpt_model_args(meta['codebook_size'], meta['dataset_classes'], meta['grid_h'],
                                meta['grid_w'], ar_model, n_layer, n_head, n_embd, adaln=ar_adaln,
                                adaln_gamma=ar_adaln_gamma,
                                rope='1d' if meta['tokenizer_type'] == 'titok' else '2d')
    model = GPT(**model_args).to(device)
    decay = [p for name, p in model.named_parameters() if p.dim() >= 2 and 'adaln' not in name]
    no_decay = [p for name, p in model.named_parameters() if p.dim() < 2 or 'adaln' in name]
    optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                                   {'params': no_decay, 'weight_decay': 0.0}], lr=lr, betas=(0.9, 0.95),
                                  fused=device_type == 'cuda')
    if master:
        print(f"GPT: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {model_args}; "
              f"{len(valid_images)} images x {V} views")
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
    elif master:  # a fresh run starts a fresh log, its setting first (for evaluate.py's plot titles)
        append_log(log_path, {'iter': 0, 'split': 'config', 'config': config, 'device': device}, fresh=True)
    raw_model = model  # un-compiled, un-wrapped: what checkpoints hold
    if compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)
    restore_rng_states(rng_states, device_type, seed + rank + iter_num)  # per-rank streams (dropout)

    def get_lr(it):  # FVQ Table 6's terms, as train_tokenizer.py's
        warmup_iters = warmup_frac * max_iters
        if it < warmup_iters:
            return lr * (0.005 + 0.995 * it / warmup_iters)
        if lr_schedule == 'constant':
            return lr
        if lr_schedule == 'annealing':  # 1x for constant_frac of the steps after warmup, then linear to 0.01x
            decay_start = warmup_iters + constant_frac * (max_iters - warmup_iters)
            progress = max(0.0, it - decay_start) / max(1.0, max_iters - decay_start)
            return lr * (1.0 - 0.99 * min(1.0, progress))
        progress = min(1.0, (it - warmup_iters) / max(1.0, max_iters - warmup_iters))
        return lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress)))  # cosine

    # -----------------------------------------------------------------------------
    # training loop
    flops_per_iter = raw_model.flops_per_token() * raw_model.seq_len * batch_size
    peak_flops = peak_bf16_flops(device) * world_size
    t0, start_iter = time.time(), iter_num
    while True:
        if iter_num > start_iter and (iter_num % ckpt_interval == 0 or iter_num == max_iters):
            all_rng_states = gather_rng_states(device_type, ddp, world_size)
            if master:
                stop_if_not_finite('weights', raw_model.state_dict(), iter_num, learning_rate)
                atomic_save({'kind': 'gpt', 'format': CHECKPOINT_FORMAT, 'model': raw_model.state_dict(),
                             'optimizer': optimizer.state_dict(), 'model_args': model_args, 'config': config,
                             'iter_num': iter_num, 'rng_states': all_rng_states, 'image_size': image_size,
                             'codebook_sizes': codebook_sizes, 'tokenizer_ckpt': extraction['tokenizer_ckpt'],
                             # the weights that wrote the codes: sample.py decodes with them or refuses
                             'tokenizer_fingerprint': meta['tokenizer_fingerprint'],
                             'tokenizer_iter': meta['tokenizer_iter']}, ckpt_path)
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
                loss = model(labels, codes[:, :-1], targets=codes)  # [class, x_0..x_{T-2}] -> x_0..x_{T-1}
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
            stop_if_not_finite('loss', {'loss': record['loss']}, iter_num, learning_rate)
            append_log(log_path, record)
            mfu = f"{100 * record['mfu']:.2f}%" if peak_flops else 'n/a'
            print(f"iter {iter_num}: loss {record['loss']:.6f}, lr {step_lr:.3e}, "
                  f"{record['tok_per_s']:.0f} tok/s, {record['ms_per_iter']:.1f} ms/iter, MFU {mfu}",
                  flush=True)

    if ddp:
        del model  # the DDP wrapper holds the process group
        leave_process_group()
