"""The class and CFG-scale input of a guidance-distilled class-conditional UNet2DModel.

Guidance distillation (Meng et al., 2023, sec. 3) gives the student the guidance weight w as an
input. diffusers' UNet2DModel has no such input, but with ``class_embed_type="identity"`` it adds
whatever vector it is given as ``class_labels`` to its time embedding. This module computes that
vector: the teacher's class embedding plus an MLP of LCM's sinusoidal embedding of w - 1 (the
features ``LatentConsistencyModelPipeline.get_guidance_scale_embedding`` computes, Luo et al., 2023,
sec. 4.2). The MLP's last layer starts at zero, so the student starts as the teacher for every w.

This file is copied verbatim into exported folders as ``guidance_embedding/guidance_embedding.py``,
which diffusers loads as a custom component (``model_index.json``: ``"guidance_embedding":
["guidance_embedding", "GuidanceEmbedding"]``, with ``trust_remote_code=True``). It imports only
torch and diffusers.
"""
from __future__ import annotations

import torch
from diffusers import ConfigMixin, LatentConsistencyModelPipeline, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


class GuidanceEmbedding(ModelMixin, ConfigMixin):
    """class_labels (long, [B]) and w (float, [B]) -> the vector a UNet2DModel with
    ``class_embed_type="identity"`` adds to its time embedding."""

    @register_to_config
    def __init__(self, num_class_embeds: int, embed_dim: int, cond_dim: int = 256):
        super().__init__()
        self.class_embedding = nn.Embedding(num_class_embeds, embed_dim)  # the teacher's, null class included
        self.linear_1 = nn.Linear(cond_dim, embed_dim)  # the w branch, as diffusers' TimestepEmbedding
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def w_features(self, w) -> torch.Tensor:
        """LCM's sinusoids of 1000 (w - 1), [B, cond_dim] on the CPU (``forward`` moves them where the
        weights are, also under accelerate's offload hooks), computed by diffusers' own function."""
        w = torch.as_tensor(w, dtype=torch.float32).reshape(-1).cpu()
        return LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w - 1.0,
                                                                           embedding_dim=self.config.cond_dim)

    def forward(self, class_labels: torch.Tensor, w_features: torch.Tensor) -> torch.Tensor:
        emb = self.class_embedding(class_labels)
        return emb + self.linear_2(self.act(self.linear_1(w_features.to(device=emb.device, dtype=emb.dtype))))
