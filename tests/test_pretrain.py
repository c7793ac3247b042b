"""Teacher pretraining: the loss against diffusers' own noising and velocity, learning on a toy
set, the CLI on data other than digits, and config errors before compute."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_teacher
from omegaconf import OmegaConf

from stepdistill.resources import PRESETS, TEACHERS
from stepdistill.cli import main
from stepdistill.data import save_npz
from stepdistill.denoisers import DiffusersDenoiser
from stepdistill.errors import UserError
from stepdistill.pretrain import (ModelConfig, PretrainConfig, ScheduleConfig, build_backbone, diffusion_loss,
                                  drop_labels, make_schedule, pretrain)
from stepdistill.teachers import load_teacher

CONFIG = str(PRESETS / "digits" / "teacher.yaml")
TINY = ["model.block_out_channels=[8,16]", "model.attention=[false,true]", "model.norm_num_groups=4",
        "batch_size=8", "grid_num=4", "grid_steps=2"]


def test_loss_is_mse_to_diffusers_velocity():
    from diffusers import DDPMScheduler

    den = tiny_teacher()
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = diffusion_loss(den, x0, labels, torch.Generator().manual_seed(3))

    g = torch.Generator().manual_seed(3)  # the same draws, in the same order
    t = torch.randint(0, 1000, (6,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    ref_sched = DDPMScheduler.from_config(den.schedule.config)
    xt = ref_sched.add_noise(x0, eps, t)
    v = ref_sched.get_velocity(x0, eps, t)  # Salimans & Ho (2022): v = alpha eps - sigma x0
    raw = den.backbone(xt, t.float(), class_labels=labels).sample
    ref = (raw - v).pow(2).flatten(1).mean(1)
    assert loss.shape == (6,)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["edm", "flow"])
def test_edm_and_flow_losses_are_their_papers(kind):
    """EDM: lambda(sigma) |D(x; sigma) - x0|^2 with D = c_skip x + c_out F(c_in x, c_noise) at
    ln sigma ~ N(-1.2, 1.2^2) (Karras et al., 2022, eq. 2, 7, 8, Table 1); flow: |v - (eps - x0)|^2 at
    sigmoid(N(0, 1)) times (Esser et al., 2024, eq. 23 with shift 1), each written out here."""
    cfg = PretrainConfig(model=ModelConfig([8, 16], [False, False], norm_num_groups=4),
                         schedule=ScheduleConfig(kind=kind))
    torch.manual_seed(0)
    den = DiffusersDenoiser(build_backbone(cfg, 1, 8, 3), make_schedule(cfg.schedule), null_class=3)
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3, 1, 2])
    loss = diffusion_loss(den, x0, labels, torch.Generator().manual_seed(5))

    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g)
    net = lambda x, c: den.backbone(x.float(), c.float(), class_labels=labels).sample.double()  # noqa: E731
    if kind == "edm":
        sigma, sd = (z * 1.2 - 1.2).exp().view(-1, 1, 1, 1), 0.5
        x = x0 + sigma * eps
        c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in, c_noise = 1 / (sigma**2 + sd**2).sqrt(), sigma.log().flatten() / 4
        d = c_skip * x + c_out * net(c_in * x, c_noise)
        ref = ((sigma**2 + sd**2) / (sigma * sd) ** 2).flatten() * (d - x0).pow(2).flatten(1).mean(1)
    else:
        s = torch.sigmoid(z).view(-1, 1, 1, 1)
        x = (1 - s) * x0 + s * eps
        ref = (net(x, s.flatten() * 1000) - (eps - x0)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("kind, cls", [("edm", "EDMEulerScheduler"), ("flow", "FlowMatchEulerDiscreteScheduler")])
def test_cli_pretrains_edm_and_flow_teachers(kind, cls, tmp_path):
    out = tmp_path / kind
    assert main(["pretrain", CONFIG, f"schedule.kind={kind}", f"output_dir={out}", "max_steps=2", *TINY]) == 0
    den = load_teacher(out)
    assert den.schedule.kind == kind and json.loads((out / "scheduler" / "scheduler_config.json").read_text())[
        "_class_name"] == cls


def test_a_schedule_field_of_another_kind_is_refused(tmp_path, capsys):
    rc = main(["pretrain", CONFIG, "schedule.kind=edm", "schedule.beta_schedule=linear",
               f"output_dir={tmp_path / 't'}", *TINY])
    assert rc == 2 and "schedule.beta_schedule does not apply to schedule.kind=edm" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_label_dropout_rate():
    labels = torch.zeros(20000, dtype=torch.long)
    out = drop_labels(labels, 0.25, 7, torch.Generator().manual_seed(0))
    rate = (out == 7).float().mean().item()
    assert abs(rate - 0.25) < 4 * (0.25 * 0.75 / 20000) ** 0.5
    assert set(out.unique().tolist()) == {0, 7}


def test_training_learns_a_constant_image(tmp_path):
    pattern = torch.zeros(1, 1, 8, 8)
    pattern[..., 2:6, 3:5] = 255
    save_npz(tmp_path / "const.npz", pattern.expand(32, 1, 8, 8).to(torch.uint8))
    cfg = PretrainConfig(data=str(tmp_path / "const.npz"), model=ModelConfig([8, 16], [False, False], norm_num_groups=4),
                         batch_size=16, max_steps=80, warmup_steps=5, grid_num=0, output_dir=str(tmp_path / "t"))
    target = pattern / 127.5 - 1
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def err(den):
        xt = den.schedule.add_noise(target.expand_as(x), x, 600.0)
        return (den(xt, 600.0) - target).pow(2).mean().item()

    torch.manual_seed(cfg.seed)  # the initial network pretrain builds (same seed, same config)
    init = DiffusersDenoiser(build_backbone(cfg, 1, 8, 0), make_schedule(cfg.schedule))
    den, summary = pretrain(cfg)
    assert summary["steps"] == 80 and den.meta["kind"] == "unconditional"
    assert err(den) < 0.25 * err(init)
    assert torch.equal(load_teacher(tmp_path / "t")(x, 600.0), den(x, 600.0))  # what was saved is the EMA net


def _other_images(n=24, size=16, channels=1, seed=0):
    """Filled rectangles of random size and position: not digits."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, size, size, channels), np.uint8)
    for i in range(n):
        y0, x0 = rng.integers(0, size // 2, 2)
        h, w = rng.integers(3, size // 2, 2)
        out[i, y0:y0 + h, x0:x0 + w] = rng.integers(128, 256, channels)
    return out


def test_cli_trains_on_an_unlabelled_npz(tmp_path):
    np.savez(tmp_path / "rects.npz", images=_other_images())
    out = tmp_path / "teacher"
    rc = main(["pretrain", CONFIG, f"data={tmp_path / 'rects.npz'}", f"output_dir={out}", "max_steps=3", *TINY])
    assert rc == 0
    assert {p.name for p in out.iterdir()} == {"unet", "scheduler", "stepdistill.json", "config.yaml", "samples.png"}
    den = load_teacher(out)
    assert den.meta["kind"] == "unconditional" and den.null_class is None
    assert den.meta["sample_size"] == 16 and den.meta["training"]["steps"] == 3
    resolved = OmegaConf.load(out / "config.yaml")
    assert resolved.data == str(tmp_path / "rects.npz") and resolved.max_steps == 3


def test_cli_trains_class_conditional_rgb(tmp_path):
    imgs = _other_images(n=24, size=8, channels=3)
    np.savez(tmp_path / "rgb.npz", images=imgs, labels=np.arange(24) % 3)
    out = tmp_path / "teacher"
    rc = main(["pretrain", CONFIG, f"data={tmp_path / 'rgb.npz'}", f"output_dir={out}", "max_steps=2", *TINY])
    assert rc == 0
    den = load_teacher(out)
    assert (den.meta["num_classes"], den.null_class, den.meta["in_channels"]) == (3, 3, 3)
    assert den.backbone.config.num_class_embeds == 4


@pytest.mark.parametrize("overrides, needle", [
    (["num_classes=5"], "has no labels"),
    (["max_step=3"], "max_steps"),
    (["model.block_out_channels=[8,16,16,16,16]", "model.attention=[false,false,false,false,false]"],
     "not divisible by 2^4"),
    (["model.attention=[false]"], "one true/false per level"),
])
def test_bad_config_stops_before_training(tmp_path, capsys, overrides, needle):
    np.savez(tmp_path / "rects.npz", images=_other_images(size=20))
    out = tmp_path / "teacher"
    rc = main(["pretrain", CONFIG, f"data={tmp_path / 'rects.npz'}", f"output_dir={out}", *TINY, *overrides])
    assert rc == 2 and not out.exists()
    assert needle in capsys.readouterr().err.replace("\n", " ")


def test_non_square_images_are_refused(tmp_path):
    np.savez(tmp_path / "wide.npz", images=np.zeros((4, 8, 16, 1), np.uint8))
    with pytest.raises(UserError, match="square"):
        pretrain(PretrainConfig(data=str(tmp_path / "wide.npz"), output_dir=str(tmp_path / "t")))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_pretrain_never_replaces_a_folder(tmp_path, capsys):
    np.savez(tmp_path / "rects.npz", images=_other_images())
    out = tmp_path / "teacher"
    args = ["pretrain", CONFIG, f"data={tmp_path / 'rects.npz'}", f"output_dir={out}", "max_steps=2", *TINY]
    assert main(args) == 0
    written = _files(out)
    capsys.readouterr()
    assert main(args) == 2  # the same config again: nothing to do, nothing replaced
    assert "already holds a teacher pretrained with these settings" in capsys.readouterr().err
    assert main([*args, "lr=1e-3"]) == 2
    assert "pretrained with other settings" in capsys.readouterr().err
    assert _files(out) == written
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert main([*args[:3], f"output_dir={mine}", *args[4:]]) == 2
    assert "is not empty (it holds thesis.tex)" in capsys.readouterr().err
    assert _files(mine) == {"thesis.tex": b"years of work"}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*args[:3], f"output_dir={empty}", *args[4:]]) == 0  # an empty folder is fine
    assert (empty / "unet").is_dir()


def test_the_presets_pretrain_line_leaves_the_shipped_teacher_alone(capsys):
    shipped = TEACHERS / "digits16"
    assert Path(OmegaConf.load(CONFIG).output_dir).resolve() != shipped  # the README's line writes elsewhere
    before = _files(shipped)
    assert main(["pretrain", CONFIG, f"output_dir={shipped}"]) == 2  # asked for explicitly: still refused
    assert "holds a teacher pretrained with" in capsys.readouterr().err
    assert _files(shipped) == before
