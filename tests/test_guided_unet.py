"""Guidance distillation (Meng et al., 2023, sec. 3) of a class-conditional UNet2DModel: the student
with a w input starts as the teacher for every w, trains through the CLI, and its export runs in
plain diffusers with ``guidance_scale`` selecting w in one pass per step, as stepdistill samples it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import tiny_teacher
from stepdistill.errors import UserError
from stepdistill.export import export_student
from stepdistill.generator import StudentConfig, build_student, cond_proj_dim, guidance_embedding

LABELS = torch.tensor([0, 1, 0, 1])
META = {"num_classes": 2, "null_class": 2, "config": {"objective": {"name": "guidance_distill", "w_min": 1.0,
                                                                    "w_max": 3.0}}}


def _w(w: float, n: int = 4, dim: int = 16) -> dict:
    return {"class_labels": LABELS[:n], "timestep_cond": guidance_embedding(torch.full((n,), w), dim)}


def test_the_student_starts_as_the_teacher_for_every_w():
    teacher = tiny_teacher()
    student = build_student(teacher, StudentConfig(steps=2, sampler="ddim", time_cond_proj_dim=16))
    assert type(student.denoiser.backbone).__name__ == "GuidedUNet2DModel" and cond_proj_dim(student) == 16
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([950.0, 600.0, 300.0, 20.0])
    with torch.no_grad():
        want = teacher(x, t, {"class_labels": LABELS})
        for w in (1.0, 2.5, 7.0):
            torch.testing.assert_close(student.denoiser(x, t, _w(w)), want, rtol=0, atol=0)
        torch.testing.assert_close(student.denoiser(x, t, {"class_labels": LABELS}), want, rtol=0, atol=0)  # w = 1
    with pytest.raises(UserError, match="lora"):
        build_student(teacher, StudentConfig(steps=2, time_cond_proj_dim=16, lora_rank=2))


SNIPPET = textwrap.dedent("""
    import sys
    import torch
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    out = {}
    for name, w in (("w25", 2.5), ("default", None)):
        g = torch.Generator().manual_seed(5)
        out[name] = pipe(class_labels=[0, 1, 0, 1], guidance_scale=w, generator=g, output_type="latent").images
    assert "stepdistill" not in sys.modules
    save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[2])
""")


def test_export_takes_the_guidance_scale_at_call_time_in_plain_diffusers(tmp_path):
    """The exported folder (unet/ with an identity class embedding, guidance_embedding/ with its code)
    loads in diffusers alone; guidance_scale=2.5 and the default (the middle of the trained range, 2.0)
    reproduce the student's samples at those w, and stepdistill reads the folder back."""
    from safetensors.torch import load_file

    from stepdistill.loaders import load_for_sampling

    student = build_student(tiny_teacher(), StudentConfig(steps=2, sampler="ddim", time_cond_proj_dim=16)).eval()
    with torch.no_grad():  # a trained w branch: w now changes the output
        for p in student.denoiser.backbone.embedding.parameters():
            p.add_(0.3 * torch.randn_like(p))
    out = export_student(student, META, tmp_path / "gd")
    index = json.loads((out / "model_index.json").read_text())
    assert index["guidance_embedding"] == ["guidance_embedding", "GuidanceEmbedding"] and index["guidance_scale"] == 2.0
    assert json.loads((out / "unet" / "config.json").read_text())["class_embed_type"] == "identity"
    assert json.loads((out / "stepdistill_student.json").read_text())["format_version"] == 3  # older readers refuse it
    card = (out / "README.md").read_text()
    assert "guidance_scale=2.0" in card and "trained on [1.0, 3.0]" in card and "guidance_embedding.py" in card
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-I", "-c", SNIPPET, str(out), str(tmp_path / "x.safetensors")], env=env,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    got = load_file(tmp_path / "x.safetensors")
    ours = {}
    for name, w in (("w25", 2.5), ("default", 2.0)):
        g = torch.Generator().manual_seed(5)
        noise = torch.randn(4, 1, 8, 8, generator=g)
        with torch.no_grad():
            ours[name] = student(noise, _w(w), generator=g)
        torch.testing.assert_close(got[name], ours[name], rtol=0, atol=1e-4)
    assert not torch.allclose(ours["w25"], ours["default"], atol=1e-3)  # w is an input that matters
    back = load_for_sampling(out)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(4, 1, 8, 8, generator=g)
    again = back.generate(noise, {"class_labels": LABELS}, guidance=2.5, generator=g)
    torch.testing.assert_close(again, ours["w25"], rtol=0, atol=1e-5)


def test_guidance_distill_trains_a_class_conditional_unet2d_through_the_cli(tiny_teacher_dir, tiny_data_npz, tmp_path):
    """Stage 1 then one progressive round (4 -> 2 steps): the w branch moves off zero, and the run
    exports and samples at a chosen --guidance."""
    from stepdistill.cli import main
    from stepdistill.loaders import load_run

    run = tmp_path / "run"
    args = ["train", f"teacher={tiny_teacher_dir}", f"data={tiny_data_npz}", f"output_dir={run}", "cpu=true",
            "batch_size=4", "max_steps=3", "checkpoint_every=3", "log_every=1", "preview_every=null", "progress=false",
            "objective.name=guidance_distill", "objective.stage1_iterations=2", "objective.start_steps=4",
            "objective.final_steps=2", "objective.iterations_per_round=1", "student.steps=2", "student.sampler=ddim",
            "student.time_cond_proj_dim=16", "optim.student.lr=0.01", "ema.decay=0"]
    assert main(args) == 0
    student, _ = load_run(run)
    assert float(student.denoiser.backbone.embedding.linear_2.weight.abs().max()) > 0
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 0
    assert main(["sample", str(tmp_path / "out"), "--num", "4", "--classes", "0,1", "--guidance", "2.5",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()
