"""
The image tokenizer: a VQGAN (LlamaGen VQ-16) or a 1D TiTok encoder/decoder around a quantizer from
quantizers.py; the PatchGAN discriminator, its losses and LPIPS; the image datasets; and the plumbing the
scripts share. Images are float tensors in [-1, 1], shape (B, 3, H, W).
"""
import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from quantizers import make_quantizer

# -----------------------------------------------------------------------------
# VQGAN encoder / decoder (LlamaGen VQ-16: GroupNorm(32, eps 1e-6), swish, attention at the lowest resolution)

def Normalize(channels):
    # 32 groups as LlamaGen; narrow test/smoke models keep >= 4 channels per group, as one channel per group
    # is InstanceNorm and strips each channel's mean (the image's colour)
    return nn.GroupNorm(math.gcd(channels, min(32, max(1, channels // 4))), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, dropout=0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels
                             else nn.Identity())

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions."""
    def __init__(self, channels):
        super().__init__()
        self.norm = Normalize(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        # 3 x (B, 1, HW, C)
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, 1, C, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return x + self.proj_out(h.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as taming/LlamaGen


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode='nearest'))


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, dropout):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.res, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.res.append(ResnetBlock(block_in, ch * mult, dropout))
                block_in = ch * mult
                stage.attn.append(AttnBlock(block_in) if level == len(ch_mult) - 1 else nn.Identity())
            stage.downsample = Downsample(block_in) if level < len(ch_mult) - 1 else nn.Identity()
            self.down.append(stage)
        self.mid = nn.Sequential(ResnetBlock(block_in, block_in, dropout), AttnBlock(block_in),
                                 ResnetBlock(block_in, block_in, dropout))
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for stage in self.down:
            for res, attn in zip(stage.res, stage.attn):
                h = attn(res(h))
            h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, z_channels, H/ds, W/ds)


class Decoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, dropout):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = nn.Sequential(ResnetBlock(block_in, block_in, dropout), AttnBlock(block_in),
                                 ResnetBlock(block_in, block_in, dropout))
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):  # lowest resolution first
            stage = nn.Module()
            stage.res, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.res.append(ResnetBlock(block_in, ch * mult, dropout))
                block_in = ch * mult
                stage.attn.append(AttnBlock(block_in) if level == len(ch_mult) - 1 else nn.Identity())
            stage.upsample = Upsample(block_in) if level > 0 else nn.Identity()
            self.up.append(stage)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, 1, 1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for stage in self.up:
            for res, attn in zip(stage.res, stage.attn):
                h = attn(res(h))
            h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W)


# -----------------------------------------------------------------------------
# 1D tokenizer, the VCQ paper's: TiTok's (bytedance/1d-tokenizer modeling/titok.py, modules/blocks.py)

# (width, depth, heads) of the ViT encoder and decoder. VCQ Appendix A: Base = ViT-B encoder + ViT-B decoder,
# Large = ViT-B encoder + ViT-L decoder
TITOK_PRESETS = {'tiny': ((64, 2, 4), (64, 2, 4)), 'small': ((128, 4, 4), (128, 4, 4)),
                 'base': ((768, 12, 12), (768, 12, 12)), 'large': ((768, 12, 12), (1024, 24, 16))}


class ViTBlock(nn.Module):
    """Pre-norm ViT block (as TiTok): LayerNorm -> attention, LayerNorm -> 4x GELU MLP."""
    def __init__(self, width, heads, dropout):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                 nn.Dropout(dropout))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, width, depth, heads, dropout):
        super().__init__()
        self.norm_pre = nn.LayerNorm(width)
        self.blocks = nn.Sequential(*[ViTBlock(width, heads, dropout) for _ in range(depth)])
        self.norm_post = nn.LayerNorm(width)

    def forward(self, x):
        return self.norm_post(self.blocks(self.norm_pre(x)))


def init_vit_weights(module, width):
    """TiTok's _init_weights: Linear / conv weights trunc-normal(0.02), biases 0 (LayerNorms keep 1 / 0); qkv
    keeps xavier-uniform as TiTok's nn.MultiheadAttention in-projection (apply() visits a block after qkv).
    Presets narrower than TiTok-S (512) scale the std by sqrt(512 / width): at 0.02 the codes collapse."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02 * max(1, (512 / width) ** 0.5))
        nn.init.zeros_(module.bias)
    elif isinstance(module, ViTBlock):
        nn.init.xavier_uniform_(module.qkv.weight)


class LatentEncoder1D(nn.Module):
    """image (B, 3, S, S) -> (B, code_dim, 1, L) as TiTok's TiTokEncoder: [class, patches] and L latent tokens
    through a ViT; only the latent outputs go to code_dim (a 1 x L grid, so every quantizer applies)."""
    def __init__(self, image_size, patch_size, width, depth, heads, num_latent_tokens, code_dim, dropout):
        super().__init__()
        scale = width ** -0.5  # TiTok's embeddings: scale * randn
        self.patch_embed = nn.Conv2d(3, width, patch_size, patch_size)
        self.class_token = nn.Parameter(scale * torch.randn(1, width))  # in TiTok's code, not in its paper
        self.patch_pos = nn.Parameter(scale * torch.randn((image_size // patch_size) ** 2 + 1, width))
        self.latent_tokens = nn.Parameter(scale * torch.randn(num_latent_tokens, width))
        self.latent_pos = nn.Parameter(scale * torch.randn(num_latent_tokens, width))
        self.vit = ViT(width, depth, heads, dropout)
        self.to_code = nn.Linear(width, code_dim)  # TiTok's 1x1 conv_out
        self.apply(lambda module: init_vit_weights(module, width))

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, P, width)
        x = torch.cat([self.class_token.expand(len(x), -1, -1), x], 1) + self.patch_pos  # (B, 1 + P, width)
        latent = (self.latent_tokens + self.latent_pos).expand(len(x), -1, -1)  # (B, L, width)
        z = self.to_code(self.vit(torch.cat([x, latent], dim=1))[:, x.shape[1]:])  # (B, L, code_dim)
        return z.transpose(1, 2)[:, :, None]  # (B, code_dim, 1, L)


class LatentDecoder1D(nn.Module):
    """(B, code_dim, 1, L) -> image (B, 3, S, S) as TiTok's single-stage TiTokDecoder: [class, one mask token
    per patch] and the L codes through a ViT; each patch output to its p x p pixels, then a 3x3 conv."""
    def __init__(self, image_size, patch_size, width, depth, heads, num_latent_tokens, code_dim, dropout):
        super().__init__()
        self.patch_size, self.grid = patch_size, image_size // patch_size
        scale = width ** -0.5
        self.from_code = nn.Linear(code_dim, width)
        self.latent_pos = nn.Parameter(scale * torch.randn(num_latent_tokens, width))
        self.class_token = nn.Parameter(scale * torch.randn(1, width))
        self.mask_token = nn.Parameter(scale * torch.randn(1, width))
        self.patch_pos = nn.Parameter(scale * torch.randn(self.grid ** 2 + 1, width))
        self.vit = ViT(width, depth, heads, dropout)
        self.to_pixels = nn.Linear(width, 3 * patch_size ** 2)  # TiTok's 1x1 conv ffn
        self.conv_out = nn.Conv2d(3, 3, 3, padding=1)
        self.apply(lambda module: init_vit_weights(module, width))

    def forward(self, z_q):
        latent = self.from_code(z_q.flatten(2).transpose(1, 2)) + self.latent_pos  # (B, L, width)
        patches = torch.cat([self.class_token, self.mask_token.expand(self.grid ** 2, -1)]) + self.patch_pos
        x = self.vit(torch.cat([patches.expand(len(latent), -1, -1), latent], 1))[:, 1:1 + self.grid ** 2]
        pixels = self.to_pixels(x).transpose(1, 2).reshape(len(x), -1, self.grid, self.grid)  # (B, 3pp, g, g)
        return self.conv_out(F.pixel_shuffle(pixels, self.patch_size))  # (B, 3, S, S)


class Tokenizer(nn.Module):
    """image -> encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder -> image. 'vqgan': an h x w
    grid of codes; 'titok': L = num_latent_tokens codes, a 1 x L grid (ViTs of TITOK_PRESETS, no ch*)."""
    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256, dropout=0.0,
                 quantizer='vq', codebook_size=16384, code_dim=8, quantizer_args=None, tokenizer_type='vqgan',
                 image_size=256, patch_size=16, num_latent_tokens=256, titok_preset='base'):
        super().__init__()
        self.tokenizer_type = tokenizer_type
        quantizer_args = quantizer_args or {}
        if tokenizer_type == 'vqgan':  # (the order of construction fixes each module's random init)
            self.downsample = 2 ** (len(ch_mult) - 1)
            self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels, dropout)
            self.quant_conv = nn.Conv2d(z_channels, code_dim, 1)
            self.quantizer = make_quantizer(quantizer, codebook_size, code_dim, **quantizer_args)
            self.post_quant_conv = nn.Conv2d(code_dim, z_channels, 1)
            self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels, dropout)
        elif tokenizer_type == 'titok':
            if titok_preset not in TITOK_PRESETS:
                raise ValueError(f"unknown titok_preset '{titok_preset}'; expected {list(TITOK_PRESETS)}")
            if image_size % patch_size != 0:
                raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
            (enc_width, enc_depth, enc_heads), (dec_width, dec_depth, dec_heads) = TITOK_PRESETS[titok_preset]
            self.num_latent_tokens = num_latent_tokens
            self.encoder = LatentEncoder1D(image_size, patch_size, enc_width, enc_depth, enc_heads,
                                           num_latent_tokens, code_dim, dropout)
            self.quant_conv = self.post_quant_conv = nn.Identity()  # the ViTs project to / from code_dim
            self.quantizer = make_quantizer(quantizer, codebook_size, code_dim, **quantizer_args)
            self.decoder = LatentDecoder1D(image_size, patch_size, dec_width, dec_depth, dec_heads,
                                           num_latent_tokens, code_dim, dropout)
        else:
            raise ValueError(f"unknown tokenizer_type '{tokenizer_type}'; expected 'vqgan' or 'titok'")

    def forward(self, images):
        z = self.quant_conv(self.encoder(images))  # (B, code_dim, h, w)
        z_q, quant_loss, info = self.quantize(z)
        return self.decoder(self.post_quant_conv(z_q)), quant_loss, info

    def quantize(self, z):
        # float32 under bf16 autocast (bf16 distances cannot tell the nearest of 262,144 codes apart); each
        # quantizer turns autocast off around its own arithmetic, so IBQ's backward still sees the caller's
        return self.quantizer(z.float())

    def token_grid(self, image_size):
        """(h, w) of the codes of an image_size image: the VQGAN's grid, or 1 x L for the 1D tokenizer."""
        if self.tokenizer_type == 'titok':
            return 1, self.num_latent_tokens
        return image_size // self.downsample, image_size // self.downsample

    @torch.no_grad()
    def encode(self, images):
        z = self.quant_conv(self.encoder(images))
        indices = self.quantize(z)[2]['indices']  # (B, h, w); rq: (B, h, w, depth)
        return indices[:, 0] if self.tokenizer_type == 'titok' else indices  # 1D: (B, L); rq: (B, L, depth)

    @torch.no_grad()
    def decode(self, indices):
        # (B, h, w), or (B, L) / (B, 1, L) for the 1D tokenizer (rq: a trailing depth axis) -> (B, 3, H, W)
        if self.tokenizer_type == 'titok':
            depth = getattr(self.quantizer, 'rq_depth', 1)
            depth_axis = [depth] if depth > 1 else []
            indices = indices.reshape(len(indices), 1, self.num_latent_tokens, *depth_axis)
        return self.decoder(self.post_quant_conv(self.quantizer.lookup(indices)))


def compile_blocks(model, **compile_options):
    """Regional compilation (train_tokenizer.py --compile=True): each residual, attention and ViT block
    compiled in place (the state_dict keeps its names), the glue between them eager. Blocks of one class and
    shape share a graph: Inductor builds a few small graphs, not one whole-model graph and its backward."""
    blocks = [m for m in model.modules() if isinstance(m, (ResnetBlock, AttnBlock, ViTBlock))]
    # the blocks share nn.Module's call code, so one cache holds all their graphs (each shape, grad or not)
    dynamo_config = torch._dynamo.config
    dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 4 * len(blocks))
    for block in blocks:
        block.compile(dynamic=False, **compile_options)
    return model


def tokens_per_image(tokenizer_type, image_size, ch_mult, num_latent_tokens):
    """Codes per image: the VQGAN's (image_size / 2^(levels - 1))^2, or the 1D tokenizer's L."""
    if tokenizer_type == 'titok':
        return num_latent_tokens
    return (image_size // 2 ** (len(ch_mult) - 1)) ** 2


def load_tokenizer(path, map_location='cpu', ema=True):
    """A Tokenizer in eval mode from a train_tokenizer.py checkpoint, with its EMA weights when it has them
    (what IBQ's release evaluates with) unless ema=False. Memory-mapped: the optimiser state is never read.
    Or a released tokenizer as downloaded (tokenizer_checkpoint): LlamaGen's vq_ds16_c2i.pt / vq_ds8_c2i.pt,
    FVQ's training checkpoints and fullvq2vqgan_ds16_res2_*_256.pt, SEED-Voken's IBQ imagenet256_*.ckpt.
    `path` may also be what tokenizer_checkpoint(path, ema) returned: the file is then not read again."""
    checkpoint = path if isinstance(path, dict) else tokenizer_checkpoint(path, ema)
    model = Tokenizer(**checkpoint['model_args'])
    model.load_state_dict(tokenizer_weights(checkpoint, ema))
    return model.to(map_location).eval()


def tokenizer_weights(checkpoint, ema=True):
    return checkpoint['ema'] if ema and checkpoint.get('ema') is not None else checkpoint['model']


# -----------------------------------------------------------------------------
# released tokenizers: nanoVQ's VQGAN up to the names (LlamaGen's, kept by FVQ; taming's, kept by IBQ) and
# the q, k, v convs; FVQ's DiT bridge (qbridge.py; QBridge-L/4, L/8: width 256, depth 2, 4 heads, mlp 2)

RELEASE_NAMES = (('encoder.conv_blocks.', 'encoder.down.'), ('decoder.conv_blocks.', 'decoder.up.'),
                 ('.block.', '.res.'), ('mid.block_1.', 'mid.0.'), ('mid.attn_1.', 'mid.1.'),
                 ('mid.block_2.', 'mid.2.'), ('quantize.embedding.weight', 'quantizer.embedding'),
                 ('quantize.qbridge.', 'quantizer.projector.'), ('x_embedder.proj.', 'compress.'),
                 ('attn.qkv.', 'qkv.'), ('attn.proj.', 'proj.'), ('mlp.fc', 'fc'),
                 ('final_layer.linear.', 'expand.'), ('final_layer.adaLN_modulation.1.', 'final_modulation.'),
                 ('adaLN_modulation.1.', 'modulation.'))
IBQ_KEYS = {'encoder.mid.block_1.conv1.weight', 'quantize.embedding.weight', 'model_ema.decay'}


def tokenizer_checkpoint(path, ema=True):
    """load_checkpoint(path, 'tokenizer'), or a released tokenizer (load_tokenizer's) converted to one."""
    try:
        return load_checkpoint(path, 'tokenizer', mmap=True)
    except ValueError as error:
        not_nanovq = error
    try:
        release = torch.load(path, map_location='cpu', mmap=True, weights_only=False)
    except Exception:
        raise not_nanovq from None  # damaged, as load_checkpoint said
    release = release if isinstance(release, dict) else {}
    weights = release['ema'] if ema and isinstance(release.get('ema'), dict) else release.get('model')
    lightning = release.get('state_dict')
    is_ibq = isinstance(lightning, dict) and IBQ_KEYS <= set(lightning)
    if is_ibq:  # LitEma's copy (names without dots); taming's decoder lists the highest resolution first
        levels = 1 + max(int(name.split('.')[2]) for name in lightning if name.startswith('decoder.up.'))
        weights = {}
        for name in lightning:
            parts = name.split('.')
            if parts[:2] == ['decoder', 'up']:
                parts[2] = str(levels - 1 - int(parts[2]))
            if parts[0] in ('encoder', 'decoder', 'quant_conv', 'post_quant_conv', 'quantize'):
                weights['.'.join(parts)] = lightning['model_ema.' + name.replace('.', '') if ema else name]
    elif not (isinstance(weights, dict) and 'encoder.conv_blocks.0.res.0.conv1.weight' in weights):
        raise ValueError(f"{not_nanovq}; nor is it a released tokenizer nanoVQ reads: LlamaGen's or FVQ's "
                         f"VQGAN format ({{'model': state_dict}}, encoder.conv_blocks.*), FVQ's training "
                         f"checkpoint (quantize.qbridge.*), IBQ's (Lightning, {sorted(IBQ_KEYS)})")
    state = {}
    for name, value in weights.items():
        for old, new in RELEASE_NAMES:
            name = name.replace(old, new)
        state[name] = value
    for name in [name for name in state if name.rsplit('.', 2)[1:2] == ['q']]:  # AttnBlock's one qkv conv
        stem, _, leaf = name.rsplit('.', 2)
        state[f'{stem}.qkv.{leaf}'] = torch.cat([state.pop(f'{stem}.{part}.{leaf}') for part in 'qkv'])
    state.pop('quantize.codebook_used', None)  # LlamaGen's usage window
    ch, (K, D) = state['encoder.conv_in.weight'].shape[0], state['quantizer.embedding'].shape
    if 'quantizer.projector.compress.weight' in state:  # FVQ's bridge
        bridge = 'quantizer.projector.'
        patch_conv = state[bridge + 'compress.weight']  # (dim, D, p, p): reads a patch of codes as (D, p, p)
        dim, p = patch_conv.shape[0], patch_conv.shape[-1]
        state[bridge + 'compress.weight'] = patch_conv.permute(0, 2, 3, 1).reshape(dim, -1)  # reads (p, p, D)
        # the last class row: --is_uncondition's only one, or the class 1000 convert_fullvq2vq.py uses
        state[bridge + 'condition'] = state.pop(bridge + 'y_embedder.embedding_table.weight')[-1]
        del state[bridge + 'pos_embed']  # VQBridge's own sin-cos table (expand: unpatchify's (p, p, D))
        quantizer, quantizer_args = 'fvq', {'bridge_group_size': p * p, 'bridge_dim': dim}
    else:  # LlamaGen's VQ (codebook_embed_dim 8) quantizes l2-normalised, its default; FVQ's VQGAN format
        # (256) raw, as its eval_fid_vqgan.py (codebook_l2_norm False); IBQ by z C^T, raw
        quantizer, quantizer_args = ('ibq', {}) if is_ibq else ('vq', {'l2_norm': D == 8})
    ch_mult = tuple(value.shape[0] // ch for name, value in state.items()
                    if name.startswith('encoder.down.') and name.endswith('.res.0.conv1.weight'))
    blocks = sum(name.endswith('.conv1.weight') for name in state if name.startswith('encoder.down.0.res.'))
    model_args = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=blocks, codebook_size=K, code_dim=D,
                      z_channels=state['encoder.conv_out.weight'].shape[0], quantizer=quantizer,
                      quantizer_args=quantizer_args)
    return {'kind': 'tokenizer', 'model': state, 'model_args': model_args, 'config': {'image_size': 256},
            'iter_num': 0}


# -----------------------------------------------------------------------------
# PatchGAN discriminator (taming/LlamaGen N-layer), GAN losses, LeCAM, LPIPS

class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels=3, ch=64, n_layers=3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ch * prev, ch * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(ch * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ch * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # taming's weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)  # (B, 1, h', w') patch logits


def disc_loss_fn(logits_real, logits_fake):
    """D's hinge loss (taming, LlamaGen)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def gen_loss_fn(kind, logits_fake):
    """G's adversarial loss on D's patch logits (B, 1, h, w): 'hinge' -mean(l) (LlamaGen, FVQ), or
    'non_saturating_per_image' BCE of each image's mean logit (IBQ's release, SEED-Voken)."""
    if kind == 'hinge':
        return -logits_fake.mean()
    if kind == 'non_saturating_per_image':
        return F.softplus(-logits_fake.flatten(1).mean(1)).mean()
    raise ValueError(f"unknown gen_loss '{kind}' (expected 'hinge' or 'non_saturating_per_image')")


def lecam_loss(logits_real, logits_fake, ema_real, ema_fake):
    """LeCAM regulariser (Tseng et al. 2021): keeps D's predictions near the EMA of the opposite side's."""
    return F.relu(logits_real - ema_fake).pow(2).mean() + F.relu(ema_real - logits_fake).pow(2).mean()


def diff_augment(x):
    """DiffAugment (Zhao et al. 2020; color, translation, cutout) of D's real and fake inputs, so D cannot
    overfit the training images: our reading of VCQ Appendix A's "adversarial augmentation"."""
    B, _, H, W = x.shape
    rand = lambda *shape: torch.rand(B, *shape, device=x.device, dtype=x.dtype)  # noqa: E731
    x = x + (rand(1, 1, 1) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (rand(1, 1, 1) * 2) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (rand(1, 1, 1) + 0.5) + mean  # contrast
    # translation by up to 1/8 of the size, zero fill (the +1 below: the zero pad)
    sy, sx = int(H * 0.125 + 0.5), int(W * 0.125 + 0.5)
    ty = torch.randint(-sy, sy + 1, (B, 1, 1), device=x.device)
    tx = torch.randint(-sx, sx + 1, (B, 1, 1), device=x.device)
    rows = (torch.arange(H, device=x.device)[None, :, None] + ty + 1).clamp(0, H + 1)  # (B, H, 1)
    cols = (torch.arange(W, device=x.device)[None, None, :] + tx + 1).clamp(0, W + 1)  # (B, 1, W)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)  # (B, H+2, W+2, C)
    x = padded[torch.arange(B, device=x.device)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    # cutout: a zeroed box of half the height and width, centred at a random pixel (clipped at the border)
    cy, cx = (H + 1) // 2, (W + 1) // 2
    top = torch.randint(0, H, (B, 1, 1), device=x.device) - cy // 2
    left = torch.randint(0, W, (B, 1, 1), device=x.device) - cx // 2
    r, c = torch.arange(H, device=x.device)[None, :, None], torch.arange(W, device=x.device)[None, None, :]
    keep = ~((r >= top) & (r < top + cy) & (c >= left) & (c < left + cx))  # (B, H, W)
    return x * keep[:, None].to(x.dtype)


def make_lpips(random_backbone=False, net='vgg'):
    """LPIPS-VGG (the training loss; net='alex' for FVQ's evaluation). random_backbone=True: a random trunk,
    nothing downloaded (tests and offline smoke runs; a random-feature distance, not a perceptual one)."""
    import lpips
    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=random_backbone, verbose=False)
    return model.requires_grad_(False).eval()


# -----------------------------------------------------------------------------
# data: an ImageFolder reader and a built-in procedural dataset (no download), deterministic augmentation

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


def resize_short_side(pil_image, short):
    """ADM's resize: BOX-halve while at least twice too large, then BICUBIC to a short side of `short`."""
    while min(*pil_image.size) >= 2 * short:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = short / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    return np.asarray(pil_image)


def center_crop_arr(pil_image, image_size):
    """ADM's center crop."""
    arr = resize_short_side(pil_image, image_size)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


def random_crop_arr(pil_image, image_size, rng, min_crop_frac=0.8):
    """ADM/LlamaGen's random crop: the short side resized to a random size in [S, S/min_crop_frac]."""
    arr = resize_short_side(pil_image, rng.integers(image_size, math.ceil(image_size / min_crop_frac) + 1))
    top, left = (rng.integers(0, side - image_size + 1) for side in arr.shape[:2])  # top drawn first
    return arr[top: top + image_size, left: left + image_size]


def to_tensor(arr):
    # (H,W,3) uint8 -> (3,H,W)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def split_key(key):
    """Items are addressed by index or by (index, augmentation seed); see ShardedBatchSampler."""
    return key if isinstance(key, tuple) else (key, key)


class ImageFolder(torch.utils.data.Dataset):
    def __init__(self, root, image_size, augment):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data_dir '{root}' is not a directory "
                                    f"(expected root/<class>/<image files>)")
        classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        self.samples = [(os.path.join(root, c, f), label) for label, c in enumerate(classes)
                        for f in sorted(os.listdir(os.path.join(root, c)))
                        if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not self.samples:
            raise FileNotFoundError(f"data_dir '{root}' has no images in class folders "
                                    f"({', '.join(IMAGE_EXTENSIONS)})")
        self.num_classes, self.image_size, self.augment = len(classes), image_size, augment

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        index, aug_seed = split_key(key)
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                if img.mode.startswith('I;16'):  # 16-bit grey: convert('RGB') would clip at 255, not scale
                    img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
                img = img.convert('RGB')
        except Exception as e:  # unreadable or corrupt: skipped by collate, counted by the caller
            warnings.warn(f"skipping unreadable image {path}: {e}")
            return None
        if self.augment:
            rng = np.random.default_rng(aug_seed)
            arr = random_crop_arr(img, self.image_size, rng)
            if rng.random() < 0.5:
                arr = arr[:, ::-1]
        else:
            arr = center_crop_arr(img, self.image_size)
        return to_tensor(arr), label


class ProceduralImages(torch.utils.data.Dataset):
    """Shapes, stripes, gradients and textures in 10 classes, drawn from a per-image seed (nothing on disk);
    the held-out split draws from a disjoint seed range."""
    classes = ('circle', 'square', 'triangle', 'ring', 'hstripes', 'vstripes', 'checker', 'gradient',
               'radial', 'waves')

    def __init__(self, image_size, train, num_images, augment):
        self.image_size, self.train, self.augment = image_size, train, augment
        self.num_images = num_images or (10000 if train else 500)
        self.num_classes = len(self.classes)

    def __len__(self):
        return self.num_images

    def draw(self, index):
        rng = np.random.default_rng(index + (0 if self.train else 10_000_000))
        label = index % self.num_classes
        S = self.image_size
        y, x = np.mgrid[0:S, 0:S].astype(np.float32) / S  # (S, S) each
        bg, fg = rng.uniform(0, 1, 3).astype(np.float32), rng.uniform(0, 1, 3).astype(np.float32)
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
        freq, phase, angle = rng.uniform(3, 8), rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
        dist = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        name = self.classes[label]
        if name == 'circle':
            t = dist < r
        elif name == 'square':
            t = (np.abs(x - cx) < r) & (np.abs(y - cy) < r)
        elif name == 'triangle':
            t = (y < cy + r) & (np.abs(x - cx) < (y - cy + r) / 2)
        elif name == 'ring':
            t = (dist < r) & (dist > 0.6 * r)
        elif name == 'hstripes':
            t = np.sin(2 * np.pi * freq * y + phase) > 0
        elif name == 'vstripes':
            t = np.sin(2 * np.pi * freq * x + phase) > 0
        elif name == 'checker':
            t = (np.floor(x * freq) + np.floor(y * freq)) % 2 == 0
        elif name == 'gradient':
            t = ((x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle)) / 1.42 + 0.5
        elif name == 'radial':
            t = np.clip(dist / (2 * r), 0, 1)
        else:  # waves: a smooth texture of two crossed sinusoids
            t = 0.5 + 0.25 * (np.sin(2 * np.pi * freq * (x * np.cos(angle) + y * np.sin(angle)) + phase)
                              + np.sin(2 * np.pi * freq * 0.5 * (x - y)))
        t = t.astype(np.float32)[..., None]  # (S, S, 1) weight of the foreground colour
        img = bg * (1 - t) + fg * t + rng.normal(0, 0.02, (S, S, 3)).astype(np.float32)
        return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), label

    def __getitem__(self, key):
        index, aug_seed = split_key(key)
        arr, label = self.draw(index)
        if self.augment and np.random.default_rng(aug_seed).random() < 0.5:
            arr = arr[:, ::-1]
        return to_tensor(arr), label


def make_dataset(data_dir, image_size, train, num_images=0, augment=None):
    """data_dir '' is the procedural dataset (train: its training or held-out split; num_images 0: its
    default size). augment (default: train) is the random crop + flip, else resize + center crop."""
    augment = train if augment is None else augment
    if data_dir == '':
        return ProceduralImages(image_size, train, num_images, augment)
    return ImageFolder(data_dir, image_size, augment)


def split_held_out(samples, n):
    """samples -> (training samples, n held-out samples), a fixed random choice (seed 0): train_tokenizer.py
    and evaluate.py --split=heldout agree on which images were never trained on."""
    if not 0 < n < len(samples):
        raise ValueError(f"eval_images = {n} must be between 1 and the {len(samples)} images of the folder "
                         f"minus one: lower eval_images or give a separate eval_data_dir")
    perm = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0)).tolist()
    return [samples[i] for i in sorted(perm[n:])], [samples[i] for i in sorted(perm[:n])]


def collate(batch):
    """Drops unreadable images: -> (images (B,3,S,S), labels (B,), number skipped)."""
    kept = [item for item in batch if item is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), len(batch)
    images, labels = zip(*kept)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), len(batch) - len(kept)


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Endless per-rank batches: one global order (a permutation per epoch from `seed`) cut into global
    batches, rank r taking slice r of each. The data is a function of the step alone (any number of ranks, a
    resume at start_step), and each item carries its own augmentation seed for the same reason."""
    def __init__(self, num_items, batch_size, rank=0, world_size=1, seed=0, start_step=0):
        self.num_items, self.batch_size, self.rank, self.world_size = num_items, batch_size, rank, world_size
        self.seed, self.start_step = seed, start_step

    def __iter__(self):
        global_batch = self.batch_size * self.world_size
        position = self.start_step * global_batch + self.rank * self.batch_size
        epoch, order = -1, None
        while True:
            keys = []
            for p in range(position, position + self.batch_size):
                if p // self.num_items != epoch:
                    epoch = p // self.num_items
                    order = torch.randperm(self.num_items,
                                           generator=torch.Generator().manual_seed(self.seed + epoch))
                keys.append((int(order[p % self.num_items]), (self.seed, p)))
            yield keys
            position += global_batch


# -----------------------------------------------------------------------------
# plumbing shared by the scripts: devices, RNG streams, atomic checkpoints, logs, uint8 images, PSNR, grids

def setup_device(device):
    """Resolves device 'auto'; under torchrun, joins the process group (nccl on GPU, gloo on CPU), one GPU per
    local rank. TF32 on CUDA. -> (device, rank, local_rank, world_size)"""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    rank, local_rank, world_size = 0, 0, 1
    if int(os.environ.get('RANK', -1)) != -1:
        import torch.distributed as dist
        rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))

        def report_error(kind, value, traceback):  # also to torchrun's error file: its summary's Root Cause
            sys.__excepthook__(kind, value, traceback)
            with open(os.environ['TORCHELASTIC_ERROR_FILE'], 'w') as f:
                json.dump({'message': f"{kind.__name__}: {value}", 'timestamp': int(time.time())}, f)
        if 'TORCHELASTIC_ERROR_FILE' in os.environ:
            sys.excepthook = report_error
        if device.startswith('cuda'):
            device = f'cuda:{local_rank}'
            torch.cuda.set_device(device)
        dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    if device.startswith('cuda'):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device, rank, local_rank, world_size


def leave_process_group():
    """Frees the process group (the caller drops its DDP wrappers first) while the interpreter runs: a gloo
    thread that lets go of a collective's tensors during interpreter shutdown aborts the process."""
    import gc
    import torch.distributed as dist
    gc.collect()  # a dropped wrapper caught in a reference cycle would hold the group too
    dist.destroy_process_group()


def gather_rng_states(device_type, ddp, world_size):
    """Every rank's RNG states (torch, cuda, numpy, python) for the checkpoint: a resume continues them."""
    # numpy arrays: torch.load(map_location='cuda') would move tensors, and set_rng_state takes a CPU tensor
    states = {'torch': torch.get_rng_state().numpy(), 'numpy': np.random.get_state(),
              'python': random.getstate(),
              'cuda': torch.cuda.get_rng_state().numpy() if device_type == 'cuda' else None}
    if not ddp:
        return [states]
    import torch.distributed as dist
    all_states = [None] * world_size
    dist.all_gather_object(all_states, states)
    return all_states


def restore_rng_states(states, device_type, fresh_seed):
    """A rank's states from gather_rng_states, or, with None (a fresh run, or a resume on another number of
    ranks), a fresh stream from fresh_seed."""
    if states is None:
        torch.manual_seed(fresh_seed)
        return
    torch.set_rng_state(torch.as_tensor(states['torch']))
    np.random.set_state(states['numpy'])
    random.setstate(states['python'])
    if device_type == 'cuda' and states['cuda'] is not None:
        torch.cuda.set_rng_state(torch.as_tensor(states['cuda']))


def autocast_context(device, dtype):
    """bf16 autocast on GPU when dtype is 'bfloat16'; the CPU always runs float32."""
    if dtype not in ('bfloat16', 'float32'):
        raise ValueError(f"dtype must be 'bfloat16' or 'float32', got '{dtype}'")
    if str(device).startswith('cuda') and dtype == 'bfloat16':
        return torch.autocast(device_type='cuda', dtype=torch.bfloat16)
    return contextlib.nullcontext()


def atomic_write(path, write, mode='wb'):
    """write(f) into a temp file renamed to path: a killed run never leaves a truncated file, and a failed
    write (a full disk) removes the temp file and leaves the previous file as it was."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp'
    try:
        with open(tmp, mode) as f:
            write(f)
    except Exception as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        full = (isinstance(e, OSError) and e.errno == errno.ENOSPC) or any(  # torch.save: a RuntimeError
            words in str(e) for words in ('file write failed', 'unexpected pos'))
        if not (full or isinstance(e, OSError)):
            raise  # not a failed write (an unpicklable object, a wrong mode): the error as it is
        intact = f" and the previous {os.path.basename(path)} is intact" if os.path.exists(path) else ''
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2 ** 20 if full else 0  # MiB
        advice = (" (free some space, or point out_dir elsewhere, and resume)\ndisk is full: "
                  f"{path}, {free:.1f} MiB left") if full else ''  # the last line, the project's
        raise OSError(f"could not write {path}{'' if full else f': {e}'}; "
                      f"the partial file was removed{intact}{advice}") from e
    os.replace(tmp, path)


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


CHECKPOINT_SCRIPTS = {'tokenizer': 'train_tokenizer.py', 'gpt': 'train_ar.py'}
CHECKPOINT_FORMAT = 3  # raised whenever what a checkpoint holds changes; a file of another format is refused


def load_checkpoint(path, kind, map_location='cpu', mmap=False):
    """torch.load of a nanoVQ checkpoint of `kind` ('tokenizer' or 'gpt'), with an error naming the file when
    it is missing, damaged or of another kind. mmap=True reads each tensor from disk only when it is used."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{kind} checkpoint '{path}' does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, mmap=mmap, weights_only=False)
    except Exception as e:
        raise ValueError(f"checkpoint '{path}' is damaged (cut short, or no PyTorch file): {e}") from None
    found = checkpoint.get('kind') if isinstance(checkpoint, dict) else None
    if found not in CHECKPOINT_SCRIPTS or checkpoint.get('format') != CHECKPOINT_FORMAT:
        raise ValueError(f"'{path}' is not a {kind} checkpoint of this nanoVQ (format {CHECKPOINT_FORMAT}), "
                         f"but an older nanoVQ's or another program's: re-run {CHECKPOINT_SCRIPTS[kind]}")
    if found != kind:
        raise ValueError(f"'{path}' is a {found} checkpoint (written by {CHECKPOINT_SCRIPTS[found]}), "
                         f"but a {kind} checkpoint (written by {CHECKPOINT_SCRIPTS[kind]}) is expected here")
    return checkpoint


def state_fingerprint(state_dict):
    """sha256 (16 hex characters) of a state_dict's names, shapes, dtypes and values."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# config keys a resumed run may change: how the run is watched or where it runs, not the experiment.
# Any other needs --resume_allow=key1,key2 (the rare intended change).
RESUME_FREE_KEYS = ('init_from', 'overwrite', 'resume_allow', 'eval_interval', 'log_interval',
                    'ckpt_interval', 'num_workers', 'device', 'compile')


def check_resume_config(ckpt_path, checkpoint, model_args, config, resume_allow):
    """Resuming a checkpoint of another model (model_args) is an error naming the keys; so is a config that
    changes the experiment, unless resume_allow lists the keys."""
    saved_args = checkpoint['model_args']
    differing = sorted(k for k in set(model_args) | set(saved_args) if model_args.get(k) != saved_args.get(k))
    if differing:
        raise ValueError(f"{ckpt_path} does not match the current config; differing model keys: "
                         + ", ".join(f"{k} (checkpoint {saved_args.get(k)!r}, config {model_args.get(k)!r})"
                                     for k in differing))
    ckpt_config = checkpoint['config']
    allowed = set(RESUME_FREE_KEYS) | {k.strip() for k in resume_allow.split(',') if k.strip()}
    differing = sorted(k for k in set(config) | set(ckpt_config)
                       if k not in allowed and config.get(k, '<unset>') != ckpt_config.get(k, '<unset>'))
    if differing:
        raise ValueError(f"{ckpt_path} was trained with another config: "
                         + ", ".join(f"{k} (checkpoint {ckpt_config.get(k, '<unset>')!r}, now "
                                     f"{config.get(k, '<unset>')!r})" for k in differing)
                         + f"; resume with the checkpoint's values, or allow the change with "
                           f"--resume_allow={','.join(differing)}")


def check_config(c, rules, world_size=0):
    """rules: (key, ok, the allowed values in words), after those of the keys both trainers have when
    world_size is given; the first not ok is an error naming the key, its allowed values and c[key]."""
    if world_size:
        rules = [*[(k, c[k] >= 1, ">= 1") for k in ('batch_size', 'gradient_accumulation_steps',
                                                    'base_batch_size', 'log_interval')],
                 ('batch_size', c['batch_size'] % max(world_size * c['gradient_accumulation_steps'], 1) == 0,
                  f"divisible by {world_size} rank(s) x gradient_accumulation_steps"),
                 ('learning_rate', 0 < c['learning_rate'] < math.inf, "> 0 and finite"),
                 *[(k, 0 <= c[k] <= 1, "in [0, 1]") for k in ('warmup_frac', 'constant_frac')],
                 ('init_from', c['init_from'] in ('scratch', 'resume'), "'scratch' or 'resume'"), *rules]
    for key, ok, allowed in rules:
        if not ok:
            raise ValueError(f"{key} must be {allowed}, got {c[key]!r}")


def stop_if_not_finite(what, values, iter_num, learning_rate):
    # a NaN or inf among values {name: number or tensor} stops the run before it saves a checkpoint
    bad = [name for name, value in values.items() if not torch.as_tensor(value).isfinite().all()]
    if bad:
        raise FloatingPointError(f"non-finite {what} at iteration {iter_num}: {', '.join(bad[:5])}; the "
                                 f"last checkpoint stays as it was: retry with a learning_rate below "
                                 f"{learning_rate:g}")


_out_dir_lock = None  # this process's open out_dir/.lock: its flock is held while it is open


def lock_out_dir(out_dir, rank, keep='', advice="continue that run with --init_from=resume, or start a new "
                 "one in another out_dir (or over this one with --overwrite=True)"):
    """Rank 0 holds an advisory lock (flock) on out_dir/.lock until the process ends, however it ends: a
    second run into out_dir stops at once, naming the holder. Then the file `keep` must not exist yet."""
    global _out_dir_lock
    if rank == 0:
        if _out_dir_lock is not None:  # of a script run earlier in this process (the tests): it has ended
            _out_dir_lock.close()
        os.makedirs(out_dir, exist_ok=True)
        _out_dir_lock = open(os.path.join(out_dir, '.lock'), 'a+')
        try:
            fcntl.flock(_out_dir_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _out_dir_lock.seek(0)
            raise RuntimeError(f"{out_dir} is in use by another run ({_out_dir_lock.read().strip()}): wait "
                               f"for it to end, or give this run another out_dir") from None
        _out_dir_lock.truncate(0)
        print(f"pid {os.getpid()}: {' '.join(sys.argv)}", file=_out_dir_lock, flush=True)
        if keep and os.path.exists(keep):
            raise FileExistsError(f"{keep} already exists: {advice}")
    if torch.distributed.is_initialized():  # the other ranks write nothing before rank 0 holds the lock
        torch.distributed.barrier()


def truncate_log(path, iter_num):
    """Keeps a JSON-lines log's lines up to iteration iter_num: a resumed run drops what its killed
    predecessor logged after its last checkpoint."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)['iter'] <= iter_num:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):  # a line the kill cut short
                pass
    atomic_write(path, lambda f: f.writelines(kept), mode='w')


def append_log(path, record, fresh=False):
    with open(path, 'w' if fresh else 'a') as f:
        f.write(json.dumps(record) + '\n')


def to_uint8(images):
    """(N, 3, H, W) in [-1, 1] -> uint8 (N, 3, H, W): the 256 levels a saved image holds."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def psnr(x, y):
    """Per-image PSNR in dB of two (N, 3, H, W) batches in [0, 1] -> (N,); identical images give 100."""
    mse = ((x.double() - y.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def save_image_grid(images, path, nrow, row_labels=()):
    """images (N, 3, H, W) in [-1, 1] -> one PNG, nrow images per row, each enlarged (nearest) to at least
    128 px so that small images read at page size; row_labels name the rows in a left margin."""
    images = to_uint8(images).cpu()
    scale = max(1, 128 // images.shape[-1])
    images = images.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    N, _, H, W = images.shape
    rows = math.ceil(N / nrow)
    images = torch.cat([images, images.new_zeros(rows * nrow - N, 3, H, W)])  # black tiles end the last row
    grid = images.view(rows, nrow, 3, H, W).permute(0, 3, 1, 4, 2).reshape(rows * H, nrow * W, 3)
    picture = Image.fromarray(grid.numpy())
    if row_labels:
        font = ImageFont.load_default(size=max(12, H // 6))
        margin = max(int(font.getlength(label)) for label in row_labels) + 16
        labelled = Image.new('RGB', (margin + picture.width, picture.height), 'white')
        labelled.paste(picture, (margin, 0))
        for r, label in enumerate(row_labels):
            ImageDraw.Draw(labelled).text((8, r * H + H // 2), label, fill='black', font=font, anchor='lm')
        picture = labelled
    atomic_write(path, lambda f: picture.save(f, format='PNG'))
