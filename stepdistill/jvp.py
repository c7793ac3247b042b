"""Forward-mode derivatives (``torch.func.jvp``) through diffusers backbones.

Two kernels a diffusers UNet or DiT calls have no usable forward-mode rule in torch: the fused
scaled-dot-product attention kernels (no rule at all) and ``group_norm`` (its rule views the tangent
and fails on the non-contiguous tangents that attention's transposes produce). ``forward_mode_safe()``
routes attention to SDPA's math kernel and group normalisation to the same computation written
with reshapes (torch's own definition: per sample and group, (x - mean) / sqrt(var + eps), biased
variance, then the affine), so both are differentiated by the rules of their elementary ops.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def group_norm(x: torch.Tensor, num_groups: int, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """``torch.nn.functional.group_norm`` in elementary ops."""
    b = x.shape[0]
    g = x.reshape(b, num_groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = g.var(-1, unbiased=False, keepdim=True)
    y = ((g - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


@contextlib.contextmanager
def forward_mode_safe():
    """Inside: attention on SDPA's math kernel, ``F.group_norm`` in elementary ops (module docstring)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    original = F.group_norm
    F.group_norm = group_norm
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        F.group_norm = original


__all__ = ["forward_mode_safe", "group_norm"]
