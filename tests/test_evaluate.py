import ast
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import ROOT, make_image_folder
import evaluate
from evaluate import (FIDInceptionV3, load_inception, inception_forward, npz_image_header, npz_image_batches,
                      feature_statistics, frechet_distance, fid_from_features, inception_score,
                      manifold_radii, precision_recall, ssim, conditional_entropies,
                      entropy_cliff, probe_features, linear_probe)


def run_script(args, cwd=ROOT):
    """evaluate.py in a subprocess: tests that call it are marked slow."""
    return subprocess.run([sys.executable, 'evaluate.py'] + args, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def default_config(**overrides):
    config = {k: getattr(evaluate, k) for k in evaluate.config_keys}
    config.update(overrides)
    return config


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope='session')
def random_inception_file(tmp_path_factory):
    """A weights file with the layout of pt_inception-2015-12-05-6726825d.pth and random values:
    Kaiming-normal convs and non-trivial BatchNorm statistics, so features stay O(1) through the depth."""
    torch.manual_seed(0)
    model = FIDInceptionV3()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity='relu')
        elif isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    path = str(tmp_path_factory.mktemp('inception') / 'random_fid_inception.pth')
    torch.save(model.state_dict(), path)
    return path


def save_images_npz(path, images):
    np.savez(path, arr_0=images)
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


def test_inception_loads_strict_and_forward_is_deterministic(random_inception_file):
    model = load_inception(random_inception_file, 'cpu')
    saved = torch.load(random_inception_file, weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert not model.training
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 32, 40, 3), dtype=np.uint8)  # non-square: resized to 299x299 anyway
    features, logits = inception_forward(model, images, 'cpu')
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    assert features.dtype == np.float32 and np.isfinite(features).all() and features.std() > 0
    assert not np.allclose(features[0], features[1])
    single, single_logits = inception_forward(model, images[1:], 'cpu')  # eval-mode BN: images do not mix
    np.testing.assert_allclose(single[0], features[1], rtol=1e-4, atol=1e-5)
    again, again_logits = inception_forward(model, images[1:], 'cpu')
    assert np.array_equal(single, again) and np.array_equal(single_logits, again_logits)  # deterministic
    # IS logits are pool3 @ W without the fc bias (improved-GAN / ADM / torch-fidelity convention)
    np.testing.assert_allclose(logits, features @ saved['fc.weight'].numpy().T, rtol=1e-4, atol=1e-4)


def test_inception_weights_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match='--inception_weights'):
        load_inception(str(tmp_path / 'nope.pth'), 'cpu')
    bad = tmp_path / 'bad.pth'
    torch.save({'fc.weight': torch.zeros(1008, 2048)}, bad)
    with pytest.raises(RuntimeError, match='not the pytorch-fid FID Inception weights'):
        load_inception(str(bad), 'cpu')

    def offline(*args, **kwargs):
        raise OSError('network is unreachable')
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', offline)
    with pytest.raises(RuntimeError) as e:
        load_inception('', 'cpu')
    message = str(e.value)
    assert 'pt_inception-2015-12-05-6726825d.pth' in message
    assert str(tmp_path / 'hub' / 'checkpoints') in message
    assert 'network is unreachable' in message

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


def test_fid_from_features_matches_statistics():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 4)) * [1, 2, 3, 4] + 1.0
    y = rng.normal(size=(400, 4))
    mu, sigma = feature_statistics(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(sigma, (x - x.mean(0)).T @ (x - x.mean(0)) / 499)  # N - 1
    mu_y, sigma_y = feature_statistics(y)
    # 1-D features: the Frechet distance of two Gaussians is (m1 - m2)^2 + (s1 - s2)^2
    fid_1d = frechet_distance(*feature_statistics(x[:, :1]), *feature_statistics(y[:, :1]))
    expected = (x[:, 0].mean() - y[:, 0].mean()) ** 2 + (x[:, 0].std(ddof=1) - y[:, 0].std(ddof=1)) ** 2
    assert abs(fid_1d - expected) <= 1e-9 * expected
    assert frechet_distance(mu, sigma, mu_y, sigma_y) > 0


def test_fid_from_few_features_is_computed_exactly_in_their_span():
    rng = np.random.default_rng(2)
    D = 48
    x = rng.normal(size=(9, D)) * rng.uniform(0.5, 2.0, D)
    y = rng.normal(size=(12, D)) + 0.3
    full = frechet_distance(*feature_statistics(x), *feature_statistics(y))  # D x D sqrtm
    assert len(x) + len(y) <= D
    assert abs(fid_from_features(x, y) - full) <= 1e-7 * full
    many = rng.normal(size=(60, D))  # N1 + N2 > D: the plain path
    assert fid_from_features(many, y) == frechet_distance(*feature_statistics(many), *feature_statistics(y))
    with pytest.raises(ValueError, match='feature sizes differ'):
        fid_from_features(x, y[:, :10])


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
    with pytest.raises(ValueError, match='do not match'):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_inception_score_closed_forms():
    C, N = 8, 160
    peaked = np.full((N, 1008), -60.0)
    peaked[np.arange(N), np.arange(N) % C] = 60.0  # each split holds every one of the C classes equally often
    mean, std = inception_score(peaked, splits=10)
    assert abs(mean - C) < 1e-9 and std < 1e-9
    same = np.tile(np.random.default_rng(0).normal(size=(1, 1008)), (N, 1))  # p(y|x) = p(y): IS = 1
    assert abs(inception_score(same, splits=10)[0] - 1.0) < 1e-12
    # two classes, p(y|x) = (q, 1-q) or (1-q, q) half the time each: KL = log 2 - H(q)
    q = 0.8
    logits = np.full((N, 1008), -np.inf)  # classes 2.. have probability 0 exactly
    logits[0::2, 0], logits[0::2, 1] = np.log(q), np.log(1 - q)
    logits[1::2, 0], logits[1::2, 1] = np.log(1 - q), np.log(q)
    expected = math.exp(math.log(2) + q * math.log(q) + (1 - q) * math.log(1 - q))
    assert abs(inception_score(logits, splits=10)[0] - expected) < 1e-12
    with pytest.raises(ValueError, match='splits'):
        inception_score(peaked[:5], splits=10)


def test_precision_recall_constructed_sets():
    # 1-D points. Reference {0,1,2,3}: 3rd-neighbour squared radii 9, 4, 4, 9.
    # Samples: a tight cluster {0, .1, .2, .3} (radii .09, .04, .04, .09) and a far one at 10 (7 from ref 3).
    ref = np.array([[0.0], [1.0], [2.0], [3.0]])
    samples = np.array([[0.0], [0.1], [0.2], [0.3], [10.0], [10.1], [10.2], [10.3]])
    np.testing.assert_allclose(manifold_radii(ref, k=3), [9, 4, 4, 9], rtol=1e-6)
    # float32 |a|^2 - 2ab + |b|^2 (ADM's form): ~1e-5 absolute error at |x| = 10
    np.testing.assert_allclose(manifold_radii(samples, k=3), [.09, .04, .04, .09] * 2, rtol=1e-3)
    precision, recall = precision_recall(ref, samples, k=3)
    assert precision == 0.5  # the near cluster is inside the reference balls, the far one is not
    assert recall == 0.25  # only reference point 0 is inside a sample ball (sample 0 itself)
    p2, r2 = precision_recall(ref, samples, k=3, batch_size=3)  # blocked distances give the same answer
    assert (p2, r2) == (precision, recall)


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
    # y = x + c: contrast/structure terms are 1; luminance term per window from the local means
    y = x + 0.25
    s = ssim(x, y)
    assert (s < 1).all() and (s > 0.5).all()
    with pytest.raises(ValueError, match='11x11'):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))

# -----------------------------------------------------------------------------
# codes: usage, conditional entropy, probe


def test_conditional_entropy_exact_small_case():
    codes = np.array([[0, 0, 5], [0, 1, 5], [0, 2, 5], [1, 0, 5]])
    H = conditional_entropies(codes)
    h1 = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))  # first token 0 three times, 1 once
    h2 = 0.75 * math.log2(3)  # after a 0: uniform over 3 tokens; after a 1: determined
    np.testing.assert_allclose(H, [h1, h2, 0.0], atol=1e-12)
    assert abs(H.sum() - 2.0) < 1e-12  # chain rule: all 4 sequences distinct -> log2 N
    result = entropy_cliff(H, N=4, threshold=0.1)
    np.testing.assert_allclose(result['remaining_budget_bits'], [2.0, 2.0 - h1, 0.0], atol=1e-12)
    assert result['first_position_below_threshold'] == 3 and result['t_star'] == 2


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
    assert cliff['t_star'] == 1 and cliff['t_star_bound'] == 1  # 12 bits of capacity >= 6 bits of budget


def test_entropy_cliff_bound_with_a_growing_codebook():
    H = np.array([1.0, 1.0, 2.0, 0.05, 0.0])
    result = entropy_cliff(H, N=16, threshold=0.1, codebook_sizes=np.array([2, 2, 4, 8, 8]))
    assert result['t_star'] == 3 and result['first_position_below_threshold'] == 4
    assert result['t_star_bound'] == 3  # capacity 1, 2, 4 bits: reaches log2 16 = 4 at t = 3
    assert entropy_cliff(np.array([3.0, 3.0]), N=64)['first_position_below_threshold'] is None


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
    with pytest.raises(ValueError, match='codebook has 16 codes'):
        probe_features(np.full((2, 3), 16), codebook, first_k=2)

# -----------------------------------------------------------------------------
# ADM .npz image batches


def test_npz_reader_streams_and_rejects_bad_files(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    for saver in (np.savez, np.savez_compressed):
        path = str(tmp_path / f'{saver.__name__}.npz')
        saver(path, arr_0=images)
        assert npz_image_header(path) == (7, 5, 6)
        batches = list(npz_image_batches(path, 3))
        assert [len(b) for b in batches] == [3, 3, 1] and np.array_equal(np.concatenate(batches), images)
    np.savez(tmp_path / 'float.npz', arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match='expected uint8 N x H x W x 3'):
        npz_image_header(str(tmp_path / 'float.npz'))
    np.savez(tmp_path / 'gray.npz', arr_0=images[..., 0])
    with pytest.raises(ValueError, match='expected uint8 N x H x W x 3'):
        npz_image_header(str(tmp_path / 'gray.npz'))
    np.savez(tmp_path / 'named.npz', images=images)
    with pytest.raises(ValueError, match="no 'arr_0'"):
        npz_image_header(str(tmp_path / 'named.npz'))
    with pytest.raises(FileNotFoundError):
        npz_image_header(str(tmp_path / 'missing.npz'))

# -----------------------------------------------------------------------------
# command line, end to end at tiny scale


@pytest.mark.slow
def test_cli_gen_mode_with_reference_cache(tmp_path, random_inception_file):
    rng = np.random.default_rng(0)
    ref = save_images_npz(tmp_path / 'ref.npz', rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    samples = save_images_npz(tmp_path / 'samples.npz', rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    args = ['--mode=gen', f'--samples={samples}', f'--ref={ref}',
            f'--inception_weights={random_inception_file}', f'--out_dir={tmp_path}', '--is_splits=2',
            '--pr_k=1', '--batch_size=2', '--device=cpu']
    first = run_script(args)
    assert first.returncode == 0, first.stderr
    cache_path = str(tmp_path / 'ref.fid_stats.npz')
    assert os.path.isfile(cache_path) and 'cached reference statistics' in first.stdout
    result = read_json(tmp_path / 'eval_gen.json')
    assert result['num_samples'] == 2 and result['num_ref'] == 3
    assert math.isfinite(result['fid']) and result['fid'] > 0
    assert 0 <= result['precision'] <= 1 and 0 <= result['recall'] <= 1
    assert 1 <= result['inception_score'] <= 2
    second = run_script(args)  # the reference comes from the cache now
    assert second.returncode == 0, second.stderr
    assert 'reference statistics from cache' in second.stdout
    again = read_json(tmp_path / 'eval_gen.json')
    for key in ('fid', 'inception_score', 'precision', 'recall'):
        assert again[key] == pytest.approx(result[key], rel=1e-9), key
    # the cache file is itself a valid reference, but only for the network that wrote it
    config = default_config(ref=cache_path, inception_weights=random_inception_file)
    model = load_inception(random_inception_file, 'cpu')
    mu, sigma, features = evaluate.reference_statistics(config, model, 'cpu')
    assert features.shape == (3, 2048) and np.allclose(mu, features.mean(0)) and sigma.shape == (2048, 2048)
    with torch.no_grad():
        model.fc.bias.add_(1.0)
    with pytest.raises(ValueError, match='different Inception network'):
        evaluate.reference_statistics(config, model, 'cpu')


def test_a_statistics_file_is_a_reference_for_its_network_only(tmp_path):
    """reference_statistics reads a statistics file of this script (the ref cache) without an Inception
    forward, and only for the network whose fingerprint it holds."""
    torch.manual_seed(0)
    model = FIDInceptionV3()
    features = np.random.default_rng(0).normal(size=(3, 2048))
    mu, sigma = feature_statistics(features)
    path = tmp_path / 'ref.fid_stats.npz'
    np.savez(path, mu=mu, sigma=sigma, features=features, source='test', image_shape=np.array([32, 32]),
             weights_fingerprint=evaluate.weights_fingerprint(model))
    config = default_config(ref=str(path))
    got_mu, got_sigma, got_features = evaluate.reference_statistics(config, model, 'cpu')
    assert np.array_equal(got_features, features) and np.allclose(got_mu, features.mean(0))
    assert got_sigma.shape == (2048, 2048) and evaluate.reference_image_size(str(path)) == (32, 32)
    with torch.no_grad():
        model.fc.bias.add_(1.0)
    with pytest.raises(ValueError, match='different Inception network'):
        evaluate.reference_statistics(config, model, 'cpu')


def test_gen_mode_clear_errors(tmp_path):
    rng = np.random.default_rng(0)
    bad = save_images_npz(tmp_path / 'bad.npz', rng.random((4, 8, 8, 3)).astype(np.float32))
    ref = save_images_npz(tmp_path / 'ref.npz', rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match='expected uint8 N x H x W x 3'):
        evaluate.run_gen(default_config(samples=bad, ref=ref, out_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match='FID Inception weights file'):
        evaluate.run_gen(default_config(samples=ref, ref=ref,
                                        inception_weights=str(tmp_path / 'missing.pth')))
    with pytest.raises(ValueError, match='needs --samples'):
        evaluate.run_gen(default_config(ref=ref))
    small = save_images_npz(tmp_path / 'small.npz', rng.integers(0, 256, (4, 4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match='the samples are 4x4 images but the reference batch.s are 8x8'):
        evaluate.run_gen(default_config(samples=small, ref=ref, out_dir=str(tmp_path)))


@pytest.mark.slow
def test_cli_unknown_mode():
    out = run_script(['--mode=nope'])
    assert out.returncode != 0 and "unknown mode 'nope'" in out.stderr


def entropy_test_codes(tmp_path):
    """(512, 4, 4) codes of 16 values, rows 3-4 a copy of the first token, saved as tmp_path/codes.npy."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (512, 4, 4))  # (N, h, w): raster order
    codes[:, 2:] = codes[:, :1, :1]  # rows 3-4 copy the first token
    np.save(tmp_path / 'codes.npy', codes)
    return codes


@pytest.mark.slow
def test_cli_entropy_mode(tmp_path):
    codes = entropy_test_codes(tmp_path)
    out = run_script(['--mode=entropy', f'--codes={tmp_path / "codes.npy"}', f'--out_dir={tmp_path}',
                      '--codebook_size=16'])
    assert out.returncode == 0, out.stderr
    result = read_json(tmp_path / 'eval_entropy.json')
    H = np.array(result['H_bits'])
    assert len(H) == 16 and abs(H[0] - 4.0) < 0.05 and (H[8:] == 0).all()
    assert abs(H.sum() - math.log2(512)) < 1e-9 and result['t_star_bound'] == 3  # 4 bits per position, 9 bits
    np.testing.assert_allclose(H, conditional_entropies(codes.reshape(512, 16)))
    with open(tmp_path / 'entropy.csv') as f:
        rows = f.read().splitlines()
    assert rows[0] == 't,H_t_bits,remaining_budget_bits,codebook_size' and len(rows) == 17
    assert float(rows[1].split(',')[2]) == pytest.approx(9.0)  # remaining budget at t = 1 is log2 N


def test_entropy_mode_in_process_and_its_errors(tmp_path):
    codes = entropy_test_codes(tmp_path)
    result = evaluate.run_entropy(default_config(codes=str(tmp_path / 'codes.npy'), codebook_size=16,
                                                 out_dir=str(tmp_path)))
    np.testing.assert_allclose(result['H_bits'], conditional_entropies(codes.reshape(512, 16)))
    assert result['t_star_bound'] == 3 and os.path.isfile(result['csv']) and os.path.isfile(result['png'])
    np.savez(tmp_path / 'codes.npz', codes=codes)
    with pytest.raises(ValueError, match=r"codes.npz' is an .npz archive \(codes\); "
                                         r"codes are a single .npy array"):
        evaluate.run_entropy(default_config(codes=str(tmp_path / 'codes.npz'), out_dir=str(tmp_path)))
    np.save(tmp_path / 'float.npy', codes.astype(np.float32))
    with pytest.raises(ValueError, match='expected integer codes'):
        evaluate.run_entropy(default_config(codes=str(tmp_path / 'float.npy'), out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match='position 1 reach 15 but the codebook there has 8 codes'):
        evaluate.run_entropy(default_config(codes=str(tmp_path / 'codes.npy'), codebook_size=8,
                                            out_dir=str(tmp_path)))


TINY_TOKENIZER = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, quantizer='vq',
                      codebook_size=64, code_dim=8)


@pytest.fixture
def tiny_tokenizer_ckpt(tmp_path):
    from tokenizer import Tokenizer
    torch.manual_seed(0)
    model = Tokenizer(**TINY_TOKENIZER)
    path = str(tmp_path / 'ckpt.pt')
    torch.save({'model': model.state_dict(), 'model_args': TINY_TOKENIZER,
                'config': {'image_size': 32, 'data_dir': ''}}, path)
    return path


def probe_test_codes(tmp_path):
    """300 sequences of 16 codes < 64 whose first token carries one of 3 classes: codes.npy, labels.npy."""
    rng = np.random.default_rng(0)
    N = 300
    labels = np.arange(N) % 3
    codes = rng.integers(0, 64, (N, 16))
    codes[:, 0] = labels * 5  # the first token carries the class
    np.save(tmp_path / 'codes.npy', codes)
    np.save(tmp_path / 'labels.npy', labels)
    return codes, labels


@pytest.mark.slow
def test_cli_probe_mode(tmp_path, tiny_tokenizer_ckpt):
    probe_test_codes(tmp_path)
    base = ['--mode=probe', f'--codes={tmp_path / "codes.npy"}', f'--labels={tmp_path / "labels.npy"}',
            f'--out_dir={tmp_path}', '--probe_steps=50']
    out = run_script(base + [f'--ckpt={tiny_tokenizer_ckpt}', '--first_k=2'])
    assert out.returncode == 0, out.stderr
    result = read_json(tmp_path / 'eval_probe.json')
    assert result['top1'] == 1.0 and result['num_val'] == 60 and result['feature_dim'] == 16


def test_probe_mode_errors(tmp_path, tiny_tokenizer_ckpt):
    _, labels = probe_test_codes(tmp_path)
    config = default_config(codes=str(tmp_path / 'codes.npy'), labels=str(tmp_path / 'labels.npy'))
    with pytest.raises(ValueError, match='--ckpt'):  # no tokenizer: no code vectors to probe
        evaluate.run_probe(config)
    np.save(tmp_path / 'short.npy', labels[:10])
    with pytest.raises(ValueError, match='has 10 labels but the codes file has 300'):
        evaluate.run_probe({**config, 'labels': str(tmp_path / 'short.npy'), 'ckpt': tiny_tokenizer_ckpt})
    with pytest.raises(ValueError, match='first_k = 17'):
        evaluate.run_probe({**config, 'ckpt': tiny_tokenizer_ckpt, 'first_k': 17})


@pytest.mark.slow
def test_cli_recon_mode(tmp_path, tiny_tokenizer_ckpt, random_inception_file):
    from tokenizer import load_tokenizer, make_dataset, psnr, to_uint8
    out = run_script(['--mode=recon', f'--ckpt={tiny_tokenizer_ckpt}', '--num_images=3', '--batch_size=2',
                      '--num_workers=0', '--device=cpu', '--lpips_random_backbone=True',
                      f'--inception_weights={random_inception_file}', f'--out_dir={tmp_path}'])
    assert out.returncode == 0, out.stderr
    result = read_json(tmp_path / 'eval_recon.json')
    assert result['num_images'] == 3 and result['image_size'] == 32 and result['data_dir'] == ''
    assert math.isfinite(result['rfid']) and result['rfid'] > 0 and result['lpips'] > 0
    assert -1 <= result['ssim'] < 1 and 0 < result['codebook_usage'] <= 1 and result['perplexity'] >= 1
    codes = np.load(tmp_path / 'codes.npy')
    assert codes.shape == (3, 256) and np.load(tmp_path / 'labels.npy').shape == (3,)
    # recompute PSNR / usage in-process from the same checkpoint and images
    tokenizer = load_tokenizer(tiny_tokenizer_ckpt)
    dataset = make_dataset('', 32, train=False)
    images = torch.stack([dataset[i][0] for i in range(3)])
    with torch.no_grad():
        indices = tokenizer.encode(images)
        recon = to_uint8(tokenizer.decode(indices)) / 255.0
    assert np.array_equal(codes, indices.flatten(1).numpy())
    expected_psnr = psnr(recon, to_uint8(images) / 255.0).mean().item()
    assert result['psnr'] == pytest.approx(expected_psnr, rel=1e-5)
    assert result['codebook_usage'] == len(np.unique(codes)) / 64


@pytest.mark.slow
def test_recon_mode_without_weights_on_the_held_out_split(tmp_path):
    """rfid=False, lpips=False: no network weights at all; split='heldout' takes exactly the images that
    train_tokenizer.py held out of its data_dir."""
    from tokenizer import Tokenizer, make_dataset, split_held_out
    root = make_image_folder(tmp_path / 'data', per_class=5, size=32)
    torch.manual_seed(0)
    path = str(tmp_path / 'ckpt.pt')
    torch.save({'model': Tokenizer(**TINY_TOKENIZER).state_dict(), 'model_args': TINY_TOKENIZER,
                'config': {'image_size': 32, 'data_dir': str(root), 'eval_data_dir': '', 'eval_images': 3}},
               path)
    out = run_script(['--mode=recon', f'--ckpt={path}', '--split=heldout', '--rfid=False', '--lpips=False',
                      '--batch_size=2', '--num_workers=0', '--device=cpu', f'--out_dir={tmp_path}'])
    assert out.returncode == 0, out.stderr
    result = read_json(tmp_path / 'eval_recon.json')
    assert result['num_images'] == 3 and result['usage_tokens'] == 3 * 256 and 'rfid' not in result
    assert 'lpips' not in result and result['psnr'] > 0 and 0 < result['codebook_usage'] <= 1
    dataset = make_dataset(str(root), 32, train=False)
    train, held = split_held_out(dataset.samples, 3)
    assert len(train) == 7 and len(held) == 3 and not set(train) & set(held)
    with pytest.raises(ValueError, match='eval_images = 10 must be between 1'):
        split_held_out(dataset.samples, 10)


@pytest.mark.slow
def test_curves_mode_plots_training_logs_and_entropy_cliffs(tmp_path):
    """Two tiny 10-iteration tokenizer runs (log.jsonl) and two entropy results -> one PNG per metric, the
    entropy cliffs on one figure, and a final-value table."""
    tiny = ['--image_size=16', '--ch=16', '--ch_mult=(1,2)', '--num_res_blocks=1', '--z_channels=16',
            '--device=cpu', '--codebook_size=32', '--code_dim=8', '--perceptual_weight=0.0',
            '--disc_weight=0.0', '--num_workers=0', '--batch_size=4', '--base_batch_size=4', '--max_iters=10',
            '--log_interval=2', '--eval_interval=5', '--eval_images=4', '--learning_rate=1e-3']
    runs = {'vq': [], 'fvq': ['--bridge_group_size=4', '--bridge_dim=16', '--l2_norm=False']}
    for name, extra in runs.items():
        result = subprocess.run([sys.executable, 'train_tokenizer.py', *tiny, f'--quantizer={name}', *extra,
                                 f'--out_dir={tmp_path / name}'], cwd=ROOT, capture_output=True, text=True,
                                timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
        assert result.returncode == 0, result.stderr[-2000:]
    rng = np.random.default_rng(0)
    for name, K in (('const', 16), ('vcq', 4)):
        np.save(tmp_path / f'{name}.npy', rng.integers(0, K, (256, 8)))
        config = default_config(codes=f'{tmp_path / name}.npy', out_dir=str(tmp_path / name), codebook_size=K)
        evaluate.write_results(config, evaluate.run_entropy(config), 'entropy')  # as the command line does
    out = run_script(['--mode=curves', f'--logs={tmp_path / "vq"},{tmp_path / "fvq"}',
                      '--names=VQ,FVQ,const,VCQ', f'--entropy_dirs={tmp_path / "const"},{tmp_path / "vcq"}',
                      f'--out_dir={tmp_path / "plots"}'])
    assert out.returncode == 0, out.stderr
    for png in ('usage', 'psnr', 'rec_loss', 'entropy_cliff'):
        assert (tmp_path / 'plots' / f'{png}.png').stat().st_size > 1000, png
    # tokenizer runs: usage, PSNR, rec; the loss is for GPTs
    assert not (tmp_path / 'plots' / 'loss.png').exists()
    result = read_json(tmp_path / 'plots' / 'eval_curves.json')
    assert result['VQ']['iter'] == result['FVQ']['iter'] == 10 and 0 < result['FVQ']['usage'] <= 1
    assert 'eval_psnr' in result['VQ'] and 'FVQ' in out.stdout
    assert 't* (eq. 2) 2' in out.stdout  # 4 + 4 bits >= 8
    with pytest.raises(ValueError, match='curves mode needs --logs'):
        evaluate.run_curves(default_config(out_dir=str(tmp_path / 'plots')))
