"""Guidance distillation (Meng et al., 2023) on a tiny SD1.5-like pipeline: stage 1's loss against the
guided teacher written out, the stages and rounds over the iterations, and the exported student run
by diffusers' own StableDiffusionPipeline, whose guidance_scale selects w in one pass."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stepdistill.errors import UserError
from stepdistill.generator import guidance_embedding
from stepdistill.train.randomness import BatchRandom
from stepdistill.train.setup import resolve
from stepdistill.train.trainer import Trainer
from tiny_pipelines import build_tiny_pipeline

PROMPTS = ["a red cat", "a blue dog"]
OBJ = {"name": "guidance_distill", "w_min": 2.0, "w_max": 4.0, "stage1_iterations": 2, "start_steps": 4,
       "final_steps": 2, "iterations_per_round": 1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gd")
    teacher = build_tiny_pipeline("sd", root / "teacher")
    pairs = root / "pairs"
    pairs.mkdir()
    rng = np.random.default_rng(0)
    for i, p in enumerate(PROMPTS):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(pairs / f"im{i}.png")
        (pairs / f"im{i}.txt").write_text(p)
    return teacher, pairs, root


def _trainer(setup, out, **kw):
    teacher, pairs, root = setup
    o = {"teacher": teacher, "data": pairs, "output_dir": out, "cpu": True, "batch_size": 2, "max_steps": 4,
         "checkpoint_every": 4, "preview_every": "null", "progress": False, "log_every": 1, "ema.decay": 0.0,
         "text.max_sequence_length": 8, "text.cache": root / "text", "resolution": 16, "student.steps": 2,
         "student.sampler": "ddim", "student.time_cond_proj_dim": 16, "optim.student.lr": 0.01, **kw}
    cfg, obj = resolve(None, [f"{k}={v}" for k, v in o.items()] + [f"objective.{k}={v}" for k, v in OBJ.items()])
    return Trainer(cfg, obj)


def test_stage1_loss_is_the_guided_teacher_matched_in_one_pass(setup, tmp_path):
    """x^_eta(z_t, w) against x^_u + w (x^_c - x^_u), the x0 error weighted by max(SNR, 1) (eq. 6)."""
    from accelerate.state import AcceleratorState

    from stepdistill.fake_score import noise_grid

    tr = _trainer(setup, tmp_path / "run")
    obj, nets = tr.objective, tr.nets
    x0, cond = tr.data.rows(torch.arange(2))
    with torch.no_grad():
        got = obj.generator_loss(nets, {"x0": x0, "cond": cond, "rng": BatchRandom(4, 2, slice(0, 2))})["loss"]
    rng = BatchRandom(4, 2, slice(0, 2))
    w = 2.0 + 2.0 * rng.rand(dtype=torch.float64)
    t = noise_grid(tr.teacher.schedule)[rng.randint(0, 1000)]
    eps = rng.randn_like(x0)
    sched = tr.teacher.schedule
    a, s = (v.reshape(-1, 1, 1, 1).float() for v in sched.alpha_sigma(t))
    z = a * x0 + s * eps
    with torch.no_grad():
        x_c = tr.teacher(z, t, cond)
        x_u = tr.teacher(z, t, tr.teacher.null_cond(cond))
        target = x_u + w.reshape(-1, 1, 1, 1).float() * (x_c - x_u)
        x_hat = tr.student.denoise(z, t, {**cond, "timestep_cond": guidance_embedding(w, 16)})
    snr = (a / s).square().flatten()
    want = snr.clamp_min(1.0) * (x_hat - target).square().flatten(1).mean(1)
    assert (x_c - x_u).abs().max() > 1e-4  # guidance changes the target
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    AcceleratorState._reset_state(True)


def test_stages_rounds_and_export_to_stable_diffusion_pipeline(setup, tmp_path):
    """2 iterations of stage 1, then rounds of 2- and ... here one round (4 -> 2 steps); each stage's end
    makes the next round's teacher. The export runs in StableDiffusionPipeline with guidance_scale = w
    (one pass, no CFG) and gives the student's own DDIM sample with that w."""
    from accelerate.state import AcceleratorState
    from diffusers import StableDiffusionPipeline

    from stepdistill.export import export_run
    from stepdistill.loaders import StudentModel, load_run

    tr = _trainer(setup, tmp_path / "run")
    assert [tr.objective.stage()[0]] == [-1] and tr.objective.rounds == [2]
    before = {k: v.clone() for k, v in tr.student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in tr.teacher.state_dict().items()}
    tr.train()
    AcceleratorState._reset_state(True)
    assert tr.objective.iteration == 4 and tr.objective.stage()[0] == 0
    assert any(not torch.equal(before[k], v) for k, v in tr.student.state_dict().items())  # the student trained
    assert all(torch.equal(teacher_before[k], v) for k, v in tr.teacher.state_dict().items())  # the teacher did not
    # the round's teacher is stage 1's student, copied at its end (iteration 2), not the raw teacher
    gd = tr.nets.gd_teacher.state_dict()
    assert any(not torch.equal(before[k], gd[k]) for k in before)
    fresh = type(tr.objective)(tr.objective.cfg)
    fresh.load_state_dict(tr.objective.state_dict())
    assert fresh.stage() == tr.objective.stage()
    out = export_run(tmp_path / "run", tmp_path / "export")
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.unet.config.time_cond_proj_dim == 16
    student, meta = load_run(tmp_path / "run")
    cond = StudentModel(student, meta).text_cond(PROMPTS)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for w in (2.0, 3.5):
        got = pipe(PROMPTS, latents=noise, guidance_scale=w, num_inference_steps=2, height=16, width=16,
                   output_type="latent").images
        with torch.no_grad():
            want = student(noise, {**cond, "timestep_cond": guidance_embedding(torch.full((2,), w), 16)})
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * max(float(want.abs().max()), 1.0))
    assert "guidance_scale" in (out / "README.md").read_text()


def test_a_student_without_a_w_input_is_refused(setup, tmp_path):
    with pytest.raises(UserError, match="time_cond_proj_dim"):
        _trainer(setup, tmp_path / "run", **{"student.time_cond_proj_dim": "null"})
