"""`stepdistill eval` of a text-to-image model: samples from a prompt list, FID against reference
images and the CLIP score of each image against its own prompt (tiny random SD pipeline and CLIP)."""
from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from stepdistill.cli import main
from test_eval_clip import clip_dir  # noqa: F401  (fixture: a tiny CLIP with tokenizer)
from tiny_pipelines import build_tiny_pipeline

PROMPTS = ["a red cat", "a blue dog", "a green tree"]


def test_eval_text_to_image_reports_fid_and_clip_score(tmp_path, clip_dir):  # noqa: F811
    pipe = build_tiny_pipeline("sd", tmp_path / "sd")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    out = tmp_path / "r.json"
    rc = main(["eval", str(pipe), "--steps", "2", "--num", "6", "--detector", f"clip:{clip_dir}", "--ref", str(ref),
               "--prompts", str(tmp_path / "prompts.txt"), "--clip", str(clip_dir), "--resolution", "16",
               "--json", str(out), "--batch", "4"])
    assert rc == 0
    rep = json.loads(out.read_text())
    row = rep["results"][0]
    assert row["steps"] == 2 and np.isfinite(row["fid"]) and "class_accuracy" not in row
    assert rep["protocol"]["prompts_sha256"] and rep["protocol"]["clip"]["weights_sha256"]

    # the same images rebuilt here (same seeded noise, prompt i % 3 for sample i), scored by CLIP directly
    from stepdistill.eval.clip import CLIPDetector
    from stepdistill.eval.harness import seeded_noise
    from stepdistill.images import to_uint8
    from stepdistill.loaders import load_for_sampling

    model = load_for_sampling(pipe, resolution=16)
    text = model.text_cond(PROMPTS)
    imgs, texts = [], []
    for i, j in ((0, 4), (4, 6)):
        labels = torch.arange(i, j) % 3
        noise = seeded_noise(i, j, model.shape, 0)
        cond = {k: v[labels] for k, v in text.items()}
        imgs.append(to_uint8(model.to_pixels(model.generate(noise, cond, 2))))
        texts += [PROMPTS[int(k)] for k in labels]
    want = CLIPDetector(str(clip_dir)).clip_score(torch.cat(imgs), texts)
    assert abs(row["clip_score"] - want) < 1e-4


def test_resolution_is_refused_where_it_cannot_apply(tmp_path):
    """--resolution picks a text-to-image teacher's size; a pixel teacher (and a student) has a fixed one."""
    import pytest

    from stepdistill.errors import UserError
    from stepdistill.loaders import load_for_sampling

    with pytest.raises(UserError, match="drop --resolution"):
        load_for_sampling("digits16", resolution=32)
    run = tmp_path / "run"  # a run folder's shape is enough: the refusal comes before loading
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(UserError, match="a student samples at its trained size"):
        load_for_sampling(run, resolution=16)
