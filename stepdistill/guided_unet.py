"""A class-conditional UNet2DModel with a CFG-scale input: the backbone of a guidance-distilled
student of a class-conditional teacher (Meng et al., 2023, sec. 3; ``student.time_cond_proj_dim``).

The UNet keeps every weight of the teacher's but runs with ``class_embed_type="identity"``; its
class embedding moves into ``export/guidance_embedding.GuidanceEmbedding``, which adds the w branch.
Both save as plain diffusers folders (``unet/`` and ``guidance_embedding/``), and the exported
pipeline runs them with ``guidance_scale`` at call time, in one pass.
"""
from __future__ import annotations

import torch
from diffusers.configuration_utils import FrozenDict
from torch import nn

from .errors import UserError
from .export.guidance_embedding import GuidanceEmbedding


class GuidedUNet2DModel(nn.Module):
    """``unet`` (UNet2DModel, identity class embedding) fed by ``embedding`` (GuidanceEmbedding)."""

    def __init__(self, unet: nn.Module, embedding: GuidanceEmbedding):
        super().__init__()
        self.unet = unet
        self.embedding = embedding

    @property
    def config(self) -> FrozenDict:
        """The UNet's config with the w input's width (``time_cond_proj_dim``, as diffusers names it)
        and the class count of the embedding."""
        return FrozenDict({**self.unet.config, "num_class_embeds": self.embedding.config.num_class_embeds,
                           "time_cond_proj_dim": self.embedding.config.cond_dim})

    def forward(self, x, t, class_labels=None, timestep_cond=None):
        """``timestep_cond``: ``embedding.w_features(w)``; None runs at w = 1, the teacher's conditional
        model without guidance."""
        if class_labels is None:
            raise UserError("a guidance-distilled student is class-conditional; pass class labels")
        if timestep_cond is None:
            timestep_cond = self.embedding.w_features(torch.ones(len(class_labels)))
        return self.unet(x, t, class_labels=self.embedding(class_labels, timestep_cond))


def with_w_input(backbone: nn.Module, dim: int) -> GuidedUNet2DModel:
    """A copy of a class-conditional UNet2DModel with a w input of width `dim`: the same outputs as
    the teacher's for every w until the w branch's last layer (zero here) trains."""
    cfg = {k: v for k, v in backbone.config.items() if not k.startswith("_")}
    n = cfg.get("num_class_embeds")
    if not n or cfg.get("class_embed_type") is not None:
        raise UserError("student.time_cond_proj_dim on a UNet2DModel needs a class-conditional teacher (num_class_embeds, "
                        "no class_embed_type): guidance distillation needs classifier-free guidance")
    dtype = next(backbone.parameters()).dtype
    unet = type(backbone).from_config({**cfg, "class_embed_type": "identity", "num_class_embeds": None})
    state = {k: v for k, v in backbone.state_dict().items() if not k.startswith("class_embedding.")}
    unet.load_state_dict(state, strict=True)
    table = backbone.class_embedding.weight
    embedding = GuidanceEmbedding(num_class_embeds=int(n), embed_dim=table.shape[1], cond_dim=int(dim))
    if dtype != torch.float32:
        unet, embedding = unet.to(dtype), embedding.to(dtype)
    with torch.no_grad():
        embedding.class_embedding.weight.copy_(table)
        embedding.linear_2.weight.zero_()
        embedding.linear_2.bias.zero_()
    return GuidedUNet2DModel(unet, embedding)


def load_guided(folder, unet: nn.Module) -> GuidedUNet2DModel:
    """The exported backbone: ``unet`` (already loaded) and ``folder``'s GuidanceEmbedding."""
    return GuidedUNet2DModel(unet, GuidanceEmbedding.from_pretrained(folder, local_files_only=True))


__all__ = ["GuidedUNet2DModel", "with_w_input", "load_guided"]
