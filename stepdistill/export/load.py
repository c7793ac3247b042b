"""An exported folder back into a stepdistill student (``stepdistill eval|sample EXPORT``), from its
weights and JSON configs alone: ``pipeline.py`` is never imported, so loading runs no code."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from .writer import EXPORT_META, FORMAT_VERSION


def is_export_dir(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / EXPORT_META).is_file() and (p / "model_index.json").is_file()


def load_exported(path, *, trust_pickle: bool = False):
    """(Student in eval mode, meta) as ``train.run.load_run`` returns them."""
    from ..denoisers import DiffusersDenoiser
    from ..generator import Student
    from ..schedules import schedule_from_config
    from ..teachers import _load_backbone
    from .lora import load_lora
    from .pipeline import LORA_WEIGHT_NAME
    from .scheduler import student_scheduler_config, student_timesteps

    p = Path(path)
    record = json.loads((p / EXPORT_META).read_text())
    if record.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{str(p / EXPORT_META)!r} has format_version {record.get('format_version')!r}; this "
                        f"stepdistill reads {FORMAT_VERSION}; re-export the run or upgrade stepdistill")
    sched_cfg = json.loads((p / "scheduler" / "scheduler_config.json").read_text())
    info = None
    if record.get("kind") == "text-to-image":
        schedule, info = _t2i_schedule(p, record, sched_cfg)
    else:
        schedule = schedule_from_config(sched_cfg)
    boundary = record.get("boundary")
    first = record.get("first_timestep")
    sampler = record.get("sampler") or "renoise"  # exports written before the option re-noised
    expected = student_scheduler_config(schedule, boundary, int(record["steps"]), first, sampler)
    for key in ("_class_name", "timestep_scaling", "original_inference_steps", "stochastic_sampling"):
        if key in expected and sched_cfg.get(key) != expected[key]:
            raise UserError(f"{str(p)!r}: scheduler/scheduler_config.json has {key}={sched_cfg.get(key)!r} but the "
                            f"student needs {expected[key]!r}; restore the exported scheduler config")
    folder = info.backbone_folder if info is not None else "unet"
    unet = _load_backbone(p / folder, None, trust_pickle)
    if record.get("mode") == "lora":
        load_lora(unet, p / LORA_WEIGHT_NAME, prefix=folder)
    den = DiffusersDenoiser(unet, schedule, null_class=record.get("null_class"))
    student = Student(den, student_timesteps(schedule, int(record["steps"]), boundary, first, sampler),
                      boundary=boundary, first_timestep=first, sampler=sampler)
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

    from ..t2i.pipeline import inspect_pipeline, teacher_schedule

    info = inspect_pipeline(p, int(record["resolution"]))
    if info.kind != record.get("pipeline_kind"):
        raise UserError(f"{str(p)!r} holds a {info.kind} pipeline but was exported from a "
                        f"{record.get('pipeline_kind')} student; re-export the run")
    plain = {k: v for k, v in sched_cfg.items() if k != "stochastic_sampling"}  # a step option, not the path
    return teacher_schedule(dataclasses.replace(info, scheduler_config=plain)), info


def load_exported_model(path, *, trust_pickle: bool = False):
    from ..train.run import StudentModel

    return StudentModel(*load_exported(path, trust_pickle=trust_pickle))
