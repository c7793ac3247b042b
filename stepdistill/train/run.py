"""A run folder back into a sampling student: the newest checkpoint's student with EMA weights."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from ..errors import UserError
from ..models import SampleableModel
from . import checkpoint as ckpt


def is_run_dir(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.yaml").is_file() and (p / "checkpoints").is_dir()


def load_run(run_dir, *, ema: bool = True, checkpoint: str | None = None):
    """(student in eval mode with EMA weights where the run kept an EMA, meta dict).

    meta: step, steps (student step count), checkpoint path, teacher path, objective, config,
    num_classes, null_class, sample_size, in_channels (from the teacher)."""
    from ..generator import build_student
    from ..teachers import load_teacher
    from .config import TrainConfig

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
    student = build_student(teacher, OmegaConf.to_object(cfg.student), steps=int(state["student_steps"]))
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
            **{k: tmeta.get(k) for k in ("num_classes", "null_class", "sample_size", "in_channels", "class_names")}}
    if tmeta.get("kind") == "text-to-image":  # what sampling needs to encode prompts and decode latents
        meta.update(kind="text-to-image", t2i=teacher.info, resolution=tmeta.get("resolution"),
                    pipeline=tmeta.get("pipeline"), text=OmegaConf.to_container(cfg.text, resolve=True))
    return student, meta


def named_checkpoint(run: Path, name: str) -> Path:
    """The checkpoint ``name`` (``step-00000500``, or a path to it) of this run; another run's
    checkpoint is refused, since this run's config.yaml would be applied to it."""
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
        if guidance != 1.0:
            raise UserError("a distilled student samples without classifier-free guidance (its guidance was "
                            "distilled in); use --guidance 1")
        return self.student(noise, cond, steps=steps, generator=generator)


def load_run_model(run_dir, *, ema: bool = True) -> StudentModel:
    student, meta = load_run(run_dir, ema=ema)
    return StudentModel(student, meta)
