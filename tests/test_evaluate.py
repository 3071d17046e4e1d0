import ast
import json
import math
import os
import re
import runpy
import sys
import urllib.error

import numpy as np
import pytest
import torch

from tokenizer import CHECKPOINT_FORMAT
import torch.nn as nn

from conftest import ROOT, make_image_folder
import evaluate
from evaluate import (FIDInceptionV3, load_inception, inception_forward, inception_features, npz_images,
                      feature_statistics, frechet_distance, fid_to_statistics, fid_from_features,
                      inception_score, manifold_radii, precision_recall, ssim, reconstruction_metrics,
                      conditional_entropies, entropy_cliff, probe_features, linear_probe)

pytestmark = pytest.mark.usefixtures('one_torch_thread')  # tiny models: threads would only fight over 2 cores


def run_in_process(monkeypatch, args, script='evaluate.py'):
    """A script's command line as __main__ in this process (no interpreter and torch start-up)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, 'argv', [script, *args])
    runpy.run_path(os.path.join(ROOT, script), run_name='__main__')


def default_config(**overrides):
    return {**{k: getattr(evaluate, k) for k in evaluate.config_keys}, 'device': 'cpu', 'num_workers': 0,
            **overrides}


def read_json(path):
    with open(path) as f:
        return json.load(f)


def random_images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def save_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)

# -----------------------------------------------------------------------------
# the FID Inception network


def test_inception_state_dict_matches_the_pytorch_fid_weights_file():
    expected = {}
    with open(os.path.join(ROOT, 'tests', 'inception_keys.txt')) as f:
        for line in f:
            if not line.startswith('#'):
                key, shape = line.split(' ', 1)
                expected[key] = ast.literal_eval(shape)
    got = {k: tuple(v.shape) for k, v in FIDInceptionV3().state_dict().items()}
    assert len(expected) == 566 and expected['fc.weight'] == (1008, 2048)
    assert 'Mixed_7c.branch_pool.bn.num_batches_tracked' in expected
    assert list(got) == list(expected) and got == expected


def test_inception_outputs_with_random_weights(tmp_path):
    """Loaded strictly; pool3 features, ADM's sFID features (the TF graph's mixed_6/conv = Mixed_6d's 1x1
    branch, its first 7 channels flattened channels-last) and the IS logits pool3 @ W without the fc bias;
    eval-mode BatchNorm, so images do not mix."""
    torch.manual_seed(0)
    model = FIDInceptionV3()
    for m in model.modules():  # Kaiming convs and non-trivial BatchNorm: features stay O(1) through the depth
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity='relu')
        elif isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    path = str(tmp_path / 'random_fid_inception.pth')
    torch.save(model.state_dict(), path)
    model = load_inception(path, 'cpu')
    assert not model.training
    captured = []
    model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: captured.append(out))
    images = random_images(2, 32)[:, :, :24]  # non-square: resized to 299x299 anyway
    features, spatial, logits = inception_forward(model, images, 'cpu')
    assert features.shape == (2, 2048) and spatial.shape == (2, 2023) and logits.shape == (2, 1008)
    assert features.dtype == np.float32 and np.isfinite(features).all() and features.std() > 0
    assert not np.allclose(features[0], features[1])
    assert np.array_equal(spatial, captured[0].permute(0, 2, 3, 1)[..., :7].reshape(2, -1).numpy())
    np.testing.assert_allclose(logits, features @ model.fc.weight.detach().numpy().T, rtol=1e-4, atol=1e-4)
    single = inception_forward(model, images[1:], 'cpu')[0]
    np.testing.assert_allclose(single[0], features[1], rtol=1e-4, atol=1e-5)
    torch.save({'fc.weight': torch.zeros(1008, 2048)}, tmp_path / 'bad.pth')
    np.save(tmp_path / 'array.npy', np.zeros(3))
    for other in ('bad.pth', 'array.npy', save_tokenizer(tmp_path / 'ckpt.pt')):  # pytorch-fid's file only
        with pytest.raises(ValueError, match='is not the FID Inception weights file'):
            load_inception(str(tmp_path / other), 'cpu')


@pytest.mark.parametrize('mode', ['gen', 'ref', 'recon'])
def test_inception_modes_stop_first_offline_without_the_weights(mode, tmp_path, monkeypatch):
    """Nothing in torch hub's cache and no network: each mode that needs the Inception weights stops with
    where to get and put them before it reads its inputs, and leaves no file behind."""
    def offline(*args, **kwargs):
        raise urllib.error.URLError('no network')
    hub = tmp_path / 'hub'
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(hub))
    monkeypatch.setattr(torch.hub, 'urlopen', offline)  # inside torch.hub.download_url_to_file
    args = {'gen': ['--samples=missing.npz', '--ref=missing.npz'],  # the check comes before these are read
            'ref': ['--data_dir=', '--image_size=32', f'--ref_out={tmp_path / "ref.npz"}'],
            'recon': ['--ckpt=missing.pt']}[mode]
    cached = re.escape(str(hub / 'checkpoints' / evaluate.FID_WEIGHTS))
    with pytest.raises(FileNotFoundError, match=re.escape(evaluate.FID_WEIGHTS_URL) + '.*' + cached):
        run_in_process(monkeypatch, [f'--mode={mode}', f'--out_dir={tmp_path / "out"}', *args])
    assert [str(p.relative_to(tmp_path)) for p in tmp_path.rglob('*')] == ['hub', 'hub/checkpoints']


class LinearInception(nn.Module):
    """FIDInceptionV3's three outputs, smaller, as a fixed random linear map of 32x32 images: the modes'
    statistics without the network's CPU cost (the network is tested above)."""
    def __init__(self):
        super().__init__()
        self.register_buffer('proj', torch.randn(3 * 32 * 32, 64 + 48 + 16,
                                                 generator=torch.Generator().manual_seed(0)) / 50)

    def forward(self, images):  # -> pool3 (B, 64), spatial (B, 48), logits (B, 16)
        out = images.flatten(1) @ self.proj
        return out[:, :64], out[:, 64:112], out[:, 112:]


@pytest.fixture
def linear_inception(monkeypatch):
    model = LinearInception()
    monkeypatch.setattr(evaluate, 'load_inception', lambda path, device: model)
    return model

# -----------------------------------------------------------------------------
# FID, IS, precision / recall


def test_fid_closed_form_diagonal_and_rotated():
    rng = np.random.default_rng(0)
    D = 16
    mu1, mu2 = rng.normal(size=D), rng.normal(size=D)
    a, b = rng.uniform(0.1, 3.0, D), rng.uniform(0.1, 3.0, D)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert abs(got - expected) <= 1e-6 * expected
    Q, _ = np.linalg.qr(rng.normal(size=(D, D)))  # same rotation of both Gaussians: same distance
    got = frechet_distance(Q @ mu1, Q @ np.diag(a) @ Q.T, Q @ mu2, Q @ np.diag(b) @ Q.T)
    assert abs(got - expected) <= 1e-6 * expected
    assert abs(frechet_distance(mu1, np.diag(a), mu1, np.diag(a))) < 1e-8


def test_fid_statistics_and_the_1d_closed_form():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 4)) * [1, 2, 3, 4] + 1.0
    y = rng.normal(size=(400, 4))
    mu, sigma = feature_statistics(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(sigma, (x - x.mean(0)).T @ (x - x.mean(0)) / 499)  # N - 1
    # 1-D features: the Frechet distance of two Gaussians is (m1 - m2)^2 + (s1 - s2)^2
    fid_1d = frechet_distance(*feature_statistics(x[:, :1]), *feature_statistics(y[:, :1]))
    expected = (x[:, 0].mean() - y[:, 0].mean()) ** 2 + (x[:, 0].std(ddof=1) - y[:, 0].std(ddof=1)) ** 2
    assert abs(fid_1d - expected) <= 1e-9 * expected
    with pytest.raises(ValueError, match='at least 2 images'):
        feature_statistics(x[:1])


def test_fid_from_few_features_is_computed_exactly_in_their_span():
    rng = np.random.default_rng(2)
    D = 48
    x = rng.normal(size=(9, D)) * rng.uniform(0.5, 2.0, D)
    y = rng.normal(size=(12, D)) + 0.3
    full = frechet_distance(*feature_statistics(x), *feature_statistics(y))  # D x D sqrtm
    assert abs(fid_from_features(x, y) - full) <= 1e-7 * full
    many = rng.normal(size=(60, D))  # the smaller set's features against the larger set's statistics
    full = frechet_distance(*feature_statistics(many), *feature_statistics(y))
    assert abs(fid_from_features(many, y) - full) <= 1e-7 * full
    assert abs(fid_from_features(y, many) - full) <= 1e-7 * full
    huge = rng.normal(size=(60, 8))  # N > D on both sides: ADM's sqrtm path
    assert fid_from_features(huge, huge[:30] + 1) == frechet_distance(*feature_statistics(huge[:30] + 1),
                                                                      *feature_statistics(huge))


def test_fid_singular_retry_and_errors():
    d = np.array([1.0, 2.0])
    nilpotent = np.array([[0.0, 1.0], [0.0, 0.0]])  # sigma1 @ sigma2 has no square root: sqrtm gives inf/nan
    with pytest.warns(UserWarning, match='singular'):
        got = frechet_distance(d, nilpotent, np.zeros(2), np.eye(2))
    # retried on (S1 + eps I)(I + eps I) = (1 + eps) [[eps, 1], [0, eps]], whose square root has trace
    # 2 sqrt(eps (1 + eps)); the traces of S1 and S2 are 0 and 2
    eps = 1e-6
    assert abs(got - (5.0 + 2.0 - 4 * math.sqrt(eps * (1 + eps)))) < 1e-9
    with pytest.raises(ValueError, match='imaginary'):
        frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))  # not a covariance


def test_inception_score_closed_forms():
    C, N = 8, 160
    peaked = np.full((N, 1008), -60.0)
    peaked[np.arange(N), np.arange(N) % C] = 60.0  # each split holds every one of the C classes equally often
    mean, std = inception_score(peaked, split_size=16)
    assert abs(mean - C) < 1e-9 and std < 1e-9
    same = np.tile(np.random.default_rng(0).normal(size=(1, 1008)), (N, 1))  # p(y|x) = p(y): IS = 1
    assert abs(inception_score(same, split_size=16)[0] - 1.0) < 1e-12
    # two classes, p(y|x) = (q, 1-q) or (1-q, q) half the time each: KL = log 2 - H(q)
    q = 0.8
    logits = np.full((N, 1008), -np.inf)  # classes 2.. have probability 0 exactly
    logits[0::2, 0], logits[0::2, 1] = np.log(q), np.log(1 - q)
    logits[1::2, 0], logits[1::2, 1] = np.log(1 - q), np.log(q)
    expected = math.exp(math.log(2) + q * math.log(q) + (1 - q) * math.log(1 - q))
    assert abs(inception_score(logits, split_size=16)[0] - expected) < 1e-12


def adm_inception_score(logits, split_size=5000):
    """A direct transcription of ADM's compute_inception_score on softmax(pool3 @ W) (float64 here)."""
    preds = np.exp(logits - logits.max(1, keepdims=True))
    preds /= preds.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def test_inception_score_uses_adm_5000_sample_chunks():
    logits = np.random.default_rng(0).normal(size=(12000, 64)) * 3  # chunks of 5000, 5000 and 2000
    got, std = inception_score(logits)
    assert abs(got - adm_inception_score(logits)) < 1e-9 and std > 0
    # the first 10k samples are scored on the same two chunks whatever N is
    assert abs(inception_score(logits[:10000])[0] - adm_inception_score(logits[:10000])) < 1e-9


def test_precision_recall_constructed_sets():
    # 1-D points. Reference {0,1,2,3}: 3rd-neighbour squared radii 9, 4, 4, 9.
    # Samples: a tight cluster {0, .1, .2, .3} (radii .09, .04, .04, .09) and a far one at 10 (7 from ref 3).
    ref = np.array([[0.0], [1.0], [2.0], [3.0]])
    samples = np.array([[0.0], [0.1], [0.2], [0.3], [10.0], [10.1], [10.2], [10.3]])
    np.testing.assert_allclose(manifold_radii(torch.tensor(ref), k=3), [9, 4, 4, 9], rtol=1e-6)
    # float32 |a|^2 - 2ab + |b|^2 (ADM's form): ~1e-5 absolute error at |x| = 10
    np.testing.assert_allclose(manifold_radii(torch.tensor(samples, dtype=torch.float32), k=3),
                               [.09, .04, .04, .09] * 2, rtol=1e-3)
    precision, recall = precision_recall(ref, samples, k=3)
    assert precision == 0.5  # the near cluster is inside the reference balls, the far one is not
    assert recall == 0.25  # only reference point 0 is inside a sample ball (sample 0 itself)
    assert precision_recall(ref, samples, k=3, batch_size=3) == (precision, recall)  # blocked: the same
    with pytest.raises(ValueError, match='more than 3 images, got 3'):
        precision_recall(ref[:3], samples)


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(37, 5)).astype(np.float32)
    samples = (rng.normal(size=(23, 5)) * 0.8 + 0.7).astype(np.float32)

    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, 3]
    d = ((ref[:, None] - samples[None]) ** 2).sum(-1)  # (37, 23)
    expected_precision = (d <= radii(ref)[:, None]).any(0).mean()
    expected_recall = (d <= radii(samples)[None, :]).any(1).mean()
    assert 0 < expected_precision < 1 and 0 < expected_recall < 1
    got = precision_recall(ref, samples, k=3, batch_size=8)
    assert got == pytest.approx((expected_precision, expected_recall), abs=1e-12)

# -----------------------------------------------------------------------------
# reconstruction metrics


def test_ssim_closed_forms():
    x = torch.rand(2, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    # constant images a and b: the variance terms are c2 / c2, SSIM = (2ab + c1) / (a^2 + b^2 + c1)
    a, b, c1 = 0.2, 0.7, 0.01 ** 2
    got = ssim(torch.full((1, 3, 12, 12), a, dtype=torch.float64),
               torch.full((1, 3, 12, 12), b, dtype=torch.float64))
    assert abs(got.item() - (2 * a * b + c1) / (a * a + b * b + c1)) < 1e-9
    s = ssim(x, x + 0.25)  # contrast / structure terms 1, the luminance term below 1
    assert (s < 1).all() and (s > 0.5).all()


def image_pair(size, seed=0):
    """A fixed image pair on uint8 levels, (1, 3, size, size) in [0, 1]: an image and a noisy copy."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (1, 3, size, size))
    y = np.clip(x + rng.integers(-40, 41, x.shape), 0, 255)
    return torch.from_numpy(x / 255.0), torch.from_numpy(y / 255.0)


def skimage_ssim(x, y, data_range):
    """skimage.metrics.structural_similarity defaults (7x7 uniform_filter, use_sample_covariance, K1 0.01,
    K2 0.03) per channel of (H, W, C) images, mean over the crop of 3 border pixels, then over channels."""
    from scipy.ndimage import uniform_filter
    scores = []
    for c in range(x.shape[-1]):
        a, b = x[..., c], y[..., c]
        ux, uy = uniform_filter(a, size=7), uniform_filter(b, size=7)
        cov_norm = 49 / 48
        vx = cov_norm * (uniform_filter(a * a, size=7) - ux * ux)
        vy = cov_norm * (uniform_filter(b * b, size=7) - uy * uy)
        vxy = cov_norm * (uniform_filter(a * b, size=7) - ux * uy)
        c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
        scores.append(s[3:-3, 3:-3].mean())
    return float(np.mean(scores))


def piq_ssim(x, y, data_range=2.0):
    """piq.ssim(x, y, data_range) on (C, H, W) images: x / data_range, average pool by
    max(1, round(min(H, W) / 256)), a 2D 11x11 Gaussian (sigma 1.5) 'valid' filter, K1 0.01, K2 0.03."""
    from scipy.signal import correlate2d
    x, y = x / data_range, y / data_range
    f = max(1, round(min(x.shape[-2:]) / 256))
    if f > 1:
        pool = lambda t: t.reshape(t.shape[0], t.shape[1] // f, f, t.shape[2] // f, f).mean(axis=(2, 4))
        x, y = pool(x), pool(y)
    coords = np.arange(11) - 5.0
    g = np.exp(-(coords[None, :] ** 2 + coords[:, None] ** 2) / (2 * 1.5 ** 2))
    g /= g.sum()
    blur = lambda t: correlate2d(t, g, mode='valid')
    scores = []
    for a, b in zip(x, y):
        mx, my = blur(a), blur(b)
        sxx, syy, sxy = blur(a * a) - mx ** 2, blur(b * b) - my ** 2, blur(a * b) - mx * my
        cs = (2 * sxy + 0.03 ** 2) / (sxx + syy + 0.03 ** 2)
        scores.append((((2 * mx * my + 0.01 ** 2) / (mx ** 2 + my ** 2 + 0.01 ** 2)) * cs).mean())
    return float(np.mean(scores))


def test_metric_conventions_match_the_reference_formulas():
    x, y = image_pair(32)
    hwc = lambda t: t[0].permute(1, 2, 0).numpy()
    # standard: RGB PSNR (data range 1) and the Gaussian SSIM
    psnr_value, ssim_value = reconstruction_metrics(y, x, 'standard')
    mse = ((hwc(x) - hwc(y)) ** 2).mean()
    assert psnr_value.item() == pytest.approx(10 * math.log10(1 / mse), rel=1e-12)
    assert ssim_value.item() == pytest.approx(ssim(y, x).item(), rel=1e-12)
    # llamagen: skimage PSNR (float images in [0, 1]: data range 1) and skimage SSIM with data_range=2.0
    psnr_value, ssim_value = reconstruction_metrics(y, x, 'llamagen')
    assert psnr_value.item() == pytest.approx(10 * math.log10(1 / mse), rel=1e-12)
    assert ssim_value.item() == pytest.approx(skimage_ssim(hwc(y), hwc(x), 2.0), rel=1e-9)
    assert abs(ssim_value.item() - reconstruction_metrics(y, x, 'standard')[1].item()) > 1e-3
    # fvq: pyiqa PSNR on the BT.601 Y channel, piq.ssim(data_range=2.)
    psnr_value, ssim_value = reconstruction_metrics(y, x, 'fvq')
    luma = lambda t: (hwc(t) @ np.array([65.481, 128.553, 24.966]) + 16.0) / 255.0
    expected_psnr_y = 10 * math.log10(1 / (((luma(y) - luma(x)) ** 2).mean() + 1e-8))
    assert psnr_value.item() == pytest.approx(expected_psnr_y, rel=1e-12)
    assert ssim_value.item() == pytest.approx(piq_ssim(y[0].numpy(), x[0].numpy()), rel=1e-9)
    # piq averages 2x2 pixels of a 512 px image first
    big_x, big_y = image_pair(512, seed=1)
    assert reconstruction_metrics(big_y, big_x, 'fvq')[1].item() == pytest.approx(
        piq_ssim(big_y[0].numpy(), big_x[0].numpy()), rel=1e-9)

# -----------------------------------------------------------------------------
# code sequences: conditional entropy, entropy cliff, probe


def test_conditional_entropy_exact_small_case():
    codes = np.array([[0, 0, 5], [0, 1, 5], [0, 2, 5], [1, 0, 5]])
    H = conditional_entropies(codes)
    h1 = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))  # first token 0 three times, 1 once
    h2 = 0.75 * math.log2(3)  # after a 0: uniform over 3 tokens; after a 1: determined
    np.testing.assert_allclose(H, [h1, h2, 0.0], atol=1e-12)
    assert abs(H.sum() - 2.0) < 1e-12  # chain rule: all 4 sequences distinct -> log2 N
    result = entropy_cliff(H, N=4, threshold=0.1)
    np.testing.assert_allclose(result['remaining_budget_bits'], [2.0, 2.0 - h1, 0.0], atol=1e-12)
    # after position 2 no entropy is left; without codebook sizes there is no t*
    assert result['t_cliff'] == 2 and 't_star' not in result


def test_conditional_entropy_uniform_tokens_and_deterministic_tail():
    rng = np.random.default_rng(0)
    N, K, T = 4096, 16, 12
    codes = rng.integers(0, K, (N, T))
    codes[:, 8:] = (codes[:, :1] * 7 + 3) % K  # positions 9..12 are a function of the first token
    assert len(np.unique(codes, axis=0)) == N  # 16^8 prefixes: no two sequences coincide (for this seed)
    H = conditional_entropies(codes)
    assert abs(H[0] - math.log2(K)) < 0.01  # plug-in bias ~ (K - 1) / (2 N ln 2) = 0.003 bit
    assert abs(H.sum() - math.log2(N)) < 1e-9  # all sequences distinct: the budget log2 N is used up exactly
    assert (H[8:] == 0).all()
    assert H[4] < 0.5  # 16^4 = 65536 prefixes for 4096 sequences: mostly unique already
    # fewer sequences than codes: H_1 ~ log2 N (up to collisions), not log2 K
    few = rng.integers(0, 4096, (64, 3))
    H_few = conditional_entropies(few)
    assert 5.9 < H_few[0] <= 6.0 and H_few[1:].max() < 0.1
    cliff = entropy_cliff(H_few, N=64, threshold=0.1, codebook_sizes=np.full(3, 4096))
    assert cliff['t_star'] == 1  # 12 bits of capacity >= 6 bits of budget
    assert cliff['t_cliff'] == 1  # H_2 + H_3 = 1/32 bit (one collision among 64 first tokens)


def test_entropy_cliff_with_a_growing_codebook():
    H = np.array([1.0, 1.0, 2.0, 0.05, 0.0])
    result = entropy_cliff(H, N=16, threshold=0.1, codebook_sizes=np.array([2, 2, 4, 8, 8]))
    assert result['t_star'] == 3  # capacity 1, 2, 4 bits: reaches log2 16 = 4 at t = 3
    assert result['t_cliff'] == 3  # 0.05 bit is left after position 3
    assert entropy_cliff(np.array([3.0, 3.0]), N=64)['t_cliff'] == 2  # the budget is never exhausted early
    # VCQ codes: a 2-entry first codebook used unevenly has H_1 < 0.1 bit; the cliff is still found where the
    # entropy runs out, not at position 0 as "the position before the first H_t < 0.1" would put it
    vcq_H = np.array([0.05, 0.9, 2.5, 4.0, 2.55, 0.0, 0.0])
    assert entropy_cliff(vcq_H, N=1024, threshold=0.1)['t_cliff'] == 5


def test_t_star_of_a_vcq_schedule_follows_equations_1_and_2():
    from quantizers import codebook_size_schedule
    N = 1281167  # ImageNet-1k training images
    for kind, k_max in (('linear', 16384), ('cosine', 16384), ('cosine', 11264), ('power', 16384)):
        sizes = np.asarray(codebook_size_schedule(kind, 2, k_max, 256)).reshape(-1)
        capacity, expected = 0.0, None
        for t, k in enumerate(sizes, start=1):  # eq. (2): C(t) = sum_{s<=t} log2 K_s, t* = min C(t) >= log2 N
            capacity += math.log2(k)
            if capacity >= math.log2(N):
                expected = t
                break
        result = entropy_cliff(np.zeros(256), N, codebook_sizes=sizes)
        assert result['t_star'] == expected, kind
        assert result['t_star'] > 2  # small early codebooks push t* past the constant-K value
    constant = entropy_cliff(np.zeros(256), N, codebook_sizes=np.full(256, 16384))
    assert constant['t_star'] == 2  # 14 bits per token, log2 N = 20.3 bits: the paper's t* = 2
    # the equality case N = prod K_s reaches the budget, where float sums of log2 K_s can fall ulps short
    assert entropy_cliff(np.zeros(3), 17 ** 3, codebook_sizes=[17, 17, 17])['t_star'] == 3
    assert entropy_cliff(np.zeros(8), 3 ** 5, codebook_sizes=[3] * 8)['t_star'] == 5
    assert entropy_cliff(np.zeros(8), 3 ** 5 + 1, codebook_sizes=[3] * 8)['t_star'] == 6


def test_linear_probe_separates_a_separable_case_and_not_random_labels():
    g = torch.Generator().manual_seed(0)
    C, N, T, D = 4, 400, 6, 8
    codebook = torch.randn(16, D, generator=g)
    labels = torch.arange(N) % C
    codes = torch.randint(0, 16, (N, T), generator=g)
    codes[:, 1] = labels  # the class is written in the 2nd token; the rest is noise
    x = probe_features(codes.numpy(), codebook, first_k=3)
    assert x.shape == (N, 3 * D)
    torch.testing.assert_close(x[:, D:2 * D], codebook[labels])
    top1, top5 = linear_probe(x[:300], labels[:300], x[300:], labels[300:], C, steps=100)
    assert top1 == 1.0 and top5 == 1.0
    shuffled = labels[torch.randperm(N, generator=g)]  # labels unrelated to the codes: chance level
    top1, _ = linear_probe(x[:300], shuffled[:300], x[300:], shuffled[300:], C, steps=100)
    assert top1 < 0.45
    with pytest.raises(ValueError, match='codebook has 16'):
        probe_features(np.full((2, 3), 16), codebook, first_k=2)
    with pytest.raises(ValueError, match='at least 2 training sequences, got 1'):  # its features' std is NaN
        linear_probe(x[:1], labels[:1], x[300:], labels[300:], C)

# -----------------------------------------------------------------------------
# gen and ref modes (ADM's protocol), with LinearInception in place of the network


def test_npz_images_rejects_other_files(tmp_path):
    images = random_images(3, 8)
    assert np.array_equal(npz_images(save_npz(tmp_path / 'ok.npz', arr_0=images, arr_1=np.arange(3))), images)
    for name, arrays in (('float', {'arr_0': images.astype(np.float32)}), ('gray', {'arr_0': images[..., 0]}),
                         ('named', {'images': images}), ('empty', {'arr_0': images[:0]})):
        with pytest.raises(ValueError, match="no arr_0 of uint8 images N x H x W x 3"):
            npz_images(save_npz(tmp_path / f'{name}.npz', **arrays))
    np.save(tmp_path / 'plain.npy', images)
    with pytest.raises(ValueError, match="ADM's .npz format"):
        npz_images(str(tmp_path / 'plain.npy'))
    with pytest.raises(FileNotFoundError):
        npz_images(str(tmp_path / 'missing.npz'))


def test_gen_mode_follows_adm(tmp_path, linear_inception):
    """FID / sFID of the samples' features against the reference's arr_0 statistics (exact, few features),
    ADM's stored mu/sigma (mu_s/sigma_s) instead where the reference batch has them, IS of the logits and
    precision/recall against arr_0."""
    ref_images, sample_images = random_images(6, seed=1), random_images(5, seed=2)
    ref = save_npz(tmp_path / 'ref.npz', arr_0=ref_images)
    samples = save_npz(tmp_path / 'samples.npz', arr_0=sample_images)
    config = default_config(ref=ref, samples=samples, batch_size=4, out_dir=str(tmp_path))
    first = evaluate.run_gen(config)
    features, spatial, logits = inception_features(linear_inception, sample_images, 4, 'cpu', '')
    ref_features, ref_spatial, _ = inception_features(linear_inception, ref_images, 4, 'cpu', '')
    assert first['fid'] == pytest.approx(fid_from_features(features, ref_features), rel=1e-9)
    assert first['sfid'] == pytest.approx(fid_from_features(spatial, ref_spatial), rel=1e-9)
    assert first['inception_score'] == pytest.approx(inception_score(logits)[0], rel=1e-12)
    assert (first['precision'], first['recall']) == precision_recall(ref_features, features)
    assert first['ref_statistics'] == 'computed from its 6 arr_0 images' and first['num_samples'] == 5
    with torch.no_grad():  # features scaled by 2: FID by 4
        linear_inception.proj.mul_(2)
    assert evaluate.run_gen(config)['fid'] == pytest.approx(4 * first['fid'], rel=1e-6)
    # a reference batch with stored statistics (ADM's: over the whole training set): FID and sFID use them
    mu, sigma = feature_statistics(2 * ref_features)
    stored = save_npz(tmp_path / 'stored.npz', arr_0=ref_images, mu=mu + 0.5, sigma=2 * sigma, mu_s=mu[:48],
                      sigma_s=sigma[:48, :48])
    moved = evaluate.run_gen({**config, 'ref': stored})
    assert moved['ref_statistics'] == 'mu, sigma, mu_s, sigma_s'
    assert moved['fid'] == pytest.approx(fid_to_statistics(2 * features, mu + 0.5, 2 * sigma), rel=1e-9)
    assert moved['sfid'] == pytest.approx(fid_to_statistics(2 * spatial, mu[:48], sigma[:48, :48]), rel=1e-9)
    assert moved['precision'] == first['precision']


def test_gen_mode_clear_errors(tmp_path, linear_inception):
    ref = save_npz(tmp_path / 'ref.npz', arr_0=random_images(4, 8))
    small = save_npz(tmp_path / 'small.npz', arr_0=random_images(4, 4))
    with pytest.raises(ValueError, match='needs --samples'):
        evaluate.run_gen(default_config(ref=ref))
    with pytest.raises(ValueError, match='the samples are 4x4 images, the reference batch.s 8x8'):
        evaluate.run_gen(default_config(samples=small, ref=ref))


def test_ref_mode_writes_an_adm_reference_batch_of_an_image_folder(tmp_path, linear_inception):
    from tokenizer import make_dataset, to_uint8
    root = make_image_folder(tmp_path / 'data', per_class=3, size=32)
    config = default_config(mode='ref', data_dir=str(root), image_size=32, ref_sample_images=4, batch_size=4,
                            ref_out=str(tmp_path / 'ref' / 'folder_ref.npz'), out_dir=str(tmp_path))
    result = evaluate.run_ref(config)
    dataset = make_dataset(str(root), 32, train=False, augment=False)
    images = to_uint8(torch.stack([dataset[i][0] for i in range(len(dataset))])).permute(0, 2, 3, 1).numpy()
    assert result['num_images'] == len(images) == 6 and result['arr_0_images'] == 4
    features, spatial, _ = inception_features(linear_inception, images, 4, 'cpu', '')  # run_ref's batches
    with np.load(config['ref_out']) as ref:
        assert sorted(ref.files) == ['arr_0', 'mu', 'mu_s', 'sigma', 'sigma_s']
        for got, want in zip((ref['mu'], ref['sigma']), feature_statistics(features)):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
        for got, want in zip((ref['mu_s'], ref['sigma_s']), feature_statistics(spatial)):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
        arr_0 = ref['arr_0']
    # arr_0: 4 distinct images of the folder, in folder order
    rows = [int(np.flatnonzero((images == image).all(axis=(1, 2, 3)))[0]) for image in arr_0]
    assert arr_0.shape == (4, 32, 32, 3) and rows == sorted(set(rows))
    samples = save_npz(tmp_path / 'samples.npz', arr_0=images[:4])
    gen = evaluate.run_gen(default_config(samples=samples, ref=config['ref_out']))
    assert gen['ref_statistics'] == 'mu, sigma, mu_s, sigma_s' and gen['num_ref'] == 4
    with pytest.raises(ValueError, match='ref mode needs --ref_out'):
        evaluate.run_ref({**config, 'data_dir': 'from_ckpt'})

# -----------------------------------------------------------------------------
# entropy and probe modes


def test_cli_unknown_mode(monkeypatch):
    with pytest.raises(ValueError, match="unknown mode 'nope'"):
        run_in_process(monkeypatch, ['--mode=nope'])


def save_codes_folder(folder, codes, codebook_sizes):
    """A train_ar.py codes folder: codes.npy, labels.npy, meta.json and (VCQ) codebook_sizes.npy."""
    np.save(folder / 'codes.npy', codes)
    np.save(folder / 'labels.npy', np.zeros(len(codes), dtype=np.int64))
    np.save(folder / 'codebook_sizes.npy', codebook_sizes)
    (folder / 'meta.json').write_text(json.dumps({'dataset_images': len(codes), 'views_per_image': 1,
                                                  'center_view': 0, 'vcq': True, 'codebook_size': 0}))
    return str(folder / 'codes.npy')


def test_cli_entropy_mode_and_its_errors(tmp_path, monkeypatch):
    codes = np.random.default_rng(0).integers(0, 16, (512, 4, 4))  # (N, h, w): raster order
    codes[:, 2:] = codes[:, :1, :1]  # rows 3-4 copy the first token
    path = save_codes_folder(tmp_path, codes, np.full(16, 16))
    run_in_process(monkeypatch, ['--mode=entropy', f'--codes={path}', f'--out_dir={tmp_path}'])
    result = read_json(tmp_path / 'eval_entropy.json')
    H = np.array(result['H_bits'])
    np.testing.assert_allclose(H, conditional_entropies(codes.reshape(512, 16)))
    assert len(H) == 16 and abs(H[0] - 4.0) < 0.05 and (H[8:] == 0).all()
    assert abs(H.sum() - math.log2(512)) < 1e-9 and result['t_star'] == 3  # 4 bits per position, 9 bits
    assert result['remaining_budget_bits'][0] == pytest.approx(9.0)  # log2 N at t = 1
    assert result['t_cliff'] == 4 and os.path.isfile(result['png'])  # 1/128 bit is left after t = 4
    config = default_config(codes=str(tmp_path / 'codes.npy'), out_dir=str(tmp_path))
    np.savez(tmp_path / 'codes.npz', codes=codes)
    np.save(tmp_path / 'float.npy', codes.astype(np.float32))
    for bad in ('codes.npz', 'float.npy'):
        with pytest.raises(ValueError, match='not a .npy of non-negative integer codes'):
            evaluate.run_entropy({**config, 'codes': str(tmp_path / bad)})
    save_codes_folder(tmp_path, codes, np.full(16, 8))
    with pytest.raises(ValueError, match='position 1 reach 15 but the codebook there has 8 codes'):
        evaluate.run_entropy(config)


def test_entropy_mode_takes_vcq_codebook_sizes_from_the_codes_folder(tmp_path):
    sizes = np.array([2, 2, 4, 8, 16, 16])
    path = save_codes_folder(tmp_path, np.random.default_rng(0).integers(0, sizes, (1000, 6)), sizes)
    config = default_config(codes=path, out_dir=str(tmp_path))
    result = evaluate.run_entropy(config)
    assert result['codebook_sizes'] == sizes.tolist() and result['t_star'] == 5  # 1+1+2+3+4 = 11 >= 9.97 bits
    np.save(tmp_path / 'codebook_sizes.npy', sizes[:4])
    with pytest.raises(ValueError, match=r'have shape \(4,\); codes: 6 positions'):
        evaluate.run_entropy(config)
    np.save(tmp_path / 'codebook_sizes.npy', np.full(6, 2))
    with pytest.raises(ValueError, match='position 3 reach 3 but the codebook there has 2 codes'):
        evaluate.run_entropy(config)


TINY_TOKENIZER = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, quantizer='vq',
                      codebook_size=64, code_dim=8)


def save_tokenizer(path, model_args=TINY_TOKENIZER, **config):
    """A random tokenizer checkpoint as train_tokenizer.py writes it (32 px; here 16x16 codes, K = 64)."""
    from tokenizer import Tokenizer
    torch.manual_seed(0)
    torch.save({'kind': 'tokenizer', 'format': CHECKPOINT_FORMAT,
                'model': Tokenizer(**model_args).state_dict(), 'model_args': model_args,
                'config': {'image_size': 32, 'data_dir': '', **config}}, path)
    return str(path)


def train_ar_codes_folder(folder, num_images=40, views=10, T=4, K=16, unreadable=(3,)):
    """A codes folder as train_ar.py writes it: views_per_image adjacent rows per image, rows of label -1 (all
    zero codes) for unreadable images, meta.json. The centre view (4 with ten crops) of image i is its class
    i % 4 written in every token; the other views are noise."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, K, (num_images * views, T))
    labels = np.repeat(np.arange(num_images) % 4, views)
    codes[4::views] = (np.arange(num_images) % 4)[:, None]
    for i in unreadable:
        codes[i * views:(i + 1) * views], labels[i * views:(i + 1) * views] = 0, -1
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, 'codes.npy'), codes.astype(np.uint16))
    np.save(os.path.join(folder, 'labels.npy'), labels)
    with open(os.path.join(folder, 'meta.json'), 'w') as f:
        json.dump({'num_images': 0, 'dataset_images': num_images, 'views_per_image': views, 'center_view': 4,
                   'codebook_size': K, 'vcq': False, 'grid_h': 2, 'grid_w': 2}, f)
    return codes, labels


def test_entropy_and_probe_use_one_view_per_image(tmp_path):
    codes, labels = train_ar_codes_folder(tmp_path / 'codes')
    codes_path = str(tmp_path / 'codes' / 'codes.npy')
    readable = [i for i in range(40) if i != 3]
    selected, kept, _ = evaluate.load_codes(codes_path)
    assert np.array_equal(selected, codes[[i * 10 + 4 for i in readable]])
    assert np.array_equal(kept, np.arange(40)[readable] % 4)
    # entropy: 39 sequences (log2 39 bits of budget, not log2 400), each a function of its class: H_1 = H(y)
    result = evaluate.run_entropy(default_config(codes=codes_path, out_dir=str(tmp_path / 'eval')))
    assert result['num_sequences'] == 39 and result['log2_N'] == pytest.approx(math.log2(39))
    counts = np.bincount(kept)
    assert result['H_bits'][0] == pytest.approx(-(counts / 39 * np.log2(counts / 39)).sum(), rel=1e-12)
    assert result['t_cliff'] == 1 and result['t_star'] == 2  # K = 16 from meta.json: 8 bits >= log2 39
    # probe: the centre views carry the class exactly; the other 9 views are noise
    probe = evaluate.run_probe(default_config(codes=codes_path, labels=str(tmp_path / 'codes' / 'labels.npy'),
                                              ckpt=save_tokenizer(tmp_path / 'ckpt.pt'), first_k=1,
                                              probe_steps=50))
    assert probe['num_train'] + probe['num_val'] == 39 and probe['top1'] == 1.0
    np.save(codes_path, codes[:-1])  # rows that do not match meta.json
    with pytest.raises(ValueError, match="399 rows; meta.json says 40 images x 10 views"):
        evaluate.load_codes(codes_path)
    meta_path = tmp_path / 'codes' / 'meta.json'  # a meta.json of an older nanoVQ: re-extract
    meta_path.write_text(json.dumps({k: v for k, v in read_json(meta_path).items() if k != 'dataset_images'}))
    with pytest.raises(ValueError, match='older nanoVQ; re-extract the codes'):
        evaluate.load_codes(codes_path)


def test_cli_probe_mode_and_its_errors(tmp_path, monkeypatch):
    """300 sequences of 16 codes < 64 whose first token carries one of 3 classes."""
    labels = np.arange(300) % 3
    codes = np.random.default_rng(0).integers(0, 64, (300, 16))
    codes[:, 0] = labels * 5
    np.save(tmp_path / 'codes.npy', codes)
    np.save(tmp_path / 'labels.npy', labels)
    ckpt = save_tokenizer(tmp_path / 'ckpt.pt')
    run_in_process(monkeypatch, ['--mode=probe', f'--codes={tmp_path / "codes.npy"}', f'--ckpt={ckpt}',
                                 f'--labels={tmp_path / "labels.npy"}', f'--out_dir={tmp_path}',
                                 '--probe_steps=50', '--first_k=2'])
    result = read_json(tmp_path / 'eval_probe.json')
    assert result['top1'] == 1.0 and result['num_val'] == 60 and result['feature_dim'] == 16
    config = default_config(codes=str(tmp_path / 'codes.npy'), labels=str(tmp_path / 'labels.npy'))
    with pytest.raises(ValueError, match='--ckpt'):  # no tokenizer: no code vectors to probe
        evaluate.run_probe(config)
    np.save(tmp_path / 'short.npy', labels[:10])
    with pytest.raises(ValueError, match='not one integer label per code row'):
        evaluate.run_probe({**config, 'labels': str(tmp_path / 'short.npy'), 'ckpt': ckpt})
    with pytest.raises(ValueError, match='first_k = 17'):
        evaluate.run_probe({**config, 'ckpt': ckpt, 'first_k': 17})
    np.save(tmp_path / 'one_class.npy', np.zeros(300, dtype=np.int64))
    with pytest.warns(UserWarning, match='one class'):  # top-1 = 1 means nothing
        probe = evaluate.run_probe({**config, 'labels': str(tmp_path / 'one_class.npy'), 'ckpt': ckpt,
                                    'probe_steps': 5})
    assert probe['top1'] == 1.0

# -----------------------------------------------------------------------------
# recon mode


def test_recon_mode_rfid_psnr_usage_and_codes(tmp_path, linear_inception):
    """rFID of the reconstructions' features against the originals', PSNR of the uint8 pictures, usage, the
    codes for the entropy and probe modes; FVQ's convention measures LPIPS with AlexNet."""
    from tokenizer import load_tokenizer, make_dataset, psnr, to_uint8
    ckpt = save_tokenizer(tmp_path / 'ckpt.pt')
    config = default_config(mode='recon', ckpt=ckpt, num_images=5, batch_size=5, lpips_random_backbone=True,
                            metric_convention='fvq', out_dir=str(tmp_path))  # one batch, as computed below
    result = evaluate.run_recon(config)
    assert result['num_images'] == 5 and result['image_size'] == 32 and result['data_dir'] == ''
    assert result['lpips_network'] == 'alex' and result['lpips'] > 0
    images = torch.stack([make_dataset('', 32, train=False)[i][0] for i in range(5)])
    with torch.no_grad():
        indices = load_tokenizer(ckpt).encode(images)
        real, fake = to_uint8(images) / 255.0, to_uint8(load_tokenizer(ckpt).decode(indices)) / 255.0
        expected_rfid = fid_from_features(*(linear_inception(x)[0].numpy() for x in (fake, real)))
    assert result['rfid'] == pytest.approx(expected_rfid, rel=1e-9)
    assert result['psnr'] != pytest.approx(psnr(fake, real).mean().item(), rel=1e-3)  # Y-channel PSNR (fvq)
    codes = np.load(tmp_path / 'codes.npy')
    assert np.array_equal(codes, indices.flatten(1).numpy())
    assert np.load(tmp_path / 'labels.npy').shape == (5,)
    assert result['codebook_usage'] == 100 * len(np.unique(codes)) / 64 and result['usage_tokens'] == 5 * 256
    standard = evaluate.run_recon({**config, 'metric_convention': 'standard', 'rfid': False, 'lpips': False})
    assert standard['psnr'] == pytest.approx(psnr(fake, real).mean().item(), rel=1e-12)
    assert 'rfid' not in standard and 'lpips' not in standard
    with pytest.raises(ValueError, match="unknown metric_convention 'adm'"):
        evaluate.run_recon({**config, 'metric_convention': 'adm'})


def test_cli_recon_mode_without_weights_on_the_held_out_split(tmp_path, monkeypatch):
    """rfid=False, lpips=False: no network weights at all; split='heldout' takes exactly the images that
    train_tokenizer.py held out of its data_dir."""
    from tokenizer import load_tokenizer, make_dataset, split_held_out, psnr, to_uint8
    root = make_image_folder(tmp_path / 'data', per_class=5, size=32)
    ckpt = save_tokenizer(tmp_path / 'ckpt.pt', data_dir=str(root), eval_data_dir='', eval_images=3)
    run_in_process(monkeypatch, ['--mode=recon', f'--ckpt={ckpt}', '--split=heldout', '--rfid=False',
                                 '--lpips=False', '--batch_size=2', '--num_workers=0', '--device=cpu',
                                 f'--out_dir={tmp_path}'])
    result = read_json(tmp_path / 'eval_recon.json')
    assert result['num_images'] == 3 and result['usage_tokens'] == 3 * 256 and 'rfid' not in result
    dataset = make_dataset(str(root), 32, train=False, augment=False)
    dataset.samples = split_held_out(dataset.samples, 3)[1]
    images = torch.stack([dataset[i][0] for i in range(3)])
    with torch.no_grad():
        fake = to_uint8(load_tokenizer(ckpt).decode(load_tokenizer(ckpt).encode(images))) / 255.0
    assert result['psnr'] == pytest.approx(psnr(fake, to_uint8(images) / 255.0).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        evaluate.run_recon(default_config(ckpt=ckpt, split='test', rfid=False))


TINY_1D = dict(tokenizer_type='titok', titok_preset='tiny', image_size=32, patch_size=8, num_latent_tokens=12,
               codebook_size=64, code_dim=8)


@pytest.mark.parametrize('kind, options', [('rq', {'rq_depth': 3}), ('msvq', {'msvq_scales': (1, 2, 4, 16)}),
                                           ('rq 1d', {'rq_depth': 3})])
def test_recon_mode_on_multi_code_tokenizers_reports_usage_per_level(kind, options, tmp_path):
    """FVQ Table 4's tokenizers: usage over all codes and per rq depth / msvq scale; rq also on the 1D
    tokenizer (12 latent tokens)."""
    from tokenizer import load_tokenizer, make_dataset
    from quantizers import flat_codes
    model_args = ({**TINY_1D, 'quantizer': 'rq', 'quantizer_args': options} if kind == 'rq 1d'
                  else {**TINY_TOKENIZER, 'quantizer': kind, 'quantizer_args': options})
    ckpt = save_tokenizer(tmp_path / 'ckpt.pt', model_args)
    result = evaluate.run_recon(default_config(ckpt=ckpt, num_images=3, batch_size=2, rfid=False, lpips=False,
                                               out_dir=str(tmp_path)))
    levels = [f'depth{d}' for d in (1, 2, 3)] if kind != 'msvq' else [f'scale{s}x{s}' for s in (1, 2, 4, 16)]
    per_image = {'rq': 16 * 16 * 3, 'msvq': 1 + 4 + 16 + 256, 'rq 1d': 12 * 3}[kind]
    assert result['usage_tokens'] == 3 * per_image and result['psnr'] > 0
    codes = np.load(tmp_path / 'codes.npy')
    images = torch.stack([make_dataset('', 32, train=False)[i][0] for i in range(3)])
    with torch.no_grad():
        indices = load_tokenizer(ckpt).encode(images)
    assert np.array_equal(codes, flat_codes(indices).numpy()) and codes.shape == (3, per_image)
    level_codes = ([indices[..., d] for d in range(3)] if kind != 'msvq' else indices)
    for level, c in zip(levels, level_codes):
        assert result[f'codebook_usage_{level}'] == 100 * len(np.unique(c.numpy())) / 64  # in %
    assert result['codebook_usage'] == 100 * len(np.unique(codes)) / 64

# -----------------------------------------------------------------------------
# curves mode


def test_curves_mode_plots_training_logs_and_entropy_cliffs(tmp_path, monkeypatch):
    """A tokenizer run's log.jsonl (config/smoke.py, 4 steps), a GPT run's and two entropy-mode results ->
    one PNG per metric (the loss of the GPT run alone), the cliffs on one figure, the final values."""
    run_in_process(monkeypatch, ['config/smoke.py', f'--out_dir={tmp_path / "tok"}', '--max_iters=4',
                                 '--log_interval=2', '--eval_interval=4', '--eval_images=4', '--batch_size=4',
                                 '--base_batch_size=4'], script='train_tokenizer.py')
    os.makedirs(tmp_path / 'gpt')
    with open(tmp_path / 'gpt' / 'log.jsonl', 'w') as f:
        f.write(json.dumps({'iter': 0, 'split': 'config', 'device': 'cpu',
                            'config': {'ar_model': 'B', 'n_layer': 2, 'max_iters': 2}}) + '\n')
        f.writelines(json.dumps({'iter': i, 'split': 'train', 'loss': 5.0 - i}) + '\n' for i in (1, 2))
    for name, K in (('const', 16), ('vcq', 4)):
        os.makedirs(tmp_path / name / 'codes')
        codes = np.random.default_rng(0).integers(0, K, (256, 8))
        codes = save_codes_folder(tmp_path / name / 'codes', codes, np.full(8, K))
        run_in_process(monkeypatch, ['--mode=entropy', f'--codes={codes}', f'--out_dir={tmp_path / name}'])
    plots = tmp_path / 'plots'
    run_in_process(monkeypatch, ['--mode=curves', f'--logs={tmp_path / "tok"},{tmp_path / "gpt"}',
                                 '--names=TOK,GPT,const,VCQ', f'--out_dir={plots}',
                                 f'--entropy_dirs={tmp_path / "const"},{tmp_path / "vcq"}'])
    for png in ('usage', 'psnr', 'rec_loss', 'loss', 'entropy_cliff'):
        assert (plots / f'{png}.png').stat().st_size > 1000, png
    result = read_json(plots / 'eval_curves.json')
    log = evaluate.read_json(tmp_path / 'tok' / 'log.jsonl', lines=True)
    train = [r for r in log if r['split'] == 'train']
    assert result['TOK']['iter'] == 4 and result['TOK']['usage'] == train[-1]['usage']
    assert 0 < train[-1]['usage'] <= 100 and 'eval_psnr' in result['TOK']  # usage in %
    assert result['GPT'] == {'iter': 2, 'loss': 3.0}
    assert result['const (entropy)']['t_star'] == 2  # const: 4 + 4 bits >= log2 256
    assert result['VCQ (entropy)']['t_star'] == 4  # 2 bits per position
    assert result['const (entropy)']['t_cliff'] == 3 and result['VCQ (entropy)']['t_cliff'] == 6  # measured
    figures, save_figure = {}, evaluate.save_figure

    def keep_axes(ax, path, **axes):  # the figures themselves: whose curves, in what units, where the legend
        figures[os.path.basename(path)] = ax
        return save_figure(ax, path, **axes)
    monkeypatch.setattr(evaluate, 'save_figure', keep_axes)
    evaluate.run_curves(default_config(logs=f"{tmp_path / 'tok'},{tmp_path / 'gpt'}", out_dir=str(plots),
                                       entropy_dirs=str(tmp_path / 'const')))
    loss_lines = figures['loss.png'].get_lines()  # the GPT run's loss, not the tokenizer's total
    assert len(loss_lines) == 1 and loss_lines[0].get_ydata().tolist() == [4.0, 3.0]
    assert figures['usage.png'].get_lines()[0].get_ydata().tolist() == [r['usage'] for r in train]
    for name, ax in figures.items():
        assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1, name  # beside the axes
        assert all('/' not in line.get_label() for line in ax.get_lines()), name  # run names, not paths
    assert 'max_iters=4' in figures['usage.png'].get_title()  # the tokenizer's setting
    with pytest.raises(ValueError, match='curves mode needs --logs'):
        evaluate.run_curves(default_config(out_dir=str(plots)))
