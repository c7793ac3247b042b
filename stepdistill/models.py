"""Anything that can generate images, behind one call: ``load_for_sampling(path).generate(...)``.

A teacher folder (sampled with the teacher samplers), a trained student's run folder, or a folder
written by ``stepdistill export`` (the student rebuilt from its weights and JSON configs).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .denoisers import Denoiser
from .errors import UserError


class SampleableModel:
    """What every loaded model shares: ``denoiser``, ``meta`` and the calls around ``generate``."""

    denoiser: Denoiser
    meta: dict

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes") or 0)

    @property
    def is_text_to_image(self) -> bool:
        return self.meta.get("kind") == "text-to-image"

    @property
    def shape(self) -> tuple[int, int, int]:
        if self.is_text_to_image:  # latents
            s = int(self.meta["sample_size"])
            return int(self.meta["in_channels"]), s, s
        cfg = self.denoiser.backbone.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return int(cfg.in_channels), int(size), int(size)

    def make_cond(self, labels: torch.Tensor | None):
        return None if labels is None else {"class_labels": labels}

    def text_cond(self, prompts: list[str], *, negative_prompt: str = "", max_sequence_length: int | None = None,
                  embedded_guidance: float = 3.5) -> dict:
        """Text-to-image models: the prompts' condition, by the pipeline's own text encoders (loaded
        for this call, then freed); also sets the null condition that CFG needs."""
        from .t2i.pipeline import TextEncoders, attach_null_text

        text = dict(self.meta.get("text") or {})
        enc = TextEncoders(self.meta["t2i"], negative_prompt=text.get("negative_prompt", negative_prompt),
                           max_sequence_length=text.get("max_sequence_length", max_sequence_length),
                           embedded_guidance=text.get("embedded_guidance", embedded_guidance))
        cond = enc.encode(prompts)
        attach_null_text(self.denoiser, enc.null())
        enc.offload()
        return cond

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Samples as images in [-1, 1]: latents go through the teacher pipeline's VAE decoder."""
        if not self.is_text_to_image:
            return x
        from .t2i.pipeline import decode_latents, load_vae

        if getattr(self, "_vae", None) is None:
            self._vae = load_vae(self.meta["t2i"])
        return decode_latents(self._vae, x)

    @property
    def default_steps(self) -> int:
        """The step count to sample with when none is asked for: a student's trained K."""
        return int(self.meta.get("steps") or 50)


@dataclass
class TeacherModel(SampleableModel):
    """A teacher, sampled with a teacher sampler on its schedule's diffusers grid."""

    denoiser: Denoiser
    meta: dict
    samplers: tuple[str, ...] = ("ddim", "euler", "heun", "dpmpp2m")

    @torch.no_grad()
    def generate(self, noise: torch.Tensor, cond, steps: int, sampler: str = "ddim", guidance: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        from .sampling import sample

        return sample(self.denoiser, noise, steps, sampler=sampler, cond=cond, guidance=guidance,
                      generator=generator)


def load_for_sampling(path: str | os.PathLike, *, trust_pickle: bool = False,
                      resolution: int | None = None, ema: bool = True) -> TeacherModel:
    """The sampleable model stored at ``path`` (a teacher, run or exported folder). ``resolution``
    (pixels) picks a text-to-image teacher's sampling size (default: its pipeline's). ``ema=False``
    takes a run's raw student weights instead of their EMA."""
    from .teachers import META_FILE, load_teacher

    p = Path(path)
    from .train.run import is_run_dir, load_run_model

    from .export import is_export_dir, load_exported_model

    student = is_run_dir(p) or is_export_dir(p)
    if resolution is not None and student:
        raise UserError("--resolution applies to text-to-image teachers; a student samples at its trained size, "
                        "drop --resolution")
    if not ema and not is_run_dir(p):
        raise UserError(f"--no-ema applies to a run folder (the output_dir of `stepdistill train`); {str(p)!r} "
                        "is not one, drop --no-ema")
    if is_run_dir(p):  # a `stepdistill train` output_dir: its newest checkpoint's EMA (or raw) student
        return load_run_model(p, ema=ema)
    if is_export_dir(p):  # a `stepdistill export` folder: the student rebuilt from weights + JSON
        return load_exported_model(p, trust_pickle=trust_pickle)
    if p.is_dir() and not (p / META_FILE).is_file() and not (p / "model_index.json").is_file():
        raise UserError(f"{str(p)!r} is not a model folder this command can sample; pass a teacher folder "
                        f"(with {META_FILE}, unet/ and scheduler/), e.g. assets/teachers/digits16")
    den = load_teacher(p, trust_pickle=trust_pickle, resolution=resolution)
    if resolution is not None and den.meta.get("kind") != "text-to-image":
        raise UserError(f"--resolution applies to text-to-image teachers; {str(p)!r} has a fixed sample size, "
                        "drop --resolution")
    meta = dict(den.meta)
    if getattr(den, "info", None) is not None:
        meta["t2i"] = den.info
    return TeacherModel(den, meta)


__all__ = ["TeacherModel", "load_for_sampling"]
