"""
Micro-benchmarks: --what picks one; its last printed line carries the figures (rate, ms/iter, peak memory,
the first step's time). The README lists a command for each. --baseline=naive also times the quantizer's
formula with whole (N, K) matrices in the same run.
"""
import inspect
import os
import runpy
import time

import torch
import torch.nn.functional as F

from quantizers import make_quantizer, quantizer_options, ibq_reference, vq_reference
from tokenizer import (setup_device, autocast_context, Tokenizer, PatchDiscriminator, make_lpips,
                       disc_loss_fn, gen_loss_fn, compile_blocks, tokens_per_image, check_config)

# -----------------------------------------------------------------------------
what = 'quantizer'  # 'tokenizer', 'quantizer', 'ar' or 'sample'
tokenizer_config = 'config/vq_16k.py'  # tokenizer: the model of this train_tokenizer.py config
tokenizer_batch = 8
kind = 'vq'  # quantizer: 'vq', 'ibq', 'fvq', 'rq' or 'msvq'
codebook_size = 16384  # also the GPT's vocabulary for ar / sample
dim = 256
tokens = 1024  # N tokens per step
baseline = ''  # 'naive': also time quantizers.vq_reference / ibq_reference and print the ratio
projector = 'vqbridge'  # fvq, rq, msvq: 'vqbridge', 'linear' or 'mlp5' (FVQ Table 5)
ar_model = 'B'  # ar / sample: a train_ar.GPT preset ('B', 'L', 'XL', 'XXL') with 1000 classes
n_layer = 0  # 0 = the preset's
n_head = 0
n_embd = 0
ar_batch = 8  # sequences per training step / images per sampling batch
ar_grid = 16  # ar_grid x ar_grid tokens per image
cfg_scale = 2.0  # sample: 1.0 = no guidance
warmup_steps = 1  # untimed calls after the first
steps = 5
device = 'cpu'
dtype = 'float32'  # 'bfloat16': autocast on GPU
compile = False
seed = 0
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (bool, int, float, str, tuple, list, dict))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------

check_config(globals(), [('what', what in ('tokenizer', 'quantizer', 'ar', 'sample'), "one of tokenizer, "
                          "quantizer, ar, sample"), ('steps', steps >= 1, ">= 1"),
                          ('warmup_steps', warmup_steps >= 0, ">= 0"),
                          ('baseline', baseline == '' or baseline == 'naive' and kind not in ('rq', 'msvq'),
                           "'' or 'naive' (a quantizer of one code per token: not rq or msvq)")])
device = setup_device(device)[0]  # resolves 'auto'; TF32 on CUDA as in the training scripts
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
fused = device_type == 'cuda'  # the optimizers' one-kernel step, as in the training scripts
autocast = autocast_context(device, dtype)
sync = torch.cuda.synchronize if device_type == 'cuda' else lambda: None
torch.manual_seed(seed)


def time_steps(step, per_step, unit):
    """-> seconds per step over `steps` calls after 1 + warmup_steps untimed ones, and the printed figures."""
    def seconds_for(calls):
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        sync()
        return time.perf_counter() - t0

    first_step_s = seconds_for(1)
    seconds_for(warmup_steps)
    if device_type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    seconds = seconds_for(steps) / steps
    peak = f"{torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MB" if device_type == 'cuda' else 'n/a'
    return seconds, (f"{per_step / seconds:.2f} {unit}, {1000 * seconds:.2f} ms/iter, peak {peak}, "
                     f"first step {first_step_s:.3g} s")


def naive_quantize(quantizer, z):
    """The quantizer's formula written plainly, with whole (N, K) matrices and its own parameters."""
    B, D, H, W = z.shape
    with torch.autocast(device_type=device_type, enabled=False):
        z_flat = z.float().permute(0, 2, 3, 1).reshape(-1, D)  # (N, D)
        if quantizer.l2_norm if kind == 'ibq' else quantizer.normalize_forward:
            z_flat = F.normalize(z_flat, dim=-1)
        codebook = quantizer.codebook().float()  # (K, D), through the projector for FVQ
        if kind == 'ibq':
            z_q, loss, _ = ibq_reference(z_flat, codebook, quantizer.beta, quantizer.entropy_weight,
                                         quantizer.entropy_temperature)
        else:
            z_q, loss, _ = vq_reference(z_flat, codebook, quantizer.beta)
    return z_q.reshape(B, H, W, D).permute(0, 3, 1, 2), loss


# -----------------------------------------------------------------------------
# the benchmarks
if what == 'quantizer':
    options = {k: globals()[k] for k in quantizer_options(kind) if k in config_keys}  # here: projector
    quantizer = make_quantizer(kind, codebook_size, dim, **options).to(device)
    # (B, D, h, w): 16x16 tokens per image when possible (256px images at 16x downsampling)
    shape = (tokens // 256, dim, 16, 16) if tokens % 256 == 0 else (1, dim, 1, tokens)
    z = torch.randn(shape, device=device, requires_grad=True)
    upstream = torch.randn(shape, device=device)  # the gradient the decoder would send back
    forward = torch.compile(quantizer) if compile else quantizer

    def step(quantize):  # forward + backward
        with autocast:
            z_q, loss = quantize(z)[:2]
            total = (z_q.float() * upstream).sum() + loss
        total.backward()
        z.grad = None
        quantizer.zero_grad(set_to_none=True)

    seconds, figures = time_steps(lambda: step(forward), tokens, 'tok/s')
    line = f"quantizer kind={kind} K={codebook_size} D={dim} N={tokens} device={device}: {figures}"
    if baseline == 'naive':  # timed in the same run, so the ratio is comparable across machines
        naive_s, figures = time_steps(lambda: step(lambda z: naive_quantize(quantizer, z)), tokens, 'tok/s')
        line += f"; naive {figures}; naive/nanoVQ {naive_s / seconds:.2f}x"
    print(line)

elif what == 'tokenizer':
    cfg = runpy.run_path(tokenizer_config)  # its keys over Tokenizer's defaults (the configs set l2_norm)
    model_args = {k: cfg.get(k, p.default) for k, p in inspect.signature(Tokenizer).parameters.items()}
    model_args['quantizer_args'] = {k: cfg[k] for k in quantizer_options(model_args['quantizer']) if k in cfg}
    if cfg.get('vcq_schedule'):  # the schedule spans one image's tokens, as in train_tokenizer.py
        model_args['quantizer_args']['vcq_seq_len'] = tokens_per_image(
            *(model_args[k] for k in ('tokenizer_type', 'image_size', 'ch_mult', 'num_latent_tokens')))
    model = Tokenizer(**model_args).to(device)
    # LPIPS with a random trunk: the same cost as the pretrained one, nothing downloaded
    lpips_model = make_lpips(random_backbone=True).to(device) if cfg.get('perceptual_weight', 1.0) else None
    disc = PatchDiscriminator().to(device) if cfg.get('disc_weight', 0.5) > 0 else None
    # train_tokenizer.py's compilation: the tokenizer block by block, the discriminator whole
    forward, disc_forward = (compile_blocks(model), torch.compile(disc)) if compile else (model, disc)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused)
    disc_optimizer = torch.optim.Adam(disc.parameters(), lr=1e-4, fused=fused) if disc else None
    size = model_args['image_size']
    images = torch.rand(tokenizer_batch, 3, size, size, device=device) * 2 - 1

    def step():
        if disc:
            disc.requires_grad_(False)  # G's adversarial loss reaches D's input only
        with autocast:
            recon, quant_loss, _ = forward(images)
            loss = (recon.float() - images).pow(2).mean() + quant_loss
            loss = loss + (lpips_model(recon, images).mean() if lpips_model else 0)
            loss = loss + (0.5 * gen_loss_fn('hinge', disc_forward(recon)) if disc else 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if disc:  # then D's step, on the detached reconstructions
            disc.requires_grad_(True)
            with autocast:
                d_loss = disc_loss_fn(disc_forward(images).float(), disc_forward(recon.detach()).float())
            d_loss.backward()
            disc_optimizer.step()
            disc_optimizer.zero_grad(set_to_none=True)

    figures = time_steps(step, tokenizer_batch, 'img/s')[1]
    print(f"tokenizer config={tokenizer_config} batch={tokenizer_batch} {size}px device={device}: {figures}")

else:  # ar / sample: a GPT preset on random codes
    from train_ar import GPT, gpt_model_args, peak_bf16_flops
    model = GPT(**gpt_model_args(codebook_size, 1000, ar_grid, ar_grid, ar_model, n_layer, n_head, n_embd))
    model = model.to(device)
    labels = torch.randint(0, 1000, (ar_batch,), device=device)

if what == 'ar':
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=fused)
    forward = torch.compile(model) if compile else model
    codes = torch.randint(0, codebook_size, (ar_batch, ar_grid * ar_grid), device=device)

    def step():
        with autocast:
            loss = forward(labels, codes[:, :-1], targets=codes)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, figures = time_steps(step, codes.numel(), 'tok/s')
    peak = peak_bf16_flops(device)  # MFU as train_ar.py logs it
    mfu = f"{100 * model.flops_per_token() * codes.numel() / seconds / peak:.2f}%" if peak else 'n/a'
    print(f"ar preset={ar_model} batch={ar_batch} device={device}: {figures}, MFU {mfu}")

elif what == 'sample':
    from sample import generate, compile_decode_step
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    decode_step = compile_decode_step(model) if compile else None  # sample.py's default on CUDA

    def sample():
        with autocast:
            return generate(model, labels, cfg_scale=cfg_scale, generator=generator, decode_step=decode_step)

    figures = time_steps(sample, ar_batch, 'img/s')[1]
    print(f"sample preset={ar_model} batch={ar_batch} cfg={cfg_scale} device={device}: {figures}")
