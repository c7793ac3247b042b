"""From a config to everything a run needs: validated config, teacher, data, objective, nets.

All input checks happen here, before any compute, each failing with one ``UserError``.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ..config import check_optimizer, load, to_dict
from ..errors import UserError
from ..generator import Student, StudentConfig, build_student
from ..objectives import Nets, Objective, Phase
from ..objectives.base import BuildContext
from .config import TrainConfig
from .lr_decay import check_run_decay

MIXED_PRECISION = ("no", "bf16", "fp16")
TRACKERS = ("tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive")


def resolve(path: str | None, overrides=()) -> tuple[DictConfig, Objective]:
    """The full config (objective fields and student steps filled in) and the objective."""
    cfg = load(TrainConfig, path, overrides)
    objective = make_objective(cfg.objective)
    cfg.objective = {"name": objective.name, **to_dict(OmegaConf.structured(objective.cfg))}
    if objective.needs_cache() and not cfg.objective.cache:  # teacher outputs live with the run that made them
        cfg.objective.cache = str(Path(cfg.output_dir) / "teacher_cache")
        objective = make_objective(cfg.objective)
    fixed = objective.student_steps()
    steps = cfg.student.steps
    if steps is None:
        steps = fixed if fixed is not None else 1
    elif fixed is not None and int(steps) != int(fixed):
        raise UserError(f"student.steps={steps} but objective {objective.name!r} trains a {fixed}-step student; "
                        f"drop student.steps or set it to {fixed}")
    if int(steps) < 1:
        raise UserError(f"student.steps must be >= 1, got {steps}; use 1, 2 or 4")
    cfg.student.steps = int(steps)
    cfg.student.experts = resolve_experts(cfg.student, objective)
    cfg.student.sampler = resolve_sampler(cfg.student, objective)
    check(cfg, objective)
    return cfg, objective


def resolve_experts(scfg, objective: Objective) -> list[int] | None:
    """The student's experts: the config's, else the objective's; refused where the two disagree."""
    from ..experts import check_steps_per_expert

    fixed, given = objective.student_experts(), scfg.experts
    given = None if given is None else [int(n) for n in given]
    if given is not None and fixed is not None and given != list(fixed):
        raise UserError(f"student.experts={given} but objective {objective.name!r} trains experts {list(fixed)}; "
                        f"drop student.experts or set objective.experts={given}")
    experts = given if given is not None else fixed
    check_steps_per_expert(experts, int(scfg.steps))
    return None if experts is None else list(experts)


def resolve_sampler(scfg, objective: Objective) -> str:
    """The student's sampler: the config's, else the objective's, else "renoise"; refused where the
    two disagree or the student's other options cannot go with it."""
    from ..export.scheduler import check_sampler

    fixed = objective.student_sampler()
    sampler = scfg.sampler
    if sampler is not None and fixed is not None and sampler != fixed:
        raise UserError(f"student.sampler={sampler!r} but objective {objective.name!r} trains a {fixed!r} student; "
                        f"drop student.sampler or set it to {fixed!r}")
    return check_sampler(sampler or fixed, scfg.boundary, scfg.first_timestep)


def make_objective(spec: Any) -> Objective:
    from ..objectives.base import make_objective as make

    return make(spec)


def updates_per_iteration(phases: list[Phase], net: str) -> int:
    """The most updates ``net`` gets in one outer iteration: the repeats of the phases training it that
    can run in the same iteration (phases one after another, a warm-up then its successor or Phased DMD's
    experts, count once), sizing its learning-rate schedule. Phases whose spans are given in different
    units (iterations, shares of the run) are taken to overlap."""
    mine = [p for p in phases if net in p.trains]

    def before(a: Phase, b: Phase) -> bool:  # a has stopped when b starts
        return ((a.stop is not None and b.start >= a.stop)
                or (a.stop_fraction is not None and b.start_fraction is not None and b.start_fraction >= a.stop_fraction))

    return max((sum(q.repeats for q in mine if not (before(p, q) or before(q, p))) for p in mine), default=1)


def trained_nets(objective: Objective) -> list[str]:
    out: list[str] = []
    for ph in objective.phases():
        out += [n for n in ph.trains if n not in out]
    return out


def check(cfg: DictConfig, objective: Objective) -> None:
    def need(ok: bool, msg: str):
        if not ok:
            raise UserError(msg)

    from ..attention import resolve_attention

    resolve_attention(cfg.attention, cfg.cpu)  # one line if the asked kernel cannot run here
    need(cfg.max_steps >= 0, f"max_steps must be >= 0, got {cfg.max_steps}")
    need(cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}")
    need(cfg.grad_accum >= 1, f"grad_accum must be >= 1, got {cfg.grad_accum}")
    need(cfg.data_workers >= 0, f"data_workers must be >= 0 (0 reads batches in the main process), got {cfg.data_workers}")
    need(cfg.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {cfg.checkpoint_every}")
    need(cfg.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {cfg.keep_checkpoints}")
    need(cfg.log_every >= 1, f"log_every must be >= 1, got {cfg.log_every}")
    need(cfg.max_nonfinite_in_a_row >= 1, "max_nonfinite_in_a_row must be >= 1")
    need(cfg.collapse_every is None or cfg.collapse_every >= 1, f"collapse_every must be >= 1 or null, got "
         f"{cfg.collapse_every}")
    need(cfg.collapse_samples >= 2, f"collapse_samples must be >= 2, got {cfg.collapse_samples}")
    need(0.0 < cfg.collapse_min_ratio < 1.0, f"collapse_min_ratio must be in (0, 1), got {cfg.collapse_min_ratio}")
    need(cfg.mixed_precision in MIXED_PRECISION,
         f"mixed_precision {cfg.mixed_precision!r} is not one of {MIXED_PRECISION}")
    need(cfg.log_with is None or cfg.log_with in TRACKERS,
         f"log_with {cfg.log_with!r} is not an accelerate tracker; use one of {TRACKERS} or null")
    need(cfg.ema.decay is None or 0.0 <= cfg.ema.decay < 1.0, f"ema.decay must be in [0, 1), got {cfg.ema.decay}")
    ratio = cfg.ema.halflife_ratio
    need(ratio is None or ratio > 0, f"ema.halflife_ratio must be > 0 (EDM's 0.05) or null, got {ratio}")
    need(ratio is None or not cfg.ema.warmup,
         "ema.halflife_ratio and ema.warmup are two ramp-ups of the EMA decay; set one (the other to null/false)")
    objective.check_budget(int(cfg.max_steps))
    phases = objective.phases()
    need(bool(phases), f"objective {objective.name!r} declares no phases")
    for ph in phases:
        need(isinstance(ph, Phase) and ph.repeats >= 1 and 0 <= ph.start <= (ph.start if ph.stop is None else ph.stop),
             f"objective {objective.name!r}: bad phase {ph!r}")
        need(all(f is None or 0.0 < f <= 1.0 for f in (ph.start_fraction, ph.stop_fraction)),
             f"objective {objective.name!r}: phase {ph.name!r} has a start/stop fraction outside (0, 1]")
        need("teacher" not in ph.trains, f"objective {objective.name!r}: phase {ph.name!r} trains the teacher, "
             "which is frozen; train a copy (e.g. fake_score) instead")
        need(hasattr(objective, f"{ph.name}_loss"),
             f"objective {objective.name!r} declares phase {ph.name!r} but has no {ph.name}_loss method")
    trained = trained_nets(objective)
    for key in cfg.optim:
        if key not in trained:
            near = difflib.get_close_matches(str(key), trained, n=1, cutoff=0.0)
            raise UserError(f"optim.{key}: objective {objective.name!r} trains no network {key!r}; "
                            f"did you mean optim.{near[0]}? (trained: {', '.join(trained)})")
    for net in trained:
        o = optim_for(cfg, net)
        check_optimizer(f"optim.{net}.", lr=o.lr, lr_schedule=o.lr_schedule, warmup_steps=o.warmup_steps,
                        betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
        check_run_decay(f"optim.{net}.", o.lr_decay, o.lr_decay_floor, o.lr_schedule)
        need(o.max_grad_norm is None or o.max_grad_norm > 0,
             f"optim.{net}.max_grad_norm must be > 0 or null (no clipping), got {o.max_grad_norm}")


def optim_for(cfg: DictConfig, net: str):
    from .config import OptimConfig

    return OmegaConf.to_object(cfg.optim[net]) if net in cfg.optim else OptimConfig()


TEACHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def teacher_dtype(cfg: DictConfig):
    """The frozen teacher's weight dtype (``teacher_dtype``, else following ``mixed_precision``)."""
    name = cfg.teacher_dtype
    if name is None:
        name = {"bf16": "bf16", "fp16": "fp16"}.get(cfg.mixed_precision, "fp32")
    if name not in TEACHER_DTYPES:
        raise UserError(f"teacher_dtype {name!r} is not one of {', '.join(TEACHER_DTYPES)} (or null)")
    return TEACHER_DTYPES[name]


def load_teacher_and_data(cfg: DictConfig, objective: Objective | None = None, *, device=None, main_first=None,
                          log=print):
    """The frozen teacher and the training set. For text-to-image teachers the set is prompts (and
    image latents for objectives that use real data) read through their caches, which are built
    here on first use by the main process (``main_first``: accelerate's main_process_first)."""
    from ..teachers import load_teacher

    teacher = load_teacher(cfg.teacher, teacher_dtype(cfg), resolution=cfg.resolution)
    teacher.requires_grad_(False).eval()
    meta = getattr(teacher, "meta", {}) or {}
    if meta.get("kind") == "text-to-image":
        return teacher, _text_to_image_data(cfg, teacher, objective, device, main_first, log)
    if cfg.resolution is not None:
        raise UserError(f"resolution={cfg.resolution} applies to text-to-image teachers only; teacher {cfg.teacher!r} "
                        "has a fixed sample size; drop resolution")
    data = _image_data(cfg)
    if len(data) == 0:
        raise UserError(f"dataset {cfg.data!r} holds no images; point data at a folder or .npz with images")
    size, ch = meta.get("sample_size"), meta.get("in_channels")
    shape = tuple(data.sample_shape)
    if ch is not None and size is not None:
        sz = (size, size) if isinstance(size, int) else tuple(size)
        if shape != (ch, *sz):
            raise UserError(f"dataset {cfg.data!r} has images of shape {shape} but teacher {cfg.teacher!r} takes "
                            f"{(ch, *sz)}; resize the data or pick the matching teacher")
    check_labels(data, teacher, cfg)
    return teacher, data


def _image_data(cfg: DictConfig):
    """The training images: in memory, or read from disk per batch (by the data workers where there are
    any): an image folder with data workers (``disk_data.FolderImages``), a saved Hugging Face dataset
    always (``hf_data.HFDiskImages``)."""
    from ..data import DIGITS_SPECS, load_images
    from ..hf_data import HFDiskImages, is_hf_dataset

    if cfg.data not in DIGITS_SPECS and is_hf_dataset(Path(cfg.data).expanduser()):  # memory-mapped, read per batch
        return HFDiskImages(Path(cfg.data).expanduser())
    if cfg.data_workers > 0 and cfg.data not in DIGITS_SPECS and Path(cfg.data).expanduser().is_dir():
        from ..disk_data import FolderImages

        return FolderImages(Path(cfg.data).expanduser())
    return load_images(cfg.data)


def check_labels(data, teacher, cfg: DictConfig) -> None:
    """A class-conditional teacher's labels are 0..num_classes-1; its null class (the unconditional
    branch of CFG) is the trainer's to use, not the data's."""
    null = getattr(teacher, "null_class", None)
    if data.labels is None or null is None or len(data.labels) == 0:
        return
    classes = int((getattr(teacher, "meta", None) or {}).get("num_classes") or null)
    lo, hi = int(data.labels.min()), int(data.labels.max())
    if lo < 0 or hi >= classes:
        bad = lo if lo < 0 else hi
        what = "its null class (the unconditional branch of guidance)" if bad == null else "out of range"
        raise UserError(f"dataset {cfg.data!r} has label {bad}, {what}; teacher {cfg.teacher!r} takes labels "
                        f"0..{classes - 1}: relabel the data or pick the matching teacher")


def _text_to_image_data(cfg, teacher, objective, device, main_first, log):
    import contextlib
    from pathlib import Path

    from ..t2i.caches import ensure_latent_cache, ensure_text_cache
    from ..t2i.data import TextToImageData
    from ..t2i.pipeline import attach_null_text
    from ..t2i.prompts import read_prompts

    prompts = read_prompts(cfg.data)  # every input check before any encoder runs
    real = bool(objective is not None and objective.uses_real_data)
    if real and prompts.images is None:
        raise UserError(f"objective {objective.name!r} uses real images, but data {cfg.data!r} is a prompt list; give "
                        "image-text pairs (a folder of images with .txt captions, or .jsonl with image and text)")
    out = Path(cfg.output_dir)
    t = cfg.text
    ctx = main_first() if main_first is not None else contextlib.nullcontext()
    with ctx:
        text = ensure_text_cache(teacher.info, prompts, t.cache or out / "text_cache",
                                 negative_prompt=t.negative_prompt, max_sequence_length=t.max_sequence_length,
                                 embedded_guidance=t.embedded_guidance, dtype=t.dtype, batch=t.encode_batch,
                                 device=device, log=log)
        latents = ensure_latent_cache(teacher.info, prompts, cfg.latent_cache or out / "latent_cache",
                                      device=device, log=log) if real else None
    attach_null_text(teacher, text.null)
    return TextToImageData(prompts, text, latents, teacher.info.latent_shape)


@dataclass
class Built:
    nets: Nets
    student: Student
    teacher: Any


def student_config(cfg: DictConfig, objective: Objective, teacher) -> StudentConfig:
    """The run's StudentConfig, its sampling times filled in from the objective where the config leaves
    them unset (``Objective.student_timesteps``)."""
    scfg = OmegaConf.to_object(cfg.student)
    assert isinstance(scfg, StudentConfig)
    if scfg.timesteps is None and scfg.first_timestep is None:  # a chosen first time keeps the scheduler's grid
        own = objective.student_timesteps(teacher, int(scfg.steps or 1))
        scfg.timesteps = None if own is None else [float(v) for v in own]
    return scfg


def build_nets(cfg: DictConfig, objective: Objective, teacher, context: BuildContext | None = None) -> Built:
    """Student and the objective's extra networks; seeded by ``cfg.seed`` alone, so every process
    (and a resumed run) builds identical initial weights. ``context`` reaches ``objective.build``
    (the trainer's loads teacher-output caches; without one they load at first use)."""
    torch.manual_seed(int(cfg.seed))
    # frozen before the objective builds: a LoRA fake score adds trainable adapters to this very
    # module (one copy of the teacher's weights), which must stay trainable
    teacher.requires_grad_(False)
    student = build_student(teacher, student_config(cfg, objective, teacher))
    extra = objective.build(teacher, student, context) or {}
    for name in ("teacher", "student"):
        if name in extra:
            raise UserError(f"objective {objective.name!r} builds a network named {name!r}, which is reserved")
    nets = Nets(teacher=teacher, student=student, **extra)
    for ph in objective.phases():
        for n in ph.trains:
            if nets.get(n) is None:
                raise UserError(f"objective {objective.name!r}: phase {ph.name!r} trains {n!r}, which neither "
                                "build() nor the trainer provides")
    unfrozen = [k for k, p in teacher.named_parameters() if p.requires_grad and "lora_" not in k]
    if unfrozen:
        raise UserError(f"objective {objective.name!r} made the teacher's own weight {unfrozen[0]!r} trainable; "
                        "the teacher stays frozen (train adapters or a copy instead)")
    return Built(nets, student, teacher)


def parameter_counts(nets: Nets) -> dict[str, dict[str, int]]:
    teacher_ids = {id(p) for p in nets.teacher.parameters()}
    out = {}
    for name, mod in nets.named_children():
        ps = [p for p in mod.parameters() if name == "teacher" or id(p) not in teacher_ids]
        out[name] = {"total": sum(p.numel() for p in ps), "trainable": sum(p.numel() for p in ps if p.requires_grad)}
    return out
