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


class _Noise:
    """The trainer's per-sample stream, reduced to the generator noise it hands out."""

    def __init__(self, noise):
        self.noise = noise

    def randn_like(self, x):
        return self.noise.clone()


def _sida(**kw):
    obj = SiD(SiD.Config(**{"gan_weight": 1.0, "gan_form": "sida", **kw}))
    teacher = tiny_teacher().requires_grad_(False)
    student = build_student(teacher)
    nets = Nets(teacher=teacher, student=student, **obj.build(teacher, student))
    with torch.no_grad():  # a fake score apart from the teacher, a classifier apart from zero
        for p in list(nets.fake_score.parameters()) + list(nets.disc.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    return obj, nets, noise


def test_sida_critic_noises_real_and_fake_alike_and_weights_the_classifier_like_one_dsm_pixel():
    """SiDA: real images are noised with the DSM's own noise and time. With real images equal to the
    student's samples both logits agree exactly; the DSM term is the fake score's raw-space error
    there; the classifier's term is gan_critic_weight * lambda(t) / pixels * BCE / 2, lambda = 1 / sigma^2
    on this v-prediction teacher."""
    from stepdistill.fake_score import find_module, forward_with_features
    from torch.nn.functional import softplus

    obj, nets, noise = _sida(gan_critic_weight=0.5)
    with torch.no_grad():
        x = nets.student(noise, COND)
    batch = {"x0": x.clone(), "cond": COND, "rng": _Noise(noise)}
    torch.manual_seed(1)
    out = obj.critic_loss(nets, batch)
    assert torch.equal(out["_d_real"], out["_d_fake"])
    sched = nets.fake_score.schedule
    torch.manual_seed(1)  # the same draws, by hand: t from the teacher's training times, then the noise
    t = sched.sample_t(4)
    x_t = sched.add_noise(x, torch.randn_like(x), t)
    with torch.no_grad():
        v_pred = sched.x0_to_raw(nets.fake_score(x_t, t, COND), x_t, t)
        _, feats = forward_with_features(nets.fake_score, find_module(nets.fake_score, "auto"), x_t, t, COND)
        logits = nets.disc(feats, COND)
    assert torch.allclose(out["fake_dsm"], (v_pred - sched.x0_to_raw(x, x_t, t)).pow(2).flatten(1).mean(1), atol=1e-6)
    assert torch.allclose(out["_d_fake"], logits, atol=1e-5)
    lam = 1.0 / sched.alpha_sigma(t)[1] ** 2
    want = 0.5 * lam.float() / 64 * 0.5 * (softplus(-logits) + softplus(logits))
    assert torch.allclose(out["gan_d"], want, rtol=1e-4)


def test_sida_generator_term_shares_sids_evaluation_and_normaliser():
    """The classifier reads the features of the one fake-score evaluation SiD makes at x_t; its loss is
    gan_weight * pixels / mean|x_g - f_phi| * softplus(-D) per sample; gradients reach the student only."""
    from stepdistill.fake_score import find_module, forward_with_features, sample_times
    from torch.nn.functional import softplus

    obj, nets, noise = _sida(gan_weight=0.7)
    calls = []
    nets.fake_score.register_forward_pre_hook(lambda m, a: calls.append(1))
    batch = {"x0": torch.zeros(4, 1, 8, 8), "cond": COND, "rng": _Noise(noise)}
    torch.manual_seed(2)
    out = obj.generator_loss(nets, batch)
    assert len(calls) == 1
    torch.manual_seed(2)
    with torch.no_grad():
        x_g = nets.student(noise, COND)
        t = sample_times(nets.fake_score.schedule, 4, obj.cfg.t_range)
        x_t = nets.fake_score.schedule.add_noise(x_g, torch.randn_like(x_g), t)
        f_phi = nets.teacher(x_t, t, COND)
        _, feats = forward_with_features(nets.fake_score, find_module(nets.fake_score, "auto"), x_t, t, COND)
        want = 0.7 * 64 / (x_g - f_phi).abs().flatten(1).mean(1) * softplus(-nets.disc(feats, COND))
    assert torch.allclose(out["gan_g"], want, rtol=1e-4)
    (out["sid"] + out["gan_g"]).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in nets.student.parameters())
    assert all(p.grad is None for n in ("fake_score", "disc") for p in nets.get(n).parameters())


def test_gan_form_is_checked():
    with pytest.raises(UserError, match="gan_form 'sidx' is not supported"):
        SiD(SiD.Config(gan_weight=1.0, gan_form="sidx"))
    with pytest.raises(UserError, match="anti_cfg"):
        SiD(SiD.Config(gan_weight=1.0, gan_form="sida", guidance_mode="anti_cfg"))
    with pytest.raises(UserError, match="r1_weight=0"):
        SiD(SiD.Config(gan_weight=1.0, gan_form="sida", r1_weight=1e-3))
