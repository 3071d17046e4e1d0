"""
Trains a VQ image tokenizer (VQGAN + VQ / IBQ / FVQ / VCQ quantizer) with reconstruction, LPIPS, quantizer,
GAN and LeCAM losses. One GPU or CPU:
    python train_tokenizer.py config/smoke.py
DDP on one node (global batch split across ranks):
    torchrun --standalone --nproc_per_node=8 train_tokenizer.py config/fvq_262k.py
Writes out_dir/ckpt.pt, out_dir/log.jsonl (one JSON line per log interval and evaluation) and
reconstruction grids.
"""
import copy
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from quantizers import options_from_config, bridge_group_size_for, code_usage, flat_codes, quantizer_stats
from tokenizer import (Tokenizer, PatchDiscriminator, make_lpips, disc_loss_fn, gen_loss_fn, lecam_loss,
                       adaptive_gan_weight, diff_augment, make_dataset, split_held_out, collate,
                       ShardedBatchSampler, setup_device, autocast_context, atomic_save, save_image_grid,
                       truncate_log, append_log, load_checkpoint, check_out_dir, check_resume_config,
                       gather_rng_states, restore_rng_states, leave_process_group, psnr, to_uint8, tokens_per_image,
                       compile_blocks)

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
tokenizer_type = 'vqgan'  # 'vqgan': the 2D grid (the ch* / z_channels keys); 'titok': the 1D tokenizer (VCQ's)
titok_preset = 'base'  # titok: ViT sizes, tokenizer.TITOK_PRESETS ('base' = VCQ's Base, 'large', 'small', 'tiny')
patch_size = 16  # titok: ViT patch size
num_latent_tokens = 256  # titok: L, the codes per image
ch = 128
ch_mult = (1, 1, 2, 2, 4)  # downsample 16; (1, 2, 2, 4) gives 8
num_res_blocks = 2
z_channels = 256
dropout = 0.0
quantizer = 'vq'  # 'vq', 'ibq', 'fvq', 'rq' (RQ-VAE) or 'msvq' (VAR)
codebook_size = 16384
code_dim = 8
# quantizer options (quantizers.make_quantizer's): each takes effect for some quantizers only, and changing
# one that has no effect for `quantizer` is an error.
# All resolved values are recorded in the checkpoint's model_args.
beta = 0.25  # commitment weight
l2_norm = True  # vq: l2-normalised codes and z (LlamaGen); fvq: the raw codes normalised once at init (the
#                 release's flag; its scripts leave it off); ibq: cosine logits (off in the release); msvq: the
#                 nearest code by cosine similarity (VAR's using_znorm, off in VAR)
chunk_size = 0  # tokens per (chunk, K) distance / logit block; 0 = chosen from K (quantizers.chunk_rows)
# window_usage: distinct codes among the last max(65536, K + 1) tokens (the release's; 0 = that)
usage_window = 0
usage_tokens = 0  # usage: distinct codes among the last usage_tokens training tokens (0 = 10 K)
ibq_beta_term = 'codebook'  # ibq: beta on the codebook term (SEED-Voken) or 'commit' (IBQ eq. 12 as printed)
entropy_weight = 0.05  # ibq: MAGVIT-v2 entropy penalty
entropy_temperature = 0.01
projector = 'vqbridge'  # fvq, rq, msvq: 'vqbridge', 'linear' or 'mlp5' ('' for rq / msvq: their own codebook)
rq_depth = 4  # rq: codes per position (RQ-VAE's depth)
msvq_scales = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # msvq: side of each scale's code map (VAR's); last = grid's
msvq_phi_ratio = 0.5  # msvq: phi(h) = (1 - r) h + r conv3x3(h) (VAR's quant_resi)
msvq_phi_convs = 4  # msvq: phi convolutions shared over the scales (VAR's share_quant_resi)
bridge_group_size = 0  # codes per bridge token (0 = quantizers.bridge_group_size_for(K): 16 at 16,384)
bridge_dim = 256
bridge_depth = 2
bridge_heads = 4
bridge_mlp_ratio = 2.0
bridge_compress_norm = False  # FVQ eq. 8's LayerNorm after the compress layer (not in the release)
# the release zero-initialises the expand layer (DiT's output layer): every code starts at 0
bridge_zero_init = True
vcq_schedule = ''  # VCQ codebook-size schedule over the token positions: '', 'linear', 'cosine', 'power'
vcq_k_min = 2
vcq_seq_len = 0  # 0 = the latent grid's token count
vcq_gamma = 2.5  # 'power' only
# weight EMA (IBQ's release: 0.999); eval, evaluate.py and code extraction then use the EMA weights
ema_decay = 0.0
# losses
rec_loss = 'l2'  # 'l1' or 'l2'
perceptual_weight = 1.0  # LPIPS-VGG; 0 = no LPIPS
lpips_random_backbone = False  # True: random VGG trunk, nothing downloaded (tests, offline smoke runs)
disc_weight = 0.5  # weight of the generator's adversarial loss; 0 = no discriminator
disc_loss_weight = 0.0  # weight of D's loss; 0 = disc_weight, as LlamaGen / FVQ (IBQ, VCQ: 1.0)
disc_start = 20000
disc_loss = 'hinge'  # 'hinge' or 'non_saturating'
gen_loss = 'hinge'  # 'hinge', 'non_saturating' or 'non_saturating_per_image' (IBQ's release)
adaptive_disc_weight = False  # taming's gradient-norm balance of the GAN loss
lecam_weight = 0.0  # IBQ uses LeCAM
lecam_decay = 0.999
disc_layers = 3
disc_ch = 64
disc_first = False  # step D before G in each iteration (IBQ's release); LlamaGen and FVQ step G first
disc_augment = False  # DiffAugment on D's inputs (our reading of VCQ's "adversarial augmentation")
# optimisation
optimizer = 'adam'  # 'adam' (LlamaGen, FVQ, IBQ) or 'adamw' (VCQ)
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
lr_milestones = ()  # 'step': fractions of max_iters at which the lr is multiplied by lr_step_factor
lr_step_factor = 0.1
grad_clip = 1.0  # 0 = off
# system
device = 'auto'  # 'auto', 'cpu', 'cuda', 'cuda:1', ...
dtype = 'bfloat16'  # autocast dtype on GPU ('bfloat16' or 'float32'); the CPU always runs float32
compile = False  # True: the tokenizer block by block (tokenizer.compile_blocks), the discriminator whole
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (bool, int, float, str, tuple, list, dict))]
default_config = {k: globals()[k] for k in config_keys}
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
if eval_images < 1:
    raise ValueError(f"eval_images = {eval_images}: the held-out evaluation needs at least 1 image")
downsample = 2 ** (len(ch_mult) - 1)
if tokenizer_type == 'vqgan' and image_size % downsample != 0:
    raise ValueError(f"image_size {image_size} is not divisible by the downsampling factor {downsample} "
                     f"of ch_mult {ch_mult}")
num_tokens = tokens_per_image(tokenizer_type, image_size, ch_mult, num_latent_tokens)
if quantizer == 'msvq' and (tokenizer_type != 'vqgan' or msvq_scales[-1] != image_size // downsample):
    raise ValueError(f"msvq needs the VQGAN's grid with msvq_scales ending at its side: msvq_scales {msvq_scales}, "
                     f"latent grid {image_size // downsample} (image_size {image_size}, ch_mult {ch_mult}), "
                     f"tokenizer_type {tokenizer_type!r}")
lr = learning_rate * batch_size / base_batch_size
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
autocast = autocast_context(device, dtype)
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
log_path = os.path.join(out_dir, 'log.jsonl')
if lr_schedule not in ('annealing', 'cosine', 'step', 'constant'):
    raise ValueError(f"unknown lr_schedule '{lr_schedule}' "
                     f"(expected 'annealing', 'cosine', 'step' or 'constant')")
check_out_dir(ckpt_path, init_from, overwrite)
torch.manual_seed(seed)  # identical init on every rank (DDP also broadcasts rank 0's)

# the quantizer options that take effect for this quantizer;
# automatic values resolved, so checkpoints record them
quantizer_args = options_from_config(quantizer, config, default_config)
if quantizer_args.get('vcq_seq_len') == 0:
    quantizer_args['vcq_seq_len'] = num_tokens
if quantizer_args.get('bridge_group_size') == 0:
    quantizer_args['bridge_group_size'] = bridge_group_size_for(codebook_size)
if master:
    print(f"config: {config}")
    print(f"world_size {world_size}, micro batch {micro_batch}/rank, lr {lr:.3e}, device {device}")

# -----------------------------------------------------------------------------
# model, discriminator, perceptual loss, optimisers

model_args = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels,
                  dropout=dropout, quantizer=quantizer, codebook_size=codebook_size, code_dim=code_dim,
                  quantizer_args=quantizer_args)
if tokenizer_type != 'vqgan':  # (VQGAN checkpoints keep the model_args they always had)
    model_args.update(tokenizer_type=tokenizer_type, image_size=image_size, patch_size=patch_size,
                      num_latent_tokens=num_latent_tokens, titok_preset=titok_preset)
use_disc = disc_weight > 0
model = Tokenizer(**model_args).to(device)
# IBQ's release evaluates with an EMA of the weights (LitEma, constant decay)
ema_model = copy.deepcopy(model).requires_grad_(False).eval() if ema_decay > 0 else None
disc = PatchDiscriminator(3, disc_ch, disc_layers).to(device) if use_disc else None
lpips_model = make_lpips(lpips_random_backbone).to(device) if perceptual_weight > 0 else None
if optimizer not in ('adam', 'adamw'):
    raise ValueError(f"optimizer must be 'adam' or 'adamw', got '{optimizer}'")
Optimizer = torch.optim.AdamW if optimizer == 'adamw' else torch.optim.Adam
fused = device_type == 'cuda'  # one kernel for the whole update instead of one per tensor


def param_groups(module):
    # weight decay on weight matrices and conv kernels only: not on biases, norms, the codebook, or the 1D
    # tokenizer's latent / mask tokens and position embeddings (TiTok's create_optimizer excludes these too)
    named = list(module.named_parameters())
    decays = [p.dim() >= 2 and n.endswith('.weight') for n, p in named]
    return [{'params': [p for (_, p), d in zip(named, decays) if d], 'weight_decay': weight_decay},
            {'params': [p for (_, p), d in zip(named, decays) if not d], 'weight_decay': 0.0}]


gen_optimizer = Optimizer(param_groups(model), lr=lr, betas=(beta1, beta2), fused=fused)
disc_optimizer = Optimizer(param_groups(disc), lr=lr, betas=(beta1, beta2), fused=fused) if use_disc else None
if master:
    if tokenizer_type == 'titok':
        shape = f"1D, {num_latent_tokens} tokens per image ({titok_preset} ViTs, patch {patch_size})"
    elif quantizer == 'msvq':
        shape = (f"{downsample}x downsampling, {sum(s * s for s in msvq_scales)} tokens per image over "
                 f"{len(msvq_scales)} scales")
    else:
        shape = (f"{downsample}x downsampling, {image_size // downsample}^2 tokens per image"
                 + (f" x depth {rq_depth}" if quantizer == 'rq' else ''))
    print(f"tokenizer: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {shape}, "
          f"quantizer {quantizer} {quantizer_args}")

iter_num, skipped_images, rng_states = 0, 0, None
lecam_ema = torch.zeros(2, device=device)  # EMA of D's mean logits on real and on reconstructed images
if init_from == 'resume':
    checkpoint = load_checkpoint(ckpt_path, 'tokenizer', device)
    check_resume_config(ckpt_path, checkpoint, model_args, config, resume_allow)
    if (checkpoint['disc'] is not None) != use_disc:
        raise ValueError(f"{ckpt_path} was trained with disc_weight {checkpoint['config']['disc_weight']}; "
                         f"the current disc_weight {disc_weight} "
                         f"{'needs' if use_disc else 'drops'} a discriminator")
    if (checkpoint.get('ema') is not None) != (ema_model is not None):
        raise ValueError(f"{ckpt_path} was trained with ema_decay "
                         f"{checkpoint['config'].get('ema_decay', 0.0)}; the current ema_decay {ema_decay} "
                         f"{'needs' if ema_model is not None else 'drops'} its EMA weights")
    model.load_state_dict(checkpoint['model'])
    gen_optimizer.load_state_dict(checkpoint['optimizer'])
    if ema_model is not None:
        ema_model.load_state_dict(checkpoint['ema'])
    if use_disc:
        disc.load_state_dict(checkpoint['disc'])
        disc_optimizer.load_state_dict(checkpoint['disc_optimizer'])
    iter_num, skipped_images = checkpoint['iter_num'], checkpoint['skipped_images']
    lecam_ema = torch.as_tensor(checkpoint['lecam_ema'], dtype=torch.float32).cpu()
    # (ranks, 2): this rank's row, or on another number of ranks their mean; older checkpoints: rank 0's (2,)
    if lecam_ema.dim() == 2:
        lecam_ema = lecam_ema[rank] if len(lecam_ema) == world_size else lecam_ema.mean(0)
    lecam_ema = lecam_ema.to(device)
    rng_states = checkpoint['rng_states'][rank] if len(checkpoint['rng_states']) == world_size else None
    if master:
        truncate_log(log_path, iter_num)  # what the killed run logged after this checkpoint is logged again
        print(f"resumed from {ckpt_path} at iter {iter_num}")
    del checkpoint
elif init_from != 'scratch':
    raise ValueError(f"init_from must be 'scratch' or 'resume', got '{init_from}'")
elif master and os.path.exists(log_path):
    os.remove(log_path)  # a fresh run (check_out_dir allowed it) starts a fresh log

raw_model, raw_disc = model, disc  # un-wrapped: what checkpoints hold
if compile:
    # regional compilation, in place (the state_dict keeps its names): config/vq_16k.py on an H100 compiles in
    # 89.9 s instead of the whole-model graph's 99.6 s, and runs at 140.0 img/s instead of 126.6 (README)
    compile_blocks(model)
    disc = torch.compile(disc) if use_disc else None
gen_disc = disc  # the generator's GAN loss goes through D without DDP (its D-gradients are not wanted)
if ddp:
    # broadcast_buffers=False: the tokenizer has no BatchNorm, and its usage buffers are per-rank statistics
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None, broadcast_buffers=False)
    disc = DDP(disc, device_ids=[local_rank] if device_type == 'cuda' else None) if use_disc else None

# -----------------------------------------------------------------------------
# data: the order depends only on the step, so a resumed run sees exactly what it would have seen

train_set = make_dataset(data_dir, image_size, train=True, num_images=num_images)
if data_dir and not eval_data_dir:  # hold out eval_images images of the training folder
    eval_set = make_dataset(data_dir, image_size, train=False)
    train_set.samples, eval_set.samples = split_held_out(train_set.samples, eval_images)
else:
    eval_set = make_dataset(eval_data_dir or data_dir, image_size, train=False,
                            num_images=num_images and eval_images)
sampler = ShardedBatchSampler(len(train_set), micro_batch, rank, world_size, seed,
                              start_step=iter_num * gradient_accumulation_steps)
loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate,
                                     num_workers=num_workers, pin_memory=device_type == 'cuda',
                                     persistent_workers=num_workers > 0)
batches = iter(loader)
# after iter(loader), which draws a seed from the global generator: a resumed run continues the very stream
restore_rng_states(rng_states, device_type, seed + rank + iter_num)  # per-rank streams (dropout, DiffAugment)

if master:
    print(f"data: {len(train_set)} training images in {train_set.num_classes} classes"
          f" ({'built-in procedural' if not data_dir else data_dir}),"
          f" {min(eval_images, len(eval_set))} held out")


@torch.no_grad()
def evaluate():
    """Held-out PSNR, reconstruction loss and codebook usage (over every held-out token), and a PNG of inputs
    (odd rows) vs reconstructions; with ema_decay > 0, of the EMA weights."""
    eval_model = ema_model if ema_model is not None else raw_model
    eval_model.eval()
    keys = list(range(min(eval_images, len(eval_set))))
    psnrs, rec, indices, shown = [], [], [], None
    for start in range(0, len(keys), micro_batch):
        images, _, _ = collate([eval_set[k] for k in keys[start: start + micro_batch]])
        if len(images) == 0:
            continue
        images = images.to(device)
        with autocast:
            recon, _, info = eval_model(images)
        recon = recon.float()
        rec.append(((recon - images).abs() if rec_loss == 'l1'
                    else (recon - images).pow(2)).flatten(1).mean(1))
        recon = recon.clamp(-1, 1)
        psnrs.append(psnr(to_uint8(recon) / 255.0, to_uint8(images) / 255.0))  # as evaluate.py: saved levels
        indices.append(flat_codes(info['indices']).flatten())
        if shown is None:
            n = min(8, len(images))
            shown = torch.cat([images[:n], recon[:n]])
    raw_model.train()
    if not psnrs:
        raise ValueError(f"none of the {len(keys)} held-out images could be read (see the warnings above)")
    indices = torch.cat(indices)
    save_image_grid(shown, os.path.join(out_dir, f'recon_{iter_num:07d}.png'), nrow=len(shown) // 2)
    usage = code_usage(torch.bincount(indices, minlength=codebook_size))[0].item()
    return {'psnr': torch.cat(psnrs).mean().item(), 'rec': torch.cat(rec).mean().item(), 'usage': usage,
            'usage_tokens': indices.numel(), 'images': sum(len(p) for p in psnrs)}


def save_checkpoint():
    all_states = gather_rng_states(device_type, ddp, world_size)
    # every rank's LeCAM EMA (each follows its own D logits, as each process of the release does): (ranks, 2)
    all_lecam_ema = [lecam_ema]
    if ddp:
        all_lecam_ema = [torch.zeros_like(lecam_ema) for _ in range(world_size)]
        dist.all_gather(all_lecam_ema, lecam_ema)
    if master:
        atomic_save({'kind': 'tokenizer', 'model': raw_model.state_dict(),
                     'ema': ema_model.state_dict() if ema_model else None,
                     'disc': raw_disc.state_dict() if use_disc else None,
                     'optimizer': gen_optimizer.state_dict(),
                     'disc_optimizer': disc_optimizer.state_dict() if use_disc else None,
                     'model_args': model_args, 'config': config, 'iter_num': iter_num,
                     'data_step': iter_num * gradient_accumulation_steps,
                     'lecam_ema': torch.stack(all_lecam_ema).cpu(),
                     'skipped_images': skipped_images, 'rng_states': all_states}, ckpt_path)
        print(f"saved checkpoint to {ckpt_path} at iter {iter_num}", flush=True)


def set_requires_grad(module, flag):
    for p in module.parameters():
        p.requires_grad_(flag)


def discriminator_step(pairs):
    """One D update on the (real, reconstructed) images of every micro-step -> D's loss (a tensor)."""
    global lecam_ema
    set_requires_grad(raw_disc, True)
    total = torch.zeros((), device=device)
    ema_before, means_sum = lecam_ema, torch.zeros(2, device=device)
    for micro_step, (images, recon) in enumerate(pairs):
        last = micro_step == len(pairs) - 1
        with (disc.no_sync() if ddp and not last else nullcontext()), autocast:
            real, fake = (diff_augment(images), diff_augment(recon)) if disc_augment else (images, recon)
            logits_real, logits_fake = disc(real).float(), disc(fake.detach()).float()
            d_loss = disc_loss_fn(disc_loss, logits_real, logits_fake)
            # the EMA takes this batch's logits first, then regularises (SEED-Voken's order); one update per D
            # step, from the mean over its micro-batches (exact at the last one), whatever the accumulation
            if lecam_weight > 0:
                means_sum = means_sum + torch.stack([logits_real.mean(), logits_fake.mean()]).detach()
                lecam_ema = lecam_decay * ema_before + (1 - lecam_decay) * means_sum / (micro_step + 1)
                d_loss = d_loss + lecam_weight * lecam_loss(logits_real, logits_fake,
                                                            lecam_ema[0], lecam_ema[1])
            d_loss = (disc_loss_weight or disc_weight) * d_loss
            (d_loss / len(pairs)).backward()
        total += d_loss.detach() / len(pairs)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(raw_disc.parameters(), grad_clip)
    disc_optimizer.step()
    disc_optimizer.zero_grad(set_to_none=True)
    set_requires_grad(raw_disc, False)
    return total



def get_lr(it):
    """The learning rate of iteration it. 'annealing' is FVQ's learning annealing (Table 6): warmup(0.1) from
    0.005x to 1x, baselr(0.3) of the remaining steps at 1x, then linear decay to 0.01x at max_iters. 'cosine'
    decays from 1x to 0.01x after the same warmup; 'step' multiplies by lr_step_factor at each milestone
    (fractions of max_iters: IBQ's multi-step decay); 'constant' is the baselines' flat rate. Every schedule
    starts with the warmup (warmup_frac; 0 = none)."""
    warmup_iters = warmup_frac * max_iters
    if it < warmup_iters:
        return lr * (0.005 + 0.995 * it / warmup_iters)
    if lr_schedule == 'constant':
        return lr
    if lr_schedule == 'step':
        return lr * lr_step_factor ** sum(it >= m * max_iters for m in lr_milestones)
    if lr_schedule == 'annealing':
        decay_start = warmup_iters + constant_frac * (max_iters - warmup_iters)
        progress = max(0.0, it - decay_start) / max(1.0, max_iters - decay_start)
        return lr * (1.0 - 0.99 * min(1.0, progress))
    progress = min(1.0, (it - warmup_iters) / max(1.0, max_iters - warmup_iters))
    return lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress)))  # cosine

# -----------------------------------------------------------------------------
# training loop

if master:
    os.makedirs(out_dir, exist_ok=True)  # only now: a config or data error leaves no empty out_dir behind
if use_disc:
    set_requires_grad(raw_disc, False)  # only discriminator_step trains D
t0, start_iter = time.time(), iter_num
while True:
    if iter_num == 0 or iter_num > start_iter and (iter_num % eval_interval == 0 or iter_num == max_iters):
        if master:
            result = evaluate()
            print(f"eval iter {iter_num}: psnr {result['psnr']:.2f} dB, rec {result['rec']:.5f}, "
                  f"held-out usage {100 * result['usage']:.2f}% "
                  f"({result['usage_tokens']} tokens of {result['images']} images)", flush=True)
            append_log(log_path, {'iter': iter_num, 'split': 'eval', **result})
        if iter_num > start_iter:
            save_checkpoint()
    if iter_num >= max_iters:
        break

    step_lr = get_lr(iter_num)
    for opt in (gen_optimizer, disc_optimizer):
        if opt is not None:
            for group in opt.param_groups:
                group['lr'] = step_lr
    gan_active = use_disc and iter_num >= disc_start
    micro_batches = []
    for _ in range(gradient_accumulation_steps):
        images, _, n_skipped = next(batches)
        skipped_images += n_skipped
        if len(images) == 0:
            raise ValueError(f"all {n_skipped} images of a batch were unreadable (see the warnings above; "
                             f"{skipped_images} so far): check data_dir '{data_dir}'")
        micro_batches.append(images.to(device, non_blocking=True))
    stats = {}
    if gan_active and disc_first:
        # IBQ's release steps D first, on this iteration's reconstructions, and G's GAN loss then
        # sees the updated D. They are recomputed without a graph here (one extra forward) so that
        # DDP and gradient accumulation keep their one forward-backward per micro-step; eval mode:
        # the same weights, no usage recorded.
        raw_model.eval()
        with torch.no_grad(), autocast:
            pairs = [(images, raw_model(images)[0]) for images in micro_batches]
        raw_model.train()
        stats['disc'] = discriminator_step(pairs)

    # generator: reconstruction + perceptual + quantizer (+ GAN) losses, accumulated over micro-steps
    stash = []
    for micro_step, images in enumerate(micro_batches):
        last = micro_step == gradient_accumulation_steps - 1
        with (model.no_sync() if ddp and not last else nullcontext()), autocast:
            recon, quant_loss, info = model(images)
            recon_err = recon.float() - images
            rec = recon_err.abs().mean() if rec_loss == 'l1' else recon_err.pow(2).mean()
            p_loss = (lpips_model(recon, images).mean() if lpips_model is not None
                      else torch.zeros((), device=device))
            rec_perceptual = rec + perceptual_weight * p_loss
            loss = rec_perceptual + quant_loss
            terms = {'rec': rec, 'lpips': p_loss, 'quant': quant_loss}
            if gan_active:
                g_loss = gen_loss_fn(gen_loss, gen_disc(diff_augment(recon) if disc_augment else recon))
                weight = (adaptive_gan_weight(rec_perceptual, g_loss, raw_model.last_layer())
                          if adaptive_disc_weight else 1.0)
                loss = loss + disc_weight * weight * g_loss
                terms['gan'] = g_loss
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
        with torch.no_grad():
            for ema_p, p in zip(ema_model.parameters(), raw_model.parameters()):
                ema_p.lerp_(p, 1 - ema_decay)
    if gan_active and not disc_first:  # LlamaGen / FVQ: D after G, on the same real/reconstructed pairs
        stats['disc'] = discriminator_step(stash)

    iter_num += 1
    if iter_num % log_interval == 0 and master:
        # reading the stats is the one host-device sync of the step; it happens once per log interval
        if device_type == 'cuda':
            torch.cuda.synchronize()
        dt = (time.time() - t0) / log_interval
        t0 = time.time()
        record = {'iter': iter_num, 'split': 'train', **{k: v.item() for k, v in stats.items()},
                  **{k: v.item() for k, v in quantizer_stats(raw_model.quantizer, info['indices']).items()},
                  **{f'q_{k}': v.item() for k, v in info.items() if k.endswith(('_loss', '_entropy'))},
                  'lr': step_lr, 'img_per_s': batch_size / dt, 'ms_per_iter': 1000 * dt,
                  'skipped_images': skipped_images}
        append_log(log_path, record)
        print(f"iter {iter_num}: loss {record['loss']:.5f}, rec {record['rec']:.5f}, "
              f"lpips {record['lpips']:.4f}, quant {record['quant']:.5f}, "
              f"gan {record.get('gan', 0.0):.4f}, disc {record.get('disc', 0.0):.4f}, "
              f"usage {100 * record['usage']:.2f}% (last {record['usage_tokens']} tokens), window usage "
              f"{100 * record['window_usage']:.2f}%, ppl {record['perplexity']:.1f}, lr {step_lr:.3e}, "
              f"{record['img_per_s']:.1f} img/s, {record['ms_per_iter']:.1f} ms/iter"
              + (f", skipped {skipped_images} unreadable images" if skipped_images else ''), flush=True)

if ddp:
    del model, disc  # the DDP wrappers hold the process group
    leave_process_group()
