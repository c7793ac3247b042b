"""The shipped digits detector: its recorded held-out accuracy is real, and its FID sees pixel noise."""
from __future__ import annotations

import json

import pytest
import torch

from stepdistill.data import load_images
from stepdistill.eval.detectors import get_detector
from stepdistill.eval.digits_detector import DEFAULT_WEIGHTS
from stepdistill.eval.metrics import frechet_distance_low_rank
from stepdistill.images import to_uint8


@pytest.fixture(scope="module")
def digits():
    return get_detector("digits"), load_images("digits-train"), load_images("digits-test")


def test_accuracy_matches_its_record(digits):
    det, _, test = digits
    logits = det.extract(to_uint8(test.images))["logits"]
    acc = float((logits.argmax(1) == test.labels).float().mean())
    meta = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    assert acc == pytest.approx(meta["test_accuracy"], abs=1e-3) and acc > 0.9
    assert meta["test_sha256"] == test.sha256  # recorded on the very split we load


def test_fid_rises_clearly_with_gaussian_noise(digits):
    det, train, test = digits
    ref = det.features(to_uint8(test.images)).numpy()
    real = frechet_distance_low_rank(det.features(to_uint8(train.images)).numpy(), ref)
    g = torch.Generator().manual_seed(0)
    noisy_x = train.images + 0.1 * torch.randn(train.images.shape, generator=g)
    noisy = frechet_distance_low_rank(det.features(to_uint8(noisy_x)).numpy(), ref)
    assert noisy > 3 * real, (real, noisy)


def test_rgb_and_upscaled_inputs_are_read_consistently(digits):
    det = digits[0]
    x = to_uint8(digits[2].images[:8])
    f = det.features(x)
    assert torch.allclose(det.features(x.expand(-1, 3, -1, -1).contiguous()), f, atol=1e-5)
    assert det.features(x.repeat_interleave(2, -1).repeat_interleave(2, -2)).shape == f.shape
