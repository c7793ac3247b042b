"""``stepdistill sample``: determinism, the .npz format, grid content and settings file, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from stepdistill.cli import main
from stepdistill.images import to_uint8
from stepdistill.loaders import load_for_sampling
from stepdistill.sampling import sample


def _run(tiny_teacher_dir, tmp_path, name, *extra):
    out, npz = tmp_path / f"{name}.png", tmp_path / f"{name}.npz"
    rc = main(["sample", str(tiny_teacher_dir), "--steps", "3", "--num", "6", "--out", str(out),
               "--save-npz", str(npz), *extra])
    assert rc == 0
    with np.load(npz) as z:
        return {k: z[k] for k in z.files}, out


def test_same_seed_same_images_and_batch_size_does_not_matter(tiny_teacher_dir, tmp_path):
    a, _ = _run(tiny_teacher_dir, tmp_path, "a", "--seed", "5")
    b, _ = _run(tiny_teacher_dir, tmp_path, "b", "--seed", "5", "--batch", "4")
    c, _ = _run(tiny_teacher_dir, tmp_path, "c", "--seed", "6")
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])
    assert not np.array_equal(a["images"], c["images"])


def test_npz_format_and_it_equals_direct_sampling(tiny_teacher_dir, tmp_path):
    z, _ = _run(tiny_teacher_dir, tmp_path, "s", "--seed", "2", "--sampler", "heun")
    assert z["images"].dtype == np.uint8 and z["images"].shape == (6, 8, 8, 1)
    assert z["labels"].tolist() == [0, 1, 0, 1, 0, 1]  # every class in order, cycled
    model = load_for_sampling(tiny_teacher_dir)
    noise = torch.randn((6, 1, 8, 8), generator=torch.Generator().manual_seed(2))
    x = sample(model.denoiser, noise, 3, sampler="heun", cond={"class_labels": torch.tensor([0, 1] * 3)})
    assert np.array_equal(to_uint8(x).permute(0, 2, 3, 1).numpy(), z["images"])


def test_requested_classes_and_guidance(tiny_teacher_dir, tmp_path):
    one, _ = _run(tiny_teacher_dir, tmp_path, "one", "--classes", "1")
    assert one["labels"].tolist() == [1] * 6
    plain, _ = _run(tiny_teacher_dir, tmp_path, "g1", "--classes", "1", "--guidance", "1")
    guided, _ = _run(tiny_teacher_dir, tmp_path, "g3", "--classes", "1", "--guidance", "3")
    assert np.array_equal(one["images"], plain["images"]) and not np.array_equal(plain["images"], guided["images"])


def test_grid_shows_the_saved_images_and_settings_are_written(tiny_teacher_dir, tmp_path):
    z, png = _run(tiny_teacher_dir, tmp_path, "grid", "--seed", "1")
    grid = np.asarray(Image.open(png))
    scale, pad, nrow = 8, 2, 2  # 8x8 images are upscaled x8 (nearest) to 64 px; one column per class
    assert grid.shape == (3 * (64 + pad) + pad, nrow * (64 + pad) + pad)
    for i in range(6):
        r, c = divmod(i, nrow)
        tile = grid[pad + r * (64 + pad):pad + r * (64 + pad) + 64, pad + c * (64 + pad):pad + c * (64 + pad) + 64]
        assert np.array_equal(tile[::scale, ::scale], z["images"][i, ..., 0])
        assert np.array_equal(tile, np.kron(z["images"][i, ..., 0], np.ones((scale, scale), np.uint8)))
    settings = yaml.safe_load(png.with_suffix(".yaml").read_text())
    assert settings["seed"] == 1 and settings["steps"] == 3 and settings["sampler"] == "ddim"
    assert settings["classes"] == [0, 1] and settings["num"] == 6 and settings["guidance"] == 1.0


@pytest.mark.parametrize("extra, needle", [
    (["--classes", "2"], "class ids must be in 0..1"),
    (["--classes", "a,b"], "comma-separated"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--sampler", "plms"], "unknown sampler"),
    (["--no-ema"], "--no-ema applies to a run folder"),
])
def test_bad_arguments_exit_2(tiny_teacher_dir, tmp_path, capsys, extra, needle):
    rc = main(["sample", str(tiny_teacher_dir), "--num", "2", "--out", str(tmp_path / "x.png"), *extra])
    assert rc == 2 and not (tmp_path / "x.png").exists()
    assert needle in capsys.readouterr().err


def test_missing_model_exit_2(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
