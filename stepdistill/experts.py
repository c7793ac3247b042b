"""A student made of experts, one per run of sampling steps (Phased DMD's mixture of experts, Fan
et al., 2025, sec. 3: the SNR range split into phases, phase k's expert mapping x_{t_{k-1}} to
x_{t_k}).

``steps_per_expert`` lists how many of the student's steps each expert takes, noisiest first: a
4-step student with ``[2, 2]`` runs expert 0 at its first two timesteps and expert 1 at the last
two. An expert is chosen by time, not by step index, so a student sampled with another step count
still sends each time to the expert trained there: expert k answers times t with
b_{k+1} < t <= b_k, where b_k is the first timestep of expert k's run (b_0 = +inf).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .errors import UserError

#: the exported pipeline's expert slots (unet, unet_2, unet_3, unet_4): a 4-step student with an expert per step
MAX_EXPERTS = 4


def check_steps_per_expert(steps_per_expert: Sequence[int] | None, steps: int) -> list[int] | None:
    """The validated list (None or a single expert: one network)."""
    if steps_per_expert is None:
        return None
    counts = [int(n) for n in steps_per_expert]
    if any(n < 1 for n in counts) or sum(counts) != int(steps):
        raise UserError(f"student.experts {counts} must list positive step counts that add up to the student's "
                        f"{steps} steps (e.g. [2, 2] for a 4-step student with two experts)")
    if len(counts) > MAX_EXPERTS:
        raise UserError(f"student.experts {counts} names {len(counts)} experts; at most {MAX_EXPERTS} are supported")
    return counts if len(counts) > 1 else None


def first_steps(steps_per_expert: Sequence[int]) -> list[int]:
    """The index of each expert's first step: [2, 2] -> [0, 2]."""
    out, i = [], 0
    for n in steps_per_expert:
        out.append(i)
        i += int(n)
    return out


def expert_bounds(timesteps: torch.Tensor, steps_per_expert: Sequence[int]) -> torch.Tensor:
    """b_1..b_{K-1}: the first timestep of every expert after the first (descending)."""
    return timesteps[first_steps(steps_per_expert)[1:]].to(torch.float64)


def expert_index(bounds: torch.Tensor, t) -> torch.Tensor:
    """Per time, the expert that answers it: the number of bounds b_k with t <= b_k."""
    t = torch.as_tensor(t, dtype=torch.float64, device=bounds.device).reshape(-1)
    return (t[:, None] <= bounds[None, :]).sum(1)


def denoise_by_expert(experts, bounds: torch.Tensor, x: torch.Tensor, t, cond=None) -> torch.Tensor:
    """Each sample's x0 estimate from the expert of its time (scalar t: one expert for the batch)."""
    t_in = torch.as_tensor(t, dtype=torch.float64)
    idx = expert_index(bounds.cpu(), t_in.cpu())  # on the host: which network runs is a host decision
    if t_in.ndim == 0 or bool((idx == idx[0]).all()):
        return experts[int(idx[0])](x, t, cond)
    out = None
    for k in idx.unique().tolist():
        rows = (idx == k).nonzero().reshape(-1).to(x.device)
        sub = experts[k](x[rows], t_in.to(x.device)[rows], _rows(cond, rows))
        out = torch.empty((x.shape[0], *sub.shape[1:]), dtype=sub.dtype, device=sub.device) if out is None else out
        out = out.index_copy(0, rows, sub)
    return out


def _rows(cond, rows: torch.Tensor):
    """The condition's entries for the given rows (a dict of batch-first tensors, a tensor, or None)."""
    if cond is None:
        return None
    if torch.is_tensor(cond):
        return cond[rows]
    return {k: (v[rows] if torch.is_tensor(v) and v.ndim > 0 else v) for k, v in cond.items()}


__all__ = ["MAX_EXPERTS", "check_steps_per_expert", "first_steps", "expert_bounds", "expert_index",
           "denoise_by_expert"]
