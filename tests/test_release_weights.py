"""Released tokenizers as downloaded (LlamaGen's VQ, FVQ's VQBridge checkpoint and VQGAN format, SEED-Voken's
IBQ): tiny state_dicts in each release's own names and shapes, random values, saved in its container."""
import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures('one_torch_thread')
CH, Z = 32, 16


# -----------------------------------------------------------------------------
# the releases' state_dicts: name -> shape, then random values

def conv(prefix, out_channels, in_channels, kernel):
    return {f'{prefix}.weight': (out_channels, in_channels, kernel, kernel),
            f'{prefix}.bias': (out_channels,)}


def norm(prefix, channels):
    return {f'{prefix}.weight': (channels,), f'{prefix}.bias': (channels,)}


def resnet(prefix, cin, cout):
    # LlamaGen's / taming's ResnetBlock (temb_channels 0: no temb_proj), a 1x1 nin_shortcut when cin != cout
    shapes = {**norm(f'{prefix}.norm1', cin), **conv(f'{prefix}.conv1', cout, cin, 3),
              **norm(f'{prefix}.norm2', cout), **conv(f'{prefix}.conv2', cout, cout, 3)}
    return {**shapes, **(conv(f'{prefix}.nin_shortcut', cout, cin, 1) if cin != cout else {})}


def attn(prefix, channels):
    return {**norm(f'{prefix}.norm', channels),
            **{k: v for part in ('q', 'k', 'v', 'proj_out') for k, v in conv(f'{prefix}.{part}', channels,
                                                                               channels, 1).items()}}


def vqgan_shapes(taming, ch_mult, blocks, D):
    """LlamaGen's vq_model.py Encoder / Decoder (conv_blocks, mid.0-2), or taming's diffusionmodules/model.py
    as SEED-Voken's IBQ (down / up by level, block, mid.block_1 / attn_1 / block_2; attn_resolutions [16] of a
    256 px model: the lowest resolution level), with quant_conv / post_quant_conv around D-dim codes."""
    last = len(ch_mult) - 1
    mid_names = ('block_1', 'attn_1', 'block_2') if taming else ('0', '1', '2')
    res = 'block' if taming else 'res'
    shapes, block_in = conv('encoder.conv_in', CH, 3, 3), CH
    for level, mult in enumerate(ch_mult):
        stage = f'encoder.down.{level}' if taming else f'encoder.conv_blocks.{level}'
        for j in range(blocks):
            shapes.update(resnet(f'{stage}.{res}.{j}', block_in, CH * mult))
            block_in = CH * mult
            shapes.update(attn(f'{stage}.attn.{j}', block_in) if level == last else {})
        shapes.update(conv(f'{stage}.downsample.conv', block_in, block_in, 3) if level != last else {})
    def mid(part):
        return {**resnet(f'{part}.mid.{mid_names[0]}', block_in, block_in),
                **attn(f'{part}.mid.{mid_names[1]}', block_in),
                **resnet(f'{part}.mid.{mid_names[2]}', block_in, block_in)}

    shapes.update({**mid('encoder'), **norm('encoder.norm_out', block_in),
                   **conv('encoder.conv_out', Z, block_in, 3), **conv('decoder.conv_in', block_in, Z, 3),
                   **mid('decoder')})
    for position, level in enumerate(reversed(range(len(ch_mult)))):  # lowest resolution first
        stage = f'decoder.up.{level}' if taming else f'decoder.conv_blocks.{position}'
        for j in range(blocks + 1):
            shapes.update(resnet(f'{stage}.{res}.{j}', block_in, CH * ch_mult[level]))
            block_in = CH * ch_mult[level]
            shapes.update(attn(f'{stage}.attn.{j}', block_in) if level == last else {})
        shapes.update(conv(f'{stage}.upsample.conv', block_in, block_in, 3) if level != 0 else {})
    shapes.update({**norm('decoder.norm_out', block_in), **conv('decoder.conv_out', 3, block_in, 3),
                   **conv('quant_conv', D, Z, 1), **conv('post_quant_conv', Z, D, 1)})
    return shapes


def bridge_shapes(K, D, dim, p, classes, depth=2, mlp_ratio=2):
    """qbridge.py's DiT (timm PatchEmbed / Attention / Mlp, adaLN_modulation = SiLU + Linear) as
    vq_model_qbridge.py's quantize.qbridge; its LayerNorms have no weights."""
    shapes = {'pos_embed': (1, (math.isqrt(K) // p) ** 2, dim), 'x_embedder.proj.weight': (dim, D, p, p),
              'x_embedder.proj.bias': (dim,), 'y_embedder.embedding_table.weight': (classes, dim)}
    for n in range(depth):
        for name, (out_features, in_features) in {'attn.qkv': (3 * dim, dim), 'attn.proj': (dim, dim),
                                                  'mlp.fc1': (mlp_ratio * dim, dim),
                                                  'mlp.fc2': (dim, mlp_ratio * dim),
                                                  'adaLN_modulation.1': (6 * dim, dim)}.items():
            shapes.update({f'blocks.{n}.{name}.weight': (out_features, in_features),
                           f'blocks.{n}.{name}.bias': (out_features,)})
    shapes.update({'final_layer.linear.weight': (p * p * D, dim), 'final_layer.linear.bias': (p * p * D,),
                   'final_layer.adaLN_modulation.1.weight': (2 * dim, dim),
                   'final_layer.adaLN_modulation.1.bias': (2 * dim,)})
    return {f'quantize.qbridge.{name}': shape for name, shape in shapes.items()}


def random_values(shapes, generator):
    return {name: 0.2 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def mae_pos_embed(dim, grid):
    # MAE's get_2d_sincos_pos_embed as qbridge.py copies it: meshgrid(w, h), so its "emb_h" half reads w
    grid_w, grid_h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    halves = []
    for positions in (grid_w, grid_h):
        out = np.einsum('m,d->md', positions.reshape(-1), omega)
        halves.append(np.concatenate([np.sin(out), np.cos(out)], axis=1))
    return torch.from_numpy(np.concatenate(halves, axis=1)).float()[None]  # (1, T, dim)


def release_output_codebook(weights, K, D, p, label, heads=4):
    """vq_model_qbridge.py's output_codebook(label) written plainly: the (D, sqrt K, sqrt K) image of the raw
    codes, DiT (patchify, adaLN-Zero blocks, final layer, unpatchify), read back as (K, D)."""
    def w(name):
        return weights[f'quantize.qbridge.{name}']

    side = math.isqrt(K)
    image = weights['quantize.embedding.weight'].permute(1, 0).reshape(1, D, side, side)
    x = F.conv2d(image, w('x_embedder.proj.weight'), w('x_embedder.proj.bias'), stride=p)
    x = x.flatten(2).transpose(1, 2) + w('pos_embed')  # (1, T, dim)
    _, T, dim = x.shape
    c = F.silu(w('y_embedder.embedding_table.weight')[[label]])  # (1, dim); the SiLU of adaLN_modulation

    def modulate(x, shift, scale):
        return F.layer_norm(x, (dim,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    for n in range(2):
        def linear(name, x):
            return F.linear(x, w(f'blocks.{n}.{name}.weight'), w(f'blocks.{n}.{name}.bias'))
        shift1, scale1, gate1, shift2, scale2, gate2 = linear('adaLN_modulation.1', c).chunk(6, dim=1)
        qkv = linear('attn.qkv', modulate(x, shift1, scale1))  # (1, T, 3 dim)
        q, k, v = qkv.reshape(1, T, 3, heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (1, heads, T, head_dim)
        attention = ((q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5).softmax(-1) @ v
        x = x + gate1[:, None] * linear('attn.proj', attention.transpose(1, 2).reshape(1, T, dim))
        hidden = F.gelu(linear('mlp.fc1', modulate(x, shift2, scale2)), approximate='tanh')
        x = x + gate2[:, None] * linear('mlp.fc2', hidden)
    shift, scale = F.linear(c, w('final_layer.adaLN_modulation.1.weight'),
                            w('final_layer.adaLN_modulation.1.bias')).chunk(2, dim=1)
    x = F.linear(modulate(x, shift, scale), w('final_layer.linear.weight'), w('final_layer.linear.bias'))
    g = side // p
    image = torch.einsum('nhwpqc->nchpwq', x.reshape(1, g, g, p, p, D)).reshape(1, D, side, side)
    return image.reshape(1, D, K).permute(0, 2, 1)[0]


def nearest_codes(z, codebook):
    # z (B, D, h, w) -> (B, h, w) the nearest code by Euclidean distance
    z_flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    return torch.cdist(z_flat.double(), codebook.double()).argmin(1).reshape(z.shape[0], *z.shape[2:])


def encode_check(model, images, codebook, normalise=False):
    # the loaded tokenizer's codes = a nearest-code search of its encoder output on `codebook`; decode runs
    with torch.no_grad():
        z = model.quant_conv(model.encoder(images))
    z = F.normalize(z, dim=1) if normalise else z
    codes = model.encode(images)
    assert torch.equal(codes, nearest_codes(z, codebook))
    recon = model.decode(codes)
    assert recon.shape == images.shape and torch.isfinite(recon).all()
    return codes


# -----------------------------------------------------------------------------
# the loaders

@pytest.mark.parametrize('ch_mult', [(1, 1, 2), (1, 2)])  # as vq_ds16_c2i's (1,1,2,2,4), vq_ds8's (1,2,2,4)
def test_llamagen_vq(tmp_path, ch_mult):
    generator = torch.Generator().manual_seed(0)
    K, D = 64, 8
    shapes = {**vqgan_shapes(False, ch_mult, 2, D), 'quantize.embedding.weight': (K, D)}
    weights = random_values(shapes, generator)
    weights['quantize.codebook_used'] = torch.zeros(65536)
    torch.save({'model': weights}, tmp_path / 'vq_ds.pt')
    model = load_tokenizer(str(tmp_path / 'vq_ds.pt'))
    assert not model.training and model.downsample == 2 ** (len(ch_mult) - 1)
    assert model.quantizer.normalize_forward  # LlamaGen's codebook_l2_norm: unit z and codes
    images = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    encode_check(model, images, F.normalize(weights['quantize.embedding.weight'], dim=1), normalise=True)
    # the mid attention block: LlamaGen's AttnBlock from its own q, k, v convs (its norm maps by name)
    block, prefix = model.encoder.mid[1], 'encoder.mid.1.'
    x = torch.randn(1, CH * ch_mult[-1], 2, 2, generator=generator)
    with torch.no_grad():
        h = block.norm(x)
        q, k, v = (F.conv2d(h, weights[prefix + f'{n}.weight'], weights[prefix + f'{n}.bias']).flatten(2)
                   for n in 'qkv')
        attention = torch.softmax(q.transpose(1, 2) @ k * q.shape[1] ** -0.5, dim=2)  # (1, hw of q, hw of k)
        out = (v @ attention.transpose(1, 2)).reshape(x.shape)
        expected = x + F.conv2d(out, weights[prefix + 'proj_out.weight'], weights[prefix + 'proj_out.bias'])
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('classes', [1, 1001])  # --is_uncondition's single class; 1,000 + the null class
def test_fvq_bridge_and_its_vqgan_format(tmp_path, classes):
    generator = torch.Generator().manual_seed(1)
    K, D, dim, p = 256, 16, 32, 4  # a 16 x 16 image of codes, 4 x 4 patches: 16 bridge tokens
    shapes = {**vqgan_shapes(False, (1, 2), 1, D), 'quantize.embedding.weight': (K, D),
              **bridge_shapes(K, D, dim, p, classes)}
    weights = random_values(shapes, generator)
    weights['quantize.qbridge.pos_embed'] = mae_pos_embed(dim, math.isqrt(K) // p)
    weights['quantize.codebook_used'] = torch.zeros(65536)  # vq_model_qbridge.py: K < 65536
    args = argparse.Namespace(codebook_size=K, codebook_embed_dim=D, QB_type='QBridge-S/4', vq_model='VQ-16')
    torch.save({'model': weights, 'optimizer': {}, 'discriminator': {}, 'optimizer_disc': {}, 'steps': 7,
                'args': args}, tmp_path / '0400000.pt')
    model = load_tokenizer(str(tmp_path / '0400000.pt'))
    bridge = model.quantizer.projector
    assert (bridge.group_size, bridge.compress.out_features) == (p * p, dim)
    torch.testing.assert_close(bridge.pos_embed, weights['quantize.qbridge.pos_embed'][0])  # dropped: equal
    codebook = release_output_codebook(weights, K, D, p, label=classes - 1)  # convert_fullvq2vq.py: 1000
    with torch.no_grad():
        torch.testing.assert_close(model.quantizer.codebook(), codebook, atol=1e-5, rtol=1e-5)
    images = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    codes = encode_check(model, images, codebook)  # no l2 in the bridge's forward
    # convert_fullvq2vq.py: the output codebook as a plain VQGAN's, the bridge dropped, a fresh usage window
    converted = {name: value for name, value in weights.items() if not name.startswith('quantize.qbridge.')}
    converted['quantize.embedding.weight'] = codebook
    torch.save({'model': converted}, tmp_path / 'fullvq2vqgan.pt')
    plain = load_tokenizer(str(tmp_path / 'fullvq2vqgan.pt'))
    assert plain.quantizer.projector is None and not plain.quantizer.normalize_forward
    assert torch.equal(encode_check(plain, images, codebook), codes)


def test_ibq_lightning_checkpoint_takes_the_ema(tmp_path):
    generator = torch.Generator().manual_seed(2)
    K, D, ch_mult = 64, 8, (1, 2)
    weights = random_values({**vqgan_shapes(True, ch_mult, 2, D), 'quantize.embedding.weight': (K, D),
                             'loss.discriminator.main.0.weight': (8, 3, 4, 4)}, generator)
    ema = {'model_ema.' + name.replace('.', ''): value + 0.1 * torch.randn(value.shape, generator=generator)
           for name, value in weights.items()}  # LitEma: one buffer per trainable parameter
    state_dict = {**weights, **ema, 'model_ema.decay': torch.tensor(0.999),
                  'model_ema.num_updates': torch.tensor(-1, dtype=torch.int)}
    torch.save({'epoch': 3, 'global_step': 10, 'pytorch-lightning_version': '2.2.0', 'state_dict': state_dict,
                'optimizer_states': [], 'lr_schedulers': [], 'callbacks': {}, 'loops': {}},
               tmp_path / 'imagenet256.ckpt')
    model = load_tokenizer(str(tmp_path / 'imagenet256.ckpt'))
    assert type(model.quantizer).__name__ == 'IndexBackpropQuantizer' and model.quantizer.l2_norm is False
    assert len(model.encoder.down[0].res) == 2
    # taming's decoder.up[level] (up[0] the highest resolution); nanoVQ's lists the lowest resolution first
    assert torch.equal(model.decoder.up[0].res[0].conv1.weight, ema['model_ema.decoderup1block0conv1weight'])
    codebook = ema['model_ema.quantizeembeddingweight']
    images = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    with torch.no_grad():
        z = model.quant_conv(model.encoder(images))
    codes = model.encode(images)  # IBQ: argmax of z C^T (IndexPropagationQuantize)
    assert torch.equal(codes, torch.einsum('bdhw,nd->bnhw', z, codebook).argmax(1))
    assert torch.isfinite(model.decode(codes)).all()
    raw = load_tokenizer(str(tmp_path / 'imagenet256.ckpt'), ema=False)
    assert torch.equal(raw.quantizer.embedding, weights['quantize.embedding.weight'])


@pytest.mark.parametrize('content', ['unrelated', 'lightning_lfq', 'lightning_without_ema'])
def test_other_files_name_what_is_expected(tmp_path, content):
    weights = random_values(vqgan_shapes(True, (1, 2), 1, 8), torch.Generator().manual_seed(3))
    checkpoint = {
        'unrelated': {'weights': {'fc.weight': torch.zeros(2, 2)}},
        # Open-MAGVIT2's LFQ: no codebook to map onto
        'lightning_lfq': {'state_dict': weights},
        # a taming VQGAN (nearest-code VQ, no LitEma) must not pass for IBQ
        'lightning_without_ema': {'state_dict': {**weights, 'quantize.embedding.weight': torch.zeros(64, 8)}},
    }[content]
    torch.save(checkpoint, tmp_path / 'other.pt')
    expected = "not a tokenizer checkpoint.*nor is it a released tokenizer.*LlamaGen"
    with pytest.raises(ValueError, match=expected):
        load_tokenizer(str(tmp_path / 'other.pt'))
