"""SiD: the generator loss is the paper's expression, it reaches the student through both score
networks without training them, and the guidance strategies route conditions as SiD-LSG says."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_teacher
from stepdistill.errors import UserError
from stepdistill.generator import build_student
from stepdistill.fake_score import forward_with_features, noise_grid
from stepdistill.objectives.base import Nets
from stepdistill.objectives.common import Draws, pseudo_huber
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


def _stream(seed=0, n=4):
    """The trainer's per-sample stream for a batch of n on one process."""
    from stepdistill.train.randomness import BatchRandom

    return BatchRandom(seed, n, slice(0, n))


def _nets(obj, teacher=None):
    teacher = teacher or tiny_teacher().requires_grad_(False)
    student = build_student(teacher)
    nets = Nets(teacher=teacher, student=student, **obj.build(teacher, student))
    with torch.no_grad():  # a fake score apart from the teacher (and a classifier apart from zero)
        for n in ("fake_score", "disc"):
            for p in (nets.get(n).parameters() if nets.get(n) is not None else []):
                p.add_(0.05 * torch.randn_like(p))
    return nets


def _guided(den, x, t, cond, w):
    """CFG by hand: D_u + w (D_c - D_u), the two branches as separate calls."""
    d_u = den(x, t, {"class_labels": torch.full_like(cond["class_labels"], 2)})
    return d_u + w * (den(x, t, cond) - d_u)


def test_guidance_modes_route_conditions():
    teacher = tiny_teacher().requires_grad_(False)
    student = build_student(teacher)
    seen = []
    for mode, fg in (("cfg", 1.0), ("zero_cfg", 1.0), ("anti_cfg", -1.0)):
        obj = SiD(SiD.Config(guidance_mode=mode, guidance=2.0, fake_guidance=fg))
        nets = Nets(teacher=teacher, student=student, **obj.build(teacher, student))
        labels = []
        nets.fake_score.register_forward_pre_hook(lambda m, a: labels.append(a[2]["class_labels"].tolist()))
        x = torch.randn(4, 1, 8, 8)
        t = torch.full((4,), 500.0, dtype=torch.float64)
        draws = Draws({"x0": x})
        cond, fc = obj.conds(nets, {"x0": x, "cond": COND}, draws)
        obj.scores(nets, x, t, cond, fc, draws)
        seen.append(labels)
    assert seen[0] == [[0, 1, 0, 1]]                     # cfg: the fake score sees the condition
    assert seen[1] == [[2, 2, 2, 2]]                     # zero-cfg: only the null class
    assert seen[2] == [[2, 2, 2, 2, 0, 1, 0, 1]]         # anti-cfg: both branches, for its own CFG


def test_lsg_trains_the_fake_score_through_its_own_guidance():
    """SiD-LSG's cfg_train_fake (kappa_1; SiD-LSG training/sid_training_loop.py, the fake-score
    update regresses the CFG combination eps_u + kappa_1 (eps_c - eps_u) of the fake network on the
    target): the DSM loss is mean((raw_u + k1 (raw_c - raw_u) - raw_target)^2) in the teacher's
    parameterisation, at x_t = x + noise, t from the teacher's training times."""
    obj = SiD(SiD.Config(fake_train_guidance=2.0, lsg_dropout=0.0, fake_t="train"))
    nets = _nets(obj)
    batch = {"x0": torch.zeros(4, 1, 8, 8), "cond": COND, "rng": _stream(3)}
    out = obj.critic_loss(nets, batch)
    rng, sched = _stream(3), nets.fake_score.schedule
    with torch.no_grad():
        x = nets.student(rng.randn_like(batch["x0"]), COND)
        t = rng.sample_t(sched)
        x_t = sched.add_noise(x, rng.randn_like(x), t)
        raw = [sched.x0_to_raw(nets.fake_score(x_t, t, c), x_t, t) for c in ({"class_labels": torch.full((4,), 2)},
                                                                              COND)]
        want = (raw[0] + 2.0 * (raw[1] - raw[0]) - sched.x0_to_raw(x, x_t, t)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(out["fake_dsm"], want, rtol=1e-5, atol=1e-6)


def test_lsg_evaluates_teacher_and_fake_score_with_their_own_scales():
    """SiD-LSG's generator loss (sid_training_loop.py, the G update): y_real from the teacher with
    cfg_eval_real (kappa_4 = ``guidance``), y_fake from the fake score with cfg_eval_fake (kappa_2 =
    ``fake_guidance``), then SiD's loss on them."""
    obj = SiD(SiD.Config(guidance=3.0, fake_guidance=2.0, lsg_dropout=0.0, alpha=1.0))
    nets = _nets(obj)
    batch = {"x0": torch.zeros(4, 1, 8, 8), "cond": COND, "rng": _stream(4)}
    out = obj.generator_loss(nets, batch)
    rng, sched = _stream(4), nets.fake_score.schedule
    with torch.no_grad():
        x_g = nets.student(rng.randn_like(batch["x0"]), COND)
        t = noise_grid(sched)[rng.randint(0, 801)]  # t_range [0, 0.8]: grid indices 0..800
        x_t = sched.add_noise(x_g, rng.randn_like(x_g), t)
        f_phi, f_psi = _guided(nets.teacher, x_t, t, COND, 3.0), _guided(nets.fake_score, x_t, t, COND, 2.0)
        wf = (x_g - f_phi).abs().flatten(1).mean(1)
        want = ((f_phi - f_psi) * (f_psi - x_g)).flatten(1).sum(1) / wf  # alpha = 1 (sid_training_loop.py)
    torch.testing.assert_close(out["sid"].detach(), want, rtol=1e-4, atol=1e-5)


def test_lsg_drops_conditions_only_with_a_guided_fake_score():
    """With the fake score guided, lsg_dropout of the conditions become the null one (SiD-LSG replaces
    10 % of the prompts with the empty one); unguided, none do."""
    for fg, want in ((2.0, True), (1.0, False)):
        obj = SiD(SiD.Config(fake_guidance=fg, lsg_dropout=0.5))
        nets = _nets(obj)
        labels = torch.arange(256) % 2
        cond, fc = obj.conds(nets, {"x0": torch.zeros(256, 1), "cond": {"class_labels": labels}},
                             Draws({"x0": torch.zeros(256, 1), "rng": _stream(0, 256)}))
        nulls = int((cond["class_labels"] == 2).sum())
        assert (80 < nulls < 176) if want else nulls == 0
        assert torch.equal(cond["class_labels"], fc["class_labels"])


def test_regression_warmup_option(tmp_path):
    """SiD takes DMD2's regression initialisation as an option: a warm-up phase of regression alone,
    the critic and the generator waiting."""
    obj = SiD(SiD.Config(regression_warmup=1, cache=str(tmp_path / "pairs"), cache_num=8, cache_steps=2))
    assert [(p.name, p.start, p.stop) for p in obj.phases()] == [("warmup", 0, 1), ("critic", 1, None),
                                                                  ("generator", 1, None)]
    teacher = tiny_teacher().requires_grad_(False)
    teacher.meta = {"num_classes": 2, "in_channels": 1, "sample_size": 8}
    student = build_student(teacher, steps=1)
    nets = Nets(teacher=teacher, student=student, **obj.build(teacher, student))
    batch = {"x0": torch.zeros(4, 1, 8, 8), "cond": {"class_labels": torch.tensor([0, 1, 0, 1])}}
    torch.manual_seed(0)
    out = obj.warmup_loss(nets, batch)
    torch.manual_seed(0)
    noise, x_ref, cond = obj.regression.pairs.get(torch.randint(0, 8, (4,)))
    assert set(out) == {"regression"}
    torch.testing.assert_close(out["regression"], pseudo_huber(student(noise, cond), x_ref))
    assert "sid" in obj.generator_loss(nets, batch)
    assert SiD(SiD.Config(regression_warmup=1)).needs_cache() and not SiD().needs_cache()
    with pytest.raises(UserError, match="objective.cache"):
        SiD(SiD.Config(regression_warmup=1)).regression.check(None)


def test_regression_warmup_as_a_share_of_the_run(tmp_path):
    """regression_warmup_fraction sizes SiD's warm-up as DMD2's: the warm-up stops, and the critic and
    the generator (with SiDA's GAN term when it is on) start, at that share of the run; the iteration
    starts generator_start / gan_start cannot be mixed with it."""
    obj = SiD(SiD.Config(regression_warmup_fraction=0.2, cache=str(tmp_path / "pairs")))
    assert [(p.name, p.start_fraction, p.stop_fraction) for p in obj.phases()] == [
        ("warmup", None, 0.2), ("critic", 0.2, None), ("generator", 0.2, None)]
    assert [p.fresh_moments_after for p in obj.phases()] == [True, False, False]  # the student's moments after the warm-up
    assert obj.needs_cache()
    gan = SiD(SiD.Config(regression_warmup_fraction=0.25, gan_weight=1e-4, alpha=1.0, cache=str(tmp_path / "p")))
    assert [(p.name, p.start_fraction) for p in gan.phases()] == [
        ("warmup", None), ("critic", 0.25), ("generator_gan", 0.25)]
    fixed = SiD(SiD.Config(regression_warmup=3, gan_weight=1e-4, alpha=1.0, gan_start=5, cache=str(tmp_path / "q")))
    assert [(p.name, p.start, p.stop, p.fresh_moments_after) for p in fixed.phases()] == [
        ("warmup", 0, 3, True), ("critic", 3, None, False), ("generator", 3, 5, False), ("generator_gan", 5, None, False)]
    with pytest.raises(UserError, match="generator_start and gan_start count iterations"):
        SiD(SiD.Config(regression_warmup_fraction=0.2, gan_weight=1e-4, alpha=1.0, generator_start=3)).phases()
    with pytest.raises(UserError, match="regression_warmup_fraction must lie in"):
        SiD(SiD.Config(regression_warmup_fraction=0.2, regression_warmup=5))


def _sida(**kw):
    obj = SiD(SiD.Config(**{"gan_weight": 1e-4, "gan_form": "sida", "alpha": 1.0, **kw}))
    return obj, _nets(obj)


def test_sida_phases_wait_for_the_critic_then_add_the_gan_term():
    """sida_training_loop.py: no generator update before 100k images, the SiD term alone until 200k,
    then 0.5 SiD + 0.5 GAN: here generator_start and gan_start in iterations."""
    obj, _ = _sida(generator_start=3, gan_start=7)
    assert [(p.name, p.start, p.stop) for p in obj.phases()] == [
        ("critic", 0, None), ("generator", 3, 7), ("generator_gan", 7, None)]
    plain, _ = _sida(gan_weight=0.0, generator_start=3)
    assert [(p.name, p.start) for p in plain.phases()] == [("critic", 0), ("generator", 3)]


def test_sida_critic_noises_real_and_fake_alike_and_weights_the_classifier_like_one_dsm_pixel():
    """SiDA (sida_loss.py, the discriminator loss): real images are noised with the DSM's own noise
    and time, at the teacher's training times. With real images equal to the student's samples both
    logits agree exactly (here at the teacher's training times, SiDA's EDM form); the DSM term is the fake score's raw-space error there; the classifier's
    term is lambda * (BCE(real, 1) + BCE(fake, 0)) / 2 with the BCE a batch mean weighted per sample
    by lambda(sigma): per sample here, each BCE times the batch mean of lambda over the pixel count
    (the DSM is a pixel mean here, a pixel sum there), lambda = 1 / sigma^2 on this v-prediction teacher."""
    from torch.nn.functional import softplus

    obj, nets = _sida(gan_critic_weight=0.5, fake_t="train")
    rng = _stream(1)
    with torch.no_grad():
        x = nets.student(rng.randn_like(torch.zeros(4, 1, 8, 8)), COND)
    out = obj.critic_loss(nets, {"x0": x.clone(), "cond": COND, "rng": _stream(1)})
    assert torch.equal(out["_d_real"], out["_d_fake"])
    sched = nets.fake_score.schedule
    t = rng.sample_t(sched)
    x_t = sched.add_noise(x, rng.randn_like(x), t)
    with torch.no_grad():
        v_pred = sched.x0_to_raw(nets.fake_score(x_t, t, COND), x_t, t)
        unet = nets.fake_score.denoiser.backbone
        _, feats = forward_with_features(nets.fake_score, unet.down_blocks[-1], x_t, t, COND)
        logits = feats.mean(dim=1).flatten(1)  # sida_networks.py: x.mean(dim=1) of the encoder output
    assert nets.get("disc") is None and [p.trains for p in obj.phases() if p.name == "critic"] == [("fake_score",)]
    assert torch.allclose(out["fake_dsm"], (v_pred - sched.x0_to_raw(x, x_t, t)).pow(2).flatten(1).mean(1), atol=1e-6)
    assert torch.allclose(out["_d_fake"], logits.mean(1), atol=1e-5)
    lam = (1.0 / sched.alpha_sigma(t)[1] ** 2).mean()
    want = 0.5 * lam.float() / 64 * 0.5 * (softplus(-logits) + softplus(logits)).mean(1)  # BCE over the map
    assert torch.allclose(out["gan_d"], want, rtol=1e-4)


def test_sida_generator_term_is_the_authors_mix_of_sid_and_gan():
    """sida_loss.py and sida_training_loop.py: the classifier reads the features of the one
    fake-score evaluation SiD makes at x_t; GAN = BCE(clamp(D, -10, 10), 1) per sample, over mean|x_g -
    f_phi| and times C*H*W (the batch mean of 1 / wf, as the authors' batch-mean BCE divided per
    sample); the loss is 0.5 * lsg * SiD + 0.5 * lsg_gan * GAN with lsg_gan / lsg = gan_weight = 1e-4.
    Before gan_start the generator's loss is SiD's alone; gradients reach the student only."""
    from torch.nn.functional import softplus

    obj, nets = _sida()
    calls = []
    nets.fake_score.register_forward_pre_hook(lambda m, a: calls.append(1))
    batch = {"x0": torch.zeros(4, 1, 8, 8), "cond": COND, "rng": _stream(2)}
    out = obj.generator_gan_loss(nets, batch)
    assert len(calls) == 1
    rng, sched = _stream(2), nets.fake_score.schedule
    with torch.no_grad():
        x_g = nets.student(rng.randn_like(batch["x0"]), COND)
        t = noise_grid(sched)[rng.randint(0, 801)]
        x_t = sched.add_noise(x_g, rng.randn_like(x_g), t)
        f_phi = nets.teacher(x_t, t, COND)
        f_psi, feats = forward_with_features(nets.fake_score, nets.fake_score.denoiser.backbone.down_blocks[-1],
                                             x_t, t, COND)
        wf = (x_g - f_phi).abs().flatten(1).mean(1)
        sid = ((f_phi - f_psi) * (f_psi - x_g)).flatten(1).sum(1) / wf
        bce = softplus(-feats.mean(dim=1).flatten(1).clamp(-10, 10)).mean(1)  # the encoder's channel mean
        gan_term = 64 * (1 / wf).mean() * bce
    torch.testing.assert_close(out["sid"].detach(), 0.5 * sid, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["gan_g"].detach(), 0.5 * 1e-4 * gan_term, rtol=1e-4, atol=1e-9)
    (out["sid"] + out["gan_g"]).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in nets.student.parameters())
    assert all(p.grad is None for p in nets.fake_score.parameters())
    alone = obj.generator_loss(nets, {**batch, "rng": _stream(2)})
    assert set(alone) == {"sid", "_score_gap"}
    torch.testing.assert_close(alone["sid"].detach(), sid, rtol=1e-4, atol=1e-6)


def test_gan_form_and_guidance_are_checked():
    with pytest.raises(UserError, match="gan_form 'sidx' is not supported"):
        SiD(SiD.Config(gan_weight=1.0, gan_form="sidx"))
    with pytest.raises(UserError, match="fake_guidance=1"):
        SiD(SiD.Config(gan_weight=1.0, gan_form="sida", guidance_mode="anti_cfg", fake_guidance=-1.0))
    with pytest.raises(UserError, match="r1_weight=0"):
        SiD(SiD.Config(gan_weight=1.0, gan_form="sida", r1_weight=1e-3))
    with pytest.raises(UserError, match="disc_head=channel_mean is SiDA's"):
        SiD(SiD.Config(gan_weight=1.0, gan_form="dmd2", disc_head="channel_mean"))
    with pytest.raises(UserError, match="disc_head 'mlp' is not supported"):
        SiD(SiD.Config(gan_weight=1.0, disc_head="mlp"))
    with pytest.raises(UserError, match="fake_guidance below 0"):
        SiD(SiD.Config(guidance_mode="anti_cfg"))
    with pytest.raises(UserError, match="zero_cfg"):
        SiD(SiD.Config(guidance_mode="zero_cfg", fake_guidance=2.0))


def test_sigma_init_on_edm_and_flow_teachers():
    """SiD's generator reads noise at sigma_init = 2.5 (Zhou et al., 2024, sec. 5; sid_train.py
    init_sigma), on EDM teachers as a sigma: the student's grid is EDM's Karras grid (Karras et al.,
    2022, eq. 5) from there, over K + 1 points less the last (sigma_min); on flow teachers a time t
    (sigma = t / 1000), which the exported FlowMatchEulerDiscreteScheduler cannot start from, so
    export refuses it in one line."""
    from conftest import tiny_unet2d
    from stepdistill.denoisers import DiffusersDenoiser
    from stepdistill.export import student_timesteps
    from stepdistill.export.scheduler import student_scheduler_config
    from stepdistill.generator import StudentConfig
    from stepdistill.schedules import EDMSchedule, FlowSchedule, VPSchedule

    edm = EDMSchedule()
    rho, lo = 7.0, 0.002
    ramp = torch.linspace(0, 1, 5, dtype=torch.float64)
    karras = (2.5 ** (1 / rho) + ramp * (lo ** (1 / rho) - 2.5 ** (1 / rho))) ** rho  # eq. 5 from sigma_max = 2.5
    torch.testing.assert_close(student_timesteps(edm, 4, first_timestep=2.5), karras[:4])  # sigma_min dropped
    assert student_timesteps(edm, 1, first_timestep=2.5).tolist() == [2.5]
    teacher = DiffusersDenoiser(tiny_unet2d(num_class_embeds=3, channels=1), edm, null_class=2).requires_grad_(False)
    student = build_student(teacher, StudentConfig(first_timestep=2.5))
    seen, inputs = [], []

    def record(module, args):
        seen.append(float(torch.as_tensor(args[1]).flatten()[0]))
        inputs.append(args[0])

    student.denoiser.register_forward_pre_hook(record)
    z = torch.randn(2, 1, 8, 8)
    student(z, {"class_labels": torch.tensor([0, 1])})
    assert seen == [2.5]
    torch.testing.assert_close(inputs[0], z * 2.5)  # sid_training_loop: G(z * init_sigma, init_sigma)
    for bad in (0.001, 100.0):
        with pytest.raises(UserError, match="sigma on EDM teachers"):
            student_timesteps(edm, 1, first_timestep=bad)
    flow = FlowSchedule({"shift": 3.0})
    assert student_timesteps(flow, 1, first_timestep=700.0).tolist() == [700.0]
    two = student_timesteps(flow, 2)
    torch.testing.assert_close(student_timesteps(flow, 2, first_timestep=700.0), two * 700.0 / float(two[0]))
    with pytest.raises(UserError, match="cannot be exported"):
        student_scheduler_config(flow, steps=1, first_timestep=700.0)
    vp = VPSchedule({"beta_schedule": "scaled_linear"})
    assert student_timesteps(vp, 1, first_timestep=625).tolist() == [625.0]
    with pytest.raises(UserError, match="integer in"):
        student_timesteps(vp, 1, first_timestep=625.5)


def test_fake_score_can_be_trained_where_the_generator_loss_reads_it():
    """SiD-LSG (sid_training_loop.py) draws the fake score's DSM times and the generator's from the same
    randint(tmin, tmax): fake_t="dm" draws uniform grid points of t_range, on an EDM schedule too,
    where the teacher's log-normal (the default "train", EDM SiD's sid_loss.py) puts ~1 % of draws
    above sigma 5 against ~40 % of the generator's reads over [0.02, 0.98]."""
    from stepdistill.objectives.critic import CriticConfig, check_critic, fake_times
    from stepdistill.schedules import EDMSchedule
    edm = EDMSchedule()
    assert SiD.Config().fake_t == "train"
    cfg = SiD.Config(t_range=[0.02, 0.98], fake_t="dm")
    draws = Draws({"x0": torch.zeros(4096, 1, 2, 2)})
    torch.manual_seed(0)
    t = fake_times(cfg, edm, draws)
    grid = noise_grid(edm)
    idx = (grid.to(t.dtype)[None, :] - t[:, None]).abs().argmin(1)
    torch.testing.assert_close(grid.to(t.dtype)[idx], t)           # grid points ...
    assert idx.min() >= 20 and idx.max() <= 980                    # ... of t_range only (DMD2's 20..980)
    above = (t > 5.0).double().mean().item()
    train = (fake_times(SiD.Config(fake_t="train"), edm, draws) > 5.0).double().mean().item()
    assert above > 0.3 and train < 0.05
    with pytest.raises(UserError, match="t_range"):
        check_critic(CriticConfig(fake_t="dm"))


def test_sida_with_a_learned_head_trains_it_on_the_named_module():
    """disc_head=learned: a trained DiscHead on feature_module (the form before SiDA's channel mean),
    trained in the critic phase with the fake score."""
    obj, nets = _sida(disc_head="learned", feature_module="mid_block")
    assert nets.get("disc") is not None
    assert [p.trains for p in obj.phases() if p.name == "critic"] == [("fake_score", "disc")]
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = obj.critic_loss(nets, {"x0": x, "cond": COND, "rng": _stream(4)})
    out["gan_d"].mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in nets.disc.parameters())
