import copy
import json
import os
import random
import shutil
import subprocess
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tokenizer import CHECKPOINT_FORMAT
from PIL import Image

from conftest import ROOT, graph_counter
from tokenizer import (Tokenizer, PatchDiscriminator, load_tokenizer, load_checkpoint, disc_loss_fn,
                       gen_loss_fn, lecam_loss, make_lpips, make_dataset, collate, ShardedBatchSampler, psnr,
                       to_uint8, atomic_save, save_image_grid, compile_blocks, ResnetBlock, AttnBlock,
                       ViTBlock, gather_rng_states, restore_rng_states)

TINY = dict(ch=32, num_res_blocks=1, z_channels=32, codebook_size=64, code_dim=8)
TINY_1D = dict(tokenizer_type='titok', titok_preset='tiny', image_size=32, patch_size=8, num_latent_tokens=12)


@pytest.mark.parametrize('ch_mult, downsample', [((1, 2, 2, 4), 8), ((1, 1, 2, 2, 4), 16)])
def test_tokenizer_shapes(ch_mult, downsample):
    torch.manual_seed(0)
    model = Tokenizer(ch_mult=ch_mult, **TINY).eval()
    assert model.downsample == downsample
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    recon, quant_loss, info = model(images)
    h = 64 // downsample
    assert recon.shape == images.shape and quant_loss.ndim == 0
    assert info['indices'].shape == (2, h, h) and info['indices'].dtype == torch.long
    indices = model.encode(images)
    assert torch.equal(indices, info['indices'])
    decoded = model.decode(indices)
    assert decoded.shape == (2, 3, 64, 64)
    # = forward's recon (up to z + (z_q - z) rounding)
    torch.testing.assert_close(decoded, recon, atol=1e-4, rtol=1e-4)


def test_default_is_llamagen_vq16_layout():
    with torch.device('meta'):  # the sizes without allocating them
        model = Tokenizer()  # VQ-16: ch 128, ch_mult (1,1,2,2,4), 2 ResBlocks, z 256, 8-dim codes
    n_params = sum(p.numel() for p in model.parameters())
    assert model.downsample == 16 and model.quantizer.codebook().shape == (16384, 8)
    assert 69e6 < n_params < 74e6  # LlamaGen reports 71.9M for VQ-16
    assert len(model.decoder.up[0].res) == 3 and len(model.encoder.down[0].res) == 2


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model_args = dict(ch_mult=(1, 2), **TINY)
    model = Tokenizer(**model_args)
    path = str(tmp_path / 'ckpt.pt')
    atomic_save({'kind': 'tokenizer', 'format': CHECKPOINT_FORMAT,
                 'model': model.state_dict(), 'model_args': model_args, 'config': {}},
                path)
    assert os.listdir(tmp_path) == ['ckpt.pt']  # the temp file was renamed away
    loaded = load_tokenizer(path)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    assert not loaded.training
    assert torch.equal(loaded.encode(images), model.eval().encode(images))
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_tokenizer(str(tmp_path / 'nope.pt'))
    # a checkpoint without 'kind' (another program's), or of another format (an older nanoVQ's): re-run the
    # step that writes it
    torch.save({'model': model.state_dict(), 'model_args': model_args}, tmp_path / 'other.pt')
    torch.save({'kind': 'tokenizer', 'format': CHECKPOINT_FORMAT - 1, 'model': model.state_dict(),
                'model_args': model_args}, tmp_path / 'older.pt')
    for name in ('other.pt', 'older.pt'):
        with pytest.raises(ValueError, match="not a tokenizer checkpoint.*older nanoVQ.*re-run train_tok"):
            load_tokenizer(str(tmp_path / name))


def test_load_tokenizer_maps_the_checkpoint_and_takes_the_ema(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model_args = dict(ch_mult=(1, 2), **TINY)
    model, ema = Tokenizer(**model_args), Tokenizer(**model_args)
    optimizer = torch.optim.Adam(model.parameters())
    model.encoder.conv_in.weight.sum().backward()
    optimizer.step()
    path = str(tmp_path / 'ckpt.pt')
    atomic_save({'kind': 'tokenizer', 'format': CHECKPOINT_FORMAT,
                 'model': model.state_dict(), 'ema': ema.state_dict(),
                 'optimizer': optimizer.state_dict(), 'model_args': model_args, 'config': {}}, path)
    calls = []
    torch_load = torch.load
    monkeypatch.setattr(torch, 'load', lambda *a, **kw: calls.append(kw) or torch_load(*a, **kw))
    loaded = load_tokenizer(path)
    assert calls == [dict(map_location='cpu', mmap=True, weights_only=False)]
    for key, value in ema.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_rng_states_restore_wherever_the_checkpoint_was_mapped(tmp_path):
    # a resume on a GPU loads the checkpoint with map_location='cuda'; 'meta' stands in for it on the CPU:
    # torch's saved states must reach set_rng_state as CPU tensors all the same
    path = str(tmp_path / 'ckpt.pt')
    atomic_save({'rng_states': gather_rng_states('cpu', ddp=False, world_size=1)}, path)
    expected = torch.rand(4), np.random.rand(), random.random()
    states = torch.load(path, map_location='meta', weights_only=False)['rng_states'][0]
    torch.manual_seed(1)
    restore_rng_states(states, 'cpu', fresh_seed=2)
    assert torch.equal(torch.rand(4), expected[0]) and (np.random.rand(), random.random()) == expected[1:]
    restore_rng_states(None, 'cpu', fresh_seed=2)  # a fresh stream
    expected = torch.rand(4)
    torch.manual_seed(2)
    assert torch.equal(torch.rand(4), expected)


LEAVE_SCRIPT = """
import os, sys
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tokenizer import gather_rng_states, leave_process_group

def threads():
    return len(os.listdir('/proc/self/task'))

def join_and_gather(store):  # a DDP step, then the checkpoint's all_gather of the RNG states
    dist.init_process_group('gloo', init_method='file://' + store, rank=0, world_size=1)
    model = DDP(torch.nn.Linear(2, 2))
    model(torch.ones(1, 2)).sum().backward()
    gather_rng_states('cpu', ddp=True, world_size=1)
    return model

before = threads()
model = join_and_gather(sys.argv[1] + '.a')
during = threads()
leave_process_group()  # the wrapper is alive: it holds the group, whose threads live on
kept = threads()
del model
model = join_and_gather(sys.argv[1] + '.b')
del model  # as train_tokenizer.py and train_ar.py do before leaving
leave_process_group()
print(before, during, kept, threads())
"""


@pytest.mark.skipif(not os.path.isdir('/proc/self/task'), reason="counts the threads in Linux's /proc")
def test_leaving_the_process_group_joins_gloos_threads_before_exit(tmp_path):
    # a gloo worker thread that lets go of a collective's tensors during interpreter shutdown aborts the
    # process; freed by leave_process_group, the group has joined its threads by then
    result = subprocess.run([sys.executable, '-c', LEAVE_SCRIPT, str(tmp_path / 'store')], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-3000:]
    before, during, kept, after = map(int, result.stdout.split()[-4:])
    assert during > before and kept == during and after == before


def test_checkpoint_errors_name_the_file(tmp_path, monkeypatch):
    import errno
    torch.manual_seed(0)
    model_args = dict(ch_mult=(1, 2), **TINY)
    path = str(tmp_path / 'ckpt.pt')
    atomic_save({'kind': 'tokenizer', 'format': CHECKPOINT_FORMAT,
                 'model': Tokenizer(**model_args).state_dict(), 'model_args': model_args,
                 'config': {}}, path)
    with open(path, 'rb') as f:
        data = f.read()
    with open(tmp_path / 'cut.pt', 'wb') as f:
        f.write(data[:len(data) // 2])  # a truncated copy
    with pytest.raises(ValueError, match=rf"checkpoint '{tmp_path / 'cut.pt'}' is damaged"):
        load_tokenizer(str(tmp_path / 'cut.pt'))
    with pytest.raises(ValueError,
                       match=r"is a tokenizer checkpoint \(written by train_tokenizer.py\), but a gpt"):
        load_checkpoint(path, 'gpt')
    # a full disk, as an OSError or as torch.save's zip writer says it: the temp file goes, the previous
    # checkpoint stays, and the error's last line is the project's, with the space left
    for error in (OSError(errno.ENOSPC, 'No space left on device'),
                  RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598')):
        def no_space(obj, f):
            f.write(b'partial')
            raise error
        monkeypatch.setattr(torch, 'save', no_space)
        monkeypatch.setattr(shutil, 'disk_usage', lambda path: SimpleNamespace(free=3 * 2 ** 19))  # 1.5 MiB
        with pytest.raises(OSError, match='the partial file was removed and the previous ckpt.pt is intact'
                                          r' \(free some space') as raised:
            atomic_save({'model': {}}, path)
        assert str(raised.value).splitlines()[-1] == f'disk is full: {path}, 1.5 MiB left'
        assert sorted(os.listdir(tmp_path)) == ['ckpt.pt', 'cut.pt']
    monkeypatch.undo()
    assert load_checkpoint(path, 'tokenizer')['kind'] == 'tokenizer'
    # an error that is not a failed write is raised as it is, without the full-disk advice
    with pytest.raises(Exception) as error:
        atomic_save({'model': {}, 'fn': lambda: 0}, path)
    assert 'pickle' in str(error.value).lower() and not isinstance(error.value, OSError)
    assert not os.path.exists(path + '.tmp') and load_checkpoint(path, 'tokenizer')['kind'] == 'tokenizer'


def test_truncate_log_drops_a_line_the_kill_cut_short(tmp_path):
    from tokenizer import append_log, truncate_log
    path = str(tmp_path / 'log.jsonl')
    for i in (1, 2, 3):
        append_log(path, {'iter': i, 'loss': 0.5})
    with open(path, 'a') as f:
        f.write('{"iter": 4, "lo')  # a killed append_log
    truncate_log(path, 2)
    with open(path) as f:
        assert [json.loads(line)['iter'] for line in f] == [1, 2]


def test_state_fingerprint_tells_weights_apart():
    from tokenizer import state_fingerprint
    torch.manual_seed(0)
    a = Tokenizer(ch_mult=(1, 2), **TINY).state_dict()
    b = {k: v.clone() for k, v in a.items()}
    assert state_fingerprint(a) == state_fingerprint(b)
    b['decoder.conv_out.bias'][0] += 1e-6
    assert state_fingerprint(a) != state_fingerprint(b)


def test_discriminator_and_gan_losses():
    disc = PatchDiscriminator(3, ch=16, n_layers=3)
    logits = disc(torch.randn(2, 3, 64, 64))
    # 70x70-receptive-field PatchGAN on 64^2: 64 -> 32 -> 16 -> 8 -> 7 -> 6
    assert logits.shape == (2, 1, 6, 6)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # hinge: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * (0.25 + 0.5)
    assert disc_loss_fn(real, fake).item() == pytest.approx(0.375)
    assert gen_loss_fn('hinge', fake).item() == pytest.approx(1.0)
    # SEED-Voken (IBQ): BCE(mean of each image's patch logits, 1) averaged over images, not over patches
    # (2, 1, 2, 2): means 0, -1
    patches = torch.tensor([[[[1.0, -3.0], [0.0, 2.0]]], [[[-1.0, -1.0], [-1.0, -1.0]]]])
    assert gen_loss_fn('non_saturating_per_image', patches).item() == pytest.approx(
        np.mean(np.log1p(np.exp([0.0, 1.0]))))
    # LeCAM: relu(real - ema_fake)^2 and relu(ema_real - fake)^2, each averaged
    assert lecam_loss(real, fake, ema_real=1.0, ema_fake=1.0).item() == pytest.approx(
        0.5 * 1.0 + 0.5 * (9 + 1))
    with pytest.raises(ValueError, match="unknown gen_loss 'wgan'"):
        gen_loss_fn('wgan', fake)


def test_diff_augment_is_random_differentiable_and_shape_preserving():
    from tokenizer import diff_augment
    torch.manual_seed(0)
    x = (torch.rand(8, 3, 16, 16) * 2 - 1).requires_grad_(True)
    a, b = diff_augment(x), diff_augment(x)
    assert a.shape == x.shape and not torch.equal(a, b)  # a fresh transform per call
    zeros = (a == 0).all(1).float().mean((1, 2))  # cutout (8x8 box, clipped) + translation fill, per image
    assert (zeros > 0.05).all() and (zeros < 0.8).all()
    a.sum().backward()
    assert x.grad.abs().sum() > 0  # D's gradient reaches the generator through the augmentation


def test_lpips_random_backbone_builds_offline():
    model = make_lpips(random_backbone=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    d_same, d_other = model(x, x), model(x, torch.rand(2, 3, 32, 32) * 2 - 1)
    assert d_same.abs().max().item() < 1e-6 and (d_other > 0).all()
    assert not any(p.requires_grad for p in model.parameters())


def test_procedural_dataset_is_deterministic_and_labelled():
    train, held_out = make_dataset('', 32, train=True), make_dataset('', 32, train=False)
    assert len(train) == 10000 and len(held_out) == 500 and train.num_classes == 10
    a, b = train[(3, 7)], train[(3, 7)]
    assert torch.equal(a[0], b[0]) and a[1] == 3
    assert a[0].shape == (3, 32, 32) and a[0].min() >= -1 and a[0].max() <= 1
    assert not torch.equal(train[(3, 7)][0], held_out[3][0])  # the held-out split draws other images
    labels = {train[i][1] for i in range(20)}
    assert labels == set(range(10))
    flips = [torch.equal(train[(5, s)][0], train[5][0].flip(-1)) or torch.equal(train[(5, s)][0], train[5][0])
             for s in range(8)]
    assert all(flips)  # training augmentation is a horizontal flip of the same drawing


def make_folder(root, n_per_class=3, size=40, corrupt=True):
    rng = np.random.default_rng(0)
    for c in ('cat', 'ant'):
        os.makedirs(root / c)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(
                root / c / f'{i}.png')
    if corrupt:
        (root / 'cat' / 'broken.jpg').write_bytes(b'not a jpeg at all')
    return root


def test_image_folder_reads_crops_and_skips_corrupt_images(tmp_path):
    root = make_folder(tmp_path / 'data')
    ds = make_dataset(str(root), 32, train=True)
    assert ds.num_classes == 2 and len(ds) == 7
    assert [label for _, label in ds.samples] == [0, 0, 0, 1, 1, 1, 1]  # 'ant' < 'cat', sorted
    broken = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith('broken.jpg'))
    with pytest.warns(UserWarning, match='broken.jpg'):
        assert ds[broken] is None
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        images, labels, skipped = collate([ds[(i, i)] for i in range(len(ds))])
    assert images.shape == (6, 3, 32, 32) and skipped == 1 and labels.tolist() == [0, 0, 0, 1, 1, 1]
    eval_ds = make_dataset(str(root), 32, train=False)
    assert torch.equal(eval_ds[0][0], eval_ds[0][0])
    with pytest.raises(FileNotFoundError, match='is not a directory'):
        make_dataset(str(tmp_path / 'missing'), 32, train=True)
    os.makedirs(tmp_path / 'empty' / 'x')
    with pytest.raises(FileNotFoundError, match='has no images'):
        make_dataset(str(tmp_path / 'empty'), 32, train=True)


def test_a_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    os.makedirs(tmp_path / 'data' / 'a')
    ramp = np.linspace(0, 65535, 32).round().astype(np.uint16)[None].repeat(32, 0)  # (32, 32), left to right
    Image.fromarray(ramp).save(tmp_path / 'data' / 'a' / 'ramp.png')  # Pillow mode I;16
    Image.fromarray((ramp >> 8).astype(np.uint8)).save(tmp_path / 'data' / 'a' / 'ramp8.png')
    ds = make_dataset(str(tmp_path / 'data'), 32, train=False)
    assert [os.path.basename(p) for p, _ in ds.samples] == ['ramp.png', 'ramp8.png']
    assert torch.equal(ds[0][0], ds[1][0]) and ds[0][0].min() == -1 and ds[0][0].max() == 1


def test_real_imagenet_sample_center_crop(imagenet_samples):
    ds = make_dataset(imagenet_samples, 64, train=False)
    assert ds.num_classes == 1000
    image, label = ds[0]
    assert image.shape == (3, 64, 64) and label == 0 and image.std() > 0.05


def test_sharded_sampler_ranks_partition_the_global_batch():
    single = iter(ShardedBatchSampler(10, batch_size=4, seed=3))
    rank0 = iter(ShardedBatchSampler(10, batch_size=2, rank=0, world_size=2, seed=3))
    rank1 = iter(ShardedBatchSampler(10, batch_size=2, rank=1, world_size=2, seed=3))
    steps = [next(single) for _ in range(6)]  # crosses epoch boundaries (10 items, 4 per step)
    for step in steps:
        assert next(rank0) + next(rank1) == step
    first_epoch = [k[0] for s in steps[:2] for k in s] + [k[0] for k in steps[2][:2]]
    assert sorted(first_epoch) == list(range(10))  # each epoch is a permutation
    resumed = iter(ShardedBatchSampler(10, batch_size=4, seed=3, start_step=4))
    assert next(resumed) == steps[4] and next(resumed) == steps[5]


def test_save_image_grid(tmp_path):
    """Images smaller than 128 px are enlarged (nearest) by an integer factor; row labels take a white left
    margin and leave the pictures as they are."""
    images = torch.linspace(-1, 1, 6 * 3 * 4 * 4).reshape(6, 3, 4, 4)
    save_image_grid(images, str(tmp_path / 'grid.png'), nrow=3)
    grid = np.asarray(Image.open(tmp_path / 'grid.png'))
    assert grid.shape == (2 * 128, 3 * 128, 3)  # 4 px x 32
    enlarged = to_uint8(images).repeat_interleave(32, 2).repeat_interleave(32, 3).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(grid[128:, 256:], enlarged[5]) and np.array_equal(grid[:128, :128], enlarged[0])
    save_image_grid(images, str(tmp_path / 'labelled.png'), nrow=3, row_labels=('input', 'reconstruction'))
    labelled = np.asarray(Image.open(tmp_path / 'labelled.png'))
    margin = labelled.shape[1] - grid.shape[1]
    assert margin > 0 and np.array_equal(labelled[:, margin:], grid)
    assert labelled[:5, :margin].min() == 255 and labelled[:, :margin].min() < 128  # white, with dark text


def test_uint8_levels_and_psnr():
    images = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 2.0]).reshape(1, 3, 1, 2)
    # round((x + 1) * 127.5), clamped to [0, 255]
    assert to_uint8(images).flatten().tolist() == [0, 0, 128, 191, 255, 255]
    x = torch.rand(2, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    # mse 0.01 -> 20 dB
    assert torch.allclose(psnr(x, x + torch.full_like(x, 0.1)), torch.full((2,), 20.0, dtype=torch.float64))
    assert torch.equal(psnr(x, x), torch.full((2,), 100.0, dtype=torch.float64))


def test_titok_presets_shapes_and_parameter_counts():
    from tokenizer import TITOK_PRESETS
    with torch.device('meta'):  # the sizes without allocating them
        counts = {}
        for preset in ('base', 'large'):
            model = Tokenizer(tokenizer_type='titok', titok_preset=preset, codebook_size=16384, code_dim=12)
            counts[preset] = {part: sum(p.numel() for p in getattr(model, part).parameters())
                              for part in ('encoder', 'decoder')}
    # VCQ Appendix A: the Base tokenizer (ViT-B encoder + ViT-B decoder) has 172M parameters
    assert abs(sum(counts['base'].values()) / 1e6 - 172) < 1
    assert counts['large']['encoder'] == counts['base']['encoder']  # Large keeps the ViT-B encoder
    assert 300e6 < counts['large']['decoder'] < 310e6  # ViT-L: 24 blocks of width 1024
    assert TITOK_PRESETS['large'][1] == (1024, 24, 16)
    torch.manual_seed(0)
    model = Tokenizer(**TINY_1D, quantizer='vq', codebook_size=64, code_dim=8)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    recon, loss, info = model(images)
    assert recon.shape == images.shape and info['indices'].shape == (3, 1, 12) and loss.ndim == 0
    codes = model.encode(images)
    assert codes.shape == (3, 12) and model.token_grid(32) == (1, 12)
    assert torch.equal(codes, info['indices'][:, 0])
    assert model.decode(codes).shape == (3, 3, 32, 32)
    assert torch.equal(model.decode(codes[:, None]), model.decode(codes))  # a 1 x L grid, as sample.py has it
    # residual codes on the 1D tokenizer: (B, L, depth), and decode(encode(x)) is the forward's reconstruction
    model = Tokenizer(**TINY_1D, quantizer='rq', codebook_size=64, code_dim=8,
                      quantizer_args={'rq_depth': 3}).eval()
    codes = model.encode(images)
    assert codes.shape == (3, 12, 3) and torch.allclose(model.decode(codes), model(images)[0], atol=1e-5)
    with pytest.raises(ValueError, match='not divisible by patch_size'):
        Tokenizer(tokenizer_type='titok', titok_preset='tiny', image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="unknown tokenizer_type 'vit'"):
        Tokenizer(tokenizer_type='vit')


def test_titok_class_tokens_positions_pixel_head_and_init():
    """TiTok's layout: [class, 16 patches, 12 latents] in the encoder, only the latent outputs coded;
    [class, 16 mask tokens, 12 codes] in the decoder, the patch outputs depth-to-space then a 3x3 conv."""
    torch.manual_seed(0)
    model = Tokenizer(**TINY_1D, quantizer='vq', codebook_size=64, code_dim=8)  # width 64, 4 x 4 patches
    encoder, decoder = model.encoder, model.decoder
    for part in (encoder, decoder):
        assert part.class_token.shape == (1, 64) and part.patch_pos.shape == (1 + 16, 64)
        assert part.latent_pos.shape == (12, 64)
    # TiTok's init: Linear / conv weights trunc-normal(0.02), biases 0; qkv xavier-uniform; embeddings randn/8
    from tokenizer import LatentEncoder1D
    titok_s = LatentEncoder1D(16, 8, 512, 1, 8, 4, 12, 0.0)  # width 512, as TiTok-S
    assert abs(titok_s.vit.blocks[0].mlp[0].weight.std().item() - 0.02) < 2e-4
    tiny_std = 0.02 * (512 / 64) ** 0.5  # a preset narrower than TiTok's (at 0.02 its codes collapse)
    assert abs(encoder.vit.blocks[0].mlp[0].weight.std().item() - tiny_std) < 2e-3  # 64 -> 256
    assert abs(encoder.patch_embed.weight.std().item() - tiny_std) < 2e-3
    assert (encoder.patch_embed.bias == 0).all() and (decoder.to_pixels.bias == 0).all()
    assert (decoder.conv_out.bias == 0).all()
    assert abs(encoder.vit.blocks[1].qkv.weight.std().item() - (2 / (64 + 3 * 64)) ** 0.5) < 0.005
    assert abs(encoder.latent_tokens.std().item() - 64 ** -0.5) < 0.015
    vit_outputs = {}
    for part in (encoder, decoder):
        part.vit.register_forward_hook(lambda module, args, out, part=part: vit_outputs.update({part: out}))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    z = encoder(images)
    assert z.shape == (2, 8, 1, 12) and vit_outputs[encoder].shape == (2, 1 + 16 + 12, 64)
    latent_codes = encoder.to_code(vit_outputs[encoder][:, 1 + 16:])  # the class and patch outputs unused
    assert torch.allclose(z, latent_codes.transpose(1, 2)[:, :, None])
    with torch.no_grad():  # the 3x3 conv as identity: the image is each patch output's pixels in place
        decoder.conv_out.weight.zero_()
        decoder.conv_out.weight[[0, 1, 2], [0, 1, 2], 1, 1] = 1
    recon = decoder(z)
    assert recon.shape == (2, 3, 32, 32) and vit_outputs[decoder].shape == (2, 1 + 16 + 12, 64)
    patch_outputs = vit_outputs[decoder][:, 1:1 + 16]  # (B, 16, 64), the class and code outputs unused
    pixels = decoder.to_pixels(patch_outputs).reshape(2, 4, 4, 3, 8, 8)  # (B, row, column, 3, p, p)
    assert torch.allclose(recon, pixels.permute(0, 3, 1, 4, 2, 5).reshape(2, 3, 32, 32), atol=1e-6)


@pytest.mark.parametrize('quantizer', ['vq', 'ibq', 'fvq'])
def test_vcq_on_1d_latent_tokens_never_uses_a_code_beyond_k_t(quantizer):
    torch.manual_seed(0)
    # (a random bridge output layer: zero-initialised, every mapped code starts at 0 and ties pick code 0)
    extra = {'bridge_dim': 32, 'bridge_zero_init': False} if quantizer == 'fvq' else {}
    model = Tokenizer(**dict(TINY_1D, image_size=16, patch_size=4, num_latent_tokens=24), quantizer=quantizer,
                      codebook_size=144, code_dim=8,  # square K: the FVQ bridge lays codes out as an image
                      quantizer_args={'vcq_schedule': 'cosine', 'vcq_k_min': 2, 'vcq_seq_len': 24, **extra})
    sizes = model.quantizer.codebook_sizes  # (24,) K_t along the latent tokens
    assert sizes[0] == 2 and sizes[-1] == 144
    codes = model.encode(torch.rand(64, 3, 16, 16) * 2 - 1)  # (64, 24)
    assert (codes < sizes[None, :]).all()
    assert (codes[:, -1] >= 2).any()  # the late positions do use their larger codebooks


def tiny_tokenizer(tokenizer_type, quantizer, **quantizer_args):
    # 16 x 16 images: 8 x 8 codes, or 8 latent tokens
    shape = (dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8) if tokenizer_type == 'vqgan'
             else dict(TINY_1D, image_size=16, patch_size=4, num_latent_tokens=8))
    return Tokenizer(**shape, quantizer=quantizer, codebook_size=64, code_dim=4,
                     quantizer_args=quantizer_args)


@pytest.mark.parametrize('quantizer', ['vq', 'fvq', 'msvq', 'ibq'])
def test_quantization_is_float32_under_the_callers_bf16_autocast(quantizer):
    """Under the training's bf16 autocast every quantizer still searches, maps its codebook and computes its
    loss in float32 (the same codes, z_q and loss), while IBQ's backward sees the caller's autocast."""
    import quantizers as Q
    torch.manual_seed(0)
    model = tiny_tokenizer('vqgan', quantizer, **({'msvq_scales': (1, 2, 4)} if quantizer == 'msvq' else {}))
    z = torch.randn(2, 4, 4, 4, requires_grad=True)

    def quantize(autocast):
        z.grad = None
        model.zero_grad(set_to_none=True)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            z_q, loss, info = model.quantize(z)
            (z_q.square().sum() + loss).backward()
        return z_q, loss, Q.flat_codes(info['indices']), model.quantizer.embedding.grad.clone()

    plain, mixed = quantize(False), quantize(True)
    assert mixed[0].dtype == mixed[1].dtype == torch.float32
    for a, b in zip(plain[:3], mixed[:3]):
        assert torch.equal(a, b)
    assert torch.equal(plain[3], mixed[3]) == (quantizer != 'ibq')  # IBQ: the bf16 backward products


@pytest.mark.parametrize('tokenizer_type, quantizer', [('vqgan', 'vq'), ('titok', 'fvq')])
def test_compile_blocks_compiles_each_block_shape_once_and_changes_nothing(tokenizer_type, quantizer):
    """train_tokenizer.py --compile=True: one graph per distinct block (class, input shape and strides, weight
    shapes), so no break inside a block and no recompile over the steps; the state_dict keeps its names and
    the outputs and gradients are the eager ones. Dynamo alone (a counting backend)."""
    counting_backend, graphs = graph_counter()
    torch.manual_seed(0)
    model = tiny_tokenizer(tokenizer_type, quantizer)
    eager = copy.deepcopy(model)
    kinds, blocks = set(), [m for m in eager.modules() if isinstance(m, (ResnetBlock, AttnBlock, ViTBlock))]
    for block in blocks:
        block.register_forward_pre_hook(lambda m, args: kinds.add(
            (type(m), args[0].shape, args[0].stride(), tuple(p.shape for p in m.parameters()))))
    names = list(model.state_dict())
    assert compile_blocks(model, backend=counting_backend) is model
    assert list(model.state_dict()) == names
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    for step in range(2):
        outputs = []
        for m in (eager, model):
            recon, loss, _ = m(images)
            total = recon.square().mean() + loss
            grads = torch.autograd.grad(total, list(m.parameters()), allow_unused=True)
            outputs.append([recon, loss, *grads])
        for a, b in zip(*outputs):
            assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-5, atol=1e-6)
        if step == 0:
            assert len(graphs) == len(kinds) < len(blocks)  # blocks of one kind share their graph
    assert len(graphs) == len(kinds)


@pytest.mark.parametrize('tokenizer_type, quantizer', [('vqgan', 'vq'), ('vqgan', 'ibq'), ('titok', 'fvq')])
def test_compiled_tokenizer_compiles_once_without_graph_breaks(tokenizer_type, quantizer):
    """torch.compile of the tokenizer: the steps after the first reuse its graphs (no recompile as the
    quantizer's usage records move), and only IBQ's chunked autograd function breaks the graph."""
    counting_backend, graphs = graph_counter()
    # IBQ in chunks of 32 of the 128 tokens: the whole-matrix formula would take these few
    model = tiny_tokenizer(tokenizer_type, quantizer, **({'chunk_size': 32} if quantizer == 'ibq' else {}))
    compiled = torch.compile(model, backend=counting_backend)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    for step in range(3):
        recon, loss, _ = compiled(images)
        (recon.square().mean() + loss).backward()
        if step == 1:
            compiles = len(graphs)
    assert len(graphs) == compiles
    if quantizer != 'ibq':
        assert compiles == 1  # one graph: no break anywhere
    else:  # one break, at ibq_chunked (each enclosing frame reports it)
        explanation = torch._dynamo.explain(model)(images)
        assert explanation.graph_count == compiles > 1
        assert all('ibq_chunked' in r.reason for r in explanation.break_reasons), explanation.break_reasons
