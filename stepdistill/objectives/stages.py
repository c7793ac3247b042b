"""Stages of a run sized as shares of it (progressive distillation's rounds, Hyper-SD's segment stages):
a stage ends at the first iteration where the run's progress (``Objective.set_progress``: the larger of
step / max_steps and the share of the time budget spent) reaches the sum of the shares so far, so a
machine half as fast, or a shorter budget, still runs every stage, each in its proportion, where stages
of a fixed iteration count would leave the last ones out.
"""
from __future__ import annotations

from typing import Optional, Sequence

from ..errors import UserError


def share_bounds(shares: Optional[Sequence[float]], count: int, key: str) -> Optional[list[float]]:
    """The progress at which each stage but the last ends (cumulative shares over their sum), or None
    without shares; refuses (UserError) a list that is not one positive share per stage."""
    if shares is None:
        return None
    values = [float(s) for s in shares]
    if len(values) != count or any(s <= 0 for s in values):
        raise UserError(f"objective.{key} needs one positive share per stage ({count}), got {list(shares)}; "
                        f"e.g. {[round(1 / count, 3)] * count}")
    total = sum(values)
    return [sum(values[:k + 1]) / total for k in range(count - 1)]


def stage_at(bounds: Sequence[float], progress: float, current: int = 0) -> int:
    """The stage a run at ``progress`` is in, never before ``current`` (a stage once reached stays)."""
    return max(current, sum(1 for b in bounds if progress >= b))


__all__ = ["share_bounds", "stage_at"]
