"""GAN losses against their definitions, approximate R1 against the true gradient penalty, and the
adversarial objective's phases on a tiny teacher (LADD head on teacher features, pixel head)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_teacher
from stepdistill.errors import UserError
from stepdistill.generator import build_student
from stepdistill.objectives import gan
from stepdistill.objectives.adversarial import Adversarial
from stepdistill.objectives.base import Nets
from stepdistill.objectives.dmd import DMD2


def test_losses_match_definitions():
    r, f = torch.tensor([2.0, -1.0, 0.3]), torch.tensor([-0.5, 1.5, 0.0])
    assert torch.allclose(gan.d_loss(r, f, "ns"), -torch.log(torch.sigmoid(r)) - torch.log(1 - torch.sigmoid(f)))
    assert torch.allclose(gan.g_loss(f, "ns"), -torch.log(torch.sigmoid(f)))
    assert torch.allclose(gan.d_loss(r, f, "hinge"), F.relu(1 - r) + F.relu(1 + f))
    assert torch.allclose(gan.g_loss(f, "hinge"), -f)
    with pytest.raises(UserError, match="gan_loss"):
        gan.g_loss(f, "wgan")


def test_approx_r1_matches_gradient_penalty_for_small_noise():
    torch.manual_seed(0)
    w = torch.randn(16, dtype=torch.float64)

    def disc(x):
        return torch.tanh(x.flatten(1) @ w / 4)

    x = torch.randn(4000, 16, dtype=torch.float64, requires_grad=True)
    logits = disc(x)
    (grad,) = torch.autograd.grad(logits.sum(), x)
    s = 1e-3
    approx = gan.approx_r1(disc, x.detach(), logits.detach(), s).mean() / s**2
    exact = grad.pow(2).sum(1).mean()
    assert torch.allclose(approx, exact, rtol=0.05), (approx, exact)


@pytest.mark.parametrize("disc", ["teacher", "pixels"])
def test_objective_trains_the_head_then_the_student(disc):
    obj = Adversarial(Adversarial.Config(disc=disc, r1_weight=1.0))
    teacher = tiny_teacher().requires_grad_(False)
    student = build_student(teacher)
    nets = Nets(teacher=teacher, student=student, **obj.build(teacher, student))
    batch = {"x0": torch.rand(4, 1, 8, 8) * 2 - 1, "cond": {"class_labels": torch.tensor([0, 1, 0, 1])}}
    d = obj.losses("disc", nets, batch)
    assert {"gan_d", "r1"} <= set(d)
    sum(v.mean() for k, v in d.items() if not k.startswith("_")).backward()
    assert all(p.grad is not None for p in nets.disc.parameters() if p.requires_grad)
    assert all(p.grad is None for p in student.parameters())
    nets.zero_grad(set_to_none=True)
    g = obj.losses("generator", nets, batch)
    assert {"gan_g", "distill"} <= set(g)
    sum(v.mean() for k, v in g.items() if not k.startswith("_")).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in nets.disc.parameters())


def test_disc_learns_to_separate_on_a_toy_problem():
    """A few head updates on teacher features raise real logits above fake ones."""
    torch.manual_seed(0)
    obj = Adversarial(Adversarial.Config(disc="pixels", gan_loss="ns"))
    teacher = tiny_teacher().requires_grad_(False)
    student = build_student(teacher)
    nets = Nets(teacher=teacher, student=student, **obj.build(teacher, student))
    opt = torch.optim.Adam(nets.disc.parameters(), lr=1e-2)
    batch = {"x0": torch.full((16, 1, 8, 8), 0.8), "cond": {"class_labels": torch.arange(16) % 2}}
    for _ in range(30):
        opt.zero_grad()
        out = obj.losses("disc", nets, batch)
        out["gan_d"].mean().backward()
        opt.step()
    assert (out["_d_real"].mean() - out["_d_fake"].mean()) > 1.0


def test_gan_add_on_for_dmd2_reuses_the_losses():
    obj = DMD2(DMD2.Config(gan_loss="hinge", r1_weight=0.1))
    teacher = tiny_teacher().requires_grad_(False)
    student = build_student(teacher)
    nets = Nets(teacher=teacher, student=student, **obj.build(teacher, student))
    out = obj.critic_loss(nets, {"x0": torch.rand(4, 1, 8, 8), "cond": {"class_labels": torch.tensor([0, 1, 0, 1])}})
    assert torch.allclose(out["gan_d"], 1e-2 * gan.d_loss(out["_d_real"], out["_d_fake"], "hinge"))
    assert "r1" in out


def test_add_student_denoises_real_images_noised_to_its_timesteps():
    """ADD (Sauer et al., 2023, sec. 3.1): the student sees x_s = alpha_s x0 + sigma_s eps, x0 a real
    training image and s uniform over its own timesteps, and the discriminator judges x^_theta(x_s, s);
    with student_input "noise" it runs its own chain from pure noise instead."""
    from stepdistill.train.randomness import BatchRandom

    teacher = tiny_teacher().requires_grad_(False)
    student = build_student(teacher, steps=2)
    obj = Adversarial(Adversarial.Config(disc="pixels", distill="none"))
    nets = Nets(teacher=teacher, student=student, **obj.build(teacher, student))
    seen = []
    student.denoiser.register_forward_pre_hook(lambda m, a: seen.append((a[0].detach().clone(), a[1])))
    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = {"x0": x0, "cond": {"class_labels": torch.tensor([0, 1, 0, 1])}, "rng": BatchRandom(5, 4, slice(0, 4))}
    obj.generator_loss(nets, batch)
    rng = BatchRandom(5, 4, slice(0, 4))
    s = student.timesteps[rng.randint(0, 2)]
    x_s = student.schedule.add_noise(x0, rng.randn_like(x0), s)
    assert len(seen) == 1 and torch.equal(torch.as_tensor(seen[0][1]), s)
    torch.testing.assert_close(seen[0][0], x_s)
    assert set(s.tolist()) == set(student.timesteps.tolist())  # both of its timesteps drawn here
    seen.clear()
    Adversarial(Adversarial.Config(disc="pixels", distill="none", student_input="noise")).generator_loss(nets, batch)
    assert float(torch.as_tensor(seen[0][1]).flatten()[0]) == float(student.timesteps[0])  # the chain's first step


def test_sana_sprint_student_input_mixes_the_proposal_with_pure_noise():
    """SANA-Sprint (train_scm_ladd.py, train_largest_timestep): real images noised to TrigFlow times
    t = arctan(e^tau / sigma_d), tau ~ N(0.2, 1.6^2), half of them replaced by pure noise at the
    student's first time; the student's x0 estimate at each is what the discriminator judges."""
    from stepdistill.schedules import bcast
    from stepdistill.train.randomness import BatchRandom
    from stepdistill.trigflow import TrigFlow

    teacher = tiny_teacher().requires_grad_(False)
    student = build_student(teacher, steps=1)
    obj = Adversarial(Adversarial.Config(disc="pixels", distill="none", student_input="proposal"))
    nets = Nets(teacher=teacher, student=student, **obj.build(teacher, student))
    seen = []
    student.denoiser.register_forward_pre_hook(lambda m, a: seen.append((a[0].detach().clone(), a[1])))
    n = 256
    x0 = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = {"x0": x0, "cond": {"class_labels": torch.arange(n) % 2}, "rng": BatchRandom(5, n, slice(0, n))}
    obj.generator_loss(nets, batch)
    rng = BatchRandom(5, n, slice(0, n))                      # the same draws, in the same order
    u, top = rng.rand(dtype=torch.float64), rng.rand(dtype=torch.float64) < 0.5
    eps, z = rng.randn_like(x0), rng.randn_like(x0)
    trig = TrigFlow(student.schedule, 0.5)
    t = torch.atan(torch.exp(0.2 + 1.6 * torch.special.ndtri(u)) / 0.5).clamp(trig.t_min, trig.t_max)
    s = torch.where(top, torch.full_like(t, float(student.timesteps[0])), trig.native_time(t))
    want = torch.where(bcast(top, x0).bool(), z, student.schedule.add_noise(x0, eps, s))  # VP prior: unit noise
    assert len(seen) == 1 and 0.4 < float(top.float().mean()) < 0.6
    torch.testing.assert_close(torch.as_tensor(seen[0][1]).double(), s)
    torch.testing.assert_close(seen[0][0], want.to(x0.dtype))


def test_sana_sprint_discriminator_times_are_its_log_normal():
    """disc_proposal = [-0.6, 1.0] (SANA-Sprint's logit_mean/std_discriminator): on an EDM schedule, whose
    time is sigma = sigma_d tan t, log sigma of the discriminator's times is N(-0.6, 1.0^2)."""
    from types import SimpleNamespace

    from stepdistill.objectives.common import Draws
    from stepdistill.objectives.critic import disc_times
    from stepdistill.schedules import EDMSchedule

    torch.manual_seed(0)
    view = SimpleNamespace(disc_proposal=[-0.6, 1.0], sigma_d=0.5, disc_t_range=[0.02, 0.98])
    log_sigma = disc_times(view, EDMSchedule(), Draws({"x0": torch.zeros(20000, 1)})).log()
    assert abs(float(log_sigma.mean()) + 0.6) < 0.03 and abs(float(log_sigma.std()) - 1.0) < 0.03
    with pytest.raises(UserError, match="disc_proposal is"):
        Adversarial(Adversarial.Config(disc_proposal=[0.0]))


def test_gan_losses_average_over_locations():
    """Logits [B, N] (one per location or head): the per-sample loss is the mean over N of the
    elementwise loss (SANA-Sprint's hinge: mean(relu(1 - D(real))) over every logit)."""
    real, fake = torch.randn(4, 6), torch.randn(4, 6)
    torch.testing.assert_close(gan.d_loss(real, fake, "hinge"), (F.relu(1 - real) + F.relu(1 + fake)).mean(1))
    torch.testing.assert_close(gan.g_loss(fake, "ns"), F.softplus(-fake).mean(1))
    torch.testing.assert_close(gan.d_loss(real[:, 0], fake[:, 0], "ns"), F.softplus(-real[:, 0]) + F.softplus(fake[:, 0]))


def test_teacher_disc_on_several_blocks_with_a_logit_per_location():
    """LADD with heads on several teacher blocks and per-location logits trains: the critic phase's and the
    generator's losses are per sample, and the head sees every block."""
    from stepdistill.fake_score import DiscHeads
    from stepdistill.train.randomness import BatchRandom

    teacher = tiny_teacher().requires_grad_(False)
    student = build_student(teacher, steps=1)
    obj = Adversarial(Adversarial.Config(feature_module="down_blocks.0,mid_block", per_location=True,
                                         distill="none", disc_proposal=[-0.6, 1.0]))
    nets = Nets(teacher=teacher, student=student, **obj.build(teacher, student))
    assert isinstance(nets.disc, DiscHeads) and len(nets.disc.heads) == 2
    x0 = torch.randn(4, 1, 8, 8)
    batch = {"x0": x0, "cond": {"class_labels": torch.tensor([0, 1, 0, 1])}, "rng": BatchRandom(2, 4, slice(0, 4))}
    d = obj.disc_loss(nets, batch)
    g = obj.generator_loss(nets, batch)
    assert d["gan_d"].shape == (4,) and d["_d_real"].shape == (4,) and g["gan_g"].shape == (4,)
    g["gan_g"].mean().backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_ladd_options_are_checked_before_compute():
    """Bad SANA-Sprint LADD settings stop with one line: a proposal that is not [p_mean, p_std > 0], a
    pixel discriminator given teacher-feature options, SiDA's one-module GAN given several."""
    from stepdistill.objectives.sid import SiD

    for bad in ({"disc_proposal": 0.5}, {"student_proposal": [0.2, 0.0]}, {"largest_prob": 1.5}, {"sigma_d": 0.0},
                {"disc": "pixels", "per_location": True}, {"disc": "pixels", "feature_module": "a,b"}):
        with pytest.raises(UserError):
            Adversarial(Adversarial.Config(**bad))
    with pytest.raises(UserError, match="gan_form=sida reads one feature module"):
        SiD(SiD.Config(gan_weight=1e-4, alpha=1.0, feature_module="down_blocks.0,mid_block"))
    teacher = tiny_teacher()
    from stepdistill.fake_score import feature_modules
    with pytest.raises(UserError, match="names no module"):
        feature_modules(teacher, " , ")


def test_sana_sprint_misaligned_pairs_join_the_fake_side(monkeypatch):
    """misaligned_pairs (SANA-Sprint's misaligned_pairs_D, train_scm_ladd.py): the discriminator also judges
    the real batch rolled by one under the original conditions as fake, the fake side averaging the
    student's B samples and those B pairs: per sample relu(1 - D(real)) + (relu(1 + D(fake)) +
    relu(1 + D(misaligned))) / 2 (hinge); where the rolled label is the sample's own (two images of one
    class) the pair is not a negative and the loss is the plain one."""
    from stepdistill.objectives import critic
    from stepdistill.train.randomness import BatchRandom

    teacher = tiny_teacher().requires_grad_(False)
    student = build_student(teacher, steps=1)
    obj = Adversarial(Adversarial.Config(distill="none", misaligned_pairs=True, disc_proposal=[-0.6, 1.0]))
    nets = Nets(teacher=teacher, student=student, **obj.build(teacher, student))
    calls, original = [], critic.disc_logits

    def recording(c, nets_, x, t, cond, draws, net=None):
        logits = original(c, nets_, x, t, cond, draws, net)
        calls.append((x.detach().clone(), cond, logits.detach()))
        return logits

    monkeypatch.setattr(critic, "disc_logits", recording)
    x0 = torch.randn(4, 1, 8, 8)
    labels = torch.tensor([0, 1, 1, 2])                      # rolled: 2, 0, 1, 1 -> sample 2 keeps its class
    batch = {"x0": x0, "cond": {"class_labels": labels}, "rng": BatchRandom(3, 4, slice(0, 4))}
    d = obj.disc_loss(nets, batch)["gan_d"]
    assert len(calls) == 3
    (x_real, _, real), (_, _, fake), (x_mis, cond_mis, mis) = calls
    torch.testing.assert_close(x_real, x0)
    torch.testing.assert_close(x_mis, x0[[3, 0, 1, 2]])       # image i - 1 under label i
    assert torch.equal(cond_mis["class_labels"], labels)
    plain = F.relu(1 - real) + F.relu(1 + fake)
    with_mis = F.relu(1 - real) + 0.5 * (F.relu(1 + fake) + F.relu(1 + mis))
    want = torch.where(torch.tensor([False, False, True, False]), plain, with_mis)
    torch.testing.assert_close(d.detach(), want)
    assert not torch.allclose(plain, with_mis)
    # SANA-Sprint's loss_D = 0.5 (loss_real + loss_gen): disc_weight 0.5 halves the same terms
    half = Adversarial(Adversarial.Config(distill="none", misaligned_pairs=True, disc_proposal=[-0.6, 1.0],
                                          disc_weight=0.5))
    calls.clear()
    again = dict(batch, rng=BatchRandom(3, 4, slice(0, 4)))  # the same draws again
    torch.testing.assert_close(half.disc_loss(nets, again)["gan_d"].detach(), 0.5 * want)
    with pytest.raises(UserError, match="disc_weight"):
        Adversarial(Adversarial.Config(disc_weight=0.0))
    with pytest.raises(UserError, match="misaligned_pairs"):
        Adversarial(Adversarial.Config(disc="pixels", misaligned_pairs=True))
