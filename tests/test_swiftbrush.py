"""SwiftBrush (Nguyen & Tran, 2024): the generator's VSD gradient and the LoRA teacher's loss against
a transcription of the authors' training loop (VinAIResearch/SwiftBrush train_swiftbrush.py: the
"VSD loss" and "LoRA loss" blocks) on fixed tensors, computed from the backbone's raw outputs."""
from __future__ import annotations

import torch

from conftest import tiny_teacher
from stepdistill.fake_score import adapters_disabled, noise_grid
from stepdistill.generator import StudentConfig, build_student
from stepdistill.objectives.base import Nets
from stepdistill.objectives.swiftbrush import SwiftBrush
from stepdistill.train.randomness import BatchRandom

LABELS = torch.tensor([0, 1, 0, 1])


def _setup(**cfg):
    torch.manual_seed(0)
    teacher = tiny_teacher().requires_grad_(False)
    student = build_student(teacher, StudentConfig(steps=1))
    obj = SwiftBrush(SwiftBrush.Config(**cfg))
    nets = Nets(teacher=teacher, student=student, **obj.build(teacher, student))
    with torch.no_grad():  # the LoRA away from zero, so the fake score differs from the teacher
        for name, p in nets.fake_score.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return obj, nets


def _eps(backbone, schedule, x_t, t, labels):
    """eps from the v-prediction backbone (Salimans & Ho, 2022): eps = alpha v + sigma x_t."""
    v = backbone(x_t, t.float(), class_labels=labels).sample
    a, s = (z.reshape(-1, 1, 1, 1).float() for z in schedule.alpha_sigma(t))
    return a * v + s * x_t


def test_generator_gradient_is_sigma2_times_the_eps_difference():
    obj, nets = _setup(guidance=1.0)
    x0 = torch.zeros(4, 1, 8, 8)
    batch = {"x0": x0, "cond": {"class_labels": LABELS}, "rng": BatchRandom(3, 4, slice(0, 4))}
    # the objective's draws in its order: generator noise, the time index, the noise of x_t
    rng = BatchRandom(3, 4, slice(0, 4))
    z = rng.randn_like(x0)
    idx = rng.randint(20, 981)
    eps = rng.randn_like(x0)
    sched = nets.teacher.schedule
    t = noise_grid(sched)[idx]
    with torch.no_grad():
        x = nets.student(z, {"class_labels": LABELS})
        a, s = (v.reshape(-1, 1, 1, 1).float() for v in sched.alpha_sigma(t))
        x_t = a * x + s * eps
        with adapters_disabled(nets.teacher.backbone):  # the LoRA teacher shares the teacher's weights
            eps_teacher = _eps(nets.teacher.backbone, sched, x_t, t, LABELS)
        fake = nets.fake_score(x_t, t, {"class_labels": LABELS})
        eps_lora = (x_t - a * fake) / s
        expected = s**2 * (eps_teacher - eps_lora)                # score_gradient
    out = obj.generator_loss(nets, batch)
    torch.testing.assert_close(out["_vsd_grad_norm"], expected.flatten(1).norm(dim=1), rtol=1e-4, atol=1e-6)
    assert expected.abs().max() > 1e-3  # the LoRA teacher differs from the teacher
    # the loss is 0.5 mean((x - sg(x - g))^2) = 0.5 mean(g^2) at the sample
    torch.testing.assert_close(out["vsd"], 0.5 * expected.pow(2).flatten(1).mean(1), rtol=1e-4, atol=1e-8)


def test_lora_loss_is_the_alpha_weighted_eps_loss():
    obj, nets = _setup(cond_drop=0.5)
    x0 = torch.zeros(4, 1, 8, 8)
    batch = {"x0": x0, "cond": {"class_labels": LABELS}, "rng": BatchRandom(5, 4, slice(0, 4))}
    rng = BatchRandom(5, 4, slice(0, 4))
    z = rng.randn_like(x0)
    idx = rng.randint(0, 1000)
    eps = rng.randn_like(x0)
    drop = rng.rand(dtype=torch.float64) < 0.5
    sched = nets.teacher.schedule
    t = noise_grid(sched)[idx]
    labels = torch.where(drop, torch.full_like(LABELS, 2), LABELS)  # class 2 is the tiny teacher's null class
    with torch.no_grad():
        x = nets.student(z, {"class_labels": LABELS})
        a, s = (v.reshape(-1, 1, 1, 1).float() for v in sched.alpha_sigma(t))
        x_t = a * x + s * eps
        fake = nets.fake_score(x_t, t, {"class_labels": labels})
        eps_lora = (x_t - a * fake) / s
        expected = (a * eps_lora - a * eps).pow(2).flatten(1).mean(1)  # mse(alpha lora_pred, alpha noise)
        got = obj.critic_loss(nets, batch)["fake_eps"]
    assert drop.any() and not drop.all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
