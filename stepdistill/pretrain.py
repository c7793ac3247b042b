"""Train a small pixel-space teacher (diffusers ``UNet2DModel``) on any ``load_images`` dataset.

The loss is the schedule's own parameterisation: the backbone regresses ``x0_to_raw(x0, x_t, t)``
with plain MSE at t drawn by ``schedule.sample_t``. ``schedule.kind`` picks the family:

- ``vp``: v for a v-prediction schedule (Salimans & Ho, 2022, sec. 4), t uniform over the training
  indices (Ho et al., 2020, Alg. 1);
- ``edm``: EDM's preconditioned F-target (Karras et al., 2022, eq. 8) at log-normal sigmas
  (P_mean -1.2, P_std 1.2); the MSE on F is EDM's loss, since its weight lambda(sigma) c_out(sigma)^2 = 1;
- ``flow``: the velocity eps - x0 of rectified flow (Liu et al., 2023) at logit-normal times with
  the schedule's shift (Esser et al., 2024, eq. 23).

Class labels
are dropped to the null class with probability ``label_dropout`` so that one network serves both
branches of classifier-free guidance (Ho & Salimans, 2022, Alg. 1). The weights written are the
EMA ones (diffusers ``EMAModel``).
"""
from __future__ import annotations

import dataclasses
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .data import ImageSet, infinite_batches, load_images, make_loader
from .denoisers import BACKBONE_CALLS, DiffusersDenoiser
from .errors import UserError
from .runfolder import LOCK_FILE, FolderClaim
from .schedules import VPSchedule


@dataclass
class ModelConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # one per resolution level
    attention: list[bool] = field(default_factory=lambda: [False, False, False])  # per level; mid block always
    layers_per_block: int = 1
    norm_num_groups: int = 8
    attention_head_dim: int = 8
    dropout: float = 0.0


@dataclass
class ScheduleConfig:
    kind: str = "vp"                    # vp | edm | flow (the fields below name the kind they apply to)
    # vp: diffusers DDIMScheduler config keys; SD's scaled_linear keeps a usable x0 at t = T-1 (final
    # alpha-bar 4.7e-3), which one-step students need
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    prediction_type: str = "v_prediction"
    timestep_spacing: str = "trailing"  # 1-step grids start at T-1, not 0
    rescale_betas_zero_snr: bool = False
    # edm: diffusers EDMEulerScheduler keys (Karras et al., 2022, Table 1)
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0
    # flow: diffusers FlowMatchEulerDiscreteScheduler's shift (1 = plain rectified flow)
    shift: float = 1.0


VP_KEYS = ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "prediction_type", "timestep_spacing",
           "rescale_betas_zero_snr")


def make_schedule(cfg: ScheduleConfig):
    """The teacher's schedule from ``cfg.kind`` and that kind's fields (a field of another kind left at
    its default: setting one is refused, so no setting is silently ignored)."""
    from .schedules import EDMSchedule, FlowSchedule

    own = {"vp": VP_KEYS, "edm": ("sigma_min", "sigma_max", "sigma_data", "rho", "num_train_timesteps"),
           "flow": ("shift", "num_train_timesteps")}
    if cfg.kind not in own:
        raise UserError(f"schedule.kind {cfg.kind!r} is not supported; use vp, edm or flow")
    values, defaults = dataclasses.asdict(cfg), dataclasses.asdict(ScheduleConfig())
    stray = [k for k in values if k != "kind" and k not in own[cfg.kind] and values[k] != defaults[k]]
    if stray:
        raise UserError(f"schedule.{stray[0]} does not apply to schedule.kind={cfg.kind}; drop it "
                        f"({cfg.kind} takes {', '.join(own[cfg.kind])})")
    mine = {k: values[k] for k in own[cfg.kind]}
    if cfg.kind == "edm":
        return EDMSchedule({**mine, "prediction_type": "epsilon", "final_sigmas_type": "zero"})
    if cfg.kind == "flow":
        return FlowSchedule(mine)
    return VPSchedule(mine)


@dataclass
class PretrainConfig:
    data: str = "digits-train"         # a load_images spec: digits[-train|-test], image folder, .npz
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    num_classes: int | None = None     # None = from the data's labels; 0 = unconditional
    label_dropout: float = 0.1         # P(label -> null class), for classifier-free guidance
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    lr_schedule: str = "cosine"        # a diffusers.optimization schedule name, over max_steps
    grad_clip: float | None = 1.0      # None = disable
    batch_size: int = 64
    max_steps: int = 1000
    max_minutes: float | None = None   # stop early once this wall time is spent; None = disable
    ema_decay: float = 0.995           # EMAModel's cap; its warm-up ramps towards it
    ema_power: float = 0.75            # EMA warm-up: decay = 1 - (1 + step)^-power
    seed: int = 0
    threads: int | None = None         # torch intra-op threads; None = torch's default
    output_dir: str = "runs/teacher"   # the teacher folder written
    grid_steps: int = 50               # DDIM steps for the preview grid
    grid_num: int = 100


def build_backbone(cfg: PretrainConfig, channels: int, size: int, num_classes: int):
    from diffusers import UNet2DModel

    m = cfg.model
    levels = len(m.block_out_channels)
    if levels < 1 or len(m.attention) != levels:
        raise UserError(f"model.attention has {len(m.attention)} entries for {levels} block_out_channels; "
                        "give one true/false per level")
    if size % (2 ** (levels - 1)):
        raise UserError(f"image size {size} is not divisible by 2^{levels - 1} (one halving per extra level); "
                        "use fewer model.block_out_channels or a divisible size")
    bad = [c for c in m.block_out_channels if c % m.norm_num_groups]
    if bad:
        raise UserError(f"block channels {bad} are not divisible by model.norm_num_groups={m.norm_num_groups}")
    return UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(m.block_out_channels), layers_per_block=m.layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in m.attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(m.attention)),
        norm_num_groups=m.norm_num_groups, attention_head_dim=m.attention_head_dim, dropout=m.dropout,
        num_class_embeds=(num_classes + 1) if num_classes else None,  # the extra row is the null class
    )


def resolve_classes(cfg: PretrainConfig, data: ImageSet) -> int:
    if cfg.num_classes is None:
        return data.num_classes
    if cfg.num_classes > 0 and data.labels is None:
        raise UserError(f"num_classes={cfg.num_classes} but {data.name!r} has no labels; set num_classes=0 "
                        "(unconditional) or use labelled data (class subfolders or an npz 'labels' array)")
    if data.labels is not None and cfg.num_classes > 0 and int(data.labels.max()) >= cfg.num_classes:
        raise UserError(f"{data.name!r} has label {int(data.labels.max())} >= num_classes={cfg.num_classes}; "
                        "raise num_classes or leave it unset (null) to take it from the data")
    return cfg.num_classes


def check_settings(cfg: PretrainConfig) -> None:
    """Every plain value of the config, before any data is read."""
    from .config import check_optimizer

    if cfg.max_steps < 1:
        raise UserError(f"max_steps must be >= 1, got {cfg.max_steps}")
    if not 0.0 <= cfg.label_dropout < 1.0:
        raise UserError(f"label_dropout must be in [0, 1), got {cfg.label_dropout}")
    if cfg.batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise UserError(f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
    check_optimizer("", lr=cfg.lr, lr_schedule=cfg.lr_schedule, warmup_steps=cfg.warmup_steps,
                    weight_decay=cfg.weight_decay)


def check_output_dir(cfg: PretrainConfig) -> None:
    """Pretrain writes a new teacher folder: ``output_dir`` must be new or empty. An earlier pretrain
    there (of this config or another) and any other content are refused, never replaced."""
    out = Path(cfg.output_dir)
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"output_dir {str(out)!r} is a file; pass a new or empty folder")
    content = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
    if not content:
        return
    old = out / "config.yaml"
    if (out / "stepdistill.json").is_file() and old.is_file():
        from omegaconf import OmegaConf

        try:
            was = OmegaConf.to_container(OmegaConf.load(old))
        except Exception:  # noqa: BLE001 -- any unreadable config is simply "other settings"
            was = None
        now = dataclasses.asdict(cfg)
        if isinstance(was, dict):
            was.pop("output_dir", None)
        now.pop("output_dir")
        if was == now:
            raise UserError(f"output_dir {str(out)!r} already holds a teacher pretrained with these settings; nothing "
                            "to do. To train it again, pass another output_dir (the folder is left as it is)")
        raise UserError(f"output_dir {str(out)!r} holds a teacher pretrained with other settings; pretrain never "
                        "replaces a folder: pass another output_dir")
    shown = ", ".join(content[:5]) + (", ..." if len(content) > 5 else "")
    raise UserError(f"output_dir {str(out)!r} is not empty (it holds {shown}); pretrain writes a new teacher folder "
                    "and never deletes anything: pass a new or empty folder")


def diffusion_loss(den: DiffusersDenoiser, x0: torch.Tensor, labels: torch.Tensor | None,
                   generator: torch.Generator) -> torch.Tensor:
    """Per-sample MSE of the backbone's raw output against its own target at random t."""
    sch = den.schedule
    t = sch.sample_t(x0.shape[0], generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    xt = sch.add_noise(x0, eps, t)
    cond = None if labels is None else {"class_labels": labels}
    call = BACKBONE_CALLS[type(den.backbone).__name__]
    raw = call(den.backbone, sch.model_input(xt, t), sch.model_time(t).float(), cond)
    target = sch.x0_to_raw(x0, xt, t)
    return (raw.float() - target).pow(2).flatten(1).mean(1)


def drop_labels(labels: torch.Tensor | None, p: float, null_class: int, generator) -> torch.Tensor | None:
    if labels is None or p <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator) < p
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def pretrain(cfg: PretrainConfig, *, on_step: Callable[[int, float, float], None] | None = None,
             extras: Callable[[DiffusersDenoiser, Path], None] | None = None) -> tuple[DiffusersDenoiser, dict]:
    """Train and write the teacher folder; returns (EMA denoiser, training summary).

    ``on_step(step, loss, elapsed_s)`` reports progress; ``extras(denoiser, folder)`` writes more
    files into the teacher folder before it is committed (config, preview grid)."""
    if not isinstance(cfg, PretrainConfig):  # an OmegaConf structured config from config.load
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_object(cfg)
    check_settings(cfg)
    schedule = make_schedule(cfg.schedule)
    data = load_images(cfg.data)
    h, w = data.size
    if h != w:
        raise UserError(f"{data.name!r} has {h}x{w} images; the teacher needs square images (crop or resize them)")
    num_classes = resolve_classes(cfg, data)
    check_output_dir(cfg)
    claim = FolderClaim(cfg.output_dir)
    try:
        check_output_dir(cfg)  # again under the lock: another process may have written it meanwhile
        den, summary = _train(cfg, data, num_classes, schedule, on_step, extras)
    except BaseException:
        claim.release(failed=True)
        raise
    claim.release()
    return den, summary


def _train(cfg: PretrainConfig, data: ImageSet, num_classes: int, schedule,
           on_step, extras) -> tuple[DiffusersDenoiser, dict]:
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from .teachers import save_teacher

    h = data.size[0]
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    net = build_backbone(cfg, data.channels, h, num_classes)
    den = DiffusersDenoiser(net, schedule, null_class=num_classes if num_classes else None)
    loader = make_loader(data, min(cfg.batch_size, len(data)), cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)

    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = get_scheduler(cfg.lr_schedule, opt, num_warmup_steps=cfg.warmup_steps,
                             num_training_steps=cfg.max_steps)
    ema = EMAModel(net.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=cfg.ema_power)

    net.train()
    start, step, loss_avg = time.perf_counter(), 0, math.nan
    batches = infinite_batches(loader)
    stop_reason = "max_steps"
    while step < cfg.max_steps:
        batch = next(batches)
        labels = None if num_classes == 0 or batch["cond"] is None else batch["cond"]["class_labels"]
        labels = drop_labels(labels, cfg.label_dropout, num_classes, gen)
        loss = diffusion_loss(den, batch["x0"], labels, gen).mean()
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss became {loss.item()} at step {step}; lower lr (now {cfg.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        lr_sched.step()
        ema.step(net.parameters())
        step += 1
        loss_avg = loss.item() if math.isnan(loss_avg) else 0.98 * loss_avg + 0.02 * loss.item()
        elapsed = time.perf_counter() - start
        if on_step:
            on_step(step, loss_avg, elapsed)
        if cfg.max_minutes is not None and elapsed > 60.0 * cfg.max_minutes:
            stop_reason = "max_minutes"
            break
    wall = time.perf_counter() - start

    ema.copy_to(net.parameters())
    den.requires_grad_(False)
    den.eval()
    summary = {
        "data": data.name, "data_sha256": data.sha256, "num_images": len(data), "steps": step,
        "stopped_by": stop_reason, "train_seconds": round(wall, 1), "sec_per_step": round(wall / max(step, 1), 4),
        "final_loss_ema": round(loss_avg, 5), "parameters": sum(p.numel() for p in net.parameters()),
        "batch_size": loader.batch_size, "lr": cfg.lr, "ema_decay": cfg.ema_decay, "seed": cfg.seed,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
    }
    meta: dict[str, Any] = {
        "kind": "class-conditional" if num_classes else "unconditional",
        "num_classes": num_classes, "null_class": num_classes if num_classes else None,
        "sample_size": h, "in_channels": data.channels,
        "class_names": (data.class_names if num_classes else None), "training": summary,
    }
    folder = save_teacher(den, cfg.output_dir, meta, extras=(lambda p: extras(den, p)) if extras else None)
    from .teachers import teacher_meta

    den.meta = dict(teacher_meta(den, meta), path=str(folder))
    return den, summary


def class_cycle(num: int, classes: list[int]) -> torch.Tensor:
    """Labels classes[0], classes[1], ... repeated: a grid with len(classes) columns shows one
    class per column and the requested classes in order along every row."""
    return torch.tensor([classes[i % len(classes)] for i in range(num)], dtype=torch.long)


@torch.no_grad()
def preview(den: DiffusersDenoiser, num: int, steps: int, seed: int = 0) -> tuple[torch.Tensor, int]:
    """``num`` DDIM samples (classes cycling when conditional) and the grid's row length."""
    from .sampling import sample

    meta_classes = int(getattr(den, "null_class", None) or 0)
    size = den.backbone.config.sample_size
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((num, den.backbone.config.in_channels, size, size), generator=g)
    cond = {"class_labels": class_cycle(num, list(range(meta_classes)))} if meta_classes else None
    x = sample(den, noise, steps, sampler="ddim", cond=cond, generator=g)
    return x, (meta_classes if 0 < meta_classes <= 16 else 8)


__all__ = ["PretrainConfig", "ModelConfig", "ScheduleConfig", "make_schedule", "pretrain", "build_backbone", "diffusion_loss"]
