"""
Trains a VQ image tokenizer (VQGAN + VQ / IBQ / FVQ / VCQ quantizer) with reconstruction, LPIPS, quantizer,
GAN and LeCAM losses. One GPU or CPU:
    python train_tokenizer.py config/smoke.py
DDP on one node (global batch split across ranks):
    torchrun --standalone --nproc_per_node=8 train_tokenizer.py config/fvq_262k.py
"""
import os
import time
import random
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from tokenizer import (Tokenizer, PatchDiscriminator, make_lpips, disc_loss_fn, gen_loss_fn, lecam_loss,
                       adaptive_gan_weight, make_dataset, collate, ShardedBatchSampler, lr_multiplier,
                       setup_device, autocast_context, atomic_save, save_image_grid)

# -----------------------------------------------------------------------------
# default config: LlamaGen VQ-16 on ImageNet 256 (config/vq_16k.py); override with config files / --key=value
# I/O
out_dir = 'out'
eval_interval = 2000  # also the checkpoint interval
log_interval = 50
eval_images = 64  # held-out images reconstructed at each eval (PSNR, usage, PNG grid)
init_from = 'scratch'  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
seed = 1337
# data
data_dir = ''  # ImageFolder root (root/<class>/*.JPEG); '' = the built-in procedural dataset, no download
eval_data_dir = ''  # held-out ImageFolder root; '' = hold out eval_images images of data_dir
num_images = 0  # size of the built-in dataset (0 = its default)
image_size = 256
num_workers = 4
# model
ch = 128
ch_mult = (1, 1, 2, 2, 4)  # downsample 16; (1, 2, 2, 4) gives 8
num_res_blocks = 2
z_channels = 256
dropout = 0.0
quantizer = 'vq'  # 'vq', 'ibq' or 'fvq'
codebook_size = 16384
code_dim = 8
quantizer_args = {'l2_norm': True, 'beta': 0.25}  # passed to quantizers.make_quantizer
# losses
rec_loss = 'l2'  # 'l1' or 'l2'
perceptual_weight = 1.0  # LPIPS-VGG; 0 = no LPIPS
lpips_random_backbone = False  # True: random VGG trunk, nothing downloaded (tests, offline smoke runs)
disc_weight = 0.5  # 0 = no discriminator
disc_start = 20000
disc_loss = 'hinge'  # 'hinge' or 'non_saturating'
gen_loss = 'hinge'
adaptive_disc_weight = False  # taming's gradient-norm balance of the GAN loss
lecam_weight = 0.0  # IBQ uses LeCAM
lecam_decay = 0.999
disc_layers = 3
disc_ch = 64
# optimisation
batch_size = 128  # global batch, split across ranks and gradient_accumulation_steps
gradient_accumulation_steps = 1
max_iters = 40 * 1281167 // 128  # 40 ImageNet epochs
learning_rate = 1e-4  # at base_batch_size; scaled by batch_size / base_batch_size (FVQ Table 6)
base_batch_size = 128
beta1 = 0.9
beta2 = 0.95
weight_decay = 0.0
lr_schedule = 'constant'  # 'annealing' (FVQ), 'cosine', 'step' (IBQ) or 'constant'
warmup_frac = 0.0
constant_frac = 0.0  # 'annealing': the constant part after warmup, then linear decay to 0.01x
lr_milestones = ()  # 'step': fractions of max_iters at which the lr is multiplied by lr_step_factor
lr_step_factor = 0.1
grad_clip = 1.0  # 0 = off
# system
device = 'auto'  # 'auto', 'cpu', 'cuda', 'cuda:1', ...
dtype = 'bfloat16'  # autocast dtype on GPU ('bfloat16' or 'float32'); the CPU always runs float32
compile = False
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (bool, int, float, str, tuple, list, dict))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in config_keys}
# -----------------------------------------------------------------------------

ddp = int(os.environ.get('RANK', -1)) != -1
device, rank, local_rank, world_size = setup_device(device)
master = rank == 0
if batch_size % (world_size * gradient_accumulation_steps) != 0:
    raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size} x "
                     f"gradient_accumulation_steps {gradient_accumulation_steps}")
micro_batch = batch_size // (world_size * gradient_accumulation_steps)
if image_size % 2 ** (len(ch_mult) - 1) != 0:
    raise ValueError(f"image_size {image_size} is not divisible by the downsampling factor {2 ** (len(ch_mult) - 1)} "
                     f"of ch_mult {ch_mult}")
lr = learning_rate * batch_size / base_batch_size
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
autocast = autocast_context(device, dtype)
if master:
    os.makedirs(out_dir, exist_ok=True)
    print(f"config: {config}")
    print(f"world_size {world_size}, micro batch {micro_batch}/rank, lr {lr:.3e}, device {device}")
torch.manual_seed(seed)  # identical init on every rank (DDP also broadcasts rank 0's)

# -----------------------------------------------------------------------------
# model, discriminator, perceptual loss, optimisers

model_args = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels, dropout=dropout,
                  quantizer=quantizer, codebook_size=codebook_size, code_dim=code_dim, quantizer_args=quantizer_args)
use_disc = disc_weight > 0
model = Tokenizer(**model_args).to(device)
disc = PatchDiscriminator(3, disc_ch, disc_layers).to(device) if use_disc else None
lpips_model = make_lpips(lpips_random_backbone).to(device) if perceptual_weight > 0 else None
fused = device_type == 'cuda'  # one kernel for the whole update instead of one per tensor
optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(beta1, beta2), weight_decay=weight_decay, fused=fused)
disc_optimizer = torch.optim.Adam(disc.parameters(), lr=lr, betas=(beta1, beta2), fused=fused) if use_disc else None
if master:
    print(f"tokenizer: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{model.downsample}x downsampling, {image_size // model.downsample}^2 tokens per image")

iter_num, lecam_ema, skipped_images, rng_states = 0, [0.0, 0.0], 0, None
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if init_from == 'resume':
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"init_from='resume' but {ckpt_path} does not exist")
    ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
    differing = sorted(k for k in set(model_args) | set(ckpt['model_args'])
                       if model_args.get(k) != ckpt['model_args'].get(k))
    if differing:
        raise ValueError(f"{ckpt_path} does not match the current config; differing model keys: "
                         + ", ".join(f"{k} (checkpoint {ckpt['model_args'].get(k)!r}, config {model_args.get(k)!r})"
                                     for k in differing))
    if (ckpt['disc'] is not None) != use_disc:
        raise ValueError(f"{ckpt_path} was trained with disc_weight {ckpt['config']['disc_weight']}; "
                         f"the current disc_weight {disc_weight} {'needs' if use_disc else 'drops'} a discriminator")
    model.load_state_dict(ckpt['model'])
    optimizer.load_state_dict(ckpt['optimizer'])
    if use_disc:
        disc.load_state_dict(ckpt['disc'])
        disc_optimizer.load_state_dict(ckpt['disc_optimizer'])
    iter_num, lecam_ema, skipped_images = ckpt['iter_num'], ckpt['lecam_ema'], ckpt['skipped_images']
    rng_states = ckpt['rng_states'][rank] if len(ckpt['rng_states']) == world_size else None
    if master:
        print(f"resumed from {ckpt_path} at iter {iter_num}")
    del ckpt
elif init_from != 'scratch':
    raise ValueError(f"init_from must be 'scratch' or 'resume', got '{init_from}'")

raw_model, raw_disc = model, disc  # un-compiled, un-wrapped: what checkpoints hold
if compile:
    model = torch.compile(model)
    disc = torch.compile(disc) if use_disc else None
gen_disc = disc  # the generator's GAN loss goes through D without DDP (its D-gradients are not wanted)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)
    disc = DDP(disc, device_ids=[local_rank] if device_type == 'cuda' else None) if use_disc else None

if rng_states is not None:
    torch.set_rng_state(rng_states['torch'])
    np.random.set_state(rng_states['numpy'])
    random.setstate(rng_states['python'])
    if device_type == 'cuda' and rng_states['cuda'] is not None:
        torch.cuda.set_rng_state(rng_states['cuda'])
else:
    torch.manual_seed(seed + rank + iter_num)  # per-rank streams (dropout), fresh after an elastic resume

# -----------------------------------------------------------------------------
# data: the order depends only on the step, so a resumed run sees exactly what it would have seen

train_set = make_dataset(data_dir, image_size, train=True, num_images=num_images)
if data_dir and not eval_data_dir:  # hold out eval_images images of the training folder
    eval_set = make_dataset(data_dir, image_size, train=False)
    perm = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0)).tolist()
    eval_set.samples = [train_set.samples[i] for i in sorted(perm[:eval_images])]
    train_set.samples = [train_set.samples[i] for i in sorted(perm[eval_images:])]
else:
    eval_set = make_dataset(eval_data_dir or data_dir, image_size, train=False, num_images=num_images and eval_images)
sampler = ShardedBatchSampler(len(train_set), micro_batch, rank, world_size, seed,
                              start_step=iter_num * gradient_accumulation_steps)
loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                                     pin_memory=device_type == 'cuda', persistent_workers=num_workers > 0)
batches = iter(loader)
if master:
    print(f"data: {len(train_set)} training images in {train_set.num_classes} classes"
          f" ({'built-in procedural' if not data_dir else data_dir}), {min(eval_images, len(eval_set))} held out")


@torch.no_grad()
def evaluate():
    """PSNR and codebook usage on the held-out images, and a PNG of inputs (odd rows) vs reconstructions."""
    raw_model.eval()
    keys = list(range(min(eval_images, len(eval_set))))
    mse, indices, shown = [], [], None
    for start in range(0, len(keys), micro_batch):
        images, _, _ = collate([eval_set[k] for k in keys[start: start + micro_batch]])
        if len(images) == 0:
            continue
        images = images.to(device)
        with autocast:
            recon, _, info = raw_model(images)
        recon = recon.float().clamp(-1, 1)
        mse.append(((recon - images) / 2).pow(2).flatten(1).mean(1))  # per image, on the [0, 1] scale
        indices.append(info['indices'].flatten())
        if shown is None:
            n = min(8, len(images))
            shown = torch.cat([images[:n], recon[:n]])
    raw_model.train()
    mse, indices = torch.cat(mse), torch.cat(indices)
    psnr = (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean().item()
    usage = indices.unique().numel() / raw_model.quantizer.codebook_size
    save_image_grid(shown, os.path.join(out_dir, f'recon_{iter_num:07d}.png'), nrow=len(shown) // 2)
    return psnr, usage


def save_checkpoint():
    states = {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(), 'python': random.getstate(),
              'cuda': torch.cuda.get_rng_state() if device_type == 'cuda' else None}
    all_states = [None] * world_size
    if ddp:
        dist.all_gather_object(all_states, states)
    else:
        all_states = [states]
    if master:
        atomic_save({'model': raw_model.state_dict(), 'disc': raw_disc.state_dict() if use_disc else None,
                     'optimizer': optimizer.state_dict(),
                     'disc_optimizer': disc_optimizer.state_dict() if use_disc else None,
                     'model_args': model_args, 'config': config, 'iter_num': iter_num,
                     'data_step': iter_num * gradient_accumulation_steps, 'lecam_ema': lecam_ema,
                     'skipped_images': skipped_images, 'rng_states': all_states}, ckpt_path)
        print(f"saved checkpoint to {ckpt_path} at iter {iter_num}", flush=True)


def set_requires_grad(module, flag):
    for p in module.parameters():
        p.requires_grad_(flag)

# -----------------------------------------------------------------------------
# training loop

t0, start_iter = time.time(), iter_num
while True:
    if master and (iter_num == 0 or iter_num > start_iter and (iter_num % eval_interval == 0 or iter_num == max_iters)):
        psnr, eval_usage = evaluate()
        print(f"eval iter {iter_num}: psnr {psnr:.2f} dB, held-out usage {100 * eval_usage:.2f}%", flush=True)
    if iter_num > start_iter and (iter_num % eval_interval == 0 or iter_num == max_iters):
        save_checkpoint()
    if iter_num >= max_iters:
        break

    step_lr = lr * lr_multiplier(iter_num, max_iters, lr_schedule, warmup_frac, constant_frac,
                                 milestones=lr_milestones, step_factor=lr_step_factor)
    for opt in (optimizer, disc_optimizer):
        if opt is not None:
            for group in opt.param_groups:
                group['lr'] = step_lr
    gan_active = use_disc and iter_num >= disc_start
    stats = {k: 0.0 for k in ('loss', 'rec', 'lpips', 'quant', 'gan', 'disc')}

    # generator: reconstruction + perceptual + quantizer (+ GAN) losses, accumulated over micro-steps
    stash = []
    if use_disc:
        set_requires_grad(raw_disc, False)
    for micro_step in range(gradient_accumulation_steps):
        images, _, n_skipped = next(batches)
        skipped_images += n_skipped
        images = images.to(device, non_blocking=True)
        last = micro_step == gradient_accumulation_steps - 1
        with (model.no_sync() if ddp and not last else nullcontext()), autocast:
            recon, quant_loss, info = model(images)
            recon_err = recon.float() - images
            rec = recon_err.abs().mean() if rec_loss == 'l1' else recon_err.pow(2).mean()
            p_loss = lpips_model(recon, images).mean() if lpips_model is not None else torch.zeros((), device=device)
            nll = rec + perceptual_weight * p_loss
            loss = nll + quant_loss
            if gan_active:
                g_loss = gen_loss_fn(gen_loss, gen_disc(recon))
                weight = adaptive_gan_weight(nll, g_loss, raw_model.last_layer()) if adaptive_disc_weight else 1.0
                loss = loss + disc_weight * weight * g_loss
                stats['gan'] += g_loss.item() / gradient_accumulation_steps
            (loss / gradient_accumulation_steps).backward()
        stash.append((images, recon.detach()))
        for k, v in (('loss', loss), ('rec', rec), ('lpips', p_loss), ('quant', quant_loss)):
            stats[k] += v.item() / gradient_accumulation_steps
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    # discriminator on the same real/reconstructed pairs
    if gan_active:
        set_requires_grad(raw_disc, True)
        for micro_step, (images, recon) in enumerate(stash):
            last = micro_step == gradient_accumulation_steps - 1
            with (disc.no_sync() if ddp and not last else nullcontext()), autocast:
                logits_real, logits_fake = disc(images).float(), disc(recon).float()
                d_loss = disc_loss_fn(disc_loss, logits_real, logits_fake)
                if lecam_weight > 0:
                    d_loss = d_loss + lecam_weight * lecam_loss(logits_real, logits_fake, *lecam_ema)
                    lecam_ema = [lecam_decay * lecam_ema[0] + (1 - lecam_decay) * logits_real.mean().item(),
                                 lecam_decay * lecam_ema[1] + (1 - lecam_decay) * logits_fake.mean().item()]
                (d_loss / gradient_accumulation_steps).backward()
            stats['disc'] += d_loss.item() / gradient_accumulation_steps
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_disc.parameters(), grad_clip)
        disc_optimizer.step()
        disc_optimizer.zero_grad(set_to_none=True)

    iter_num += 1
    if iter_num % log_interval == 0 and master:
        if device_type == 'cuda':
            torch.cuda.synchronize()
        dt = (time.time() - t0) / log_interval
        t0 = time.time()
        print(f"iter {iter_num}: loss {stats['loss']:.5f}, rec {stats['rec']:.5f}, lpips {stats['lpips']:.4f}, "
              f"quant {stats['quant']:.5f}, gan {stats['gan']:.4f}, disc {stats['disc']:.4f}, "
              f"usage {100 * float(info['usage']):.2f}%, ppl {float(info['perplexity']):.1f}, lr {step_lr:.3e}, "
              f"{batch_size / dt:.1f} img/s, {1000 * dt:.1f} ms/iter"
              + (f", skipped {skipped_images} unreadable images" if skipped_images else ''), flush=True)

if ddp:
    dist.destroy_process_group()
