"""
Evaluation, self-contained (torch, numpy, scipy; the lpips package for LPIPS):
- the FID Inception-v3 of pytorch-fid (TF-ported weights), features for FID / sFID / IS / precision-recall
  with ADM's evaluator conventions (a reference batch's stored mu/sigma, 5,000-sample IS chunks);
- reconstruction metrics of a tokenizer: rFID, PSNR, SSIM, LPIPS, codebook usage and perplexity (and, for
  rq / msvq tokenizers, usage per depth / scale), also under the conventions of LlamaGen's and FVQ's tables
  (--metric_convention);
- the VCQ entropy-cliff analysis of token sequences (t* of eq. 1-2) and the VCQ §4.4 linear probe;
- training curves of several runs (their out_dir/log.jsonl) and entropy cliffs side by side (matplotlib).

    python evaluate.py --mode=recon --ckpt=out/ckpt.pt --data_dir=/data/imagenet/val --num_images=50000
    python evaluate.py --mode=gen --samples=samples.npz --ref=VIRTUAL_imagenet256_labeled.npz
    python evaluate.py --mode=ref --data_dir=/data/imagenet/train --image_size=256 --num_images=2000000 \
        --ref_out=imagenet256_train_ref.npz
    python evaluate.py --mode=entropy --codes=out_eval/codes.npy --ckpt=out/ckpt.pt
      (recon mode writes codes.npy / labels.npy; train_ar.py's codes_dir/codes.npy works as well: one view
      per image, the centre crop, is used)
    python evaluate.py --mode=probe --codes=codes.npy --labels=labels.npy --ckpt=out/ckpt.pt --first_k=10
    python evaluate.py --mode=curves --logs=out-study-vq,out-study-fvq --entropy_dirs=eval-fvq,eval-vcq \
        --out_dir=plots

Every mode prints a short table and writes out_dir/eval_<mode>.json. Images are compared as uint8 pictures
(the reconstructions are rounded to uint8 first, as if saved to disk), like the ADM/LlamaGen evaluation code.
The file reads top-down: config, the metrics, one section per mode, the Inception network (a port to skip),
and the command line at the very end.
"""
import os
import json
import math
import time
import hashlib
import zipfile
import warnings

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from quantizers import code_usage, code_levels, flat_codes
from tokenizer import atomic_write, to_uint8, psnr

# -----------------------------------------------------------------------------
# default config; override with config files / --key=value
mode = 'gen'  # 'recon', 'gen', 'ref', 'entropy', 'probe' or 'curves'
out_dir = 'out_eval'
seed = 0
device = 'auto'  # 'auto', 'cpu', 'cuda', 'cuda:1', ...
batch_size = 50  # images per Inception / tokenizer forward
num_workers = 4  # data-loader workers (recon and ref modes)
# the FID Inception network
inception_weights = ''  # pt_inception-2015-12-05-6726825d.pth; '' = download once into the torch hub cache
# gen mode: ADM-format .npz files (arr_0: uint8 N x H x W x 3)
samples = ''
ref = ''  # ADM reference batch (its stored mu/sigma are used), or a statistics file this script wrote
ref_cache = True  # keep the reference's arr_0 features/statistics (and its stored ones) in <ref>.fid_stats.npz
is_split_size = 5000  # Inception Score over consecutive chunks of this many samples (ADM: 5,000)
pr_k = 3  # precision/recall neighbourhood size (Kynkaanniemi et al. 2019; ADM's evaluator uses 3)
pr_batch_size = 10000  # rows/columns per block of pairwise distances
# ref mode: an ADM-format reference batch of an ImageFolder (data_dir, image_size, num_images, split below)
ref_out = ''  # the .npz to write: mu, sigma, mu_s, sigma_s over all images, arr_0 a random sample of them
ref_sample_images = 10000  # images in arr_0 (ADM's reference batches: 10,000, for precision/recall)
# recon mode
ckpt = ''  # tokenizer checkpoint path (recon: the model; entropy: K for t*; probe: code vectors)
data_dir = 'from_ckpt'  # 'from_ckpt' = the tokenizer's training data_dir; '' = the built-in procedural set
image_size = 0  # 0 = the checkpoint's image_size (ref mode: required)
num_images = 50000  # the first num_images images of the dataset (center-cropped, no augmentation)
split = 'val'  # 'val': data_dir as it is (the built-in set's held-out split); 'train': the built-in set's
#               training split; 'heldout': the eval_images images train_tokenizer.py held out of its data_dir
rfid = True  # False: no Inception network (no weights needed): PSNR, SSIM, LPIPS, usage and perplexity only
lpips = True  # False: no LPIPS (no VGG / AlexNet weights needed)
lpips_random_backbone = False  # True: random trunk, nothing downloaded (tests, offline), not real LPIPS
# 'standard': RGB PSNR, SSIM (11x11 Gaussian), LPIPS-VGG; 'llamagen' / 'fvq': the conventions of those
# papers' tables (reconstruction_metrics)
metric_convention = 'standard'
save_codes = True  # recon also writes out_dir/codes.npy (N, h*w) and labels.npy for the entropy/probe modes
# entropy mode
codes = ''  # .npy of integer codes, (N, T) or (N, h, w) (raster order)
entropy_threshold = 0.1  # bits: t_cliff is the first position after which at most this much entropy is left
codebook_size = 0  # constant K for t* when there is no ckpt (0 = unknown)
codebook_sizes = ''  # .npy of K_t (T,) for t* when there is no ckpt (VCQ codes)
# probe mode
labels = ''  # .npy of integer class labels (N,)
val_codes = ''  # held-out codes/labels to evaluate on; '' = hold out probe_val_frac of codes
val_labels = ''
probe_val_frac = 0.2
first_k = 10  # the probe sees the first k tokens
probe_steps = 200  # L-BFGS iterations (full batch)
probe_weight_decay = 1e-4
# curves mode
logs = ''  # comma-separated run folders (train_tokenizer.py / train_ar.py out_dir with log.jsonl)
entropy_dirs = ''  # comma-separated out_dirs of entropy-mode runs (eval_entropy.json), on one figure
names = ''  # comma-separated legend names (default: the folder names), logs first, then entropy
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (bool, int, float, str, tuple, list, dict))]

# the pytorch-fid weights of the FID Inception network (FIDInceptionV3, at the bottom of this file)
FID_WEIGHTS_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth'
FID_WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'

# -----------------------------------------------------------------------------
# ADM's .npz image batches, read in chunks so a 50k x 256 x 256 x 3 file never sits in memory at once

def read_npy_header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def npz_image_header(path, name='arr_0'):
    """-> (N, H, W) of a uint8 N x H x W x 3 array stored as `name` in an .npz; clear errors otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image batch '{path}' does not exist")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"'{path}' is not an .npz file (expected ADM's format: arr_0, uint8 N x H x W x 3)")
    with zipfile.ZipFile(path) as zf:
        if name + '.npy' not in zf.namelist():
            raise ValueError(f"'{path}' has no '{name}' array (has {sorted(n[:-4] for n in zf.namelist())}); "
                             f"expected ADM's format: arr_0, uint8 N x H x W x 3")
        with zf.open(name + '.npy') as f:
            shape, fortran_order, dtype = read_npy_header(f)
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or shape[0] == 0:
        raise ValueError(f"'{path}' {name} is {dtype} of shape {shape}; expected uint8 N x H x W x 3 "
                         f"with N > 0 (images in [0, 255], channels last)")
    return shape[:3]


def npz_image_batches(path, batch_size, name='arr_0'):
    """Yields uint8 (b, H, W, 3) batches of the array `name` of an .npz, in order."""
    N, H, W = npz_image_header(path, name)
    with zipfile.ZipFile(path) as zf, zf.open(name + '.npy') as f:
        _, fortran_order, _ = read_npy_header(f)
        if fortran_order:  # rare: column-major data cannot be cut into rows, read it whole
            array = np.load(path)[name]
            for start in range(0, N, batch_size):
                yield np.ascontiguousarray(array[start:start + batch_size])
            return
        image_bytes = H * W * 3
        for start in range(0, N, batch_size):
            b = min(batch_size, N - start)
            data = f.read(b * image_bytes)
            if len(data) != b * image_bytes:
                raise ValueError(f"'{path}' is truncated: {name} ends before image "
                                 f"{start + len(data) // image_bytes}")
            yield np.frombuffer(data, dtype=np.uint8).reshape(b, H, W, 3)

# -----------------------------------------------------------------------------
# Inception features of images and of ADM reference batches (the reference statistics are cached)

def load_inception(weights_path, device):
    """The FID Inception in eval mode with the pytorch-fid weights (strict key/shape match)."""
    if weights_path == '':
        weights_path = os.path.join(torch.hub.get_dir(), 'checkpoints', FID_WEIGHTS_FILE)
        if not os.path.isfile(weights_path):
            print(f"downloading the FID Inception weights to {weights_path}")
            try:
                torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, progress=True, map_location='cpu')
            except Exception as e:
                raise RuntimeError(
                    f"could not download the FID Inception weights from {FID_WEIGHTS_URL} "
                    f"({type(e).__name__}: {e}). Download {FID_WEIGHTS_FILE} on a machine with internet "
                    f"access and put it at {weights_path}, or pass --inception_weights=/path/to/"
                    f"{FID_WEIGHTS_FILE}") from None
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(
            f"FID Inception weights file '{weights_path}' does not exist. Get {FID_WEIGHTS_FILE} from "
            f"{FID_WEIGHTS_URL} and pass its path with --inception_weights=..., or leave "
            f"inception_weights='' to download it into {os.path.join(torch.hub.get_dir(), 'checkpoints')}")
    state_dict = torch.load(weights_path, map_location='cpu', weights_only=True)
    model = FIDInceptionV3()
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"'{weights_path}' is not the pytorch-fid FID Inception weights file "
                           f"({FID_WEIGHTS_FILE}): {e}") from None
    return model.to(device).float().eval()


def weights_fingerprint(model):
    """sha256 of all parameters and buffers: cached reference features are only valid for the same network."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def inception_forward(model, images_uint8, device):
    """uint8 images (B, H, W, 3) numpy -> (pool3 features (B, 2048), spatial features (B, 2023),
    logits (B, 1008)), float32 numpy."""
    x = torch.from_numpy(np.array(images_uint8)).to(device).permute(0, 3, 1, 2).float() / 255.0
    return tuple(t.cpu().numpy() for t in model(x))


def npz_inception_features(model, path, batch_size, device, desc):
    """-> pool3 features (N, 2048), spatial features (N, 2023), logits (N, 1008) of all images of an ADM .npz."""
    N, H, W = npz_image_header(path)
    outputs = [inception_forward(model, batch, device) for batch in
               tqdm(npz_image_batches(path, batch_size), total=math.ceil(N / batch_size), desc=desc)]
    return tuple(np.concatenate(parts) for parts in zip(*outputs))


def stored_statistics(path):
    """ADM's read_statistics: the mu / sigma (and the spatial mu_s / sigma_s) an .npz carries, or None. ADM's
    reference batches hold them over the whole training set, while arr_0 is a 10,000-image sample for
    precision/recall; statistics recomputed from that sample would bias FID upward."""
    with np.load(path) as data:
        if 'mu' not in data.files:
            return None
        stats = {'mu': data['mu'], 'sigma': data['sigma']}
        if 'mu_s' in data.files:
            stats.update(mu_s=data['mu_s'], sigma_s=data['sigma_s'])
        return stats


def reference_image_size(ref_path):
    """(H, W) of a reference batch: its arr_0 images, or the size recorded in a statistics file of ours."""
    if not (os.path.isfile(ref_path) and zipfile.is_zipfile(ref_path)):
        return None  # reference_statistics gives the error
    with zipfile.ZipFile(ref_path) as zf:
        names = zf.namelist()
    if 'arr_0.npy' in names:
        return npz_image_header(ref_path)[1:]
    if 'image_shape.npy' in names:
        with np.load(ref_path) as data:
            return tuple(int(x) for x in data['image_shape'])
    return None


def arr0_statistics(config, model, dev, fingerprint, stored):
    """-> {features, mu, sigma, mu_s, sigma_s} of the reference batch's arr_0 images with this network,
    from the cache next to the reference file when it matches this network and file; a cache written here
    also keeps the file's stored statistics (stored_statistics' result, or None)."""
    ref_path = config['ref']
    stat = os.stat(ref_path)
    source = f"{os.path.abspath(ref_path)}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_path = (ref_path[:-4] if ref_path.endswith('.npz') else ref_path) + '.fid_stats.npz'
    keys = ('features', 'mu', 'sigma', 'mu_s', 'sigma_s')
    if config['ref_cache'] and os.path.isfile(cache_path):
        with np.load(cache_path) as cache:
            if (str(cache['weights_fingerprint']) == fingerprint and str(cache['source']) == source
                    and all(k in cache.files for k in keys)):
                print(f"reference features from cache {cache_path}")
                return {k: cache[k] for k in keys}
        print(f"cache {cache_path} is for another network, reference file or version; recomputing")
    features, spatial, _ = npz_inception_features(model, ref_path, config['batch_size'], dev, 'reference')
    (mu, sigma), (mu_s, sigma_s) = feature_statistics(features), feature_statistics(spatial)
    result = dict(features=features, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    if config['ref_cache']:
        try:
            image_shape = np.array(npz_image_header(ref_path)[1:])
            # the reference's stored statistics go along, so that the cache used as --ref gives the same FID
            kept = {f'stored_{k}': v for k, v in (stored or {}).items()}
            atomic_write(cache_path, lambda f: np.savez(f, weights_fingerprint=fingerprint, source=source,
                                                        image_shape=image_shape, has_stored_statistics=bool(kept),
                                                        **kept, **result))
            print(f"cached the reference features in {cache_path}")
        except OSError as e:
            warnings.warn(f"could not write the reference cache {cache_path}: {e}")
    return result


def reference_statistics(config, model, dev):
    """-> {features, mu, sigma, mu_s, sigma_s, statistics}: the reference batch's arr_0 features (for
    precision/recall) and the FID / sFID statistics, the file's stored ones where it has them (ADM), else
    computed from arr_0. `statistics` says which."""
    ref_path = config['ref']
    if not os.path.isfile(ref_path):
        raise FileNotFoundError(f"reference batch '{ref_path}' does not exist")
    if not zipfile.is_zipfile(ref_path):
        raise ValueError(f"'{ref_path}' is not an .npz file (expected an ADM reference batch with arr_0)")
    fingerprint = weights_fingerprint(model)
    with np.load(ref_path) as data:
        files = data.files
        if 'arr_0' not in files and 'features' in files:  # a statistics file written by this script
            if str(data['weights_fingerprint']) != fingerprint:
                raise ValueError(f"'{ref_path}' holds features of a different Inception network than "
                                 f"'{config['inception_weights'] or FID_WEIGHTS_FILE}'")
            if 'mu_s' not in files or 'has_stored_statistics' not in files:
                raise ValueError(f"'{ref_path}' is a statistics file of an older evaluate.py (without sFID "
                                 f"statistics or the reference's stored ones); pass the reference batch it was "
                                 f"made from")
            # its arr_0 statistics, and the stored ones of the reference batch it was made from
            result = {k: data[k] for k in ('features', 'mu', 'sigma', 'mu_s', 'sigma_s')}
            stored = ({k[len('stored_'):]: data[k] for k in files if k.startswith('stored_')}
                      if data['has_stored_statistics'] else None)
        elif 'arr_0' not in files:
            raise ValueError(f"'{ref_path}' has no arr_0 images (has {', '.join(files)}); expected an ADM "
                             f"reference batch")
    if 'arr_0' in files:
        stored = stored_statistics(ref_path)
        result = arr0_statistics(config, model, dev, fingerprint, stored)
    if stored is None:
        result['statistics'] = f"computed from the {len(result['features'])} arr_0 images"
    else:
        result.update(stored)
        result['statistics'] = ('stored mu/sigma' + (' and mu_s/sigma_s' if 'mu_s' in stored else
                                                     '; sFID statistics computed from arr_0'))
    print(f"reference statistics: {result['statistics']}")
    return result

# -----------------------------------------------------------------------------
# FID, Inception Score, precision / recall

def feature_statistics(features):
    """features (N, D) -> mean (D,), covariance (D, D) with N - 1 normalisation, float64 (as pytorch-fid /
    ADM)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, D) for FID statistics, "
                         f"got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2)) between two Gaussians."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"FID statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # a singular product without a square root (e.g. a defective one from too few samples): regularise
        warnings.warn(f"FID: sqrtm of a singular product; adding {eps} to the covariance diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # the product of two PSD matrices has a real square root; a small imaginary part is round-off
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has a significant imaginary component "
                             f"(max |imag| = {np.abs(covmean.imag).max():.3g}); are the covariances valid?")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_to_statistics(features, mu, sigma):
    """FID between a feature set (N, D) and Gaussian statistics (mu (D,), sigma (D, D)). With N <= D the
    features' covariance is S1 = A^T A (A = centred features / sqrt(N - 1)), and S1 S2 has the nonzero
    eigenvalues of the N x N PSD matrix A S2 A^T: tr sqrt(S1 S2) is the sum of their square roots, exactly,
    without the D x D sqrtm (2048 x 2048 takes a minute on a 2-core CPU). Otherwise ADM's formula."""
    features = np.asarray(features, dtype=np.float64)
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if features.ndim != 2 or features.shape[1:] != mu.shape or sigma.shape != mu.shape * 2:
        raise ValueError(f"feature sizes differ: features {features.shape}, statistics mu {mu.shape} "
                         f"sigma {sigma.shape}")
    N, D = features.shape
    if N > D:
        return frechet_distance(*feature_statistics(features), mu, sigma)
    if N < 2:
        raise ValueError(f"need at least 2 feature vectors for FID statistics, got {N}")
    mean = features.mean(axis=0)
    A = (features - mean) / math.sqrt(N - 1)  # (N, D)
    eigenvalues = np.linalg.eigvalsh(A @ sigma @ A.T).clip(min=0)  # (N,); round-off below 0
    diff = mean - mu
    return float(diff @ diff + (A * A).sum() + np.trace(sigma) - 2 * np.sqrt(eigenvalues).sum())


def fid_from_features(features1, features2):
    """FID between two feature sets (N1, D), (N2, D); FID is symmetric, so the smaller set keeps its features."""
    if np.shape(features1)[1:] != np.shape(features2)[1:]:
        raise ValueError(f"feature sizes differ: {np.shape(features1)} vs {np.shape(features2)}")
    small, large = sorted((features1, features2), key=len)
    return fid_to_statistics(small, *feature_statistics(large))


def inception_score(logits, split_size=5000):
    """logits (N, C) -> (mean, std) of exp(E_x KL(p(y|x) || p(y))) over consecutive chunks of split_size
    samples (ADM: 5,000, the last chunk may be shorter), so a score at 10k and at 50k uses the same chunks."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if logits.ndim != 2 or logits.shape[0] < 1 or split_size < 1:
        raise ValueError(f"Inception Score needs (N, C) logits with N >= 1 and split_size >= 1, got "
                         f"{tuple(logits.shape)} and split_size = {split_size}")
    log_p = torch.log_softmax(logits, dim=1)  # (N, C)
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


@torch.no_grad()
def manifold_radii(features, k=3, batch_size=10000, device='cpu'):
    """features (N, D) -> (N,) squared distance of each point to its k-th nearest other point."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32, device=device)
    if x.shape[0] <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} feature vectors, "
                         f"got {x.shape[0]}")
    radii = []
    for rows in x.split(batch_size):
        nearest = None  # running k+1 smallest distances of each row (the point itself, at 0, is one of them)
        for cols in x.split(batch_size):
            d = pairwise_sq_distances(rows, cols)
            d = d if nearest is None else torch.cat([nearest, d], 1)
            nearest = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii.append(nearest[:, k])  # sorted ascending: index k is the k-th neighbour after the point itself
    return torch.cat(radii).cpu().numpy()


@torch.no_grad()
def precision_recall(ref_features, sample_features, k=3, batch_size=10000, device='cpu', ref_radii=None):
    """Improved precision / recall (Kynkaanniemi et al. 2019) as ADM's evaluator: precision = fraction of
    samples inside some reference point's k-NN ball, recall = fraction of reference points inside some
    sample's ball."""
    if np.shape(ref_features)[1] != np.shape(sample_features)[1]:
        raise ValueError(f"feature sizes differ: ref {np.shape(ref_features)}, "
                         f"samples {np.shape(sample_features)}")
    if ref_radii is None:
        ref_radii = manifold_radii(ref_features, k, batch_size, device)
    sample_radii = manifold_radii(sample_features, k, batch_size, device)
    ref = torch.as_tensor(np.asarray(ref_features), dtype=torch.float32, device=device)
    smp = torch.as_tensor(np.asarray(sample_features), dtype=torch.float32, device=device)
    ref_r = torch.as_tensor(ref_radii, dtype=torch.float32, device=device)
    smp_r = torch.as_tensor(sample_radii, dtype=torch.float32, device=device)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
    smp_in = torch.zeros(len(smp), dtype=torch.bool, device=device)
    for i in range(0, len(ref), batch_size):
        for j in range(0, len(smp), batch_size):
            d = pairwise_sq_distances(ref[i:i + batch_size], smp[j:j + batch_size])  # (r, s)
            smp_in[j:j + batch_size] |= (d <= ref_r[i:i + batch_size, None]).any(0)
            ref_in[i:i + batch_size] |= (d <= smp_r[None, j:j + batch_size]).any(1)
    return smp_in.double().mean().item(), ref_in.double().mean().item()

# -----------------------------------------------------------------------------
# reconstruction metrics on uint8-quantised images, given as float (B, 3, H, W) in [0, 1]

def gaussian_window(size=11, sigma=1.5):
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    return g / g.sum()  # (size,)


def blur_valid(t, window):
    """Separable 'valid' filter per channel: (B, C, H, W), window (n,) -> (B, C, H - n + 1, W - n + 1)."""
    C, n = t.shape[1], window.shape[0]
    t = F.conv2d(t, window.view(1, 1, n, 1).expand(C, 1, n, 1), groups=C)
    return F.conv2d(t, window.view(1, 1, 1, n).expand(C, 1, 1, n), groups=C)


def ssim(x, y, data_range=1.0, gaussian=True, window_size=11, sample_covariance=False):
    """Per-image SSIM (Wang et al. 2004) -> (B,), K1 0.01, K2 0.03, mean over the positions where the window
    fits and over the channels. Default: 11x11 Gaussian window, sigma 1.5, population (co)variances, which is
    skimage's structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    channel_axis=...): its 11-tap window (truncate 3.5) and its crop of 5 border pixels leave exactly this
    'valid' region. gaussian=False: a uniform window_size^2 window (skimage's default, 7)."""
    x, y = x.double(), y.double()
    B, C, H, W = x.shape
    if min(H, W) < window_size:
        raise ValueError(f"SSIM needs images of at least {window_size}x{window_size} pixels, got {H}x{W}")
    if gaussian:
        window = gaussian_window(window_size).to(x.device)
    else:
        window = torch.full((window_size,), 1.0 / window_size, dtype=torch.float64, device=x.device)
    # skimage's use_sample_covariance: the window's variances with n - 1 instead of n
    cov_norm = window_size ** 2 / (window_size ** 2 - 1) if sample_covariance else 1.0
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur_valid(x, window), blur_valid(y, window)
    var_x = cov_norm * (blur_valid(x * x, window) - mu_x ** 2)
    var_y = cov_norm * (blur_valid(y * y, window) - mu_y ** 2)
    cov_xy = cov_norm * (blur_valid(x * y, window) - mu_x * mu_y)
    s = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3))


def luma(x):
    """(B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) ITU-R BT.601 Y in [16/255, 235/255] (pyiqa's rgb2ycbcr)."""
    weights = torch.tensor([65.481, 128.553, 24.966], dtype=torch.float64, device=x.device)
    return ((x.double().permute(0, 2, 3, 1) @ weights + 16.0) / 255.0)[:, None]


def reconstruction_metrics(fake, real, convention='standard'):
    """Per-image PSNR and SSIM (B,) of uint8-level images (B, 3, H, W) in [0, 1] under the convention of a
    paper's table. LPIPS differs by network only: VGG, AlexNet for 'fvq' (see lpips_network)."""
    if convention == 'standard':  # RGB PSNR; SSIM of Wang et al. with its 11x11 Gaussian window
        return psnr(fake, real), ssim(fake, real)
    if convention == 'llamagen':  # LlamaGen reconstruction_vq_ddp.py: skimage PSNR, skimage SSIM defaults
        # (7x7 uniform window, sample covariance) called with data_range=2.0 on [0, 1] images
        return psnr(fake, real), ssim(fake, real, data_range=2.0, gaussian=False, window_size=7,
                                      sample_covariance=True)
    if convention == 'fvq':  # FVQ eval_fid_usage_lpips.py: pyiqa PSNR on BT.601 Y, piq.ssim(data_range=2.)
        psnr_y = 10 * torch.log10(1.0 / (((luma(fake) - luma(real)) ** 2).flatten(1).mean(1) + 1e-8))
        # piq scales the images by 1/data_range and average-pools images of >= 384 px by round(min(H, W) / 256)
        f = max(1, round(min(fake.shape[-2:]) / 256))
        if f > 1:
            fake, real = F.avg_pool2d(fake.double(), f), F.avg_pool2d(real.double(), f)
        return psnr_y, ssim(fake / 2.0, real / 2.0)
    raise ValueError(f"unknown metric_convention '{convention}' (expected 'standard', 'llamagen' or 'fvq')")


def lpips_network(convention):
    return 'alex' if convention == 'fvq' else 'vgg'  # FVQ's tables: pyiqa's LPIPS v0.1 AlexNet

# -----------------------------------------------------------------------------
# codes: usage, per-position conditional entropy (VCQ's entropy cliff), linear probe (VCQ §4.4)

def load_codes(path):
    """.npy of integer codes (N, T) or (N, h, w) -> int64 (N, T), raster order."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"codes file '{path}' does not exist")
    c = np.load(path)
    if isinstance(c, np.lib.npyio.NpzFile):
        raise ValueError(f"'{path}' is an .npz archive ({', '.join(c.files)}); codes are a single .npy array "
                         f"(N, T) or (N, h, w), e.g. the codes.npy of evaluate.py --mode=recon or "
                         f"train_ar.py")
    if not np.issubdtype(c.dtype, np.integer) or c.ndim not in (2, 3) or c.shape[0] == 0:
        raise ValueError(f"'{path}' holds {c.dtype} of shape {c.shape}; "
                         f"expected integer codes (N, T) or (N, h, w)")
    c = c.reshape(c.shape[0], -1).astype(np.int64)
    if c.min() < 0:
        raise ValueError(f"'{path}' has negative codes (min {c.min()})")
    return c


def load_labels(path, n):
    """.npy of integer class labels (N,), N = n -> int64 (N,); -1 marks an unreadable image (train_ar.py)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"labels file '{path}' does not exist")
    y = np.load(path)
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise ValueError(f"'{path}' holds {y.dtype} of shape {y.shape}; expected integer labels (N,)")
    if len(y) != n:
        raise ValueError(f"'{path}' has {len(y)} labels but the codes file has {n} sequences")
    return y.astype(np.int64)


def conditional_entropies(codes):
    """codes (N, T) -> H_t = H(x_t | x_<t) in bits, t = 1..T, of the empirical distribution of the N
    sequences. The prefixes x_<t are numbered incrementally: (prefix id, token) pairs -> np.unique -> the
    next prefix id."""
    codes = np.asarray(codes, dtype=np.int64)
    N, T = codes.shape
    K = int(codes.max()) + 1
    if N * K >= 2 ** 62:
        raise ValueError(f"N * K = {N} * {K} overflows the int64 (prefix, token) keys")
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
    """H (T,) bits, N sequences -> remaining budget R_t = log2 N - sum_{s<t} H_s (t = 1..T), VCQ's t* when
    the per-position codebook sizes K_t are known, and the empirical cliff of H."""
    H = np.asarray(H, dtype=np.float64)
    remaining = math.log2(N) - np.concatenate([[0.0], np.cumsum(H)[:-1]])
    # the entropy left after position t: sum_{s>t} H_s (t = 0..T-1); the sequences hold sum H_s in all
    left_after = np.concatenate([np.cumsum(H[::-1])[::-1][1:], [0.0]])  # exact zeros where the tail is zero
    result = {
        'num_sequences': int(N), 'seq_len': len(H), 'log2_N': math.log2(N), 'threshold_bits': threshold,
        'H_bits': H.tolist(), 'remaining_budget_bits': remaining.tolist(),
        # the empirical cliff: the first (1-based) position after which at most `threshold` bits of the
        # sequences' entropy remain. A per-position rule (the first H_t below the threshold) would put it at 0 on
        # VCQ codes, whose first positions have 2-entry codebooks (H_1 <= 1 bit) and carry little entropy.
        't_cliff': int(np.flatnonzero(left_after <= threshold)[0]) + 1,
    }
    if codebook_sizes is not None:
        result['codebook_sizes'] = np.asarray(codebook_sizes).tolist()
        # VCQ eq. (1)-(2): t* = the smallest t whose capacity sum_{s<=t} log2 K_s reaches log2 N, i.e.
        # prod_{s<=t} K_s >= N, compared in integers (float log sums miss the equality case, N = K^t); with a
        # constant K = 16384 and N = 1.28M ImageNet images, t* = 2 (the paper's figure)
        product, result['t_star'] = 1, None
        for t, K in enumerate(result['codebook_sizes'], start=1):
            product *= int(K)
            if product >= N:
                result['t_star'] = t
                break
    return result


def codes_meta(codes_path):
    """The meta.json of a train_ar.py codes folder next to the codes file, or None (e.g. recon's codes.npy)."""
    path = os.path.join(os.path.dirname(os.path.abspath(codes_path)), 'meta.json')
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        meta = json.load(f)
    return meta if 'views_per_image' in meta else None


def one_view_per_image(codes, labels, codes_path):
    """codes (M, T), labels (M,) or None -> one row per readable image. train_ar.py's codes.npy holds every
    augmented view of each image (10 adjacent rows with ten_crop) and rows of label -1 for unreadable images:
    the entropy budget log2 N and the probe's split count images, so keep the centre crop and drop label -1."""
    meta = codes_meta(codes_path)
    if meta is None:
        return codes, labels
    views = meta['views_per_image']
    # the images read (older meta.json files hold only the num_images setting, 0 for a whole ImageFolder)
    num_images = meta.get('dataset_images', len(codes) // views)
    if len(codes) != num_images * views:
        raise ValueError(f"'{codes_path}' has {len(codes)} rows, but its meta.json says {num_images} "
                         f"images x {views} views")
    if labels is None:
        labels_path = os.path.join(os.path.dirname(os.path.abspath(codes_path)), 'labels.npy')
        if not os.path.isfile(labels_path):
            raise FileNotFoundError(f"'{labels_path}' is missing: train_ar.py's labels mark the unreadable "
                                    f"images (-1) whose code rows are empty")
        labels = np.load(labels_path)
    if len(labels) != len(codes):
        raise ValueError(f"{len(labels)} labels for {len(codes)} code rows")
    center_view = meta.get('center_view', 4 if views == 10 else 0)  # TenCrop order: 4 crops, then the centre
    rows = np.arange(center_view, len(codes), views)
    rows = rows[np.asarray(labels)[rows] >= 0]
    print(f"one view per image: {len(rows)} of {len(codes)} rows (view {center_view} of {views}, "
          f"{num_images - len(rows)} unreadable images dropped)")
    return codes[rows], np.asarray(labels)[rows]


def probe_features(codes, codebook, first_k):
    """codes (N, T), codebook (K, D) -> (N, first_k * D): the code vectors of the first k tokens,
    concatenated. The VCQ paper (§4.4) does not say how the k tokens are pooled; concatenating keeps which
    position holds which code, whereas averaging would mix the coarse early tokens (VCQ's small codebooks)
    with the later ones."""
    codes = torch.as_tensor(codes[:, :first_k], dtype=torch.long)
    if codes.max() >= codebook.shape[0]:
        raise ValueError(f"codes reach {int(codes.max())} but the tokenizer's codebook has "
                         f"{codebook.shape[0]} codes")
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
        top = linear(val_x).topk(min(5, num_classes), dim=1).indices  # (N_val, 5)
        hits = top == val_y[:, None]
        return hits[:, 0].float().mean().item(), hits.any(1).float().mean().item()

# -----------------------------------------------------------------------------
# device, results file, printed table, plots

def resolve_device(name):
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name.startswith('cuda'):
        # full float32: TF32 convolutions move Inception features by ~1e-3 relative, enough to shift FID
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return name


def write_results(config, results, name):
    path = os.path.join(config['out_dir'], f'eval_{name}.json')
    atomic_write(path, lambda f: json.dump({'config': config, **results}, f, indent=1), mode='w')
    return path


def print_table(title, rows):
    print(f"\n{title}")
    for key, value in rows:
        print(f"  {key:<28} {value:.6g}" if isinstance(value, float) else f"  {key:<28} {value}")


def pyplot():
    import matplotlib
    matplotlib.use('Agg')  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def save_figure(plt, fig, path):
    fig.savefig(path, dpi=100, bbox_inches='tight')
    plt.close(fig)
    return path


def plot_entropy(runs, path):
    """runs: [(name, H (T,), entropy_cliff result)] -> one PNG of H_t and the remaining budget
    log2 N - sum_{s<t} H_s (VCQ Fig. 2a), with each run's t* of eq. (2) where its codebook sizes are known."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, (name, H, result) in enumerate(runs):
        t = np.arange(1, len(H) + 1)
        color = f'C{i}'
        ax.plot(t, H, color=color, label=f'{name}: H(x_t | x_<t)')
        ax.plot(t, result['remaining_budget_bits'], color=color, linestyle='--',
                label=f'{name}: remaining budget')
        if result.get('t_star') is not None:
            ax.axvline(result['t_star'], color=color, linestyle=':', label=f"{name}: t* = {result['t_star']}")
    ax.set_xscale('log')
    ax.set_xlabel('position t')
    ax.set_ylabel('bits')
    ax.set_title('entropy cliff: ' + ', '.join(f"{name} N = {result['num_sequences']}"
                                               for name, _, result in runs))
    ax.legend(fontsize=7)
    return save_figure(plt, fig, path)


def read_jsonl(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"'{path}' does not exist (expected a training run's log.jsonl)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

# -----------------------------------------------------------------------------
# recon mode: rFID, PSNR, SSIM, LPIPS, codebook usage and perplexity of a tokenizer on an image set

def run_recon(config):
    """rFID (reconstructions vs originals), PSNR, SSIM, LPIPS, codebook usage and perplexity."""
    from tokenizer import load_tokenizer, load_checkpoint, make_dataset, split_held_out, collate, make_lpips
    ckpt_path = config['ckpt']
    if ckpt_path == '':
        raise ValueError("recon mode needs --ckpt=<tokenizer checkpoint>")
    dev = resolve_device(config['device'])
    tokenizer = load_tokenizer(ckpt_path, map_location='cpu').to(dev).float()
    train_config = load_checkpoint(ckpt_path, 'tokenizer', mmap=True).get('config', {})
    data_dir = train_config.get('data_dir', '') if config['data_dir'] == 'from_ckpt' else config['data_dir']
    size = config['image_size'] or train_config.get('image_size', 0)
    if size <= 0:
        raise ValueError(f"'{ckpt_path}' has no config['image_size']; pass --image_size=...")
    if config['split'] not in ('val', 'train', 'heldout'):
        raise ValueError(f"split must be 'val', 'train' or 'heldout', got '{config['split']}'")
    # an ImageFolder's split is its data_dir; train only picks the built-in set's split. Never augmented here.
    dataset = make_dataset(data_dir, size, train=config['split'] == 'train', augment=False)
    if config['split'] == 'heldout':
        if data_dir == '' or train_config.get('eval_data_dir', ''):
            raise ValueError("split='heldout' is for a tokenizer that held images out of its own ImageFolder "
                             "data_dir (train_tokenizer.py with data_dir set and eval_data_dir '')")
        dataset.samples = split_held_out(dataset.samples, train_config['eval_images'])[1]
    n = min(config['num_images'], len(dataset))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)),
                                         batch_size=config['batch_size'], shuffle=False,
                                         num_workers=config['num_workers'], collate_fn=collate)
    inception = load_inception(config['inception_weights'], dev) if config['rfid'] else None
    convention = config['metric_convention']
    if convention not in ('standard', 'llamagen', 'fvq'):
        raise ValueError(f"unknown metric_convention '{convention}' (expected 'standard', 'llamagen' or 'fvq')")
    lpips_model = (make_lpips(config['lpips_random_backbone'], lpips_network(convention)).to(dev)
                   if config['lpips'] else None)
    K = tokenizer.quantizer.codebook_size
    counts, level_counts = torch.zeros(K, dtype=torch.long, device=dev), {}
    real_feats, fake_feats, psnrs, ssims, lpipses, all_codes, all_labels = [], [], [], [], [], [], []
    skipped = 0
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
            counts += torch.bincount(codes.flatten(), minlength=K)
            # multi-code quantizers: per depth / scale (the 1D tokenizer's (B, L, depth) read as a 1 x L grid)
            grid_indices = indices[:, None] if tokenizer.tokenizer_type == 'titok' else indices
            for level, level_codes in code_levels(grid_indices).items():
                level_counts.setdefault(level, torch.zeros(K, dtype=torch.long, device=dev))
                level_counts[level] += torch.bincount(level_codes.flatten(), minlength=K)
            if inception is not None:
                real_feats.append(inception(real)[0].cpu())
                fake_feats.append(inception(fake)[0].cpu())
            psnr_batch, ssim_batch = reconstruction_metrics(fake, real, convention)
            psnrs.append(psnr_batch.cpu())
            ssims.append(ssim_batch.cpu())
            if lpips_model is not None:
                lpipses.append(lpips_model(fake * 2 - 1, real * 2 - 1).flatten().cpu())
            all_codes.append(codes.cpu())
            all_labels.append(labels_batch)
    if not psnrs:
        raise ValueError(f"no readable images in '{data_dir}'")
    usage, perplexity = (x.item() for x in code_usage(counts))
    results = {'psnr': torch.cat(psnrs).mean().item(), 'ssim': torch.cat(ssims).mean().item(),
               'codebook_usage': usage, 'perplexity': perplexity, 'codebook_size': K,
               'usage_tokens': int(counts.sum()), 'num_images': int(sum(len(c) for c in all_codes)),
               'num_skipped': skipped, 'image_size': size, 'data_dir': data_dir, 'split': config['split'],
               'metric_convention': convention}
    results.update({f'codebook_usage_{level}': code_usage(c)[0].item() for level, c in level_counts.items()})
    if inception is not None:
        results['rfid'] = fid_from_features(torch.cat(fake_feats).numpy(), torch.cat(real_feats).numpy())
    if lpips_model is not None:
        results.update(lpips=torch.cat(lpipses).mean().item(), lpips_network=lpips_network(convention),
                       lpips_random_backbone=config['lpips_random_backbone'])
    if config['save_codes']:
        os.makedirs(config['out_dir'], exist_ok=True)
        codes_array = torch.cat(all_codes).numpy().astype(np.int32 if K < 2 ** 31 else np.int64)  # (N, T)
        np.save(os.path.join(config['out_dir'], 'codes.npy'), codes_array)
        np.save(os.path.join(config['out_dir'], 'labels.npy'), torch.cat(all_labels).numpy())
        results['codes_file'] = os.path.join(config['out_dir'], 'codes.npy')
    print_table(f"recon: {ckpt_path} on {data_dir or 'the built-in procedural set'} ({config['split']}) "
                f"at {size}px", list(results.items()))
    return results

# -----------------------------------------------------------------------------
# gen mode: FID, IS, precision and recall of a sample batch against a reference batch

def run_gen(config):
    """FID, sFID, IS, precision and recall of a sample batch against a reference batch (ADM's protocol)."""
    if config['samples'] == '' or config['ref'] == '':
        raise ValueError("gen mode needs --samples=<samples .npz> and --ref=<reference batch .npz>")
    # fail on a malformed samples file before the reference
    sample_size = npz_image_header(config['samples'])[1:]
    ref_size = reference_image_size(config['ref'])
    if ref_size is not None and tuple(sample_size) != tuple(ref_size):
        raise ValueError(f"the samples are {sample_size[0]}x{sample_size[1]} images but the reference "
                         f"batch's are {ref_size[0]}x{ref_size[1]}: the FID protocol compares images of one "
                         f"size (sample at the reference's resolution, or make a reference batch at the "
                         f"samples')")
    dev = resolve_device(config['device'])
    model = load_inception(config['inception_weights'], dev)
    ref = reference_statistics(config, model, dev)
    t0 = time.time()
    features, spatial, logits = npz_inception_features(model, config['samples'], config['batch_size'], dev,
                                                       'samples')
    if features.shape[1] != ref['features'].shape[1]:
        raise ValueError(f"feature sizes differ: samples {features.shape}, reference {ref['features'].shape}")
    stored = stored_statistics(config['samples']) or {}  # ADM reads a sample batch's stored statistics too
    if stored:
        print(f"sample statistics: stored {', '.join(stored)} in {config['samples']}")
    fid = (frechet_distance(stored['mu'], stored['sigma'], ref['mu'], ref['sigma']) if 'mu' in stored
           else fid_to_statistics(features, ref['mu'], ref['sigma']))
    sfid = (frechet_distance(stored['mu_s'], stored['sigma_s'], ref['mu_s'], ref['sigma_s']) if 'mu_s' in stored
            else fid_to_statistics(spatial, ref['mu_s'], ref['sigma_s']))
    is_mean, is_std = inception_score(logits, config['is_split_size'])
    precision, recall = precision_recall(ref['features'], features, config['pr_k'], config['pr_batch_size'],
                                         dev)
    results = {'fid': fid, 'sfid': sfid, 'inception_score': is_mean, 'inception_score_std': is_std,
               'precision': precision, 'recall': recall, 'num_samples': int(len(features)),
               'num_ref': int(len(ref['features'])), 'ref_statistics': ref['statistics'],
               'sample_seconds': time.time() - t0}
    print_table(f"gen: {config['samples']} vs {config['ref']}", list(results.items()))
    return results

# -----------------------------------------------------------------------------
# ref mode: an ADM-format reference batch (statistics over a whole image set + a sample of its images)

def add_moments(moments, x):
    """Running first and second moments of feature rows x (B, D), shifted by the first row against the
    cancellation of E[x x^T] - mu mu^T over a million images."""
    x = np.asarray(x, dtype=np.float64)
    if moments is None:
        moments = {'n': 0, 'shift': x[0].copy(), 'sum': np.zeros(x.shape[1]),
                   'outer': np.zeros((x.shape[1], x.shape[1]))}
    xc = x - moments['shift']
    moments['n'] += len(x)
    moments['sum'] += xc.sum(0)
    moments['outer'] += xc.T @ xc
    return moments


def moments_statistics(moments):
    """-> mean (D,), covariance (D, D) with N - 1 normalisation, as feature_statistics of all the rows."""
    n = moments['n']
    if n < 2:
        raise ValueError(f"need at least 2 images for reference statistics, got {n}")
    mean_c = moments['sum'] / n
    return moments['shift'] + mean_c, (moments['outer'] - n * np.outer(mean_c, mean_c)) / (n - 1)


def run_ref(config):
    """Writes an ADM-format reference batch of an image set: mu / sigma (pool3) and mu_s / sigma_s (sFID)
    over all its images, and arr_0, a random sample of ref_sample_images of them for precision/recall. So a
    user with ImageNet can make full-training-set statistics like ADM's VIRTUAL_imagenet256_labeled.npz."""
    from tokenizer import make_dataset, collate
    if config['ref_out'] == '':
        raise ValueError("ref mode needs --ref_out=<the reference .npz to write>")
    if config['data_dir'] == 'from_ckpt' or config['image_size'] <= 0:
        raise ValueError("ref mode needs --data_dir=<ImageFolder> ('' = the built-in procedural set) and "
                         "--image_size=<pixels> (the samples' resolution)")
    if config['split'] not in ('val', 'train'):
        raise ValueError(f"ref mode's split must be 'val' or 'train', got '{config['split']}'")
    size = config['image_size']
    # ADM's preprocessing: centre crop (BOX-halving, then BICUBIC), no augmentation
    dataset = make_dataset(config['data_dir'], size, train=config['split'] == 'train', augment=False)
    n = min(config['num_images'], len(dataset))
    k = min(config['ref_sample_images'], n)
    chosen = np.zeros(n, dtype=bool)  # the arr_0 sample, in dataset order
    chosen[torch.randperm(n, generator=torch.Generator().manual_seed(config['seed']))[:k].numpy()] = True
    out_path = config['ref_out']
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    # arr_0 goes through a memory-mapped .npy, so 10,000 256 px images never sit in host memory at once
    sample_path = out_path + '.arr_0.tmp.npy'
    sample = np.lib.format.open_memmap(sample_path, mode='w+', dtype=np.uint8, shape=(k, size, size, 3))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)),
                                         batch_size=config['batch_size'], shuffle=False,
                                         num_workers=config['num_workers'], collate_fn=list)
    dev = resolve_device(config['device'])
    model = load_inception(config['inception_weights'], dev)
    pool, spatial, position, filled, skipped = None, None, 0, 0, 0
    try:
        for batch in tqdm(loader, desc='reference'):
            # the readable images of this batch that belong to the arr_0 sample (collate keeps them in order)
            picked_rows = [bool(chosen[position + i]) for i, item in enumerate(batch) if item is not None]
            position += len(batch)
            images, _, n_skipped = collate(batch)
            skipped += n_skipped
            if len(images) == 0:
                continue
            images = to_uint8(images).permute(0, 2, 3, 1).numpy()  # (B, S, S, 3)
            features, spatial_features, _ = inception_forward(model, images, dev)
            pool, spatial = add_moments(pool, features), add_moments(spatial, spatial_features)
            picked = images[np.asarray(picked_rows, dtype=bool)]
            sample[filled:filled + len(picked)] = picked
            filled += len(picked)
        if pool is None:
            raise ValueError(f"no readable images in '{config['data_dir']}'")
        (mu, sigma), (mu_s, sigma_s) = moments_statistics(pool), moments_statistics(spatial)
        sample.flush()
        atomic_write(out_path, lambda f: np.savez(f, arr_0=sample[:filled], mu=mu, sigma=sigma, mu_s=mu_s,
                                                  sigma_s=sigma_s))
    finally:
        os.remove(sample_path)  # the memmap stays readable until it is dropped (POSIX)
    results = {'ref_out': out_path, 'num_images': pool['n'], 'num_skipped': skipped, 'arr_0_images': filled,
               'image_size': size, 'data_dir': config['data_dir'], 'split': config['split']}
    print_table(f"ref: {config['data_dir'] or 'the built-in procedural set'} at {size}px", list(results.items()))
    return results

# -----------------------------------------------------------------------------
# entropy mode: per-position conditional entropy H_t and the entropy cliff of a set of code sequences

def entropy_codebook_sizes(config, T):
    """K_t per position for VCQ's t*: from --ckpt (its VCQ schedule or constant K), --codebook_sizes (.npy of
    K_t), --codebook_size (constant K), or a train_ar.py codes folder's own record; None if unknown."""
    if config['ckpt'] != '':
        from tokenizer import load_tokenizer
        quantizer = load_tokenizer(config['ckpt']).quantizer
        if quantizer.codebook_sizes is None:
            return np.full(T, quantizer.codebook_size), config['ckpt']
        sizes, source = quantizer.codebook_sizes.numpy(), config['ckpt']
    elif config['codebook_sizes'] != '':
        if not os.path.isfile(config['codebook_sizes']):
            raise FileNotFoundError(f"codebook sizes file '{config['codebook_sizes']}' does not exist")
        sizes, source = np.load(config['codebook_sizes']), config['codebook_sizes']
        if not np.issubdtype(sizes.dtype, np.integer) or sizes.ndim != 1 or (sizes < 1).any():
            raise ValueError(f"'{source}' holds {sizes.dtype} of shape {sizes.shape}; expected positive "
                             f"integer codebook sizes K_t (T,)")
    elif config['codebook_size'] > 0:
        return np.full(T, config['codebook_size']), '--codebook_size'
    else:
        meta = codes_meta(config['codes'])
        if meta is None:
            return None, 'unknown (pass --ckpt, --codebook_sizes or --codebook_size)'
        folder = os.path.dirname(os.path.abspath(config['codes']))
        if not meta.get('vcq'):
            return np.full(T, meta['codebook_size']), os.path.join(folder, 'meta.json')
        sizes, source = np.load(os.path.join(folder, 'codebook_sizes.npy')), folder
    if len(sizes) != T:
        raise ValueError(f"the VCQ schedule of {source} has {len(sizes)} positions, the codes have {T}")
    return sizes, source


def run_entropy(config):
    """Per-position conditional entropy H_t, remaining budget, VCQ's t* (eq. 1-2; needs the codebook sizes
    K_t) and the empirical entropy cliff of a set of code sequences, one sequence per image."""
    if config['codes'] == '':
        raise ValueError("entropy mode needs --codes=<codes .npy, (N, T) or (N, h, w)>")
    c, _ = one_view_per_image(load_codes(config['codes']), None, config['codes'])
    N, T = c.shape
    codebook_sizes, sizes_source = entropy_codebook_sizes(config, T)
    if codebook_sizes is not None and (c >= codebook_sizes[None, :]).any():
        t = int(np.flatnonzero((c >= codebook_sizes[None, :]).any(0))[0])
        raise ValueError(f"codes at position {t + 1} reach {c[:, t].max()} but the codebook there has "
                         f"{int(codebook_sizes[t])} codes")
    H = conditional_entropies(c)
    results = entropy_cliff(H, N, config['entropy_threshold'], codebook_sizes)
    results['codebook_sizes_source'] = sizes_source
    os.makedirs(config['out_dir'], exist_ok=True)
    csv_path = os.path.join(config['out_dir'], 'entropy.csv')
    with open(csv_path, 'w') as f:
        f.write('t,H_t_bits,remaining_budget_bits' + (',codebook_size' if codebook_sizes is not None else '')
                + '\n')
        for t in range(T):
            row = f"{t + 1},{H[t]:.6f},{results['remaining_budget_bits'][t]:.6f}"
            f.write(row + (f",{int(codebook_sizes[t])}" if codebook_sizes is not None else '') + '\n')
    results['csv'] = csv_path
    results['png'] = plot_entropy([(config['codes'], H, results)],
                                  os.path.join(config['out_dir'], 'entropy.png'))
    shown = min(T, 8)
    print_table(f"entropy: {config['codes']} (N = {N} sequences of {T} tokens)",
                [('N (sequences)', N), ('log2 N', results['log2_N'])]
                + [(f"H_{t + 1} (bits)", float(H[t])) for t in range(shown)]
                + [('t* (VCQ eq. 1-2)', results.get('t_star', 'unknown K')), ('K_t from', sizes_source),
                   (f"t_cliff (<= {config['entropy_threshold']:g} bits left)", results['t_cliff'])])
    return results

# -----------------------------------------------------------------------------
# probe mode: VCQ §4.4's linear probe on the code vectors of the first k tokens

def run_probe(config):
    """VCQ §4.4: linear probe on the code vectors of the first k tokens -> held-out top-1 / top-5."""
    if config['codes'] == '' or config['labels'] == '':
        raise ValueError("probe mode needs --codes=<codes .npy> and --labels=<labels .npy>")
    if config['ckpt'] == '':
        raise ValueError("probe mode needs --ckpt=<tokenizer checkpoint>: the probe reads the tokens' code "
                         "vectors from its codebook (a learned embedding would not be a linear probe of the "
                         "tokens)")
    from tokenizer import load_tokenizer

    def codes_and_labels(codes_path, labels_path):
        # one view per image: with every augmented view, a probe split would put views of one image on both
        # sides of it
        c = load_codes(codes_path)
        c, y = one_view_per_image(c, load_labels(labels_path, len(c)), codes_path)
        if (y < 0).any():
            raise ValueError(f"'{labels_path}' has negative labels")
        return c, torch.as_tensor(y)

    c, y = codes_and_labels(config['codes'], config['labels'])
    if not 1 <= config['first_k'] <= c.shape[1]:
        raise ValueError(f"first_k = {config['first_k']} must be in [1, {c.shape[1]}] (the sequence length)")
    with torch.no_grad():
        codebook = load_tokenizer(config['ckpt']).quantizer.codebook().float()  # (K, D)
    x = probe_features(c, codebook, config['first_k'])
    if config['val_codes'] != '':
        val_c, val_y = codes_and_labels(config['val_codes'], config['val_labels'])
        if val_c.shape[1] != c.shape[1]:
            raise ValueError(f"val codes have {val_c.shape[1]} tokens per sequence, codes have {c.shape[1]}")
        train_x, train_y = x, y
        val_x = probe_features(val_c, codebook, config['first_k'])
    else:
        order = torch.randperm(len(c), generator=torch.Generator().manual_seed(config['seed']))
        n_val = math.ceil(config['probe_val_frac'] * len(c))
        if not 0 < n_val < len(c):
            raise ValueError(f"probe_val_frac = {config['probe_val_frac']} leaves no train or "
                             f"no val sequences")
        train_x, train_y = x[order[n_val:]], y[order[n_val:]]
        val_x, val_y = x[order[:n_val]], y[order[:n_val]]
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    dev = resolve_device(config['device'])
    top1, top5 = linear_probe(train_x, train_y, val_x, val_y, num_classes, config['probe_steps'],
                              config['probe_weight_decay'], dev)
    results = {'top1': top1, 'top5': top5, 'first_k': config['first_k'], 'feature_dim': int(x.shape[1]),
               'num_train': int(len(train_y)), 'num_val': int(len(val_y)), 'num_classes': num_classes}
    print_table(f"probe: first {config['first_k']} tokens of {config['codes']}", list(results.items()))
    return results

# -----------------------------------------------------------------------------
# curves mode: training curves of several runs (their log.jsonl) and entropy cliffs on one figure

def run_curves(config):
    """Codebook usage, held-out PSNR and reconstruction loss against iteration for several tokenizer runs
    (one PNG per metric; loss only for GPT runs), a final-value table, and the entropy cliffs of several code
    sets on one figure."""
    logs = [d for d in config['logs'].split(',') if d]
    entropy_dirs = [d for d in config['entropy_dirs'].split(',') if d]
    if not logs and not entropy_dirs:
        raise ValueError("curves mode needs --logs=<run dir>,<run dir>,... and/or "
                         "--entropy_dirs=<entropy-mode out_dir>,...")
    names = ([n for n in config['names'].split(',') if n]
             or [os.path.basename(os.path.normpath(d)) for d in logs + entropy_dirs])
    if len(names) != len(logs) + len(entropy_dirs):
        raise ValueError(f"names has {len(names)} entries for {len(logs) + len(entropy_dirs)} folders")
    os.makedirs(config['out_dir'], exist_ok=True)
    plt = pyplot()
    records = {name: read_jsonl(os.path.join(d, 'log.jsonl')) for name, d in zip(names, logs)}
    # (file name, y label, split, key): train lines every log interval, eval lines every evaluation
    metrics = [('usage', 'codebook usage (%)', 'train', 'usage'),
               ('psnr', 'held-out PSNR (dB)', 'eval', 'psnr'),
               ('rec_loss', 'reconstruction loss', 'train', 'rec'),
               ('loss', 'training loss', 'train', 'loss')]
    results, table = {'png': []}, []
    for file_name, label, split, key in metrics:
        series = {name: [(r['iter'], r[key]) for r in rows if r.get('split') == split and key in r]
                  for name, rows in records.items()}
        series = {name: points for name, points in series.items() if points}
        if not series or (key == 'loss' and any('rec' in r for rows in records.values() for r in rows)):
            continue  # nothing logged; the total loss only for GPT runs (tokenizers: usage, PSNR, rec)
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for name, points in series.items():
            x, y = zip(*points)
            ax.plot(x, [100 * v for v in y] if key == 'usage' else y, label=name)
        if key == 'usage':
            ax.set_ylim(0, 102)
        ax.set_xlabel('iteration')
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        results['png'].append(save_figure(plt, fig, os.path.join(config['out_dir'], f'{file_name}.png')))
    for name, rows in records.items():
        train = [r for r in rows if r.get('split') == 'train']
        evals = [r for r in rows if r.get('split') == 'eval']
        final = {'iter': rows[-1]['iter'] if rows else 0}
        if train:
            final.update({k: train[-1][k] for k in ('usage', 'usage_tokens', 'rec', 'loss')
                          if k in train[-1]})
        if evals:
            final.update({f'eval_{k}': evals[-1][k] for k in ('psnr', 'usage', 'usage_tokens')
                          if k in evals[-1]})
        results[name] = final
        table.append((name, ', '.join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in final.items())))
    if entropy_dirs:
        runs = []
        for name, d in zip(names[len(logs):], entropy_dirs):
            with open(os.path.join(d, 'eval_entropy.json')) as f:
                result = json.load(f)
            runs.append((name, np.asarray(result['H_bits']), result))
            table.append((name, f"N {result['num_sequences']}, log2 N {result['log2_N']:.2f}, "
                                f"t* (eq. 2) {result.get('t_star')}, t_cliff {result.get('t_cliff')}, H_1..4 "
                                + ' '.join(f'{h:.2f}' for h in result['H_bits'][:4])))
        results['png'].append(plot_entropy(runs, os.path.join(config['out_dir'], 'entropy_cliff.png')))
    print_table('final values', table)
    return results

# -----------------------------------------------------------------------------
# faithful port of pytorch-fid's network; no need to read

class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (TF's eps 1e-3) -> ReLU."""
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
    """Mixed_5b-5d at 35x35: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""
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
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(tf_avg_pool_3x3(x))
        return torch.cat([b1, b5, b3, bp], 1)  # (B, 224 + pool_features, 35, 35)


class InceptionB(nn.Module):
    """Mixed_6a: 35x35 -> 17x17 by stride-2 convs and a max pool."""
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)  # (B, 768, 17, 17)


class InceptionC(nn.Module):
    """Mixed_6b-6e at 17x17 with factorised 1x7 / 7x1 convolutions."""
    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(bd))))
        bp = self.branch_pool(tf_avg_pool_3x3(x))
        return torch.cat([b1, b7, bd, bp], 1)  # (B, 768, 17, 17)


class InceptionD(nn.Module):
    """Mixed_7a: 17x17 -> 8x8."""
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
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)  # (B, 1280, 8, 8)


class InceptionE(nn.Module):
    """Mixed_7b / 7c at 8x8 with split 1x3 / 3x1 branches. The TF graph's Mixed_7c pools with a 3x3 max pool
    (stride 1) where Mixed_7b averages; the ported weights were trained with that, so keep it."""
    def __init__(self, in_channels, max_pool):
        super().__init__()
        self.max_pool = max_pool
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
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else tf_avg_pool_3x3(x)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)  # (B, 2048, 8, 8)


class FIDInceptionV3(nn.Module):
    """images (B, 3, H, W) in [0, 1] -> (pool3 features (B, 2048), sFID's spatial features (B, 2023),
    logits (B, 1008)). torchvision's
    Inception-v3 layout and parameter names, 1008 classes, TF's pooling in the Mixed blocks and TF's BatchNorm
    eps, so the ported weights file loads with strict=True."""
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # 1008 ImageNet-2012 + extra classes of the 2015 TF graph

    def forward(self, images):
        x = F.interpolate(images, size=(299, 299), mode='bilinear', align_corners=False)
        x = 2 * x - 1  # the TF graph's input range
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
        x = self.Mixed_6e(x)
        x = self.Mixed_7a(x)  # (B, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (B, 2048, 8, 8)
        features = x.mean(dim=(2, 3))  # (B, 2048) pool3
        # The Inception Score of improved-GAN / ADM / torch-fidelity ('logits_unbiased') takes the softmax of
        # pool3 @ W, without the fc bias: keep that convention so IS values are comparable with the papers'.
        logits = features @ self.fc.weight.t()  # (B, 1008)
        return features, spatial, logits

# -----------------------------------------------------------------------------
# command line: python evaluate.py [config files] --key=value ...

if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    config = {k: globals()[k] for k in config_keys}
    print(config)
    runs = {'recon': run_recon, 'gen': run_gen, 'ref': run_ref, 'entropy': run_entropy, 'probe': run_probe,
            'curves': run_curves}
    if mode not in runs:
        raise ValueError(f"unknown mode '{mode}' (expected one of {', '.join(runs)})")
    torch.manual_seed(seed)
    results = runs[mode](config)
    print(f"wrote {write_results(config, results, mode)}")
