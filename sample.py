"""
Class-conditional sampling from a train_ar.py checkpoint: KV-cached decoding, temperature / top-k / top-p, and
classifier-free guidance with the conditional and unconditional halves in one batch (the sampled token is fed
to both). Writes an ADM-style .npz (arr_0 uint8 N x H x W x 3, arr_1 labels) for evaluate.py and a PNG grid.
    python sample.py --ckpt=out-ar/ckpt.pt --cfg_scale=2.0 --num_samples=50000
    python sample.py --ckpt=c2i_L_256.pt --tokenizer_ckpt=vq_ds16_c2i.pt   (LlamaGen's released GPT and VQ)
    torchrun --standalone --nproc_per_node=8 sample.py --ckpt=out-ar-vcq-b/ckpt.pt \
        --cfg_schedule=codebook_size_aware --cfg_scale=10 --cfg_power=1.5
CFG schedules (w = cfg_scale, p = cfg_power, T tokens, w_t the scale at position t, logits = u + w_t (c - u)):
  constant             w_t = w
  linear               w_t = 1 + (w - 1) x,                          x = t / (T - 1)
  cosine               w_t = 1 + (w - 1) (1 - cos(pi x^p)) / 2        (VCQ Appendix B, "cosine, scale=w, p")
  codebook_size_aware  VCQ equation 4 as we read it: the cosine formula with
                       x = r_t = (log K_t - log K_min) / (log K_max - log K_min).
x ends at 1 on the last token (not at (T - 1) / T), so codebook_size_aware on a constant codebook is 'cosine',
as VCQ says. VCQ's tables (the RAR convention) write "cfg=0" for no guidance; here that is cfg_scale=1.0.
"""
import math
import os
import re
import time

import numpy as np
import torch

from tokenizer import (load_checkpoint, load_tokenizer, save_image_grid, setup_device, autocast_context,
                       to_uint8, atomic_write, state_fingerprint, tokenizer_checkpoint, tokenizer_weights,
                       check_config, lock_out_dir)


def cfg_weights(schedule, scale, power, seq_len, codebook_sizes=None):
    """Guidance scale w_t for t = 0 .. seq_len - 1 -> float tensor (seq_len,)."""
    x = torch.arange(seq_len, dtype=torch.float64) / max(seq_len - 1, 1)
    if schedule == 'constant':
        return torch.full((seq_len,), float(scale), dtype=torch.float64)
    if schedule == 'linear':
        return 1 + (scale - 1) * x
    if schedule == 'codebook_size_aware' and codebook_sizes is not None:
        log_k = torch.as_tensor(codebook_sizes, dtype=torch.float64).log()
        if log_k.max() > log_k.min():  # a constant codebook keeps x = t / (T - 1)
            x = (log_k - log_k.min()) / (log_k.max() - log_k.min())
    return 1 + (scale - 1) * (1 - torch.cos(math.pi * x ** power)) / 2


def sample_from_logits(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """logits (B, K) -> token ids (B,). top_k 0 and top_p 1.0 keep everything."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # tokens after the nucleus (the first one is always kept)
        logits = logits.masked_fill(drop.scatter(1, order, drop), float('-inf'))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def compile_decode_step(model):
    # CUDA graphs: a decode step is a few small kernels per layer, cheaper to replay than to launch
    return torch.compile(model.decode_step, mode='reduce-overhead', fullgraph=True, dynamic=False)


@torch.no_grad()
def sample_tokens(model, labels, weights=None, temperature=1.0, top_k=0, top_p=1.0, codebook_sizes=None,
                  generator=None, decode_step=None):
    """KV-cached sampling (model in eval mode) -> codes (B, T) long, raster order. labels (B,) long; weights
    (T,) the CFG scale per position, or None: no guidance, no unconditional half; codebook_sizes (T,) K_t;
    decode_step: compile_decode_step(model) (the KV cache then stays for the next batch), or None: eager."""
    B, T, K, device = len(labels), model.seq_len, model.codebook_size, labels.device
    if labels.numel() and (labels.min() < 0 or labels.max() >= model.num_classes):
        raise ValueError(f"class ids {labels.tolist()} out of range: the model has classes "
                         f"0..{model.num_classes - 1}")
    if weights is not None:  # [conditional; unconditional] halves in one batch
        labels = torch.cat([labels, torch.full_like(labels, model.num_classes)])
        weights = torch.as_tensor(weights, dtype=torch.float32, device=device)
    # VCQ section 3 (shared codebook): position t quantizes against the first K_t entries only, so codes
    # >= K_t never occur there and their logits are masked before sampling
    too_big = (None if codebook_sizes is None else  # (T, K)
               torch.arange(K, device=device) >= torch.as_tensor(codebook_sizes, device=device)[:, None])
    model.setup_kv_cache(len(labels))
    codes = torch.empty(B, T, dtype=torch.long, device=device)
    positions = torch.arange(T, device=device)  # step t's position as a tensor: no recompile, no host sync
    for t in range(T):  # one token per step: the only loop autoregressive decoding allows
        if t == 0:  # the class token, eager (a CUDA graph of its own would replay once)
            logits = model.decode_step(labels, None, positions[0])
        else:
            previous = codes[:, t - 1:t].repeat(1 if weights is None else 2, 1)  # to both CFG halves
            logits = (decode_step or model.decode_step)(labels, previous, positions[t])  # (B or 2B, K)
        if weights is not None:
            cond, uncond = logits.float().chunk(2)
            logits = uncond + weights[t] * (cond - uncond)
        if too_big is not None:
            logits = logits.masked_fill(too_big[t], float('-inf'))
        codes[:, t] = sample_from_logits(logits, temperature, top_k, top_p, generator)
    if decode_step is None:
        model.clear_kv_cache()
    return codes


def check_sampling_options(cfg_scale, cfg_schedule, cfg_power, temperature, top_k, top_p):
    # logits are u + w (c - u): w = 1.0 is no guidance, and w < 1 would push away from the class
    check_config(locals(), [
        ('cfg_scale', cfg_scale >= 1.0, ">= 1.0 (1.0 = no guidance)"),
        ('cfg_schedule', cfg_schedule in ('constant', 'linear', 'cosine', 'codebook_size_aware'),
         "'constant', 'linear', 'cosine' or 'codebook_size_aware'"),
        ('cfg_power', cfg_power > 0, "> 0"), ('temperature', temperature > 0, "> 0"),
        ('top_k', top_k >= 0, ">= 0 (0 = all codes)"), ('top_p', 0 < top_p <= 1, "in (0, 1] (1.0 = all)")])


def generate(model, labels, cfg_scale=1.0, cfg_schedule='constant', cfg_power=1.0, temperature=1.0, top_k=0,
             top_p=1.0, codebook_sizes=None, generator=None, decode_step=None):
    """codes (B, T) for class labels (B,); cfg_scale 1.0 = no guidance (no unconditional half)."""
    check_sampling_options(cfg_scale, cfg_schedule, cfg_power, temperature, top_k, top_p)
    weights = (cfg_weights(cfg_schedule, cfg_scale, cfg_power, model.seq_len, codebook_sizes)
               if cfg_scale != 1.0 else None)
    return sample_tokens(model, labels, weights, temperature, top_k, top_p, codebook_sizes, generator,
                         decode_step)


def sample_images(model, tokenizer, labels, **options):
    """uint8 images (B, H, W, 3) on the CPU for class labels (B,): generate(model, labels, **options) under
    the caller's autocast, decoded in float32 (as LlamaGen decodes) whatever that autocast is."""
    codes = generate(model, labels, **options).reshape(len(labels), model.grid_h, model.grid_w)
    with torch.autocast(codes.device.type, enabled=False):
        images = tokenizer.decode(codes).float()
    return to_uint8(images).permute(0, 2, 3, 1).cpu()


def llamagen_checkpoint(path, error):
    """LlamaGen's released class-conditional GPT (c2i_B_256.pt .. c2i_3B_384.pt, its models/gpt.py) as a
    train_ar.py checkpoint, in memory: the size from the shapes (head dim 64, GPT-3B's 32 heads of 100), the
    grid from the image size ending the file name (else 256) over the VQ's 16, no tokenizer. Else: `error`."""
    try:  # the state_dict, alone (FSDP) or under 'model' (DDP), 'module' (DeepSpeed) or 'state_dict'
        raw = torch.load(path, map_location='cpu', mmap=True, weights_only=False)
        state = next((raw[k] for k in ('model', 'module', 'state_dict') if k in raw), raw)
        (K, C), table = state['tok_embeddings.weight'].shape, state['cls_embedding.embedding_table.weight']
    except Exception:
        raise ValueError(f"{error}; nor is it LlamaGen's class-conditional GPT (a state_dict of "
                         f"tok_embeddings, cls_embedding.embedding_table, layers.N.attention.wqkv, ... alone "
                         f"or in 'model', 'module' or 'state_dict')") from None
    image_size = int((re.findall(r'_(\d+)\.\w+$', path) or [256])[0])  # c2i_L_384.pt: 384
    model_args = dict(codebook_size=K, num_classes=len(table) - 1, grid_h=image_size // 16,
                      grid_w=image_size // 16, n_embd=C, n_head=32 if C == 3200 else C // 64,
                      n_layer=1 + max(int(k.split('.')[1]) for k in state if k.startswith('layers.')))
    model = {k.replace('.wqkv.', '.qkv.').replace('.wo.', '.proj.'): v for k, v in state.items()
             if k != 'freqs_cis' and not k.startswith('cls_embedding.')}
    model.update({'class_embedding.weight': table[:-1], 'null_class_embedding': table[-1]})  # last row: null
    return dict(model=model, model_args=model_args, image_size=image_size, codebook_sizes=None,
                tokenizer_ckpt='', tokenizer_fingerprint=None)


def load_gpt(ckpt_path, device):
    """A GPT in eval mode on `device` and the settings of its train_ar.py checkpoint (everything but the
    weights, the optimiser state and the RNG states), or of LlamaGen's released GPT (llamagen_checkpoint)."""
    from train_ar import GPT
    # memory-mapped: only the model's weights are read from disk, never the (2x larger) AdamW state
    try:
        checkpoint = load_checkpoint(ckpt_path, 'gpt', mmap=True)
    except ValueError as error:  # not a nanoVQ GPT: LlamaGen's release, or that error
        checkpoint = llamagen_checkpoint(ckpt_path, error)
    model = GPT(**checkpoint['model_args'])
    model.load_state_dict(checkpoint['model'])
    settings = {k: v for k, v in checkpoint.items() if k not in ('model', 'optimizer', 'rng_states')}
    return model.to(device).eval(), settings


if __name__ == '__main__':
    import torch.distributed as dist
    from tqdm import tqdm

    # -----------------------------------------------------------------------------
    # default config; override with config files / --key=value
    ckpt = 'out-ar/ckpt.pt'  # train_ar.py checkpoint
    tokenizer_ckpt = ''  # '' = the tokenizer the GPT was trained on (recorded in its checkpoint)
    out_dir = ''  # '' = the GPT checkpoint's folder
    sample_name = 'samples'  # writes out_dir/<sample_name>.npz and out_dir/<sample_name>_grid.png
    overwrite = False  # True: replace the samples file already there
    num_samples = 50000  # ADM protocol: 50 per class for 1000 classes (labels = index % num_classes)
    batch_size = 32  # images per rank and step (the GPT runs 2x this with CFG)
    cfg_scale = 2.0  # 1.0 = no guidance
    cfg_schedule = 'constant'  # 'constant', 'linear', 'cosine' or 'codebook_size_aware'
    cfg_power = 1.0  # p of the cosine-power schedules
    temperature = 1.0
    top_k = 0  # 0 = all codes
    top_p = 1.0
    grid_classes = ()  # the PNG grid's classes, one row each; () = the first 8 classes
    grid_per_class = 8
    seed = 0
    device = 'auto'
    dtype = 'bfloat16'  # autocast dtype on GPU ('bfloat16' or 'float32'); the CPU always runs float32
    compile = True  # CUDA: the decode step compiled with CUDA graphs (same codes as eager); False = eager
    # -----------------------------------------------------------------------------
    config_keys = [k for k, v in globals().items()
                   if not k.startswith('_') and isinstance(v, (bool, int, float, str, tuple, list, dict))]
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    # -----------------------------------------------------------------------------

    ddp = int(os.environ.get('RANK', -1)) != -1
    device, rank, local_rank, world_size = setup_device(device)
    master = rank == 0
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    autocast = autocast_context(device, dtype)
    out_dir = out_dir or os.path.dirname(os.path.abspath(ckpt))
    check_config(globals(), [*[(k, globals()[k] >= 1, ">= 1") for k in ('num_samples', 'batch_size',
                                                                      'grid_per_class')],
                             ('sample_name', sample_name not in ('', '.', '..') and '/' not in sample_name,
                              "a plain file name (no '/', not '.' or '..')")])
    check_sampling_options(cfg_scale, cfg_schedule, cfg_power, temperature, top_k, top_p)

    # -----------------------------------------------------------------------------
    # the GPT and the tokenizer that decodes its codes
    model, gpt_settings = load_gpt(ckpt, device)
    if not (tokenizer_ckpt or gpt_settings['tokenizer_ckpt']):  # LlamaGen's VQ: vq_ds16_c2i.pt
        raise ValueError(f"{ckpt} is LlamaGen's GPT, which records no tokenizer: set tokenizer_ckpt")
    if not tokenizer_ckpt:  # the recorded path must still hold the weights that wrote the GPT's codes
        tokenizer_ckpt, recorded = gpt_settings['tokenizer_ckpt'], gpt_settings['tokenizer_fingerprint']
        checkpoint = tokenizer_checkpoint(tokenizer_ckpt)
        found = state_fingerprint(tokenizer_weights(checkpoint))
        if found != recorded:
            raise ValueError(f"the tokenizer at {tokenizer_ckpt} is not the one whose codes the GPT was "
                             f"trained on (its weights {found} at iteration {checkpoint['iter_num']}, the "
                             f"GPT's {recorded} at iteration {gpt_settings['tokenizer_iter']}): retrained or "
                             f"resumed in place; pass --tokenizer_ckpt=<one that decodes these codes>")
        del checkpoint
    tokenizer = load_tokenizer(tokenizer_ckpt, map_location=device).float()  # sample_images: float32
    image_px = gpt_settings['image_size']
    found = (tokenizer.quantizer.codebook_size, tokenizer.token_grid(image_px))
    if found != (model.codebook_size, (model.grid_h, model.grid_w)):
        raise ValueError(f"the tokenizer's codebook size and grid of codes at {image_px}px are {found}, the "
                         f"GPT's {(model.codebook_size, (model.grid_h, model.grid_w))}")
    grid_classes = tuple(grid_classes) or tuple(range(min(8, model.num_classes)))
    check_config(globals(), [('grid_classes', all(0 <= c < model.num_classes for c in grid_classes),
                              f"class ids of the model, 0..{model.num_classes - 1}")])
    npz_path = os.path.join(out_dir, f'{sample_name}.npz')
    lock_out_dir(out_dir, rank, '' if overwrite else npz_path, "--overwrite=True replaces it")
    generator = torch.Generator(device=device).manual_seed(seed * world_size + rank)  # per-rank streams
    options = dict(cfg_scale=cfg_scale, cfg_schedule=cfg_schedule, cfg_power=cfg_power,
                   temperature=temperature, top_k=top_k, top_p=top_p,
                   codebook_sizes=gpt_settings['codebook_sizes'], generator=generator,  # VCQ: K_t, else None
                   decode_step=compile_decode_step(model) if compile and device_type == 'cuda' else None)

    # -----------------------------------------------------------------------------
    # sampling: every rank samples the global indices rank, rank + world_size, ...; labels are index % classes
    my_indices = torch.arange(rank, num_samples, world_size)
    parts, t0 = [], time.time()
    for start in tqdm(range(0, len(my_indices), batch_size), desc='sampling', disable=not master):
        labels = (my_indices[start:start + batch_size] % model.num_classes).to(device)
        with autocast:
            parts.append(sample_images(model, tokenizer, labels, **options))
    if device_type == 'cuda':
        torch.cuda.synchronize()
    elapsed = time.time() - t0
    images = torch.cat(parts) if parts else torch.empty(0, image_px, image_px, 3, dtype=torch.uint8)
    atomic_write(os.path.join(out_dir, f'{sample_name}_rank{rank}.npz'),  # whole or not at all
                 lambda f: np.savez(f, indices=my_indices.numpy(), images=images.numpy()))
    if ddp:
        dist.barrier()
    if master:  # the ranks' parts merged into one .npz in index order, then the PNG grid
        arr_0 = np.empty((num_samples, *images.shape[1:]), dtype=np.uint8)  # rank 0 samples index 0
        for r in range(world_size):
            path = os.path.join(out_dir, f'{sample_name}_rank{r}.npz')
            with np.load(path) as part:
                arr_0[part['indices']] = part['images']
            os.remove(path)
        arr_1 = np.arange(num_samples) % model.num_classes
        atomic_write(npz_path, lambda f: np.savez(f, arr_0=arr_0, arr_1=arr_1))
        print(f"wrote {npz_path}: {num_samples} images {arr_0.shape[1]}x{arr_0.shape[2]}")
        grid_labels = torch.tensor(grid_classes, device=device).repeat_interleave(grid_per_class)
        with autocast:
            grid = sample_images(model, tokenizer, grid_labels, **options)
        grid = grid.permute(0, 3, 1, 2).float() / 127.5 - 1  # back to [-1, 1] for the writer
        grid_path = os.path.join(out_dir, f'{sample_name}_grid.png')
        save_image_grid(grid, grid_path, nrow=grid_per_class)
        print(f"wrote {grid_path}: classes {list(grid_classes)}, one row each")
        print(f"{num_samples} images in {elapsed:.1f} s (rank 0's sampling time) on {world_size} rank(s): "
              f"{num_samples / elapsed:.2f} images/s")
    if ddp:
        dist.destroy_process_group()
