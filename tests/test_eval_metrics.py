"""Every metric against an independent reference: scipy's sqrtm (FID), a direct double loop over the
kernel (KID, Binkowski et al. 2018 eq. 2), scikit-learn's nearest neighbours (precision/recall),
scikit-learn's accuracy."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.metrics import accuracy_score
from sklearn.neighbors import NearestNeighbors

from stepdistill.eval.metrics import (FeatureStats, class_accuracy, clip_score, frechet_distance,
                                      frechet_distance_low_rank, kid, precision_recall)


def _features(n, d, shift=0.0, scale=1.0, seed=0):
    mix = np.random.default_rng(1234).normal(size=(d, d)) / np.sqrt(d)  # same for every set
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) * scale) @ mix + shift


def scipy_fid(f1, f2):
    """The pytorch-fid / clean-fid computation, written independently."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


@pytest.mark.parametrize("n,d,shift,scale", [(500, 32, 0.3, 1.5), (300, 64, 0.0, 1.0), (200, 16, 2.0, 0.5)])
def test_fid_equals_scipy_sqrtm(n, d, shift, scale):
    f1, f2 = _features(n, d, seed=1), _features(n + 17, d, shift, scale, seed=2)
    acc = [FeatureStats(d), FeatureStats(d)]
    for a, f in zip(acc, (f1, f2)):
        for chunk in np.array_split(f, 7):  # batched accumulation gives the one-shot statistics
            a.update(torch.from_numpy(chunk).float())
    s1, s2 = acc[0].compute(), acc[1].compute()
    f1, f2 = s1["features"].astype(np.float64), s2["features"].astype(np.float64)
    np.testing.assert_allclose(s1["sigma"], np.cov(f1, rowvar=False), rtol=1e-9, atol=1e-9)
    ours = frechet_distance(s1["mu"], s1["sigma"], s2["mu"], s2["sigma"])
    assert ours == pytest.approx(scipy_fid(f1, f2), rel=1e-6)
    assert frechet_distance_low_rank(f1, f2) == pytest.approx(scipy_fid(f1, f2), rel=1e-6)


def projected_scipy_fid(f1, f2):
    """scipy's FID after an exact isometry onto the span of both centred sets and the mean gap:
    nothing lies outside it, so FID is unchanged, and sqrtm runs on a small full matrix."""
    c = f1.mean(0)
    q, _ = np.linalg.qr(np.concatenate([f1 - c, f2 - c]).T)
    return scipy_fid((f1 - c) @ q, (f2 - c) @ q)


def test_low_rank_fid_with_fewer_samples_than_dimensions():
    f1, f2 = _features(20, 300, seed=10) ** 2, _features(25, 300, shift=0.1, seed=11) ** 2
    assert frechet_distance_low_rank(f1, f2) == pytest.approx(projected_scipy_fid(f1, f2), rel=1e-6)
    s = [(f.mean(0), np.cov(f, rowvar=False)) for f in (f1, f2)]
    assert frechet_distance(*s[0], *s[1]) == pytest.approx(projected_scipy_fid(f1, f2), rel=1e-5)


def test_fid_of_identical_sets_is_zero_and_grows_with_shift():
    f = _features(400, 8)
    mu, s = f.mean(0), np.cov(f, rowvar=False)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9
    # a pure mean shift adds exactly |shift|^2
    assert frechet_distance(mu + 0.5, s, mu, s) == pytest.approx(8 * 0.25, rel=1e-9)


def test_fid_of_identical_rank_deficient_statistics_is_zero_to_round_off():
    """Detector features are often rank-deficient (ReLU units that never fire, fewer images than
    dimensions): near-zero eigenvalues must not turn into sqrt(eps)-sized errors."""
    f = _features(397, 128, scale=3.0, seed=5)
    f[:, 100:] = 0.5 * f[:, :28]  # 28 dependent dimensions
    f[:, 90:100] = 0.0            # 10 dead units
    mu, s = f.mean(0), np.cov(f, rowvar=False)
    scale = np.trace(s)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-12 * scale


def naive_kid(x, y, degree=3, coef=1.0):
    """Unbiased MMD^2 with k(a, b) = (a.b / d + coef)^degree, summed pair by pair."""
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + coef) ** degree  # noqa: E731
    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return kxx + kyy - 2 * kxy


def test_kid_equals_naive_unbiased_mmd():
    x, y = _features(30, 5, seed=3), _features(30, 5, shift=0.4, seed=4)
    mean, std = kid(x, y, subsets=3, subset_size=30)  # full sets: every subset is the whole set
    assert mean == pytest.approx(naive_kid(x, y), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-12)
    # subsets: the mean over subsets of the naive value on the same index draws
    g = torch.Generator().manual_seed(7)
    ref = []
    for _ in range(4):
        i, j = torch.randperm(30, generator=g)[:12].numpy(), torch.randperm(30, generator=g)[:12].numpy()
        ref.append(naive_kid(x[i], y[j]))
    mean, std = kid(x, y, subsets=4, subset_size=12, seed=7)
    assert mean == pytest.approx(np.mean(ref), rel=1e-9) and std == pytest.approx(np.std(ref), rel=1e-6)


def test_kid_near_zero_for_same_distribution_and_positive_for_shift():
    a, b = _features(400, 8, seed=5), _features(400, 8, seed=6)
    same, std = kid(a, b, subsets=10, subset_size=200)
    shifted, _ = kid(a, b + 1.0, subsets=10, subset_size=200)
    assert abs(same) < 3 * std + 1e-3 and shifted > 10 * max(abs(same), std)


def sklearn_precision_recall(real, fake, k):
    def radii(f):
        return NearestNeighbors(n_neighbors=k + 1).fit(f).kneighbors(f)[0][:, -1]

    def inside(q, s, r):
        d = np.linalg.norm(q[:, None] - s[None], axis=-1)
        return float((d <= r[None]).any(1).mean())

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def test_precision_recall_equals_sklearn_knn():
    real, fake = _features(150, 6, seed=8), _features(120, 6, shift=0.7, scale=0.6, seed=9)
    p, r = precision_recall(real, fake, k=3)
    rp, rr = sklearn_precision_recall(real, fake, 3)
    assert (p, r) == (pytest.approx(rp), pytest.approx(rr))
    assert 0 < r < p < 1  # a narrower, shifted fake set: high precision, lower recall


def test_class_accuracy_equals_sklearn():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(200, 10, generator=g), torch.randint(0, 10, (200,), generator=g)
    assert class_accuracy(logits, labels) == pytest.approx(accuracy_score(labels, logits.argmax(1)))


def test_clip_score_is_100_times_clamped_cosine():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    assert clip_score(a, b) == pytest.approx(100 * (1 + 2 ** -0.5 + 0) / 3)
