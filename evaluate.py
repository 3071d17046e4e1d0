"""
Evaluation, per mode (run_<mode>: recon, gen, ref, entropy, probe, curves): a table, out_dir/eval_<mode>.json.
gen / ref as ADM's evaluator; recon: a standard, LlamaGen's or FVQ's convention, on uint8 pictures as saved.

    python evaluate.py --mode=gen --samples=samples.npz --ref=VIRTUAL_imagenet256_labeled.npz
"""
import os
import json
import math
import pickle
import warnings

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure  # not pyplot: no display backend, no global figure to close
from tqdm import tqdm

from quantizers import code_usage, code_levels, flat_codes
from tokenizer import (atomic_write, to_uint8, psnr, load_tokenizer, tokenizer_checkpoint, make_dataset,
                       split_held_out, collate, make_lpips)

# -----------------------------------------------------------------------------
# default config; override with config files / --key=value
mode = 'gen'  # 'recon', 'gen', 'ref', 'entropy', 'probe' or 'curves'
out_dir = 'out_eval'
seed = 0
device = 'auto'  # 'auto', 'cpu', 'cuda', 'cuda:1', ...
batch_size = 50  # images per Inception / tokenizer forward
num_workers = 4  # data-loader workers (recon and ref modes)
inception_weights = ''  # pt_inception-2015-12-05-6726825d.pth; '' = download once into the torch hub cache
# gen mode: ADM-format .npz files (arr_0: uint8 N x H x W x 3)
samples = ''
ref = ''  # ADM reference batch: its stored mu/sigma (and mu_s/sigma_s) where it has them, arr_0's otherwise
# ref mode: an ADM-format reference batch of data_dir (image_size, num_images, split as below)
ref_out = ''  # the .npz to write: mu, sigma, mu_s, sigma_s over all images, arr_0 a random sample of them
ref_sample_images = 10000  # images in arr_0 (ADM's reference batches: 10,000, for precision/recall)
# recon mode (it also writes out_dir/codes.npy (N, T) and labels.npy for the entropy and probe modes)
ckpt = ''  # tokenizer checkpoint (recon: the model; entropy: K_t for t*; probe: the code vectors)
data_dir = 'from_ckpt'  # 'from_ckpt' = the tokenizer's training data_dir; '' = the built-in procedural set
image_size = 0  # 0 = the checkpoint's image_size (ref mode: required)
num_images = 50000  # the first num_images images of the dataset (center-cropped, no augmentation)
split = 'val'  # 'val', 'train': the built-in set's (an ImageFolder: whole); 'heldout': train_tokenizer.py's
rfid = True  # False: no Inception network (no weights needed)
lpips = True  # False: no LPIPS (no VGG / AlexNet weights needed)
lpips_random_backbone = False  # True: random trunk, nothing downloaded (tests, offline), not real LPIPS
metric_convention = 'standard'  # whose tables' PSNR / SSIM / LPIPS: 'standard', 'llamagen' or 'fvq'
# entropy mode
codes = ''  # .npy of integer codes, (N, T) or (N, h, w) (raster order); train_ar.py's codes.npy works too
entropy_threshold = 0.1  # bits: t_cliff is the first position after which at most this much entropy is left
# probe mode (codes and ckpt as above; a seeded 20% of the images is held out)
labels = ''  # .npy of integer class labels (N,)
first_k = 10  # the probe sees the first k tokens
probe_steps = 200  # L-BFGS iterations (full batch)
# curves mode
logs = ''  # comma-separated run folders (train_tokenizer.py / train_ar.py out_dir with log.jsonl)
entropy_dirs = ''  # comma-separated out_dirs of entropy-mode runs (eval_entropy.json), on one figure
names = ''  # comma-separated legend names (default: the folder names), logs first, then entropy_dirs
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (bool, int, float, str, tuple, list, dict))]


# -----------------------------------------------------------------------------
# FID, Inception Score, precision / recall (ADM's evaluator: guided-diffusion evaluations/evaluator.py)
def feature_statistics(features):
    """features (N, D) -> mean (D,), covariance (D, D) with N - 1 normalisation, float64 (as ADM)."""
    features = np.asarray(features, dtype=np.float64)
    if len(features) < 2:
        raise ValueError(f"FID statistics need at least 2 images, got {len(features)}")
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2)) between two Gaussians (ADM's computation)."""
    mu1, sigma1, mu2, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, sigma1, mu2, sigma2))
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # a singular product without a square root: regularise
        warnings.warn(f"FID: sqrtm of a singular product; adding {eps} to the covariance diagonals")
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # the product of two PSD matrices has a real square root: round-off
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has an imaginary component {np.abs(covmean.imag).max():.3g}; "
                             f"are the covariances valid?")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_to_statistics(features, mu, sigma):
    """FID between features (N, D) and statistics (mu, sigma). For N <= D, S1 = A^T A (A: centred features /
    sqrt(N - 1)): tr sqrt(S1 S2) = the sum of sqrt(eigenvalues) of the N x N A S2 A^T, no D x D sqrtm."""
    features, mu, sigma = (np.asarray(a, dtype=np.float64) for a in (features, mu, sigma))
    N, D = features.shape
    if N > D:
        return frechet_distance(*feature_statistics(features), mu, sigma)
    mean = features.mean(axis=0)
    A = (features - mean) / math.sqrt(N - 1)  # (N, D)
    eigenvalues = np.linalg.eigvalsh(A @ sigma @ A.T).clip(min=0)  # (N,); round-off below 0
    diff = mean - mu
    return float(diff @ diff + (A * A).sum() + np.trace(sigma) - 2 * np.sqrt(eigenvalues).sum())


def fid_from_features(features1, features2):
    """FID between two feature sets; FID is symmetric, so the smaller set keeps its features."""
    small, large = sorted((features1, features2), key=len)
    return fid_to_statistics(small, *feature_statistics(large))


def inception_score(logits, split_size=5000):
    """logits (N, C) -> (mean, std) of exp(E_x KL(p(y|x) || p(y))) over consecutive chunks of split_size
    samples (ADM's 5,000; the last may be shorter), so scores at 10k and 50k samples share their chunks."""
    log_p = torch.log_softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), dim=1)  # (N, C)
    scores = []
    for part in torch.split(log_p, split_size):
        log_p_y = torch.logsumexp(part, dim=0) - math.log(part.shape[0])  # log of the chunk's marginal p(y)
        p = part.exp()
        kl = torch.where(p > 0, p * (part - log_p_y), 0.0).sum(dim=1).mean()  # 0 log 0 = 0
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def pairwise_sq_distances(a, b):
    """(n, D), (m, D) -> (n, m) squared Euclidean distances (ADM's DistanceBlock form, clamped at 0)."""
    return ((a * a).sum(1)[:, None] - 2 * a @ b.t() + (b * b).sum(1)[None, :]).clamp_min_(0)


def manifold_radii(x, k=3, batch_size=10000):
    """x (N, D) -> (N,) squared distance of each point to its k-th nearest other point."""
    if len(x) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} images, got {len(x)}")
    radii = []
    for rows in x.split(batch_size):  # a row block against all points, as ADM's ManifoldEstimator
        d = torch.cat([pairwise_sq_distances(rows, cols) for cols in x.split(batch_size)], 1)  # (b, N)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the point itself, at 0, is the nearest
    return torch.cat(radii)


def precision_recall(ref_features, sample_features, k=3, batch_size=10000, device='cpu'):
    """Improved precision / recall (Kynkaanniemi et al. 2019) as ADM: precision = the fraction of samples
    inside some reference point's k-NN ball, recall = the fraction of reference points inside a sample's."""
    ref, smp = (torch.as_tensor(np.asarray(f), dtype=torch.float32, device=device)
                for f in (ref_features, sample_features))
    ref_r, smp_r = manifold_radii(ref, k, batch_size), manifold_radii(smp, k, batch_size)
    smp_in, ref_in = torch.zeros(len(smp), dtype=torch.bool, device=device), []
    for rows, rows_r in zip(ref.split(batch_size), ref_r.split(batch_size)):  # a block of reference points
        d = torch.cat([pairwise_sq_distances(rows, cols) for cols in smp.split(batch_size)], 1)  # (b, M)
        smp_in |= (d <= rows_r[:, None]).any(0)
        ref_in.append((d <= smp_r[None]).any(1))
    return smp_in.double().mean().item(), torch.cat(ref_in).double().mean().item()


# -----------------------------------------------------------------------------
# reconstruction metrics of uint8-level images, float (B, 3, H, W) in [0, 1]
def blur_valid(t, window):
    """Separable 'valid' filter per channel: (B, C, H, W), window (n,) -> (B, C, H - n + 1, W - n + 1)."""
    C, n = t.shape[1], window.shape[0]
    t = F.conv2d(t, window.view(1, 1, n, 1).expand(C, 1, n, 1), groups=C)
    return F.conv2d(t, window.view(1, 1, 1, n).expand(C, 1, 1, n), groups=C)


def ssim(x, y, data_range=1.0, gaussian=True, window_size=11, sample_covariance=False):
    """Per-image SSIM (Wang et al. 2004) -> (B,), as skimage's structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False); gaussian=False: a uniform window (skimage's default, 7 x 7)."""
    x, y = x.double(), y.double()
    r = torch.arange(window_size, dtype=torch.float64, device=x.device) - (window_size - 1) / 2
    window = torch.exp(-r ** 2 / (2 * 1.5 ** 2)) if gaussian else torch.ones_like(r)  # Gaussian: sigma 1.5
    window = window / window.sum()  # (window_size,)
    cov_norm = window_size ** 2 / (window_size ** 2 - 1) if sample_covariance else 1.0  # n / (n - 1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur_valid(x, window), blur_valid(y, window)
    var_x = cov_norm * (blur_valid(x * x, window) - mu_x ** 2)
    var_y = cov_norm * (blur_valid(y * y, window) - mu_y ** 2)
    cov_xy = cov_norm * (blur_valid(x * y, window) - mu_x * mu_y)
    s = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3))


def reconstruction_metrics(fake, real, convention='standard'):
    """Per-image PSNR and SSIM (B,) under the convention of a paper's table (LPIPS: see run_recon)."""
    if convention == 'llamagen':  # LlamaGen's reconstruction_vq_ddp.py: skimage PSNR, and skimage SSIM's
        # defaults (7x7 uniform window, sample covariance) called with data_range=2.0 on [0, 1] images
        return psnr(fake, real), ssim(fake, real, data_range=2.0, gaussian=False, window_size=7,
                                      sample_covariance=True)
    if convention == 'fvq':  # FVQ's eval_fid_usage_lpips.py: pyiqa PSNR on BT.601 Y, piq.ssim(data_range=2.)
        # BT.601 Y in [16/255, 235/255] (pyiqa's rgb2ycbcr), (B, H, W)
        weights = torch.tensor([65.481, 128.553, 24.966], dtype=torch.float64, device=fake.device)
        fake_y, real_y = ((t.double().permute(0, 2, 3, 1) @ weights + 16.0) / 255.0 for t in (fake, real))
        psnr_y = 10 * torch.log10(1.0 / (((fake_y - real_y) ** 2).flatten(1).mean(1) + 1e-8))
        # piq divides the images by data_range and average-pools those of >= 384 px by round(min(H, W) / 256)
        f = max(1, round(min(fake.shape[-2:]) / 256))
        fake, real = F.avg_pool2d(fake.double(), f), F.avg_pool2d(real.double(), f)
        return psnr_y, ssim(fake / 2.0, real / 2.0)
    return psnr(fake, real), ssim(fake, real)  # 'standard': RGB PSNR, Wang et al.'s 11x11 Gaussian SSIM


# -----------------------------------------------------------------------------
# code sequences: per-position conditional entropy (VCQ's entropy cliff), linear probe (VCQ §4.4)
def conditional_entropies(codes):
    """codes (N, T) -> H_t = H(x_t | x_<t) in bits, t = 1..T, of the N sequences' empirical distribution.
    The prefixes x_<t are numbered incrementally: (prefix id, token) pairs -> np.unique -> next prefix id."""
    codes = np.asarray(codes, dtype=np.int64)
    N, T = codes.shape
    K = int(codes.max()) + 1
    H = np.zeros(T)
    prefix = np.zeros(N, dtype=np.int64)  # id of x_<t for each sequence; a single empty prefix at t = 1
    for t in range(T):
        pair_keys = prefix * K + codes[:, t]  # (N,) one integer per (x_<t, x_t)
        pair_ids, next_prefix, pair_counts = np.unique(pair_keys, return_inverse=True, return_counts=True)
        prefix_counts = np.bincount(prefix)[pair_ids // K]  # occurrences of each pair's prefix
        H[t] = -(pair_counts / N * np.log2(pair_counts / prefix_counts)).sum()
        prefix = next_prefix.reshape(N)
        if len(pair_ids) == N:  # every sequence has its own prefix: nothing is left to be uncertain about
            break
    return np.maximum(H, 0.0)  # -0.0 and round-off below zero


def entropy_cliff(H, N, threshold=0.1, codebook_sizes=None):
    """H (T,) bits of N sequences -> the budget left R_t = log2 N - sum_{s<t} H_s (t = 1..T), t_cliff measured
    on H (the first t after which <= `threshold` bits are left) and, given K_t, VCQ's t_star (eq. 1-2)."""
    H = np.asarray(H, dtype=np.float64)
    left_after = np.concatenate([np.cumsum(H[::-1])[::-1][1:], [0.0]])  # sum_{s>t} H_s, t = 0..T-1
    result = {'num_sequences': int(N), 'seq_len': len(H), 'log2_N': math.log2(N), 'threshold_bits': threshold,
              'H_bits': H.tolist(),
              'remaining_budget_bits': (math.log2(N) - np.concatenate([[0.0], np.cumsum(H)[:-1]])).tolist(),
              # not the first H_t below the threshold: VCQ's 2-entry first codebooks carry little entropy
              't_cliff': int(np.flatnonzero(left_after <= threshold)[0]) + 1}
    if codebook_sizes is not None:
        sizes = result['codebook_sizes'] = np.asarray(codebook_sizes).tolist()
        # the smallest t with sum_{s<=t} log2 K_s >= log2 N, as prod_{s<=t} K_s >= N in integers (float log
        # sums miss N = K^t). K = 16384 and N = 1.28M images: the paper's t* = 2
        result['t_star'] = next((t for t in range(1, len(sizes) + 1)
                                 if math.prod(int(K) for K in sizes[:t]) >= N), None)
    return result


def load_codes(path, labels_path=''):
    """-> int64 codes (N, T), raster order, of a .npy (N, T) or (N, h, w), labels (N,) or None, meta or None.
    Of a train_ar.py codes folder (all augmented views; label -1: unreadable): the readable centre views."""
    c = np.load(path)
    if not (isinstance(c, np.ndarray) and np.issubdtype(c.dtype, np.integer) and c.ndim in (2, 3)
            and c.min() >= 0):
        raise ValueError(f"'{path}' is not a .npy of non-negative integer codes (N, T) or (N, h, w)")
    c, y = c.reshape(len(c), -1).astype(np.int64), np.load(labels_path) if labels_path else None
    if y is not None and (y.shape != (len(c),) or not np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"'{labels_path}' holds {y.dtype} {y.shape}: not one integer label per code row")
    meta_path = os.path.join(os.path.dirname(os.path.abspath(path)), 'meta.json')
    if not os.path.isfile(meta_path):
        return c, y, None
    meta = read_json(meta_path)
    if not {'dataset_images', 'center_view'} <= meta.keys():
        raise ValueError(f"'{meta_path}' was written by an older nanoVQ; re-extract the codes (train_ar.py)")
    views, num_images = meta['views_per_image'], meta['dataset_images']
    if len(c) != num_images * views:
        raise ValueError(f"'{path}' has {len(c)} rows; meta.json says {num_images} images x {views} views")
    y = np.load(os.path.join(os.path.dirname(meta_path), 'labels.npy')) if y is None else y
    rows = np.arange(meta['center_view'], len(c), views)
    rows = rows[y[rows] >= 0]
    print(f"one view per image: {len(rows)} of {len(c)} rows ({num_images - len(rows)} unreadable images)")
    return c[rows], y[rows], meta


def probe_features(codes, codebook, first_k):
    """codes (N, T), codebook (K, D) -> (N, first_k * D): the code vectors of the first k tokens concatenated
    (VCQ §4.4 does not say how; concatenating keeps which position holds which code)."""
    codes = torch.as_tensor(codes[:, :first_k], dtype=torch.long)
    if codes.max() >= len(codebook):
        raise ValueError(f"codes reach {int(codes.max())}, but the tokenizer's codebook has {len(codebook)}")
    return codebook[codes].flatten(1).float()  # (N, first_k, D) -> (N, first_k * D)


def linear_probe(train_x, train_y, val_x, val_y, num_classes, steps=200, weight_decay=1e-4, device='cpu'):
    """Multinomial logistic regression, full-batch L-BFGS on standardised features -> val (top-1, top-5)."""
    if len(train_x) < 2:  # the features' standard deviation needs two
        raise ValueError(f"the linear probe needs at least 2 training sequences, got {len(train_x)}")
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, val_x = ((train_x - mean) / std).to(device), ((val_x - mean) / std).to(device)
    train_y, val_y = train_y.to(device), val_y.to(device)
    linear = nn.Linear(train_x.shape[1], num_classes).to(device)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=steps, history_size=20,
                                  line_search_fn='strong_wolfe')

    def closure():  # L-BFGS re-evaluates the loss during its line search
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(train_x), train_y) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        hits = linear(val_x).topk(min(5, num_classes), dim=1).indices == val_y[:, None]  # (N_val, 5)
        return hits[:, 0].float().mean().item(), hits.any(1).float().mean().item()


# -----------------------------------------------------------------------------
# recon mode: rFID, PSNR, SSIM, LPIPS, codebook usage and perplexity of a tokenizer on an image set
def run_recon(config):
    """rFID of reconstructions vs originals and the rest on the first num_images images, never augmented."""
    dev = resolve_device(config['device'])
    inception = load_inception(config['inception_weights'], dev) if config['rfid'] else None
    check_choice(config, 'split', ('val', 'train', 'heldout'))
    convention = check_choice(config, 'metric_convention', ('standard', 'llamagen', 'fvq'))
    if config['ckpt'] == '':
        raise ValueError("recon mode needs --ckpt=<tokenizer checkpoint>")
    checkpoint = tokenizer_checkpoint(config['ckpt'])  # read once: the weights and the training config
    tokenizer, train_config = load_tokenizer(checkpoint).to(dev).float(), checkpoint['config']
    if config['data_dir'] == 'from_ckpt' and 'data_dir' not in train_config:
        raise ValueError(f"{config['ckpt']} is a released tokenizer: it records no data; give --data_dir")
    data_dir = train_config['data_dir'] if config['data_dir'] == 'from_ckpt' else config['data_dir']
    size = config['image_size'] or train_config['image_size']
    # an ImageFolder's split is its data_dir; 'train' only picks the built-in set's split
    dataset = make_dataset(data_dir, size, train=config['split'] == 'train', augment=False)
    if config['split'] == 'heldout':
        if data_dir == '' or train_config.get('eval_data_dir', 'released'):
            raise ValueError("split='heldout' is for a tokenizer that held images out of its own ImageFolder "
                             "data_dir (train_tokenizer.py with data_dir set and eval_data_dir '')")
        dataset.samples = split_held_out(dataset.samples, train_config['eval_images'])[1]
    dataset = torch.utils.data.Subset(dataset, range(min(config['num_images'], len(dataset))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=config['batch_size'],
                                         num_workers=config['num_workers'], collate_fn=collate)
    lpips_net = 'alex' if convention == 'fvq' else 'vgg'  # FVQ's tables: pyiqa's LPIPS v0.1 AlexNet
    lpips_model = make_lpips(config['lpips_random_backbone'], lpips_net).to(dev) if config['lpips'] else None
    K = tokenizer.quantizer.codebook_size
    counts, parts, skipped = {}, {}, 0  # counts (K,) of all codes and of each rq depth / msvq scale
    with torch.no_grad():
        for images, labels_batch, n_skipped in tqdm(loader, desc='recon'):
            skipped += n_skipped
            if len(images) == 0:
                continue
            images = images.to(dev)
            indices = tokenizer.encode(images)  # (B, h, w); rq: (B, h, w, depth); msvq: [(B, s, s)] per scale
            real = to_uint8(images) / 255.0  # (B, 3, S, S) in [0, 1], the levels of a saved image
            fake = to_uint8(tokenizer.decode(indices)) / 255.0
            codes = flat_codes(indices)  # (B, T)
            # the 1D tokenizer's (B, L, depth) read as a 1 x L grid
            levels = code_levels(indices[:, None] if tokenizer.tokenizer_type == 'titok' else indices)
            named = {'codebook_usage': codes, **{f'codebook_usage_{k}': v for k, v in levels.items()}}
            for name, level_codes in named.items():
                counts[name] = counts.get(name, 0) + torch.bincount(level_codes.flatten(), minlength=K)
            batch = dict(zip(('psnr', 'ssim'), reconstruction_metrics(fake, real, convention)), codes=codes,
                         labels=labels_batch)
            if inception is not None:
                batch.update(real_features=inception(real)[0], fake_features=inception(fake)[0])
            if lpips_model is not None:
                batch['lpips'] = lpips_model(fake * 2 - 1, real * 2 - 1).flatten()
            for key, value in batch.items():
                parts.setdefault(key, []).append(value.cpu())
    if not parts:
        raise ValueError(f"no readable images in '{data_dir}'")
    parts = {key: torch.cat(value) for key, value in parts.items()}
    results = {name: 100 * code_usage(c)[0].item() for name, c in counts.items()}  # codebook_usage[_<level>]
    results.update(psnr=parts['psnr'].mean().item(), ssim=parts['ssim'].mean().item(),
                   perplexity=code_usage(counts['codebook_usage'])[1].item(), codebook_size=K,
                   usage_tokens=int(counts['codebook_usage'].sum()), num_images=len(parts['codes']),
                   num_skipped=skipped, image_size=size, data_dir=data_dir, split=config['split'],
                   metric_convention=convention, codes_file=os.path.join(config['out_dir'], 'codes.npy'))
    if inception is not None:
        results['rfid'] = fid_from_features(parts['fake_features'].numpy(), parts['real_features'].numpy())
    if lpips_model is not None:
        results.update(lpips=parts['lpips'].mean().item(), lpips_network=lpips_net)
    atomic_write(results['codes_file'], lambda f: np.save(f, parts['codes'].numpy().astype(np.int32)))
    atomic_write(os.path.join(config['out_dir'], 'labels.npy'), lambda f: np.save(f, parts['labels'].numpy()))
    return results


# -----------------------------------------------------------------------------
# gen and ref modes: ADM's protocol (FID, sFID, IS, precision / recall) and its reference batches
def run_gen(config):
    """FID, sFID, IS, precision and recall of a sample batch against a reference batch (ADM's protocol)."""
    dev = resolve_device(config['device'])
    model = load_inception(config['inception_weights'], dev)
    if config['samples'] == '' or config['ref'] == '':
        raise ValueError("gen mode needs --samples=<samples .npz> and --ref=<reference batch .npz>")
    samples, ref_images = npz_images(config['samples']), npz_images(config['ref'])
    if samples.shape[1:] != ref_images.shape[1:]:
        raise ValueError(f"the samples are {samples.shape[1]}x{samples.shape[2]} images, the reference "
                         f"batch's {ref_images.shape[1]}x{ref_images.shape[2]}: FID compares one size")
    # the reference's features every run, as ADM's evaluator computes them (P/R needs arr_0's features)
    ref_features, spatial, _ = inception_features(model, ref_images, config['batch_size'], dev, 'reference')
    with np.load(config['ref']) as data:  # ADM's: its stored statistics (the training set's) replace arr_0's
        ref_stored = {k: data[k] for k in REF_STATISTICS if k in data.files}
    statistics = feature_statistics(ref_features) + feature_statistics(spatial)
    ref = {**dict(zip(REF_STATISTICS, statistics)), **ref_stored}
    features, spatial, logits = inception_features(model, samples, config['batch_size'], dev, 'samples')
    is_mean, is_std = inception_score(logits)
    precision, recall = precision_recall(ref_features, features, device=dev)
    return {'fid': fid_to_statistics(features, ref['mu'], ref['sigma']),
            'sfid': fid_to_statistics(spatial, ref['mu_s'], ref['sigma_s']),
            'inception_score': is_mean, 'inception_score_std': is_std, 'precision': precision,
            'recall': recall, 'num_samples': len(features), 'num_ref': len(ref_features),
            'ref_statistics': ', '.join(ref_stored) or f"computed from its {len(ref_images)} arr_0 images"}


def add_moments(moments, x):
    """Running (n, shift, sum, outer product) of feature rows, plus the rows x (B, D): those of the rows minus
    the first row seen, against the cancellation of E[x x^T] - mu mu^T over a million images."""
    x = np.asarray(x, dtype=np.float64)
    n, shift, total, outer = moments or (0, x[0], 0.0, 0.0)
    xc = x - shift  # (B, D)
    return n + len(x), shift, total + xc.sum(0), outer + xc.T @ xc


def moments_statistics(moments):
    """-> mean (D,), covariance (D, D) with N - 1 normalisation, as feature_statistics of all the rows."""
    n, shift, total, outer = moments
    if n < 2:
        raise ValueError(f"reference statistics need at least 2 images, got {n}")
    mean = total / n  # of the shifted rows
    return shift + mean, (outer - n * np.outer(mean, mean)) / (n - 1)


def run_ref(config):
    """Writes an ADM-format reference batch of an image set (see ref_out), as ADM's VIRTUAL_*.npz files."""
    dev = resolve_device(config['device'])
    model = load_inception(config['inception_weights'], dev)
    if (config['ref_out'] == '' or config['data_dir'] == 'from_ckpt' or config['image_size'] <= 0
            or config['ref_sample_images'] <= 0):
        raise ValueError("ref mode needs --ref_out=<the .npz to write>, --data_dir=<ImageFolder; '' = the "
                         "built-in set>, --image_size=<the samples' pixels> and --ref_sample_images >= 1")
    size, train = config['image_size'], check_choice(config, 'split', ('val', 'train')) == 'train'
    # ADM's preprocessing: centre crop (BOX-halving, then BICUBIC), no augmentation
    dataset = make_dataset(config['data_dir'], size, train=train, augment=False)
    dataset = torch.utils.data.Subset(dataset, range(min(config['num_images'], len(dataset))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=config['batch_size'],
                                         num_workers=config['num_workers'], collate_fn=collate)
    pool, spatial, skipped = None, None, 0
    for images, _, n_skipped in tqdm(loader, desc='reference'):
        skipped += n_skipped
        if len(images) == 0:
            continue
        images = to_uint8(images).permute(0, 2, 3, 1).numpy()  # (B, S, S, 3), as saved
        features, spatial_features, _ = inception_forward(model, images, dev)
        pool, spatial = add_moments(pool, features), add_moments(spatial, spatial_features)
    if pool is None:
        raise ValueError(f"no readable images in '{config['data_dir']}'")
    statistics = dict(zip(REF_STATISTICS, moments_statistics(pool) + moments_statistics(spatial)))
    # arr_0: a seeded random sample of the readable images, in dataset order (read a second time)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config['seed']))
    sample = collate([dataset[i] for i in sorted(order[:config['ref_sample_images']].tolist())])[0]
    sample = to_uint8(sample).permute(0, 2, 3, 1).numpy()  # (n, S, S, 3)
    atomic_write(config['ref_out'], lambda f: np.savez(f, arr_0=sample, **statistics))
    return {'ref_out': config['ref_out'], 'num_images': pool[0], 'num_skipped': skipped, 'image_size': size,
            'arr_0_images': len(sample), 'data_dir': config['data_dir'], 'split': config['split']}


# -----------------------------------------------------------------------------
# entropy and probe modes on code sequences: VCQ's entropy cliff (H_t, t_cliff, t_star), its linear probe
def run_entropy(config):
    """H_t, the budget left, t_cliff and VCQ's t_star of code sequences, one per image (see entropy_cliff)."""
    if config['codes'] == '':
        raise ValueError("entropy mode needs --codes=<codes .npy, (N, T) or (N, h, w)>")
    c, _, meta = load_codes(config['codes'])
    N, T = c.shape
    sizes, source = None, 'unknown (pass --ckpt)'  # K_t (T,) for t*: --ckpt's or a train_ar.py codes folder's
    if config['ckpt'] != '':
        quantizer = load_tokenizer(config['ckpt']).quantizer
        sizes, source = quantizer.codebook_sizes, config['ckpt']
        sizes = np.full(T, quantizer.codebook_size) if sizes is None else sizes.numpy()
    elif meta is not None:
        source = os.path.join(os.path.dirname(os.path.abspath(config['codes'])), 'codebook_sizes.npy')
        sizes = np.load(source) if meta['vcq'] else np.full(T, meta['codebook_size'])
    if sizes is not None and sizes.shape != (T,):
        raise ValueError(f"the codebook sizes from {source} have shape {sizes.shape}; codes: {T} positions")
    if sizes is not None and (c >= sizes).any():
        t = int(np.flatnonzero((c >= sizes).any(0))[0])
        raise ValueError(f"codes at position {t + 1} reach {c[:, t].max()} but the codebook there has "
                         f"{int(sizes[t])} codes")
    results = entropy_cliff(conditional_entropies(c), N, config['entropy_threshold'], sizes)
    results['codebook_sizes_source'] = source
    png = os.path.join(config['out_dir'], 'entropy.png')
    results['png'] = plot_entropy([(os.path.basename(os.path.abspath(config['out_dir'])), results)], png)
    return results


def run_probe(config):
    """VCQ §4.4: a linear probe on the code vectors of the first k tokens -> top-1 / 5 of a held-out 20%."""
    if config['codes'] == '' or config['labels'] == '' or config['ckpt'] == '':
        raise ValueError("probe mode needs --codes=<codes .npy>, --labels=<labels .npy> and "
                         "--ckpt=<tokenizer checkpoint> (the code vectors)")
    # one view per image: with every augmented view, views of one image would fall on both sides of the split
    c, y, _ = load_codes(config['codes'], config['labels'])
    if not 1 <= config['first_k'] <= c.shape[1]:
        raise ValueError(f"first_k = {config['first_k']} must be in [1, {c.shape[1]}] (the sequence length)")
    with torch.no_grad():
        codebook = load_tokenizer(config['ckpt']).quantizer.codebook().float()  # (K, D)
    x, y = probe_features(c, codebook, config['first_k']), torch.as_tensor(y, dtype=torch.long)
    if len(y.unique()) < 2:
        warnings.warn(f"the labels in {config['labels']} hold one class: a top-1 of 1 says nothing")
    order = torch.randperm(len(c), generator=torch.Generator().manual_seed(config['seed']))
    val, train = order[:math.ceil(0.2 * len(c))], order[math.ceil(0.2 * len(c)):]
    num_classes = int(y.max()) + 1
    top1, top5 = linear_probe(x[train], y[train], x[val], y[val], num_classes, config['probe_steps'],
                              device=resolve_device(config['device']))
    return {'top1': top1, 'top5': top5, 'first_k': config['first_k'], 'feature_dim': x.shape[1],
            'num_train': len(train), 'num_val': len(val), 'num_classes': num_classes}


# -----------------------------------------------------------------------------
# curves mode: training curves of several runs (their log.jsonl) and entropy cliffs on one figure
CURVES = [('usage', 'codebook usage (%)', 'train', 'usage', (0, 102)),  # (file name, y label, log split, key,
          ('psnr', 'held-out PSNR (dB)', 'eval', 'psnr', None),  # y limits or None: automatic)
          ('rec_loss', 'reconstruction loss', 'train', 'rec', None),
          ('loss', 'GPT training loss', 'train', 'loss', None)]  # GPT runs only (a tokenizer's is its total)
SETTING_KEYS = ('quantizer', 'vcq_schedule', 'codebook_size', 'code_dim', 'image_size', 'ar_model', 'n_layer',
                'max_iters')  # a run's setting in the plots' titles: those its config sets (not to 0 or '')


def run_setting(rows):
    """'key=value' of the config record train_tokenizer.py / train_ar.py log first, and the device, or []."""
    for r in rows:
        if r.get('split') == 'config':
            return [f"{k}={r['config'][k]}" for k in SETTING_KEYS if r['config'].get(k)] + [r['device']]
    return []


def run_curves(config):
    """A PNG per curve in CURVES that a run logs, titled with the settings the runs share; final values."""
    logs, entropy_dirs = ([d for d in config[key].split(',') if d] for key in ('logs', 'entropy_dirs'))
    names = ([n for n in config['names'].split(',') if n]
             or [os.path.basename(os.path.abspath(d)) for d in logs + entropy_dirs])
    if not logs + entropy_dirs or len(names) != len(logs) + len(entropy_dirs):
        raise ValueError(f"curves mode needs --logs=<run dir>,... and/or --entropy_dirs=<entropy-mode "
                         f"out_dir>,..., and one name per folder in --names (got {len(names)})")
    records = {name: read_json(os.path.join(d, 'log.jsonl'), lines=True) for name, d in zip(names, logs)}
    settings = {name: run_setting(rows) for name, rows in records.items()}
    gpt_runs = [name for name, rows in records.items() if not any('rec' in r for r in rows)]
    results = {'png': []}
    for file_name, label, split, key, ylim in CURVES:
        series = {name: [(r['iter'], r[key]) for r in rows if r.get('split') == split and key in r]
                  for name, rows in records.items() if key != 'loss' or name in gpt_runs}
        series = {name: points for name, points in series.items() if points}
        if not series:
            continue
        shared = [s for s in settings[next(iter(series))] if all(s in settings[n] for n in series)]
        ax = Figure(figsize=(6.4, 4)).subplots()
        for name, points in series.items():  # the legend: the run and what differs
            ax.plot(*zip(*points), label=', '.join([name] + [s for s in settings[name] if s not in shared]))
        results['png'].append(save_figure(ax, os.path.join(config['out_dir'], f'{file_name}.png'), ylim=ylim,
                                          xlabel='iteration', ylabel=label, title=', '.join(shared)))
    for name, rows in records.items():  # the last train and eval values of each run
        final = results[name] = {'iter': rows[-1]['iter'] if rows else 0}
        for split, prefix, keys in (('train', '', ('usage', 'usage_tokens', 'rec', 'loss')),
                                    ('eval', 'eval_', ('psnr', 'usage', 'usage_tokens'))):
            last = ([r for r in rows if r.get('split') == split] or [{}])[-1]
            final.update({prefix + k: last[k] for k in keys if k in last})
    cliffs = [(name, read_json(os.path.join(d, 'eval_entropy.json')))
              for name, d in zip(names[len(logs):], entropy_dirs)]
    for name, cliff in cliffs:  # VCQ's t_star (from K_t and N) beside the t_cliff measured on H_t
        results[f'{name} (entropy)'] = {'N': cliff['num_sequences'], 't_star': cliff.get('t_star'),
                                        't_cliff': cliff['t_cliff'],
                                        'H_1..4': [round(h, 2) for h in cliff['H_bits'][:4]]}
    if cliffs:
        results['png'].append(plot_entropy(cliffs, os.path.join(config['out_dir'], 'entropy_cliff.png')))
    return results


# -----------------------------------------------------------------------------
# plumbing: ADM's .npz files, the FID Inception network's weights and features, tables, plots
def npz_images(path):
    """arr_0 of an ADM-format .npz: uint8 images (N, H, W, 3), read whole (as sample.py writes them)."""
    data = np.load(path)
    images = data.get('arr_0') if isinstance(data, np.lib.npyio.NpzFile) else None
    if images is None or images.dtype != np.uint8 or images.shape[3:] != (3,) or len(images) == 0:
        raise ValueError(f"'{path}' has no arr_0 of uint8 images N x H x W x 3 (ADM's .npz format)")
    return images


FID_WEIGHTS = 'pt_inception-2015-12-05-6726825d.pth'  # the name of pytorch-fid's weights file
FID_WEIGHTS_URL = f'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS}'
REF_STATISTICS = ('mu', 'sigma', 'mu_s', 'sigma_s')  # of an ADM reference batch: pool3's and sFID's


def load_inception(path, device):
    """The FID Inception in eval mode with pytorch-fid's weights; '' = torch hub's cache, downloaded once."""
    if path == '':
        path = os.path.join(torch.hub.get_dir(), 'checkpoints', FID_WEIGHTS)  # as load_state_dict_from_url
        if not os.path.isfile(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                torch.hub.download_url_to_file(FID_WEIGHTS_URL, path)  # removes its partial file
            except OSError as e:  # offline: a URLError
                raise FileNotFoundError(f"no FID Inception weights ({e}): get {FID_WEIGHTS_URL} and put it "
                                        f"at {path}, or pass --inception_weights=<its path>") from None
    model = FIDInceptionV3()
    try:
        model.load_state_dict(torch.load(path, map_location='cpu', weights_only=True))  # strict
    except (RuntimeError, TypeError, EOFError, pickle.UnpicklingError):
        raise ValueError(f"{path} is not the FID Inception weights file ({FID_WEIGHTS})") from None
    return model.to(device).eval()


@torch.no_grad()
def inception_forward(model, images_uint8, device):
    """uint8 images (B, H, W, 3) -> pool3 features (B, 2048), spatial features (B, 2023), logits (B, 1008)."""
    x = torch.from_numpy(np.array(images_uint8)).to(device).permute(0, 3, 1, 2).float() / 255.0
    return tuple(t.cpu().numpy() for t in model(x))


def inception_features(model, images, batch_size, device, desc):
    """uint8 images (N, H, W, 3) -> pool3 features, spatial features and logits (float32 numpy)."""
    outputs = [inception_forward(model, images[i:i + batch_size], device)
               for i in tqdm(range(0, len(images), batch_size), desc=desc)]
    return tuple(np.concatenate(parts) for parts in zip(*outputs))


def resolve_device(name):
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name.startswith('cuda'):  # full float32: TF32 convolutions move Inception features enough to shift FID
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return name


def check_choice(config, key, choices):
    if config[key] not in choices:
        raise ValueError(f"unknown {key} '{config[key]}' (expected one of {', '.join(choices)})")
    return config[key]


def read_json(path, lines=False):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()] if lines else json.load(f)


def print_table(title, rows):
    """One line per result: a float to 6 digits, a long list by its start, a dict (a run in curves mode)."""
    print(f"\n{title}")
    for key, value in rows.items():
        if isinstance(value, dict):
            value = ', '.join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in value.items())
        elif isinstance(value, list) and len(value) > 8:  # H_t, the remaining budget, K_t
            value = f"{[round(v, 3) for v in value[:8]]} ... ({len(value)})"
        print(f"  {key:<28} {value:.6g}" if isinstance(value, float) else f"  {key:<28} {value}")


def save_figure(ax, path, **axes):
    """Sets the axes (ax.set's keywords), the legend beside them, not over the curves; writes the PNG."""
    ax.set(**axes)
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ax.figure.savefig(path, dpi=100, bbox_inches='tight')
    return path


def plot_entropy(runs, path):
    """runs: [(name, entropy_cliff result)] -> one PNG of H_t, the budget left and t* (VCQ Fig. 2a, eq. 2)."""
    ax = Figure(figsize=(6.4, 4)).subplots()
    for i, (name, result) in enumerate(runs):
        t, color = np.arange(1, result['seq_len'] + 1), f'C{i}'
        ax.plot(t, result['H_bits'], color=color, label=name + r': $H(x_t \mid x_{<t})$')
        ax.plot(t, result['remaining_budget_bits'], color=color, linestyle='--',
                label=name + r': budget left, $\log_2 N - \Sigma_{s<t} H_s$ (eq. 2)')
        if result.get('t_star') is not None:
            ax.axvline(result['t_star'], color=color, linestyle=':', label=f"{name}: t* = {result['t_star']}")
    title = 'entropy cliff: ' + ', '.join(f"{name} N = {result['num_sequences']}" for name, result in runs)
    return save_figure(ax, path, xscale='log', xlabel='position t', ylabel='bits', title=title)


# -----------------------------------------------------------------------------
# the FID Inception-v3 of pytorch-fid, a port of TF's 2015 graph: torchvision's layout and parameter names
# (the weights file loads with strict=True), TF's pooling and BatchNorm eps. A port: no need to read.
class BasicConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def tf_avg_pool_3x3(x):
    # TF's average pool divides by the number of real pixels under the window; torchvision's counts padding
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(tf_avg_pool_3x3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels, c7):
        super().__init__()
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(tf_avg_pool_3x3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, in_channels, max_pool):
        super().__init__()
        self.max_pool = max_pool  # TF's Mixed_7c max-pools where Mixed_7b averages; its weights expect it
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else tf_avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd), self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """images (B, 3, H, W) in [0, 1] -> pool3 features (B, 2048), sFID's (B, 2023), IS logits (B, 1008)."""
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c = InceptionA(192, 32), InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # ImageNet-2012's classes and the extra ones of the 2015 TF graph

    def forward(self, images):
        x = 2 * F.interpolate(images, size=(299, 299), mode='bilinear', align_corners=False) - 1  # TF's range
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x)))
        # sFID's features: the TF graph's mixed_6/conv is Mixed_6d's 1x1 branch, the first 192 channels of its
        # output; ADM keeps 7 of them, flattened channels-last as TF's NHWC: (B, 7, 17, 17) -> (B, 2023)
        spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)
        x = self.Mixed_7a(self.Mixed_6e(x))  # (B, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (B, 2048, 8, 8)
        features = x.mean(dim=(2, 3))  # (B, 2048) pool3
        # IS as improved-GAN / ADM / torch-fidelity ('logits_unbiased'): softmax of pool3 @ W, no fc bias
        logits = features @ self.fc.weight.t()  # (B, 1008)
        return features, spatial, logits


# -----------------------------------------------------------------------------
if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    config = {k: globals()[k] for k in config_keys}
    runs = {'recon': run_recon, 'gen': run_gen, 'ref': run_ref, 'entropy': run_entropy, 'probe': run_probe,
            'curves': run_curves}
    torch.manual_seed(seed)
    results = runs[check_choice(config, 'mode', runs)](config)
    print_table(f"evaluate.py --mode={mode}", results)
    path = os.path.join(out_dir, f'eval_{mode}.json')
    atomic_write(path, lambda f: json.dump({'config': config, **results}, f, indent=1), mode='w')
    print(f"wrote {path}")
