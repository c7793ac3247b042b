"""SANA-Sprint's discriminator head (Chen et al., 2025, sec. 3.3; NVlabs/Sana ``sana_ladd.py`` with
``ladd_blocks.py``), which is StyleGAN-T's (Sauer et al., 2023, sec. 3.2, "DiscHead"): on a block's
features read as tokens [B, C, N] (a UNet's [B, C, h, w] map flattened row by row), at the full width C,

    h = LReLU(BN_local(SN-Conv1d_1(x)))                          kernel 1
    h = (h + LReLU(BN_local(SN-Conv1d_9(h)))) / sqrt(2)           kernel 9, circular padding: a residual block
    logits = SN-Conv1d_1(h) -> [B, N]                             one logit per token, no class projection

SN: spectral normalisation, one power iteration per training forward (Miyato et al., 2018); BN_local:
batch normalisation over "virtual batches" of 8 samples (their tokens included), no running statistics.
The condition reaches the head only through the features (the teacher saw it); SANA-Sprint's heads take
none (``c_dim=0``).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


class BatchNormLocal(nn.Module):
    """Batch normalisation within groups of ``virtual_bs`` samples (StyleGAN-T's BatchNormLocal): each
    channel normalised over a group's samples and tokens, with a learnt scale and shift, no running
    statistics (the same in training and evaluation). A batch that does not split evenly is cut into
    ceil(B / virtual_bs) nearly equal groups."""

    def __init__(self, channels: int, virtual_bs: int = 8, eps: float = 1e-5):
        super().__init__()
        self.virtual_bs, self.eps = int(virtual_bs), float(eps)
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, N]
        groups = torch.tensor_split(x, math.ceil(x.shape[0] / self.virtual_bs))
        out = torch.cat([(g - g.mean(dim=(0, 2), keepdim=True))
                         / (g.var(dim=(0, 2), unbiased=False, keepdim=True) + self.eps).sqrt() for g in groups])
        return out * self.weight[None, :, None] + self.bias[None, :, None]


def _block(channels: int, kernel: int) -> nn.Sequential:
    conv = nn.Conv1d(channels, channels, kernel, padding=kernel // 2, padding_mode="circular")
    return nn.Sequential(spectral_norm(conv), BatchNormLocal(channels), nn.LeakyReLU(0.2))


class TokenHead(nn.Module):
    """One logit per token of a [B, C, h, w] (or [B, C]) feature map: [B, h*w] (module docstring). The
    residual kernel is 9 (StyleGAN-T's), cut to the largest odd size the token count allows (circular
    padding needs a kernel no longer than the sequence)."""

    def __init__(self, feature_shape: Sequence[int], kernel: int = 9):
        super().__init__()
        c = int(feature_shape[0])
        tokens = int(math.prod(feature_shape[1:])) if len(feature_shape) > 1 else 1
        k = max(1, min(int(kernel), tokens if tokens % 2 else tokens - 1))
        self.first = _block(c, 1)
        self.residual = _block(c, k)
        self.out = spectral_norm(nn.Conv1d(c, 1, 1))

    def forward(self, feats: torch.Tensor, cond=None) -> torch.Tensor:
        x = feats.float().flatten(2) if feats.dim() > 2 else feats.float()[:, :, None]  # [B, C, N]
        h = self.first(x)
        h = (h + self.residual(h)) / math.sqrt(2)
        return self.out(h).squeeze(1)


__all__ = ["BatchNormLocal", "TokenHead"]
