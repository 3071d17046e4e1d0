"""
Trains a VQ image tokenizer (VQGAN or 1D TiTok; VQ / IBQ / FVQ / RQ / MSVQ quantizer, optional VCQ schedule)
with reconstruction, LPIPS, quantizer, GAN and LeCAM losses; writes out_dir/ckpt.pt, log.jsonl and PNGs:
    python train_tokenizer.py config/smoke.py
    torchrun --standalone --nproc_per_node=8 train_tokenizer.py config/fvq_262k.py  # DDP on one node
"""
import copy
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from quantizers import (QUANTIZERS, quantizer_options, bridge_group_size_for, code_usage, flat_codes,
                        quantizer_stats)
from tokenizer import (Tokenizer, PatchDiscriminator, make_lpips, disc_loss_fn, gen_loss_fn, lecam_loss,
                       diff_augment, make_dataset, split_held_out, collate, ShardedBatchSampler, setup_device,
                       autocast_context, atomic_save, save_image_grid, truncate_log, append_log, psnr,
                       to_uint8, load_checkpoint, check_resume_config, gather_rng_states, check_config,
                       restore_rng_states, leave_process_group, tokens_per_image, compile_blocks,
                       lock_out_dir, stop_if_not_finite, CHECKPOINT_FORMAT)

# -----------------------------------------------------------------------------
# default config: LlamaGen VQ-16 on ImageNet 256 (config/vq_16k.py); override with config files / --key=value
# I/O
out_dir = 'out'
eval_interval = 2000  # also the checkpoint interval
log_interval = 50
eval_images = 64  # held-out images reconstructed at each eval (PSNR, usage, PNG grid)
init_from = 'scratch'  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
overwrite = False  # True: a run from scratch may replace the checkpoint already in out_dir
resume_allow = ''  # comma-separated config keys that may differ from the resumed checkpoint's (tokenizer.py)
seed = 1337
# data
data_dir = ''  # ImageFolder root (root/<class>/*.JPEG); '' = the built-in procedural dataset, no download
eval_data_dir = ''  # held-out ImageFolder root; '' = hold out eval_images images of data_dir
num_images = 0  # size of the built-in dataset (0 = its default)
image_size = 256
num_workers = 4
# model
tokenizer_type = 'vqgan'  # 'vqgan': a 2D grid (the ch* / z_channels keys); 'titok': the 1D tokenizer (VCQ's)
titok_preset = 'base'  # titok: ViT sizes of tokenizer.TITOK_PRESETS ('base' = VCQ's Base)
patch_size = 16  # titok: ViT patch size
num_latent_tokens = 256  # titok: L, the codes per image
ch = 128
ch_mult = (1, 1, 2, 2, 4)  # downsample 16; (1, 2, 2, 4) gives 8
num_res_blocks = 2
z_channels = 256
quantizer = 'vq'  # 'vq', 'ibq', 'fvq', 'rq' (RQ-VAE) or 'msvq' (VAR): a key of quantizers.QUANTIZERS
codebook_size = 16384
code_dim = 8
# quantizer options: each quantizer takes those of its constructor's keyword arguments (quantizers.py)
l2_norm = True  # vq: cosine codes (LlamaGen); fvq: codes normalised at init; ibq: cosine logits; msvq: VAR's
projector = 'vqbridge'  # fvq, rq, msvq: 'vqbridge', 'linear' or 'mlp5' ('' for rq / msvq: their own codebook)
rq_depth = 4  # rq: codes per position (RQ-VAE's depth)
msvq_scales = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # msvq: side of each scale's code map (VAR's); last = grid's
bridge_group_size = 0  # codes per bridge token (0 = quantizers.bridge_group_size_for(K): 16 at 16,384)
bridge_dim = 256
bridge_zero_init = True  # the release's zero-initialised expand layer (DiT's output layer): codes start at 0
vcq_schedule = ''  # VCQ codebook size K_t over the token positions: '', 'linear', 'cosine', 'power'
vcq_k_min = 2
ema_decay = 0.0  # weight EMA (IBQ's release: 0.999); eval, evaluate.py and code extraction then use it
# losses
rec_loss = 'l2'  # 'l1' or 'l2'
perceptual_weight = 1.0  # LPIPS-VGG; 0 = no LPIPS
lpips_random_backbone = False  # True: random VGG trunk, nothing downloaded (tests, offline smoke runs)
disc_weight = 0.5  # weight of the generator's adversarial loss; 0 = no discriminator
disc_loss_weight = 0.0  # weight of D's hinge loss; 0 = disc_weight, as LlamaGen / FVQ (IBQ, VCQ: 1.0)
disc_start = 20000
gen_loss = 'hinge'  # 'hinge' or 'non_saturating_per_image' (IBQ's release: BCE of each image's mean logit)
lecam_weight = 0.0  # IBQ uses LeCAM
disc_first = False  # step D before G in each iteration (IBQ's release); LlamaGen and FVQ step G first
disc_augment = False  # DiffAugment on D's inputs (our reading of VCQ's "adversarial augmentation")
# optimisation: AdamW (with weight_decay 0 it is Adam, as LlamaGen, FVQ and IBQ train)
batch_size = 128  # global batch, split across ranks and gradient_accumulation_steps
gradient_accumulation_steps = 1
max_iters = 40 * 1281167 // 128  # 40 ImageNet epochs
learning_rate = 1e-4  # at base_batch_size; scaled by batch_size / base_batch_size (FVQ Table 6)
base_batch_size = 128
beta1 = 0.9
beta2 = 0.95
weight_decay = 0.0
lr_schedule = 'constant'  # 'annealing' (FVQ), 'cosine', 'step' (IBQ) or 'constant'; see get_lr
warmup_frac = 0.0  # fraction of max_iters: linear warmup from 0.005x (FVQ Table 6 "warmup(0.1)")
constant_frac = 0.0  # 'annealing': fraction of the post-warmup steps at the peak lr (Table 6 "baselr(0.3)")
lr_milestones = ()  # 'step': fractions of max_iters at which the lr is multiplied by 0.1
grad_clip = 1.0  # 0 = off
# system
device = 'auto'  # 'auto', 'cpu', 'cuda', 'cuda:1', ...
dtype = 'bfloat16'  # autocast dtype on GPU ('bfloat16' or 'float32'); the CPU always runs float32
compile = False  # True: the tokenizer block by block (tokenizer.compile_blocks), the discriminator whole
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if k.islower() and k[0] != '_' and isinstance(v, (int, float, str, tuple))]  # not CONSTANTS
default_config = {k: globals()[k] for k in config_keys}
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in config_keys}
# -----------------------------------------------------------------------------

ddp = int(os.environ.get('RANK', -1)) != -1
device, rank, local_rank, world_size = setup_device(device)
master = rank == 0
check_config(config, [*[(k, config[k] >= 1, ">= 1") for k in (
    'max_iters', 'eval_interval', 'eval_images', 'image_size', 'ch', 'z_channels', 'codebook_size',
    'code_dim', 'patch_size', 'num_latent_tokens')],
    ('image_size', tokenizer_type != 'vqgan' or image_size % 2 ** (len(ch_mult) - 1) == 0,
     f"divisible by the downsampling of ch_mult {ch_mult}"),
    *[(k, config[k] in allowed, f"one of {allowed}") for k, allowed in [
        ('lr_schedule', ('annealing', 'cosine', 'step', 'constant')), ('rec_loss', ('l1', 'l2')),
        ('gen_loss', ('hinge', 'non_saturating_per_image'))]],
    ('lr_milestones', all(0 <= m <= 1 for m in lr_milestones), "fractions of max_iters, in [0, 1]")],
    world_size)
micro_batch = batch_size // (world_size * gradient_accumulation_steps)
lr = learning_rate * batch_size / base_batch_size
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
autocast = autocast_context(device, dtype)
ckpt_path, log_path = os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'log.jsonl')

# a key only other quantizers take: ignored from a config file (--quantizer=X over any config), an error typed
options = quantizer_options(quantizer)
other_options = {name for kind in QUANTIZERS for name in quantizer_options(kind)} - set(options)
foreign = [k for k in sorted(other_options) if k in config_sources and config[k] != default_config[k]]
typed = [k for k in foreign if config_sources[k] == 'command line']
if typed:
    raise ValueError(f"quantizer '{quantizer}' does not take {', '.join(typed)} (it takes {options})")
if foreign and master:
    print(f"ignored (quantizer '{quantizer}' does not take them): {', '.join(foreign)}")
quantizer_args = {k: config[k] for k in options if k in config}  # with the automatic values resolved:
if 'vcq_seq_len' in options and vcq_schedule:
    quantizer_args['vcq_seq_len'] = tokens_per_image(tokenizer_type, image_size, ch_mult, num_latent_tokens)
if quantizer_args.get('bridge_group_size') == 0:
    quantizer_args['bridge_group_size'] = bridge_group_size_for(codebook_size)

# -----------------------------------------------------------------------------
# images, model, discriminator, perceptual loss, optimisers: an error here leaves out_dir as it was

train_set = make_dataset(data_dir, image_size, train=True, num_images=num_images)
if data_dir and not eval_data_dir:  # hold out eval_images images of the training folder
    eval_set = make_dataset(data_dir, image_size, train=False)
    train_set.samples, eval_set.samples = split_held_out(train_set.samples, eval_images)
else:
    eval_set = make_dataset(eval_data_dir or data_dir, image_size, False, num_images and eval_images)

model_keys = ('tokenizer_type', 'ch', 'ch_mult', 'num_res_blocks', 'z_channels', 'image_size', 'patch_size',
              'num_latent_tokens', 'titok_preset', 'quantizer', 'codebook_size', 'code_dim')
model_args = {**{k: config[k] for k in model_keys}, 'quantizer_args': quantizer_args}
use_disc = disc_weight > 0
torch.manual_seed(seed)  # identical init on every rank (DDP also broadcasts rank 0's)
model = Tokenizer(**model_args).to(device)
ema_model = copy.deepcopy(model).requires_grad_(False).eval() if ema_decay > 0 else None
disc = PatchDiscriminator().to(device) if use_disc else None  # taming's: 3 layers, width 64
lpips_model = make_lpips(lpips_random_backbone).to(device) if perceptual_weight > 0 else None


def make_optimizer(module):
    # weight decay on weight matrices and conv kernels only: not on biases, norms, the codebook, or the 1D
    # tokenizer's latent / mask tokens and position embeddings (TiTok's create_optimizer excludes these too)
    named = list(module.named_parameters())
    decay = [p for n, p in named if p.dim() >= 2 and n.endswith('.weight')]
    no_decay = [p for n, p in named if not (p.dim() >= 2 and n.endswith('.weight'))]
    groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), fused=device_type == 'cuda')  # (one kernel)


gen_optimizer = make_optimizer(model)
disc_optimizer = make_optimizer(disc) if use_disc else None
stateful = {'model': model, 'optimizer': gen_optimizer, 'ema': ema_model, 'disc': disc,
            'disc_optimizer': disc_optimizer}  # what a checkpoint holds: un-wrapped, un-compiled names

lock_out_dir(out_dir, rank, keep=ckpt_path if init_from == 'scratch' and not overwrite else '')
iter_num, skipped_images, rng_states = 0, 0, None
lecam_ema = torch.zeros(2, device=device)  # EMA of D's mean logits on real and on reconstructed images
if init_from == 'resume':
    checkpoint = load_checkpoint(ckpt_path, 'tokenizer', device)
    check_resume_config(ckpt_path, checkpoint, model_args, config, resume_allow)
    for key, value in stateful.items():
        if value is not None:
            value.load_state_dict(checkpoint[key])
    iter_num, skipped_images = checkpoint['iter_num'], checkpoint['skipped_images']
    for name, value in checkpoint['recent_codes'].items():  # rank 0's: the usage it logs runs on
        model.quantizer.recent_codes.get_buffer(name).copy_(value)
    saved_ema = checkpoint['lecam_ema']  # (ranks, 2): this rank's, or on another number of ranks their mean
    lecam_ema = (saved_ema[rank] if len(saved_ema) == world_size else saved_ema.mean(0)).to(device)
    rng_states = checkpoint['rng_states'][rank] if len(checkpoint['rng_states']) == world_size else None
    if master:
        truncate_log(log_path, iter_num)  # what the killed run logged after this checkpoint is logged again
        print(f"resumed from {ckpt_path} at iter {iter_num}")
    del checkpoint
elif master:  # a fresh run (lock_out_dir allowed it) starts a fresh log, its setting first (for plot titles)
    append_log(log_path, {'iter': 0, 'split': 'config', 'config': config, 'device': device}, fresh=True)

raw_model, raw_disc = model, disc  # un-wrapped
if compile:
    compile_blocks(model)  # in place
    disc = torch.compile(disc) if use_disc else None
gen_disc = disc  # the generator's GAN loss goes through D without DDP (its D-gradients are not wanted)
if ddp:
    # broadcast_buffers=False: the tokenizer has no BatchNorm, and its usage buffers are per-rank statistics
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None, broadcast_buffers=False)
    disc = DDP(disc, device_ids=[local_rank] if device_type == 'cuda' else None) if use_disc else None

# -----------------------------------------------------------------------------
# data: the order depends only on the step, so a resumed run sees exactly what it would have seen

sampler = ShardedBatchSampler(len(train_set), micro_batch, rank, world_size, seed,
                              start_step=iter_num * gradient_accumulation_steps)
loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate,
                                     num_workers=num_workers, pin_memory=device_type == 'cuda',
                                     persistent_workers=num_workers > 0)
batches = iter(loader)
# after iter(loader), which draws a seed from the global generator: a resumed run continues the very stream
restore_rng_states(rng_states, device_type, seed + rank + iter_num)  # per-rank streams (DiffAugment)
if master:
    print(f"{sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M parameters, {quantizer_args}, "
          f"{len(train_set)} training images, {min(eval_images, len(eval_set))} held out")


@torch.no_grad()
def evaluate():
    """Logs the held-out PSNR, rec loss and usage (EMA weights if any); saves inputs over reconstructions."""
    eval_model = ema_model if ema_model is not None else raw_model
    eval_model.eval()
    keys = list(range(min(eval_images, len(eval_set))))
    psnrs, rec, indices, shown = [], [], [], None
    for start in range(0, len(keys), micro_batch):
        images = collate([eval_set[k] for k in keys[start: start + micro_batch]])[0].to(device)
        if len(images) == 0:  # all unreadable
            continue
        with autocast:
            recon, _, info = eval_model(images)
        err = recon.float() - images
        rec.append((err.abs() if rec_loss == 'l1' else err.pow(2)).flatten(1).mean(1))
        recon = recon.float().clamp(-1, 1)
        psnrs.append(psnr(to_uint8(recon) / 255.0, to_uint8(images) / 255.0))  # as evaluate.py: saved levels
        indices.append(flat_codes(info['indices']).flatten())
        shown = torch.cat([images[:8], recon[:8]]) if shown is None else shown
    raw_model.train()
    if not psnrs:
        raise ValueError(f"none of the {len(keys)} held-out images could be read (see the warnings above)")
    indices = torch.cat(indices)
    save_image_grid(shown, os.path.join(out_dir, f'recon_{iter_num:07d}.png'), nrow=len(shown) // 2,
                    row_labels=('input', 'reconstruction'))
    usage = 100 * code_usage(torch.bincount(indices, minlength=codebook_size))[0].item()  # %
    result = {'psnr': torch.cat(psnrs).mean().item(), 'rec': torch.cat(rec).mean().item(), 'usage': usage,
              'usage_tokens': indices.numel(), 'images': sum(len(p) for p in psnrs)}
    append_log(log_path, {'iter': iter_num, 'split': 'eval', **result})
    print(f"eval iter {iter_num}: psnr {result['psnr']:.2f} dB, rec {result['rec']:.5f}, usage {usage:.2f}% "
          f"({indices.numel()} tokens of {result['images']} held-out images)")


def save_checkpoint():
    all_states = gather_rng_states(device_type, ddp, world_size)
    # every rank's LeCAM EMA (each follows its own D logits, as each process of the release does): (ranks, 2)
    all_lecam_ema = [torch.zeros_like(lecam_ema) for _ in range(world_size)] if ddp else [lecam_ema]
    if ddp:
        dist.all_gather(all_lecam_ema, lecam_ema)
    if master:
        states = {k: v.state_dict() if v is not None else None for k, v in stateful.items()}
        stop_if_not_finite('weights', {f'{k}.{name}': t for k in ('model', 'ema', 'disc') if states[k]
                                       for name, t in states[k].items()}, iter_num, learning_rate)
        atomic_save({'kind': 'tokenizer', 'format': CHECKPOINT_FORMAT, **states, 'model_args': model_args,
                     'config': config, 'iter_num': iter_num, 'skipped_images': skipped_images,
                     'recent_codes': dict(raw_model.quantizer.recent_codes.named_buffers()),
                     'lecam_ema': torch.stack(all_lecam_ema).cpu(), 'rng_states': all_states}, ckpt_path)
        print(f"saved checkpoint to {ckpt_path} at iter {iter_num}", flush=True)


def discriminator_step(pairs):
    """One D update on the (real, reconstructed) images of every micro-step -> D's loss (a tensor)."""
    global lecam_ema
    decay = 0.999  # of the LeCAM EMA (SEED-Voken's)
    raw_disc.requires_grad_(True)
    total = torch.zeros((), device=device)
    ema_before, means_sum = lecam_ema, torch.zeros(2, device=device)
    for micro_step, (images, recon) in enumerate(pairs):
        with (disc.no_sync() if ddp and micro_step < len(pairs) - 1 else nullcontext()), autocast:
            real, fake = (diff_augment(images), diff_augment(recon)) if disc_augment else (images, recon)
            logits_real, logits_fake = disc(real).float(), disc(fake.detach()).float()
            d_loss = disc_loss_fn(logits_real, logits_fake)
            # the EMA takes this batch's logits first, then regularises (SEED-Voken's order); one update per D
            # step, from the mean over its micro-batches (exact at the last one), whatever the accumulation
            if lecam_weight > 0:
                means_sum = means_sum + torch.stack([logits_real.mean(), logits_fake.mean()]).detach()
                lecam_ema = decay * ema_before + (1 - decay) * means_sum / (micro_step + 1)
                d_loss = d_loss + lecam_weight * lecam_loss(logits_real, logits_fake, *lecam_ema)
            d_loss = (disc_loss_weight or disc_weight) * d_loss
            (d_loss / len(pairs)).backward()
        total += d_loss.detach() / len(pairs)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(raw_disc.parameters(), grad_clip)
    disc_optimizer.step()
    disc_optimizer.zero_grad(set_to_none=True)
    raw_disc.requires_grad_(False)
    return total


def get_lr(it):
    warmup_iters = warmup_frac * max_iters
    if it < warmup_iters:
        return lr * (0.005 + 0.995 * it / warmup_iters)
    if lr_schedule == 'constant':
        return lr
    if lr_schedule == 'step':
        return lr * 0.1 ** sum(it >= m * max_iters for m in lr_milestones)
    annealing = lr_schedule == 'annealing'
    decay_start = warmup_iters + constant_frac * (max_iters - warmup_iters) if annealing else warmup_iters
    progress = min(1.0, max(0.0, it - decay_start) / max(1.0, max_iters - decay_start))
    if annealing:
        return lr * (1.0 - 0.99 * progress)
    return lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress)))

# -----------------------------------------------------------------------------
# training loop

if use_disc:
    raw_disc.requires_grad_(False)  # only discriminator_step trains D
t0, start_iter = time.time(), iter_num
while True:
    if iter_num == 0 or iter_num > start_iter and (iter_num % eval_interval == 0 or iter_num == max_iters):
        if master:
            evaluate()
        if iter_num > start_iter:
            save_checkpoint()
    if iter_num >= max_iters:
        break

    step_lr = get_lr(iter_num)
    for group in gen_optimizer.param_groups + (disc_optimizer.param_groups if use_disc else []):
        group['lr'] = step_lr
    gan_active = use_disc and iter_num >= disc_start
    micro_batches = []
    for _ in range(gradient_accumulation_steps):
        images, _, n_skipped = next(batches)
        skipped_images += n_skipped
        if len(images) == 0:
            raise ValueError(f"all {n_skipped} images of a batch are unreadable (see the warnings above)")
        micro_batches.append(images.to(device, non_blocking=True))
    stats = {}
    if gan_active and disc_first:
        # IBQ's release: D first (G's GAN loss then sees the updated D), on reconstructions made without a
        # graph (eval mode: no usage recorded) so that DDP and accumulation keep one backward per micro-step
        raw_model.eval()
        with torch.no_grad(), autocast:
            pairs = [(images, raw_model(images)[0]) for images in micro_batches]
        raw_model.train()
        stats['disc'] = discriminator_step(pairs)

    # generator: reconstruction + perceptual + quantizer (+ GAN) losses, accumulated over micro-steps
    stash = []
    for micro_step, images in enumerate(micro_batches):
        with (model.no_sync() if ddp and micro_step < len(micro_batches) - 1 else nullcontext()), autocast:
            recon, quant_loss, info = model(images)
            recon_err = recon.float() - images
            rec = recon_err.abs().mean() if rec_loss == 'l1' else recon_err.pow(2).mean()
            p_loss = lpips_model(recon, images).mean() if lpips_model is not None else rec.new_zeros(())
            loss = rec + perceptual_weight * p_loss + quant_loss
            terms = {'rec': rec, 'lpips': p_loss, 'quant': quant_loss}
            if gan_active:
                terms['gan'] = gen_loss_fn(gen_loss, gen_disc(diff_augment(recon) if disc_augment else recon))
                loss = loss + disc_weight * terms['gan']
            (loss / gradient_accumulation_steps).backward()
        stash.append((images, recon.detach()))
        terms['loss'] = loss
        for k, v in terms.items():
            stats[k] = stats.get(k, 0.0) + v.detach() / gradient_accumulation_steps
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    gen_optimizer.step()
    gen_optimizer.zero_grad(set_to_none=True)
    if ema_model is not None:
        for ema_p, p in zip(ema_model.parameters(), raw_model.parameters()):
            ema_p.lerp_(p.detach(), 1 - ema_decay)
    if gan_active and not disc_first:  # LlamaGen / FVQ: D after G, on the same real/reconstructed pairs
        stats['disc'] = discriminator_step(stash)

    iter_num += 1
    if iter_num % log_interval == 0 and master:
        # reading the stats is the one host-device sync of the step; it happens once per log interval
        if device_type == 'cuda':
            torch.cuda.synchronize()
        dt, t0 = (time.time() - t0) / log_interval, time.time()
        record = {**{k: v.item() for k, v in stats.items()},
                  **{k: v.item() for k, v in quantizer_stats(raw_model.quantizer, info['indices']).items()},
                  **{f'q_{k}': v.item() for k, v in info.items() if k.endswith(('_loss', '_entropy'))},
                  'lr': step_lr, 'img_per_s': batch_size / dt, 'ms_per_iter': 1000 * dt,
                  'skipped_images': skipped_images}
        stop_if_not_finite('loss', {k: record[k] for k in stats}, iter_num, learning_rate)
        append_log(log_path, {'iter': iter_num, 'split': 'train', **record})
        losses = ', '.join(f"{k} {v.item():.5f}" for k, v in stats.items())
        print(f"iter {iter_num}: {losses}, usage {record['usage']:.2f}%, window usage "
              f"{record['window_usage']:.2f}%, {batch_size / dt:.1f} img/s, {1000 * dt:.1f} ms/iter",
              flush=True)

if ddp:
    del model, disc  # the DDP wrappers hold the process group
    leave_process_group()
