"""SiD: the generator loss is the paper's expression, it reaches the student through both score
networks without training them, and the guidance strategies route conditions as SiD-LSG says."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_teacher
from stepdistill.errors import UserError
from stepdistill.generator import build_student
from stepdistill.objectives.base import Nets
from stepdistill.objectives.sid import SiD, sid_generator_loss

COND = {"class_labels": torch.tensor([0, 1, 0, 1])}


def test_loss_expands_to_the_papers_form():
    torch.manual_seed(0)
    x, fp, fq = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    alpha = 1.2
    got = sid_generator_loss(x, fp, fq, alpha)
    d = (fp - fq).flatten(1)
    w = (x - fp).abs().flatten(1).mean(1)
    want = ((1 - alpha) * (d * d).sum(1) + (d * (fq - x).flatten(1)).sum(1)) / w
    assert torch.allclose(got, want, atol=1e-5)


def test_gradient_reaches_the_student_only():
    obj = SiD()
    teacher = tiny_teacher().requires_grad_(False)
    student = build_student(teacher)
    nets = Nets(teacher=teacher, student=student, **obj.build(teacher, student))
    with torch.no_grad():
        for p in nets.fake_score.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = obj.generator_loss(nets, {"x0": torch.zeros(4, 1, 8, 8), "cond": COND})
    out["sid"].mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in nets.fake_score.parameters())
    assert all(p.requires_grad for p in nets.fake_score.parameters())


def test_guidance_modes_route_conditions():
    teacher = tiny_teacher().requires_grad_(False)
    student = build_student(teacher)
    seen = []
    for mode in ("cfg", "zero_cfg", "anti_cfg"):
        obj = SiD(SiD.Config(guidance_mode=mode, guidance=2.0, fake_guidance=-1.0))
        nets = Nets(teacher=teacher, student=student, **obj.build(teacher, student))
        labels = []
        nets.fake_score.register_forward_pre_hook(lambda m, a: labels.append(a[2]["class_labels"].tolist()))
        x = torch.randn(4, 1, 8, 8)
        t = torch.full((4,), 500.0, dtype=torch.float64)
        obj.scores(nets, x, t, COND)
        seen.append(labels)
    assert seen[0] == [[0, 1, 0, 1]]                     # cfg: the fake score sees the condition
    assert seen[1] == [[2, 2, 2, 2]]                     # zero-cfg: only the null class
    assert seen[2] == [[2, 2, 2, 2, 0, 1, 0, 1]]         # anti-cfg: both branches, for its own CFG


def test_regression_warmup_option(tmp_path):
    """SiD takes DMD2's regression initialisation as an option: regression alone first, critic waiting."""
    from stepdistill.objectives.dmd import pseudo_huber

    obj = SiD(SiD.Config(regression_warmup=1, cache=str(tmp_path / "pairs"), cache_num=8, cache_steps=2))
    assert [(p.name, p.start) for p in obj.phases()] == [("critic", 1), ("generator", 0)]
    teacher = tiny_teacher().requires_grad_(False)
    teacher.meta = {"num_classes": 2, "in_channels": 1, "sample_size": 8}
    student = build_student(teacher, steps=1)
    nets = Nets(teacher=teacher, student=student, **obj.build(teacher, student))
    batch = {"x0": torch.zeros(4, 1, 8, 8), "cond": {"class_labels": torch.tensor([0, 1, 0, 1])}}
    torch.manual_seed(0)
    out = obj.generator_loss(nets, batch)
    torch.manual_seed(0)
    noise, x_ref, cond = obj._pairs.get(torch.randint(0, 8, (4,)))
    assert set(out) == {"regression"}
    torch.testing.assert_close(out["regression"][0], pseudo_huber(student(noise, cond), x_ref).mean())
    obj.on_step_end(nets, 1)
    assert "sid" in obj.generator_loss(nets, batch)
    with pytest.raises(UserError, match="objective.cache"):
        SiD(SiD.Config(regression_warmup=1))
