"""Hyper-SD's trajectory segmented consistency distillation (Ren et al., 2024, sec. 3.1): the stages'
segments, their progression with the iterations (and over a checkpoint), and the loss against a
transcription on fixed tensors (teacher DDIM step, DDIM jumps of the x0 estimates to the segment end)."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_teacher
from stepdistill.errors import UserError
from stepdistill.generator import StudentConfig, build_student
from stepdistill.objectives.base import Nets
from stepdistill.objectives.hyper_sd import HyperSD
from stepdistill.train.randomness import BatchRandom


def _setup(**cfg):
    torch.manual_seed(0)
    teacher = tiny_teacher().requires_grad_(False)
    obj = HyperSD(HyperSD.Config(**cfg))
    student = build_student(teacher, StudentConfig(steps=obj.student_steps(), sampler="ddim"))
    return obj, Nets(teacher=teacher, student=student, **obj.build(teacher, student))


def test_stages_cut_the_axis_into_8_4_2_1_segments():
    obj, nets = _setup(iterations_per_stage=3)
    sched = nets.student.schedule
    t = torch.tensor([999.0, 900.0, 874.0, 750.0, 600.0, 499.0, 300.0, 100.0], dtype=torch.float64)
    ends = {k: obj.segment_end(sched, t, k).tolist() for k in (8, 4, 2, 1)}
    assert ends[8] == [874.0, 874.0, 749.0, 749.0, 499.0, 374.0, 249.0, -1.0]
    assert ends[4] == [749.0, 749.0, 749.0, 749.0, 499.0, 249.0, 249.0, -1.0]
    assert ends[2] == [499.0, 499.0, 499.0, 499.0, 499.0, -1.0, -1.0, -1.0]
    assert ends[1] == [-1.0] * 8
    seen = []
    for step in range(12):
        seen.append(obj.cfg.segments[obj.stage])
        obj.on_step_end(nets, step + 1)  # as the trainer calls it: iterations done
    assert seen == [8] * 3 + [4] * 3 + [2] * 3 + [1] * 3
    fresh = HyperSD(HyperSD.Config(iterations_per_stage=3))
    fresh.load_state_dict(obj.state_dict())
    assert fresh.stage == 3 and nets.student.steps == 1


def test_stage_shares_move_stages_and_start_the_critic_at_the_runs_progress():
    """stage_shares [1, 1, 1, 3]: stage k begins at the first iteration whose progress (told before it)
    reaches the cumulative share (1/6, 2/6, 1/2), the critic's phase at the last stage's share (the trainer
    starts it at that same progress); the stage reached is part of the objective's state."""
    obj = HyperSD(HyperSD.Config(stage_shares=[1, 1, 1, 3], dmd_weight=1.0))
    critic = next(p for p in obj.phases() if p.name == "critic")
    assert critic.start_fraction == pytest.approx(0.5) and critic.start == 0
    seen = []
    for k in range(24):
        obj.set_progress(k / 24)
        seen.append(obj.cfg.segments[obj.stage])
        obj.iteration = k + 1
    assert seen == [8] * 4 + [4] * 4 + [2] * 4 + [1] * 12
    fresh = HyperSD(HyperSD.Config(stage_shares=[1, 1, 1, 3], dmd_weight=1.0))
    fresh.load_state_dict(obj.state_dict())
    assert fresh.stage == 3
    fresh.set_progress(0.0)  # a stage once reached stays
    assert fresh.stage == 3
    for bad in ([1, 1, 0, 3], [1, 1, float("nan"), 3], [1, 1, 1]):
        with pytest.raises(UserError, match="one positive share per stage"):
            HyperSD(HyperSD.Config(stage_shares=bad))


def test_bad_segments_are_refused():
    with pytest.raises(UserError, match="non-increasing"):
        HyperSD(HyperSD.Config(segments=[1, 2]))
    with pytest.raises(UserError, match="multiple of every segment count"):
        HyperSD(HyperSD.Config(teacher_steps=20, segments=[8, 4]))


def test_loss_on_fixed_tensors_is_the_transcription():
    obj, nets = _setup(iterations_per_stage=1000, teacher_steps=8)  # stage 0: 8 segments, one teacher step each
    obj.iteration = 1000                                            # stage 1: 4 segments, two teacher steps each
    student, teacher, sched = nets.student, nets.teacher, nets.student.schedule
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    cond = {"class_labels": torch.tensor([0, 1, 0, 1, 0, 1])}
    with torch.no_grad():
        got = obj.generator_loss(nets, {"x0": x0, "cond": cond, "rng": BatchRandom(9, 6, slice(0, 6))})["loss"]
    rng = BatchRandom(9, 6, slice(0, 6))
    n = rng.randint(0, 8)
    eps = rng.randn_like(x0)
    grid = torch.tensor([999, 874, 749, 624, 499, 374, 249, 124, -1])       # DDIM trailing, 8 steps
    ends4 = {999: 749, 874: 749, 749: 499, 624: 499, 499: 249, 374: 249, 249: -1, 124: -1}
    ab = torch.cat([sched.alphas_cumprod.double(), torch.ones(1, dtype=torch.float64)])

    def a_s(t):
        v = ab[t].reshape(-1, 1, 1, 1)
        return v.sqrt(), (1 - v).sqrt()

    def jump(net, x, t_from, t_to):
        x0_hat = net(x, t_from.double(), cond).double()
        (a, s), (a2, s2) = a_s(t_from), a_s(t_to)
        out = a2 * x0_hat + s2 * (x - a * x0_hat) / s
        return torch.where((t_to == -1).reshape(-1, 1, 1, 1), x0_hat, out)

    t = grid[n]
    s_end = torch.tensor([ends4[int(v)] for v in t])
    t_prev = torch.maximum(grid[n + 1], s_end)
    a, s = a_s(t)
    x_t = (a * x0 + s * eps).float()
    with torch.no_grad():
        f = jump(student.denoise, x_t.double(), t, s_end)
        x_prev = jump(teacher, x_t.double(), t, t_prev).float()           # one DDIM step of the teacher
        target = jump(student.denoise, x_prev.double(), t_prev, s_end)
        target = torch.where((t_prev == s_end).reshape(-1, 1, 1, 1), x_prev.double(), target)
    assert (t_prev > s_end).any() and (t_prev == s_end).any()
    torch.testing.assert_close(got.double(), (f - target).square().flatten(1).mean(1), rtol=1e-4, atol=1e-7)


def test_last_stage_score_distillation_is_dmds_gradient():
    """``dmd_weight``: only in the last stage, the generator adds weight * 0.5 mean((x - sg(x - g))^2)
    with DMD's g = (F(x_t) - T(x_t)) / mean|x - T(x_t)| (Yin et al., 2024, eq. 7-8) on the student's
    one-step samples; the fake score's critic phase starts with that stage."""
    from stepdistill.fake_score import noise_grid

    obj, nets = _setup(iterations_per_stage=2, teacher_steps=8, dmd_weight=0.5)
    assert [(p.name, p.start) for p in obj.phases()] == [("critic", 6), ("generator", 0)]
    with torch.no_grad():  # the fake score away from the teacher
        for p in nets.fake_score.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x0 = torch.zeros(4, 1, 8, 8)
    cond = {"class_labels": torch.tensor([0, 1, 0, 1])}
    batch = {"x0": x0, "cond": cond, "rng": BatchRandom(3, 4, slice(0, 4))}
    assert "dmd" not in obj.generator_loss(nets, batch)
    obj.iteration = 6
    out = obj.generator_loss(nets, {**batch, "rng": BatchRandom(3, 4, slice(0, 4))})
    rng = BatchRandom(3, 4, slice(0, 4))
    rng.randint(0, 8), rng.randn_like(x0)  # the consistency term's step and noise
    z = rng.randn_like(x0)
    t = noise_grid(nets.teacher.schedule)[rng.randint(20, 981)]
    eps = rng.randn_like(x0)
    with torch.no_grad():
        x = nets.student(z, cond)
        a, s = (v.reshape(-1, 1, 1, 1).float() for v in nets.teacher.schedule.alpha_sigma(t))
        x_t = a * x + s * eps
        real = nets.teacher(x_t, t, cond)
        g = (nets.fake_score(x_t, t, cond) - real) / (x - real).abs().flatten(1).mean(1).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(out["dmd"], 0.5 * 0.5 * g.square().flatten(1).mean(1), rtol=1e-4, atol=1e-8)
    params = [p for p in nets.student.parameters()]
    got = torch.autograd.grad(out["dmd"].sum(), params)
    x = nets.student(z, cond)  # with gradient: the surrogate's gradient, sign included
    want = torch.autograd.grad((0.25 * (x - (x - g).detach()).square().flatten(1).mean(1)).sum(), params)
    got, want = torch.cat([v.flatten() for v in got]), torch.cat([v.flatten() for v in want])
    assert float(want.abs().max()) > 0
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))
    assert obj.losses("critic", nets, batch)["fake_dsm"].shape == (4,)


def _staged_trainer(teacher, data, out, max_steps, shares="[1,1]", allow_changes=False, **extra):
    """A trainer of a tiny two-stage hyper_sd run (2 segments, then 1 with the DMD term) in ``out``."""
    from stepdistill.train import resolve
    from stepdistill.train.trainer import Trainer

    over = dict(teacher=teacher, data=data, output_dir=out, cpu="true", batch_size=2, max_steps=max_steps,
                checkpoint_every=2, log_every=1, preview_every="null", progress="false",
                **{"objective.name": "hyper_sd", "objective.segments": "[2,1]", "objective.teacher_steps": 4,
                   "objective.stage_shares": shares, "objective.dmd_weight": 1.0, "student.steps": 1,
                   "student.sampler": "ddim"}, **extra)
    return Trainer(*resolve(None, [f"{k}={v}" for k, v in over.items()]), allow_changes=allow_changes)


def test_in_a_run_the_last_stage_and_its_critic_start_together_and_resume_exactly(tiny_teacher_dir, tiny_data_npz,
                                                                                  tmp_path):
    """stage_shares [1, 1] of a 6-iteration run: iteration 4 (progress 3/6 before it) is the first with one
    segment, the DMD term and the fake score's first update; a run stopped after 2 iterations and resumed
    ends with the same weights as one run straight through."""
    import json

    from accelerate.state import AcceleratorState
    from safetensors.torch import load_file

    def run(out, max_steps):
        try:
            _staged_trainer(tiny_teacher_dir, tiny_data_npz, out, max_steps, **{"optim.fake_score.lr": 1e-3}).train()
        finally:
            AcceleratorState._reset_state(True)
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    lines = run(tmp_path / "full", 6)
    segments = [x["losses"]["generator/_segments"] for x in lines]
    critic = [any(k.startswith("critic/") for k in x["losses"]) for x in lines]
    dmd = ["generator/dmd" in x["losses"] for x in lines]
    assert segments == [2, 2, 2, 1, 1, 1] and critic == dmd == [False] * 3 + [True] * 3
    import shutil

    run(tmp_path / "split", 6)
    for later in ("step-00000004", "step-00000006"):  # as if killed after its step-2 checkpoint
        shutil.rmtree(tmp_path / "split" / "checkpoints" / later)
    resumed = run(tmp_path / "split", 6)  # resumes at iteration 3, in the first stage
    assert [x["losses"]["generator/_segments"] for x in resumed][-4:] == [2, 1, 1, 1]
    a, b = (load_file(str(next((d / "checkpoints" / "step-00000006").glob("*.safetensors"))))
            for d in (tmp_path / "full", tmp_path / "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_that_moves_the_stages_is_refused(tiny_teacher_dir, tiny_data_npz, tmp_path):
    """stage_shares changed on a resume (--allow-changes) would keep the stage reached but re-key the
    critic's start: refused with one line, before any iteration; the same shares resume."""
    from accelerate.state import AcceleratorState

    def trainer(max_steps, shares):
        return _staged_trainer(tiny_teacher_dir, tiny_data_npz, tmp_path / "run", max_steps, shares, allow_changes=True)

    try:
        trainer(2, "[1,1]").train()
        AcceleratorState._reset_state(True)
        with pytest.raises(UserError, match="stage_shares moves the stages"):
            trainer(4, "[1,3]").train()
        AcceleratorState._reset_state(True)
        trainer(4, "[1,1]").train()  # the run's own shares go on
    finally:
        AcceleratorState._reset_state(True)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
