"""
Micro-benchmarks. Pick one with --what:
  quantizer:    forward+backward time and peak memory of one quantizer at a given codebook size, dim and
                token count
      python bench.py --what=quantizer --kind=ibq --codebook_size=262144 --dim=256 --tokens=8192 --device=cuda \
          --baseline=naive
      last line: quantizer kind=ibq K=262144 D=256 N=8192 device=cuda: fwd+bwd <ms> ms, peak <MB> MB
      (with --baseline=naive: ...; naive <ms> ms, peak <MB> MB; naive/nanoVQ <x>x): the same quantizer and
      parameters written plainly with whole (N, K) matrices (IBQ: quantizers.ibq_reference), timed in the
      same run, so the ratio is comparable across machines
  bridge_flops: FLOPs of one forward of the FVQ projector (FVQ Table 10), counted by torch.utils.flop_counter
      python bench.py --what=bridge_flops --codebook_size=262144 --dim=256 --projector=vqbridge
  inception:    features/s of evaluate.py's FID Inception-v3 on 256x256 uint8 images (float32, as FID needs)
      python bench.py --what=inception --inception_batch=200 --device=cuda
      last line: inception batch=200 device=cuda: <n> features/s
  tokenizer:    one steady-state tokenizer training step (generator with LPIPS + GAN loss, then the
                discriminator) for the model of a train_tokenizer.py config, on random images: img/s,
                ms/iter, peak memory. The model's step only: the config's training options (gradient clipping,
                weight EMA, LeCAM, DiffAugment, disc_first, zero loss weights) are not applied, and keys the
                config leaves out take Tokenizer's / make_quantizer's defaults
      python bench.py --what=tokenizer --tokenizer_config=config/vq_16k.py --tokenizer_batch=32 \
          --device=cuda --dtype=bfloat16 --compile=True
      last line (one line):
      tokenizer config=config/vq_16k.py batch=32 256px device=cuda: <img/s> img/s, <ms> ms/iter, peak <MB> MB,
      first step <s> s (the first call's time: with --compile=True, mostly compilation)
  tokenizer_memory: what the tokenizer step's activation memory holds: the bytes one generator forward (tokenizer,
                LPIPS, GAN loss; the --dtype autocast) saves for its backward, by part and, for the VQGAN, by the
                resolution of each block's input
      python bench.py --what=tokenizer_memory --tokenizer_config=config/vq_16k.py --tokenizer_batch=2
      last line: tokenizer_memory config=config/vq_16k.py batch=2 256px device=cpu: saved for backward <MB> MB
      (<MB> MB per image), largest <part> <percent>%
  ar:           GPT training step (fwd+bwd+AdamW) on random codes: tok/s, ms/iter and MFU (train_ar.py's
                GPT.flops_per_token and peak_bf16_flops, as its training log)
      python bench.py --what=ar --ar_model=B --ar_batch=64 --device=cuda --dtype=bfloat16
      last line: ar preset=B batch=64 device=cuda: <tok/s> tok/s, <ms> ms/iter, MFU <x>%, peak <MB> MB,
      first step <s> s
  sample:       KV-cached sampling of codes with CFG (sample.generate; no tokenizer decode): images/s
      python bench.py --what=sample --ar_model=B --ar_batch=64 --cfg_scale=2.0 --device=cuda --dtype=bfloat16 \
          --compile=True
--profile=True (any --what that times steps) prints torch.profiler's table of the ops with the most time over a
further `steps` steps after the timed ones (CUDA time on a GPU, CPU time on the CPU), then a line with the time per
step by kind (matmul, attention, compiled kernels, optimizer, copies, other: GPU kernels on CUDA, the ops' self time
on the CPU) beside the unprofiled ms/iter (on a GPU the gap is time with no kernel running); the last line is
unchanged.
Config values are globals below, overridden by config files / --key=value (configurator.py).
"""
import os
import re
import time

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType

from quantizers import make_quantizer, options_from_config, quantizer_options, ibq_reference, vq_reference
from tokenizer import setup_device, autocast_context

# -----------------------------------------------------------------------------
what = 'quantizer'  # 'quantizer', 'bridge_flops', 'inception', 'tokenizer', 'tokenizer_memory', 'ar' or 'sample'
# inception: the FID Inception-v3 of evaluate.py (random weights: same cost as the real ones)
inception_batch = 50  # 256x256 uint8 images per forward
# tokenizer: one full training step of the model that a train_tokenizer.py config describes
tokenizer_config = 'config/vq_16k.py'
tokenizer_batch = 8  # images per step (per GPU)
# quantizer
kind = 'vq'  # 'vq', 'ibq', 'fvq', 'rq' or 'msvq'
codebook_size = 16384
dim = 256
tokens = 1024  # N = batch * h * w tokens per step; laid out as (tokens // 256, dim, 16, 16) when divisible
# quantizer options (named as make_quantizer's; one that has no effect for `kind` is an error)
baseline = ''  # quantizer: 'naive' also times the plain whole-matrix formula and prints the ratio
chunk_size = 0  # tokens per chunk of the (tokens x K) distance / logit computation; 0 = chosen from K
projector = 'vqbridge'  # FVQ projector: 'vqbridge', 'linear' or 'mlp5'
bridge_group_size = 0  # 0 = quantizers.bridge_group_size_for(K)
bridge_dim = 256
bridge_depth = 2
bridge_heads = 4
entropy_weight = 0.05  # ibq
# ar / sample: a train_ar.GPT preset with K = codebook_size and 1000 classes, on random codes
ar_model = 'B'  # 'B', 'L', 'XL', 'XXL'
n_layer = 0  # 0 = the preset's
n_head = 0
n_embd = 0
ar_batch = 8  # sequences per training step / images per sampling batch (the GPT runs 2x with CFG)
ar_tokens = 256  # tokens per image, a square grid (256 = 16x16)
cfg_scale = 2.0  # sample: 1.0 = no guidance
warmup_steps = 2
steps = 5
profile = False  # also print torch.profiler's top ops over `steps` more steps
# system
device = 'cpu'
dtype = 'float32'  # autocast dtype around the quantizer on GPU: 'float32' (no autocast) or 'bfloat16'
compile = False
seed = 0
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (bool, int, float, str, tuple, list, dict))]
default_config = {k: globals()[k] for k in config_keys}
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in config_keys}
# -----------------------------------------------------------------------------

WHATS = ('quantizer', 'bridge_flops', 'inception', 'tokenizer', 'tokenizer_memory', 'ar', 'sample')
if what not in WHATS:
    raise ValueError(f"unknown --what='{what}'; expected one of {', '.join(repr(w) for w in WHATS)}")
if baseline not in ('', 'naive'):  # before any timing: a typo would otherwise cost the whole run
    raise ValueError(f"unknown --baseline='{baseline}'; expected '' or 'naive'")
if steps < 1 or warmup_steps < 0:
    raise ValueError(f"steps must be >= 1 and warmup_steps >= 0, got {steps} and {warmup_steps}")
device = setup_device(device)[0]  # resolves 'auto'; TF32 on CUDA as in the training scripts
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
autocast = autocast_context(device, dtype)
torch.manual_seed(seed)


def time_steps(step):
    """Mean seconds per call of step() after warmup_steps untimed calls; resets the CUDA peak-memory
    counter. Sets first_step_s, the first call's seconds (with --compile=True: mostly compilation)."""
    global first_step_s
    first_step_s, t0 = float('nan'), time.perf_counter()
    for i in range(warmup_steps):
        step()
        if i == 0:
            if device_type == 'cuda':
                torch.cuda.synchronize()
            first_step_s = time.perf_counter() - t0
    if device_type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device_type == 'cuda':
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    if profile:  # a pass of its own: the timing above carries no profiler overhead
        print_profile(step, seconds)
    return seconds


# --profile's per-step sum by kind: (kind, pattern over CUDA kernel or CPU op names); the first match wins
PROFILE_KINDS = (
    ('attention', r'^(?!triton_).*(sdpa|flash|fmha|attention)'),
    ('matmul', r'^triton_tem_|gemm|nvjet|xmma|cutlass|cublas|^aten::(mm|addmm|bmm|baddbmm)_?$'),
    ('compiled kernels', r'^triton_|CompiledFxGraph|cpp_fused'),  # Inductor's fused element-wise/reduction code
    ('optimizer', r'^Optimizer\.step|multi_tensor_apply|adam'),
    ('copies', r'[Mm]emcpy|[Mm]emset|^aten::(copy_|_to_copy)$'),
)


def kind_of(name):
    """The PROFILE_KINDS kind of a CUDA kernel or CPU op name, or 'other'."""
    return next((kind for kind, pattern in PROFILE_KINDS if re.search(pattern, name)), 'other')


def time_by_name(events, cuda):
    """torch.profiler events -> {name: microseconds}: on CUDA the kernels, copies and memsets themselves (not the
    ranges that annotate them, nor the profiler's own overhead records such as 'Command Buffer Full'); on the
    CPU each op's self time, with everything inside an optimizer step counted as that step's."""
    times = {}
    for e in events:
        if cuda:
            if (e.device_type != DeviceType.CUDA or getattr(e, 'is_user_annotation', False)
                    or getattr(e, 'activity_type', None) in ('gpu_user_annotation', 'overhead')
                    or e.name == 'Command Buffer Full'):
                continue
            name, microseconds = e.name, e.time_range.elapsed_us()
        else:
            parent = e
            while parent is not None and not parent.name.startswith('Optimizer.step'):
                parent = parent.cpu_parent
            name, microseconds = (e.name if parent is None else parent.name), e.self_cpu_time_total
        times[name] = times.get(name, 0.0) + microseconds
    return times


def print_profile(step, seconds):
    """torch.profiler's top ops over `steps` steps, then one line: the time per step by kind (GPU kernels on
    CUDA, the ops' self time on the CPU) against the unprofiled `seconds` per step."""
    from torch.profiler import ProfilerActivity
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == 'cuda' else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device_type == 'cuda':
            torch.cuda.synchronize()
    sort_by = 'self_cuda_time_total' if device_type == 'cuda' else 'self_cpu_time_total'
    print(f"torch.profiler, {steps} steps:")
    print(prof.key_averages().table(sort_by=sort_by, row_limit=20, max_name_column_width=70))
    times = time_by_name(prof.events(), device_type == 'cuda')
    kinds = {name: kind_of(name) for name in times}
    totals = dict.fromkeys([kind for kind, _ in PROFILE_KINDS] + ['other'], 0.0)
    for name, microseconds in times.items():
        totals[kinds[name]] += microseconds
    busy = sum(totals.values())
    largest_other = sorted((t, name) for name, t in times.items() if kinds[name] == 'other')[-3:][::-1]
    ms = lambda microseconds: f"{microseconds / 1e3 / steps:.2f} ms"  # per step
    print(f"per step, {'GPU kernels' if device_type == 'cuda' else 'CPU ops (self time)'}: {ms(busy)} of the "
          f"unprofiled {1e3 * seconds:.2f} ms/iter; "
          + ', '.join(f"{kind} {ms(t)} ({100 * t / busy:.0f}%)" for kind, t in totals.items() if t > 0)
          + ("; largest other: " + ', '.join(f"{name[:60]} {ms(t)}" for t, name in largest_other)
             if largest_other else ''))


def naive_quantizer(quantizer, z):
    """The quantizer's formula written plainly, with whole (N, K) matrices and its own parameters:
    -> z_q (N, D) float32, loss: quantizers.vq_reference (VQ, and FVQ through its projector) or
    quantizers.ibq_reference."""
    with torch.autocast(device_type=z.device.type, enabled=False):
        z_flat = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B, D, H, W) -> (N, D)
        codebook = quantizer.codebook().float()  # (K, D), through the projector for FVQ
        if kind == 'ibq':
            if quantizer.l2_norm:
                z_flat = F.normalize(z_flat, dim=-1)
            z_q, loss, _ = ibq_reference(z_flat, codebook, quantizer.beta, quantizer.ibq_beta_term,
                                         quantizer.entropy_weight, quantizer.entropy_temperature)
            return z_q, loss
        if quantizer.normalize_forward:
            z_flat = F.normalize(z_flat, dim=-1)
        z_q, loss, _ = vq_reference(z_flat, codebook, quantizer.beta)
        return z_q, loss


def peak_memory():
    return f"{torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MB" if device_type == 'cuda' else 'n/a'


def print_saved_activations(forward_loss, parts, header):
    """Bytes of the tensors forward_loss() saves for its backward (each storage once; the parameters of the
    tokenizer and the parts left out), by the part (name -> module of parts) that saved them and, inside the
    VQGAN, by the resolution of each block's input: what the step's activation memory holds."""
    from tokenizer import ResnetBlock, AttnBlock, Downsample, Upsample
    where, saved, seen = ['other'], {}, {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen |= {p.untyped_storage().data_ptr() for part in parts.values() for p in part.parameters()}

    def enter(name):  # a forward pre-hook; name: a string, or a function of the module's inputs
        return lambda module, args: where.append(name(args) if callable(name) else name)

    def leave(module, args, output):  # returns None: a forward hook's return value would replace the output
        where.pop()

    for name, part in parts.items():
        part.register_forward_pre_hook(enter(name))
        part.register_forward_hook(leave)
        for block in part.modules():
            if isinstance(block, (ResnetBlock, AttnBlock, Downsample, Upsample)):
                block.register_forward_pre_hook(enter(lambda args, name=name: f"{name} {args[0].shape[-1]}px"))
                block.register_forward_hook(leave)

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            saved[where[-1]] = saved.get(where[-1], 0) + storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward_loss()
    total = sum(saved.values())
    for name, nbytes in sorted(saved.items(), key=lambda item: -item[1]):
        print(f"  {name:18s} {nbytes / 2 ** 20:10.1f} MB {100 * nbytes / total:5.1f}%")
    largest = max(saved, key=saved.get)
    print(f"{header}: saved for backward {total / 2 ** 20:.1f} MB ({total / 2 ** 20 / tokenizer_batch:.1f} MB "
          f"per image), largest {largest} {100 * saved[largest] / total:.1f}%")


# -----------------------------------------------------------------------------
# the model under test: a quantizer, or a train_ar.GPT preset with K = codebook_size and 1000 classes

if what in ('quantizer', 'bridge_flops'):  # bridge_flops: an FVQ quantizer's projector, on the CPU
    if what == 'quantizer' and baseline == 'naive' and kind in ('rq', 'msvq'):
        raise ValueError(f"--baseline=naive has no plain formula for kind '{kind}' (vq_reference and "
                         f"ibq_reference give one code per token); run it without --baseline")
    quantizer_kind = 'fvq' if what == 'bridge_flops' else kind
    options = options_from_config(quantizer_kind, config, default_config)
    if options.get('bridge_group_size') == 0:
        del options['bridge_group_size']  # the preset for K
    quantizer = make_quantizer(quantizer_kind, codebook_size, dim, **options)
    if what == 'quantizer':
        quantizer = quantizer.to(device)
elif what in ('ar', 'sample'):
    from train_ar import GPT, gpt_model_args, peak_bf16_flops
    grid = int(ar_tokens ** 0.5)
    if grid * grid != ar_tokens:
        raise ValueError(f"ar_tokens must be a square (a grid x grid raster), got {ar_tokens}")
    model_args = gpt_model_args(codebook_size, 1000, grid, grid, ar_model, n_layer, n_head, n_embd)
    model = GPT(**model_args).to(device)

# -----------------------------------------------------------------------------
# the benchmark

if what == 'quantizer':
    # (B, D, h, w) latent grid: 16x16 tokens per image when possible (256px images at 16x downsampling)
    shape = (tokens // 256, dim, 16, 16) if tokens % 256 == 0 else (1, dim, 1, tokens)
    z = torch.randn(shape, device=device, requires_grad=True)
    upstream = torch.randn(shape, device=device)
    forward = torch.compile(quantizer) if compile else quantizer

    def step():
        with autocast:
            z_q, loss, info = forward(z)
            total = (z_q.float() * upstream).sum() + loss
        total.backward()
        z.grad = None
        quantizer.zero_grad(set_to_none=True)

    ms = time_steps(step) * 1000
    line = (f"quantizer kind={kind} K={codebook_size} D={dim} N={tokens} device={device}: fwd+bwd {ms:.1f} ms, "
            f"peak {peak_memory()}")
    if baseline == 'naive':
        def naive_step():
            with autocast:
                z_q, loss = naive_quantizer(quantizer, z)
                total = (z_q.float() * upstream.permute(0, 2, 3, 1).reshape(z_q.shape)).sum() + loss
            total.backward()
            z.grad = None
            quantizer.zero_grad(set_to_none=True)

        naive_ms = time_steps(naive_step) * 1000
        line += f"; naive {naive_ms:.1f} ms, peak {peak_memory()}; naive/nanoVQ {naive_ms / ms:.2f}x"
    print(line)

elif what == 'bridge_flops':
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    # the math attention kernel is made of matmuls the counter sees; the fused CPU kernel is not counted
    with sdpa_kernel(SDPBackend.MATH), counter:
        quantizer.projector(quantizer.embedding)
    flops = counter.get_total_flops()
    # FVQ Table 10 counts multiply-accumulates (one per weight use), i.e. half of these FLOPs
    print(f"bridge projector={projector} K={codebook_size} D={dim}: {flops} FLOPs = {flops / 2e9:.2f} GMACs")

elif what == 'inception':
    import numpy as np
    from evaluate import FIDInceptionV3, inception_forward
    torch.backends.cuda.matmul.allow_tf32 = False  # evaluate.py's strict float32
    torch.backends.cudnn.allow_tf32 = False
    model = FIDInceptionV3().to(device).eval()
    images = np.random.default_rng(seed).integers(0, 256, (inception_batch, 256, 256, 3), dtype=np.uint8)
    with torch.no_grad():
        dt = time_steps(lambda: inception_forward(model, images, device))
    print(f"inception batch={inception_batch} device={device}: {inception_batch / dt:.2f} features/s")

elif what in ('tokenizer', 'tokenizer_memory'):
    from tokenizer import (Tokenizer, PatchDiscriminator, make_lpips, disc_loss_fn, gen_loss_fn, tokens_per_image,
                           compile_blocks)
    cfg = {}
    # the config's keys; those it leaves out take Tokenizer's / make_quantizer's defaults, which can differ from
    # train_tokenizer.py's (e.g. IBQ's l2_norm): the shipped configs set theirs
    exec(open(tokenizer_config).read(), cfg)
    model_keys = ('ch', 'ch_mult', 'num_res_blocks', 'z_channels', 'quantizer', 'codebook_size', 'code_dim',
                  'dropout')
    model_args = {k: cfg[k] for k in model_keys if k in cfg}
    if cfg.get('tokenizer_type', 'vqgan') == 'titok':  # the 1D tokenizer: its ViTs and latent tokens
        model_args.update({k: cfg[k] for k in ('tokenizer_type', 'titok_preset', 'patch_size', 'num_latent_tokens')
                           if k in cfg}, image_size=cfg.get('image_size', 256))
    q_kind = cfg.get('quantizer', 'vq')
    q_options = quantizer_options(q_kind, cfg.get('projector', 'vqbridge'), cfg.get('vcq_schedule', ''))
    model_args['quantizer_args'] = {k: cfg[k] for k in q_options if k in cfg}
    if cfg.get('vcq_schedule') and not cfg.get('vcq_seq_len'):  # train_tokenizer.py's automatic length
        model_args['quantizer_args']['vcq_seq_len'] = tokens_per_image(
            cfg.get('tokenizer_type', 'vqgan'), cfg.get('image_size', 256), cfg.get('ch_mult', (1, 1, 2, 2, 4)),
            cfg.get('num_latent_tokens', 256))
    model = Tokenizer(**model_args).to(device)
    disc = PatchDiscriminator(3, cfg.get('disc_ch', 64), cfg.get('disc_layers', 3)).to(device)
    lpips_model = make_lpips(random_backbone=True).to(device)  # same cost as the pretrained one, no download
    fused = device_type == 'cuda'
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=fused)
    disc_optimizer = torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=fused)
    # train_tokenizer.py's compilation: the tokenizer block by block, the discriminator whole
    forward, disc_forward = (compile_blocks(model), torch.compile(disc)) if compile else (model, disc)
    size = cfg.get('image_size', 256)
    images = torch.rand(tokenizer_batch, 3, size, size, device=device) * 2 - 1

    def generator_loss():
        with autocast:
            recon, quant_loss, _ = forward(images)
            return recon, ((recon.float() - images).pow(2).mean() + lpips_model(recon, images).mean() + quant_loss
                           + 0.5 * gen_loss_fn('hinge', disc_forward(recon)))

    def step():
        for p in disc.parameters():
            p.requires_grad_(False)
        recon, loss = generator_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for p in disc.parameters():
            p.requires_grad_(True)
        with autocast:
            d_loss = disc_loss_fn('hinge', disc_forward(images).float(), disc_forward(recon.detach()).float())
        d_loss.backward()
        disc_optimizer.step()
        disc_optimizer.zero_grad(set_to_none=True)

    if what == 'tokenizer_memory':
        print_saved_activations(generator_loss, {'encoder': model.encoder, 'quantizer': model.quantizer,
                                                 'decoder': model.decoder, 'lpips': lpips_model, 'disc': disc},
                                f"tokenizer_memory config={tokenizer_config} batch={tokenizer_batch} {size}px "
                                f"device={device}")
    else:
        dt = time_steps(step)
        print(f"tokenizer config={tokenizer_config} batch={tokenizer_batch} {size}px device={device}: "
              f"{tokenizer_batch / dt:.2f} img/s, {1000 * dt:.1f} ms/iter, peak {peak_memory()}, "
              f"first step {first_step_s:.1f} s")

elif what == 'ar':
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                  fused=device_type == 'cuda')
    forward = torch.compile(model) if compile else model
    codes = torch.randint(0, codebook_size, (ar_batch, ar_tokens), device=device)
    labels = torch.randint(0, 1000, (ar_batch,), device=device)

    def step():
        with autocast:
            loss = forward(labels, codes[:, :-1], targets=codes)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    dt = time_steps(step)
    peak = peak_bf16_flops(device)
    mfu = f"{100 * model.flops_per_token() * ar_tokens * ar_batch / dt / peak:.2f}%" if peak else 'n/a'
    print(f"ar preset={ar_model} batch={ar_batch} device={device}: {ar_batch * ar_tokens / dt:.0f} tok/s, "
          f"{1000 * dt:.1f} ms/iter, MFU {mfu}, peak {peak_memory()}, first step {first_step_s:.1f} s")

elif what == 'sample':
    from sample import generate, compile_decode_step
    model.eval()
    labels = torch.arange(ar_batch, device=device) % 1000
    generator = torch.Generator(device=device).manual_seed(seed)
    decode_step = compile_decode_step(model) if compile else None  # sample.py's default on CUDA

    def run():
        with autocast:
            return generate(model, labels, cfg_scale=cfg_scale, generator=generator, decode_step=decode_step)

    dt = time_steps(run)
    print(f"sample preset={ar_model} batch={ar_batch} cfg={cfg_scale} tokens={ar_tokens} device={device}: "
          f"{ar_batch / dt:.2f} images/s, first call {first_step_s:.1f} s")
