"""Anything that can generate images, behind one call: ``generate(...)`` (``loaders.load_for_sampling``
builds one from a folder).

A teacher folder (sampled with the teacher samplers), a trained student's run folder, or a folder
written by ``stepdistill export`` (the student rebuilt from its weights and JSON configs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .denoisers import Denoiser


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


__all__ = ["SampleableModel", "TeacherModel"]
