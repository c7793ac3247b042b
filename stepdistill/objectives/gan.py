"""GAN losses shared by the adversarial objective and the GAN add-ons of DMD2 and SiD.

Every function maps logits [B] to per-sample losses [B]; logits [B, N] (a logit per location, SANA-Sprint's
per-token LADD heads) are averaged over N, as its hinge loss averages over all of them; a list of them
(one [B, N_h] per head, ``DiscHeads``) is averaged over each head's locations and then over the heads, so
each head weighs the same whatever its resolution (SANA-Sprint's heads all sit on one token grid, where the two
averages agree; a UNet's blocks have 8x8, 4x4 and 16x16 locations).
* non-saturating (Goodfellow et al., 2014, sec. 3): D: softplus(-D(real)) + softplus(D(fake));
  G: softplus(-D(fake)) = -log sigmoid(D(fake)). DMD2 (Yin et al., 2024b, eq. 4) uses this form.
* hinge (Lim & Ye, 2017): D: relu(1 - D(real)) + relu(1 + D(fake)); G: -D(fake). ADD/LADD use it.
* approximate R1 (APT, Lin et al., 2025, "Diffusion Adversarial Post-Training"; NVlabs/FastGen
  ladd.py): instead of the gradient penalty ||grad_x D(x)||^2 (R1, Mescheder et al., 2018; the exact
  form SANA-Sprint computes on its heads' inputs), which needs double backprop through the feature
  network, penalise the change of D's output under a small Gaussian perturbation of its input:
  E||D(x) - D(x + s n)||^2.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F

from ..errors import UserError

LOSSES = ("ns", "hinge")


def _check(kind: str) -> None:
    if kind not in LOSSES:
        raise UserError(f"gan_loss {kind!r} is not supported; use one of {', '.join(LOSSES)}")


Logits = Union[torch.Tensor, Sequence[torch.Tensor]]


def per_sample(v: Logits) -> torch.Tensor:
    """[B] as it is; [B, N] averaged over N; a list of [B, N_h] (one per head): each head averaged over
    its N_h locations, then the heads averaged (each head weighs the same)."""
    if isinstance(v, (list, tuple)):
        return torch.stack([per_sample(x) for x in v]).mean(0)
    return v if v.ndim == 1 else v.flatten(1).mean(1)


def each(fn: Callable, *logits: Logits) -> Logits:
    """fn applied to logits, head by head where they are a list (one per head)."""
    if isinstance(logits[0], (list, tuple)):
        return [fn(*xs) for xs in zip(*logits)]
    return fn(*logits)


def d_loss(real_logits: Logits, fake_logits: Logits, kind: str = "ns") -> torch.Tensor:
    """The discriminator's per-sample loss (real and fake batches of equal size)."""
    _check(kind)
    if kind == "ns":
        return (per_sample(each(lambda v: F.softplus(-v), real_logits))
                + per_sample(each(F.softplus, fake_logits)))
    return (per_sample(each(lambda v: F.relu(1.0 - v), real_logits))
            + per_sample(each(lambda v: F.relu(1.0 + v), fake_logits)))


def g_loss(fake_logits: Logits, kind: str = "ns") -> torch.Tensor:
    """The generator's per-sample loss."""
    _check(kind)
    if kind == "ns":
        return per_sample(each(lambda v: F.softplus(-v), fake_logits))
    return per_sample(each(torch.neg, fake_logits))


def approx_r1(disc: Callable[[torch.Tensor], Logits], x: torch.Tensor, logits: Logits,
              noise_std: float) -> torch.Tensor:
    """Approximate R1: (D(x) - D(x + noise_std * n))^2 per sample; `logits` = D(x), already computed.
    As noise_std -> 0 it equals noise_std^2 * ||grad_x D||^2 in expectation (first-order Taylor)."""
    perturbed = disc(x + noise_std * torch.randn_like(x))
    return per_sample(each(lambda a, b: (a - b).pow(2), logits, perturbed))


__all__ = ["d_loss", "g_loss", "approx_r1", "per_sample", "each", "Logits", "LOSSES"]
