"""A text-to-image training set: prompts (their cached embeddings) and, for pairs, cached latents.

It answers the trainer like ``data.ImageSet`` does: ``len``, ``sample_shape`` and
``rows(idx) -> (x0, cond)``. Without images (a prompt list), ``x0`` is zeros of the latent shape:
data-free objectives read only its shape.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .caches import TextCache
from .prompts import PromptSet
from .shards import ShardedRows


@dataclass
class TextToImageData:
    prompts: PromptSet
    text: TextCache
    latents: ShardedRows | None
    latent_shape: tuple[int, int, int]

    labels = None
    class_names = None

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def name(self) -> str:
        return self.prompts.name

    @property
    def cache_prompts(self):
        """The prompts as a teacher-output cache pairs them with noise (``cache.CachePrompts``)."""
        from ..cache import CachePrompts

        return CachePrompts(self.text.rows, len(self.text), self.prompts.sha256)

    @property
    def sha256(self) -> str:
        return self.prompts.sha256

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.latent_shape)

    @property
    def has_images(self) -> bool:
        return self.latents is not None

    def rows(self, idx) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        cond = self.text.rows(idx)
        if self.latents is not None:
            x0 = self.latents.rows(idx)["latents"]
        else:
            x0 = torch.zeros((len(idx), *self.latent_shape))
        return x0, cond


__all__ = ["TextToImageData"]
