"""Folders back into models, below the commands that write them: a run folder (``stepdistill
train``'s output_dir: the newest checkpoint's student with its EMA weights), an exported folder
(``stepdistill export``: the student rebuilt from weights and JSON configs, running no code from the
folder) and, through ``load_for_sampling``, a teacher folder. The trainer, export and eval import
from here; this module imports none of them at import time, so there is no loop between them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf

from . import resources
from .errors import UserError
from .models import SampleableModel, TeacherModel

#: the record an exported folder carries (read here, written by ``export.writer``)
EXPORT_META = "stepdistill_student.json"
FORMAT_VERSION = 2  # 2: a mixture-of-experts student (record "experts", unet_2, ...); single-network exports write 1
GUIDED_VERSION = 3  # 3: a guidance-distilled UNet2DModel (guidance_embedding/): earlier readers would drop its w input
OWN_TIMES_VERSION = 4  # 4: a student sampled at times of its own (trained_timesteps): earlier readers would use the grid
READ_VERSIONS = (1, 2, 3, 4)


def is_run_dir(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.yaml").is_file() and (p / "checkpoints").is_dir()


def load_run(run_dir, *, ema: bool = True, checkpoint: str | None = None):
    """(student in eval mode with EMA weights where the run kept an EMA, meta dict).

    meta: step, steps (student step count), checkpoint path, teacher path, objective, config,
    num_classes, null_class, sample_size, in_channels (from the teacher)."""
    from .generator import build_student
    from .teachers import load_teacher
    from .train import checkpoint as ckpt
    from .train.config import TrainConfig

    run = Path(run_dir)
    if not is_run_dir(run):
        raise UserError(f"{str(run)!r} is not a run folder (config.yaml + checkpoints/); pass the output_dir "
                        "of a `stepdistill train` run")
    folder = named_checkpoint(run, checkpoint) if checkpoint else ckpt.latest(run)
    if folder is None:
        raise UserError(f"run {str(run)!r} has no complete checkpoint yet; train longer or lower checkpoint_every")
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(run / "config.yaml"))
    state = ckpt.read_json(folder / "trainer.json")
    teacher = load_teacher(state.get("teacher") or cfg.teacher, resolution=cfg.resolution)
    torch.manual_seed(int(cfg.seed))
    scfg = OmegaConf.to_object(cfg.student)
    # the times the run trained at, as its checkpoint records them (earlier runs: the scheduler's grid)
    scfg.timesteps = state.get("student_timesteps") if state.get("student_custom_times") else None
    student = build_student(teacher, scfg, steps=int(state["student_steps"]))
    tensors = ckpt.load_tensors(folder / "nets.safetensors")
    own = {k[len("student."):]: v for k, v in tensors.items() if k.startswith("student.")}
    if ema and (folder / "ema.safetensors").is_file():
        own.update(ckpt.load_tensors(folder / "ema.safetensors"))
    named = dict(student.named_parameters())
    named.update(dict(student.named_buffers()))
    unknown = sorted(set(own) - set(named))
    if unknown:
        raise UserError(f"checkpoint {str(folder)!r} does not match its config.yaml (e.g. {unknown[0]!r}); "
                        "was config.yaml edited?")
    with torch.no_grad():
        for k, v in own.items():
            named[k].copy_(v.to(named[k].dtype))
    student.requires_grad_(False).eval()
    tmeta = dict(getattr(teacher, "meta", {}) or {})
    meta = {"step": int(state["step"]), "steps": student.steps, "checkpoint": str(folder),
            "teacher": str(teacher.meta.get("path", cfg.teacher)), "objective": state.get("objective"),
            "config": OmegaConf.to_container(cfg, resolve=True), "ema": bool(ema and (folder / "ema.safetensors").is_file()),
            "train_seconds": state.get("train_seconds"), "world_size": state.get("world_size"),
            **{k: tmeta.get(k) for k in ("num_classes", "null_class", "sample_size", "in_channels", "class_names")}}
    if tmeta.get("kind") == "text-to-image":  # what sampling needs to encode prompts and decode latents
        meta.update(kind="text-to-image", t2i=teacher.info, resolution=tmeta.get("resolution"),
                    pipeline=tmeta.get("pipeline"), text=OmegaConf.to_container(cfg.text, resolve=True))
    return student, meta


def named_checkpoint(run: Path, name: str) -> Path:
    """The checkpoint ``name`` (``step-00000500``, or a path to it) of this run; another run's
    checkpoint is refused, since this run's config.yaml would be applied to it."""
    from .train import checkpoint as ckpt

    given = Path(name)
    if given.parent != Path("."):
        if given.resolve().parent != (run / "checkpoints").resolve():
            raise UserError(f"--checkpoint {name!r} is not a checkpoint of run {str(run)!r}; pass the run that wrote "
                            "it, or a checkpoint name of this run such as step-00000500")
        name = given.name
    folder = run / "checkpoints" / name
    if ckpt.PATTERN.match(name) and (folder / "trainer.json").is_file():
        return folder
    have = [p.name for p in ckpt.list_checkpoints(run)]
    raise UserError(f"run {str(run)!r} has no checkpoint {name!r}; it has "
                    f"{', '.join(have) if have else 'none yet'}; pass one of those to --checkpoint")


class StudentModel(SampleableModel):
    """A trained student behind the same calls as ``models.TeacherModel`` (``stepdistill sample``).
    It samples with its own K-step rule (re-noising between steps), so ``sampler`` is ignored;
    ``steps`` other than the trained K use the schedule's K-step grid."""

    samplers = ("student",)

    def __init__(self, student, meta: dict):
        self.student, self.meta, self.denoiser = student, meta, student.denoiser

    @torch.no_grad()
    def generate(self, noise, cond, steps: int | None = None, sampler: str = "student", guidance: float = 1.0,
                 generator=None):
        from .generator import cond_proj_dim, guidance_embedding

        dim = cond_proj_dim(self.student)
        if dim and cond is not None:  # a w input (guidance distillation, LCM's w-embedding): w in one pass
            w = guidance_embedding(torch.full((len(noise),), float(guidance)), dim)
            cond = {**cond, "timestep_cond": w.to(noise.device)}
        elif guidance != 1.0:
            raise UserError("a distilled student samples without classifier-free guidance (its guidance was "
                            "distilled in); use --guidance 1")
        return self.student(noise, cond, steps=steps, generator=generator)


def is_export_dir(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / EXPORT_META).is_file() and (p / "model_index.json").is_file()


def load_exported(path, *, trust_pickle: bool = False):
    """(Student in eval mode, meta) as ``load_run`` returns them."""
    from .denoisers import DiffusersDenoiser
    from .export.lora import load_lora
    from .export.pipeline import LORA_WEIGHT_NAME
    from .export.scheduler import check_timesteps, student_scheduler_config, student_timesteps
    from .generator import Student
    from .schedules import schedule_from_config
    from .teachers import _load_backbone

    p = Path(path)
    record = json.loads((p / EXPORT_META).read_text())
    if record.get("format_version") not in READ_VERSIONS:
        raise UserError(f"{str(p / EXPORT_META)!r} has format_version {record.get('format_version')!r}; this "
                        f"stepdistill reads versions {', '.join(map(str, READ_VERSIONS))}; re-export the run or upgrade stepdistill")
    sched_cfg = json.loads((p / "scheduler" / "scheduler_config.json").read_text())
    if record.get("teacher_sigma_min") is not None:  # an EDM student: its scheduler's sigma_min ends its grid
        sched_cfg["_teacher_sigma_min"] = record["teacher_sigma_min"]
    info = None
    if record.get("kind") == "text-to-image":
        schedule, info = _t2i_schedule(p, record, sched_cfg)
    else:
        schedule = schedule_from_config(sched_cfg)
    boundary = record.get("boundary")
    first = record.get("first_timestep")
    sampler = record.get("sampler") or "renoise"  # exports written before the option re-noised
    own = bool(record.get("custom_timesteps"))  # the student's own sampling times, in the record
    expected = student_scheduler_config(schedule, boundary, int(record["steps"]), first, sampler, own)
    for key in ("_class_name", "timestep_scaling", "original_inference_steps", "stochastic_sampling"):
        if key in expected and sched_cfg.get(key) != expected[key]:
            raise UserError(f"{str(p)!r}: scheduler/scheduler_config.json has {key}={sched_cfg.get(key)!r} but the "
                            f"student needs {expected[key]!r}; restore the exported scheduler config")
    folder = info.backbone_folder if info is not None else "unet"
    unet = _load_backbone(p / folder, None, trust_pickle)
    if record.get("mode") == "lora":
        load_lora(unet, p / LORA_WEIGHT_NAME, prefix=folder)
    if record.get("guidance_embedding"):  # a guidance-distilled student: its w input (guided_unet)
        from .guided_unet import load_guided

        unet = load_guided(p / "guidance_embedding", unet)
    den = DiffusersDenoiser(unet, schedule, null_class=record.get("null_class"))
    per_expert = record.get("experts")  # a mixture of experts: the later experts in unet_2, unet_3, ...
    more = [DiffusersDenoiser(_load_backbone(p / f"unet_{i}", None, trust_pickle), schedule,
                              null_class=record.get("null_class")) for i in range(2, len(per_expert or [1]) + 1)]
    times = (check_timesteps(schedule, record["timesteps"], int(record["steps"]), sampler, first) if own
             else student_timesteps(schedule, int(record["steps"]), boundary, first, sampler))
    if schedule.kind == "edm" and not own and "teacher_sigma_min" not in record and int(record["steps"]) > 1:
        times = schedule.timesteps(int(record["steps"]), sigma_max=first)[:-1]  # exported when the grid ran to sigma_min
    student = Student(den, times, boundary=boundary, first_timestep=first, sampler=sampler,
                      gamma=float(record.get("gamma", 0.3)), experts=more, steps_per_expert=per_expert, custom_times=own)
    if not torch.equal(student.timesteps, torch.tensor(record["timesteps"], dtype=torch.float64)):
        raise UserError(f"{str(p)!r}: the scheduler gives timesteps {student.timesteps.tolist()}, but the student was "
                        f"trained at {record['timesteps']}; restore the exported scheduler config")
    student.requires_grad_(False).eval()
    meta = {**record, "path": str(p)}
    if info is not None:  # what text_cond and to_pixels need: this folder's text encoders and VAE
        c, s, _ = info.latent_shape
        meta.update(t2i=info, pipeline=info.kind, in_channels=c, sample_size=s)
    return student, meta


def _t2i_schedule(p: Path, record: dict, sched_cfg: dict):
    """The student's schedule, as ``t2i.pipeline.teacher_schedule`` built it from the teacher's
    (FLUX: the shift at the training resolution and the pipeline's linspace sigmas)."""
    import dataclasses

    from .t2i.pipeline import inspect_pipeline, teacher_schedule

    info = inspect_pipeline(p, int(record["resolution"]))
    if info.kind != record.get("pipeline_kind"):
        raise UserError(f"{str(p)!r} holds a {info.kind} pipeline but was exported from a "
                        f"{record.get('pipeline_kind')} student; re-export the run")
    plain = {k: v for k, v in sched_cfg.items() if k != "stochastic_sampling"}  # a step option, not the path
    return teacher_schedule(dataclasses.replace(info, scheduler_config=plain)), info


def load_for_sampling(path: str | os.PathLike, *, trust_pickle: bool = False,
                      resolution: int | None = None, ema: bool = True) -> SampleableModel:
    """The sampleable model stored at ``path`` (a teacher, run or exported folder). ``resolution``
    (pixels) picks a text-to-image teacher's sampling size (default: its pipeline's). ``ema=False``
    takes a run's raw student weights instead of their EMA."""
    from .teachers import META_FILE, load_teacher

    p = Path(resources.teacher(path))  # a shipped teacher by name (digits16) from any working directory
    student = is_run_dir(p) or is_export_dir(p)
    if resolution is not None and student:
        raise UserError("--resolution applies to text-to-image teachers; a student samples at its trained size, "
                        "drop --resolution")
    if not ema and not is_run_dir(p):
        raise UserError(f"--no-ema applies to a run folder (the output_dir of `stepdistill train`); {str(p)!r} "
                        "is not one, drop --no-ema")
    if is_run_dir(p):  # a `stepdistill train` output_dir: its newest checkpoint's EMA (or raw) student
        return StudentModel(*load_run(p, ema=ema))
    if is_export_dir(p):  # a `stepdistill export` folder: the student rebuilt from weights + JSON
        return StudentModel(*load_exported(p, trust_pickle=trust_pickle))
    if p.is_dir() and not (p / META_FILE).is_file() and not (p / "model_index.json").is_file():
        raise UserError(f"{str(p)!r} is not a model folder this command can sample; pass a teacher folder "
                        f"(with {META_FILE}, unet/ and scheduler/), e.g. digits16 (the shipped teacher)")
    den = load_teacher(p, trust_pickle=trust_pickle, resolution=resolution)
    if resolution is not None and den.meta.get("kind") != "text-to-image":
        raise UserError(f"--resolution applies to text-to-image teachers; {str(p)!r} has a fixed sample size, "
                        "drop --resolution")
    meta = dict(den.meta)
    if getattr(den, "info", None) is not None:
        meta["t2i"] = den.info
    return TeacherModel(den, meta)


__all__ = ["is_run_dir", "load_run", "named_checkpoint", "StudentModel", "is_export_dir", "load_exported",
           "load_for_sampling", "EXPORT_META", "FORMAT_VERSION"]
