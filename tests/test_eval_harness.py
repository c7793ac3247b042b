"""The harness end to end on tiny models: seeded and batch-independent generation, protocol records,
refusal of mismatched reference statistics, the CLI's JSON and plot."""
from __future__ import annotations

import json

import numpy as np
import pytest

from stepdistill import cli
from stepdistill.errors import UserError
from stepdistill.eval.detectors import get_detector
from stepdistill.eval.harness import evaluate_generator, resolve_ref
from stepdistill.eval.stats import Stats, check_compatible, make_stats


@pytest.fixture(scope="module")
def digits_stats():
    return make_stats("digits-test", get_detector("digits"))


def test_stats_roundtrip_and_protocol(tmp_path, digits_stats):
    path = digits_stats.save(tmp_path / "s.npz")
    back = Stats.load(path)
    np.testing.assert_array_equal(back.mu, digits_stats.mu)
    np.testing.assert_array_equal(back.sigma, digits_stats.sigma)
    np.testing.assert_array_equal(back.features, digits_stats.features)
    p = back.protocol
    assert p["detector"] == "digits" and p["count"] == 397 and p["dataset"] == "digits-test"
    assert len(p["detector_weights_sha256"]) == 64 and len(p["dataset_sha256"]) == 64 and "bicubic" in p["resize"]


@pytest.mark.parametrize("field,value", [("detector", "inception"), ("detector_weights_sha256", "0" * 64),
                                         ("resize", "bilinear"), ("image_size", 299)])
def test_mismatched_protocols_are_refused(digits_stats, field, value):
    other = dict(digits_stats.protocol, **{field: value})
    with pytest.raises(UserError, match=f"protocol mismatch in '{field}'"):
        check_compatible(digits_stats.protocol, other)
    with pytest.raises(UserError, match=field):
        resolve_ref(Stats(digits_stats.mu, digits_stats.sigma, other), get_detector("digits"))


def test_cli_refuses_stats_of_another_protocol(tmp_path, digits_stats, capsys):
    bad = Stats(digits_stats.mu, digits_stats.sigma, dict(digits_stats.protocol, resize="legacy-pytorch bilinear"))
    bad.save(tmp_path / "bad.npz")
    rc = cli.main(["eval", "digits-train", "--detector", "digits", "--ref", str(tmp_path / "bad.npz"), "--num", "50"])
    assert rc == 2 and "protocol mismatch in 'resize'" in capsys.readouterr().err


def test_same_images_score_zero_through_png_folder(tmp_path, digits_stats):
    from PIL import Image

    from stepdistill.data import load_images
    from stepdistill.images import to_uint8

    u8 = to_uint8(load_images("digits-test").images)
    for i, img in enumerate(u8):
        Image.fromarray(img[0].numpy()).save(tmp_path / f"{i:04d}.png")
    out = tmp_path / "r.json"
    assert cli.main(["eval", str(tmp_path), "--detector", "digits", "--ref", "digits-test", "--num", "397",
                     "--json", str(out)]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert abs(row["fid"]) < 1e-6 and row["precision"] == 1.0 and row["recall"] == 1.0


def _tiny_generate(den, steps):
    from stepdistill.sampling import sample

    return lambda noise, labels: sample(den, noise, steps, cond={"class_labels": labels})


def test_generation_is_seeded_and_independent_of_batch_size(digits_stats):
    from tests.conftest import tiny_teacher

    den = tiny_teacher()
    kw = dict(num=24, detector="digits", ref=digits_stats, sample_shape=(1, 8, 8), num_classes=2)
    a = evaluate_generator(_tiny_generate(den, 2), seed=3, batch=24, **kw)
    b = evaluate_generator(_tiny_generate(den, 2), seed=3, batch=5, **kw)
    c = evaluate_generator(_tiny_generate(den, 2), seed=4, batch=24, **kw)
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-9) and a["fid"] != c["fid"]
    for key in ("fid", "kid", "kid_std", "precision", "recall", "class_accuracy"):
        assert np.isfinite(a[key])
    assert a["protocol"]["seed"] == 3 and a["protocol"]["reference"]["dataset"] == "digits-test"


def test_cli_teacher_json_and_plot(tmp_path, tiny_teacher_dir):
    out, png = tmp_path / "r.json", tmp_path / "fid.png"
    assert cli.main(["eval", str(tiny_teacher_dir), "--steps", "1,2", "--num", "20", "--detector", "digits",
                     "--ref", "digits-test", "--seed", "1", "--json", str(out), "--plot", str(png)]) == 0
    rep = json.loads(out.read_text())
    assert [r["steps"] for r in rep["results"]] == [1, 2] and [r["nfe"] for r in rep["results"]] == [1, 2]
    assert all(r["count"] == 20 and "kid" in r and "class_accuracy" in r for r in rep["results"])
    assert rep["protocol"]["detector"] == "digits" and rep["protocol"]["num_samples"] == 20
    assert "command" in rep and png.stat().st_size > 1000


@pytest.mark.parametrize("argv,message", [
    (["eval", "nowhere", "--ref", "digits-test", "--detector", "digits"], "does not exist"),
    (["eval", str(__file__), "--ref", "digits-test", "--steps", "0,x"], "--steps '0,x'"),
    (["eval", "--make-stats", "digits-test", "--out", "x.txt"], "--out PATH.npz"),
    (["eval", "digits-train", "--ref", "missing.npz"], "does not exist"),
    (["eval", "digits-train", "--ref", "digits-test", "--detector", "vgg"], "unknown detector"),
])
def test_bad_input_is_refused_with_one_message(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_shipped_teacher_fid_falls_with_steps_and_stays_above_real_data():
    """The acceptance run: digits FID of the shipped teacher at 1, 4, 50 DDIM steps (N = 1,000)."""

    from stepdistill.eval.report import evaluate_model
    from stepdistill.resources import TEACHERS

    teacher = TEACHERS / "digits16"
    if not (teacher / "stepdistill.json").is_file():
        pytest.skip("the shipped digits teacher is missing from the package")
    det = get_detector("digits")
    fids = [r["fid"] for r in evaluate_model(str(teacher), steps=[1, 4, 50], num=1000, detector=det,
                                             ref="digits-test")["results"]]
    real = evaluate_model("digits-train", steps=[1], num=1400, detector=det, ref="digits-test")["results"][0]["fid"]
    assert fids[0] > fids[1] > fids[2] > 1.5 * real, (fids, real)
