"""The fake score: full copy and LoRA on the teacher's own backbone (base weights stored once,
adapters off = the teacher exactly), its denoising loss, the feature hook and the discriminator
head, and the diagnostics that read it."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_teacher
from stepdistill.fake_score import (FakeScore, build_disc_head, denoising_loss, frozen, real_score,
                                    sample_times)
from stepdistill.objectives.base import Nets

X = torch.linspace(-1, 1, 4 * 64).reshape(4, 1, 8, 8)
T = torch.tensor([999.0, 700.0, 300.0, 20.0], dtype=torch.float64)
COND = {"class_labels": torch.tensor([0, 1, 0, 1])}


def test_full_copy_starts_at_the_teacher_and_trains_alone():
    teacher = tiny_teacher().requires_grad_(False)
    fake = FakeScore(teacher)
    assert torch.equal(fake(X, T, COND), teacher(X, T, COND))
    assert all(p.requires_grad for p in fake.parameters())
    assert not {id(p) for p in fake.parameters()} & {id(p) for p in teacher.parameters()}


def test_lora_shares_the_teacher_weights_and_switches_off():
    teacher = tiny_teacher().requires_grad_(False)
    before = teacher(X, T, COND)
    n_base = sum(p.numel() for p in teacher.parameters())
    fake = FakeScore(teacher, lora_rank=4)
    trainable = [n for n, p in fake.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    base_ids = {id(p) for n, p in teacher.named_parameters() if "lora_" not in n}
    assert base_ids <= {id(p) for p in fake.parameters()}  # one copy of the base weights
    assert sum(p.numel() for n, p in teacher.named_parameters() if "lora_" not in n) == n_base
    opt = torch.optim.SGD(fake.trainable_parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        denoising_loss(fake, X, COND).mean().backward()
        opt.step()
    nets = Nets(teacher=teacher, student=torch.nn.Identity(), fake_score=fake)
    assert not torch.allclose(fake(X, T, COND), before)           # the adapters moved the fake score
    assert torch.equal(real_score(nets)(X, T, COND), before)      # the real score is the teacher, exactly
    assert not torch.allclose(fake(X, T, COND), before)           # and switching back restores the adapters


def test_denoising_loss_is_the_teachers_own_loss():
    """space='raw' on a v-prediction teacher is the v-MSE of diffusers' training loop."""
    teacher = tiny_teacher()
    torch.manual_seed(0)
    got = denoising_loss(teacher, X, COND, t=T)
    torch.manual_seed(0)
    eps = torch.randn_like(X)
    from diffusers import DDPMScheduler

    sch = DDPMScheduler.from_config(teacher.schedule.config)
    ti = T.long()
    x_t = sch.add_noise(X, eps, ti)
    v_target = sch.get_velocity(X, eps, ti)
    v_pred = teacher.backbone(x_t, ti.float(), class_labels=COND["class_labels"]).sample
    want = (v_pred - v_target).pow(2).flatten(1).mean(1)
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-5), (got, want)


def test_disc_head_on_bottleneck_features_and_frozen():
    teacher = tiny_teacher().requires_grad_(False)
    fake = FakeScore(teacher)
    head = build_disc_head(fake, "mid_block", teacher)
    x = X.clone().requires_grad_(True)
    from types import SimpleNamespace

    from stepdistill.objectives.common import Draws
    from stepdistill.objectives.critic import disc_logits

    with frozen(fake, head):
        logits = disc_logits(SimpleNamespace(feature_module="mid_block"), Nets(disc=head), x, T, COND,
                             Draws({"x0": x}), net=fake)
    assert logits.shape == (4,)
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in list(fake.parameters()) + list(head.parameters()))
    assert all(p.requires_grad for p in head.parameters())  # restored after the block


def test_sample_times_range_and_errors():
    sched = tiny_teacher().schedule
    t = sample_times(sched, 5000, (0.02, 0.98))  # DMD2's randint(min_step, max_step + 1): 20..980
    assert t.min() == 20 and t.max() == 980 and set(t.tolist()) <= set(range(20, 981))
    assert sample_times(sched, 5000, (0.0, 1.0)).max() == 999
    from stepdistill.errors import UserError

    with pytest.raises(UserError, match="lo < hi"):
        sample_times(sched, 4, (0.9, 0.1))


def test_preview_and_collapse_watchdog(tmp_path):
    from stepdistill.diagnostics import collapse_check, score_preview
    from stepdistill.generator import build_student

    teacher = tiny_teacher()
    nets = Nets(teacher=teacher, student=build_student(teacher), fake_score=FakeScore(teacher))
    grid = score_preview(nets, torch.randn(4, 1, 8, 8), COND, tmp_path / "p.png")
    assert grid.shape == (12, 1, 8, 8) and (tmp_path / "p.png").is_file()
    real = torch.randn(200, 16)
    assert not collapse_check(real[:100] * 0.9, real[100:])["collapsed"]
    with pytest.warns(RuntimeWarning, match="collapse"):
        out = collapse_check(real[:100] * 0.1, real[100:])
    assert out["collapsed"] and 0.05 < out["diversity_ratio"] < 0.15


def test_features_without_x0_stop_at_the_module():
    """need_x0=False returns the same bottleneck features (and gradients to the input) without running
    the decoder: the up blocks' hooks never fire."""
    from stepdistill.fake_score import find_module, forward_with_features

    teacher = tiny_teacher()
    mod = find_module(teacher, "mid_block")
    size = teacher.backbone.config.sample_size
    x = torch.randn(3, teacher.backbone.config.in_channels, size, size, requires_grad=True)
    t = torch.tensor([100.0, 500.0, 900.0])
    cond = {"class_labels": torch.tensor([0, 1, 0])} if teacher.null_class is not None else None
    ran = []
    h = teacher.backbone.up_blocks[0].register_forward_hook(lambda *a: ran.append(1))
    x0, full = forward_with_features(teacher, mod, x, t, cond)
    assert ran and x0 is not None
    ran.clear()
    none, early = forward_with_features(teacher, mod, x, t, cond, need_x0=False)
    h.remove()
    assert none is None and not ran
    torch.testing.assert_close(early, full)
    (g_early,) = torch.autograd.grad(early.sum(), x)
    (g_full,) = torch.autograd.grad(full.sum(), x)
    torch.testing.assert_close(g_early, g_full)


@pytest.mark.parametrize("kind", ["vp-v", "vp-eps", "edm", "flow"])
def test_dsm_weight_is_the_x0_weight_of_the_raw_loss(kind):
    """The raw-space DSM error is dsm_weight(t) times the x0 error (closed forms: v on VP 1 / sigma^2,
    eps SNR, EDM's lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2, rectified flow 1 / s^2)."""
    from stepdistill.fake_score import dsm_error, dsm_weight
    from stepdistill.schedules import EDMSchedule, FlowSchedule, VPSchedule

    vp = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    sched, t = {"vp-v": (VPSchedule({**vp, "prediction_type": "v_prediction"}), T),
                "vp-eps": (VPSchedule({**vp, "prediction_type": "epsilon"}), T),
                "edm": (EDMSchedule(), torch.tensor([80.0, 2.5, 0.5, 0.01], dtype=torch.float64)),
                "flow": (FlowSchedule(), torch.tensor([999.0, 700.0, 300.0, 20.0], dtype=torch.float64))}[kind]
    a, s = sched.alpha_sigma(t)
    want = {"vp-v": 1 / s**2, "vp-eps": a**2 / s**2, "edm": (s**2 + 0.25) / (s * 0.5) ** 2, "flow": 1 / s**2}[kind]
    got = dsm_weight(sched, t, X)
    assert torch.allclose(got.double(), want, rtol=1e-4), (got, want)
    g = torch.Generator().manual_seed(0)
    x_t, err = torch.randn(X.shape, generator=g), 0.01 * torch.randn(X.shape, generator=g)
    raw = dsm_error(sched, X + err, X, x_t, t)
    assert torch.allclose(raw, got * err.pow(2).flatten(1).mean(1), rtol=1e-3)
    assert torch.equal(dsm_weight(sched, t, X, "x0"), torch.ones(4))


def test_features_of_several_modules_in_one_pass():
    """Comma-separated feature modules (SANA-Sprint's heads on several blocks): one pass returns each
    module's features as its own single-module pass does, and stops after the last of them."""
    from stepdistill.fake_score import feature_modules, find_module, forward_with_features

    teacher = tiny_teacher()
    size = teacher.backbone.config.sample_size
    x = torch.randn(2, teacher.backbone.config.in_channels, size, size)
    t = torch.tensor([200.0, 700.0])
    cond = {"class_labels": torch.tensor([0, 1])} if teacher.null_class is not None else None
    names = ["down_blocks.0", "mid_block", "up_blocks.0"]
    mods = feature_modules(teacher, ",".join(names))
    assert isinstance(mods, list) and len(mods) == 3 and feature_modules(teacher, "mid_block") is mods[1]
    ran = []
    h = teacher.backbone.up_blocks[1].register_forward_hook(lambda *a: ran.append(1))
    none, feats = forward_with_features(teacher, mods, x, t, cond, need_x0=False)
    h.remove()
    assert none is None and not ran and len(feats) == 3
    for name, f in zip(names, feats):
        torch.testing.assert_close(f, forward_with_features(teacher, find_module(teacher, name), x, t, cond)[1])


def test_per_location_logits_average_to_the_pooled_head():
    """A per-location head (a logit per feature location, SANA-Sprint's per-token logits) is linear after
    its body, so its logits average to the pooled head's logit with the same weights, the class projection
    included; several heads give one [B, N_h] each."""
    from stepdistill.fake_score import DiscHead, DiscHeads

    torch.manual_seed(0)
    pooled = DiscHead((8, 4, 4), 16, num_classes=3)
    local = DiscHead((8, 4, 4), 16, num_classes=3, per_location=True)
    local.load_state_dict(pooled.state_dict())
    feats, cond = torch.randn(5, 8, 4, 4), {"class_labels": torch.tensor([0, 1, 2, 1, 0])}
    logits = local(feats, cond)
    assert logits.shape == (5, 16)
    torch.testing.assert_close(logits.mean(1), pooled(feats, cond))
    both = DiscHeads([local, DiscHead((4, 2, 2), 8, per_location=True)])
    out = both([feats, torch.randn(5, 4, 2, 2)], cond)
    assert [o.shape for o in out] == [(5, 16), (5, 4)]
    torch.testing.assert_close(out[0], logits)


def test_encoder_feature_module_is_the_unets_last_down_block():
    """feature_module "encoder" (SiDA's return_flag='encoder', sida_networks.py: the encoder's last block
    at the lowest resolution) is a UNet's last down block; a transformer has none and says so."""
    from conftest import tiny_dit
    from stepdistill.errors import UserError
    from stepdistill.fake_score import find_module
    from stepdistill.denoisers import DiffusersDenoiser

    teacher = tiny_teacher()
    assert find_module(teacher, "encoder") is teacher.backbone.down_blocks[-1]
    dit = DiffusersDenoiser(tiny_dit(), teacher.schedule)
    with pytest.raises(UserError, match="no down_blocks"):
        find_module(dit, "encoder")
