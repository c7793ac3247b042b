"""Stages of a run sized as shares of it (progressive distillation's rounds, Hyper-SD's segment stages):
a stage ends at the first iteration where the run's progress (``Objective.set_progress``: the larger of
step / max_steps and the share of the time budget spent) reaches the sum of the shares so far, so a
machine half as fast, or a shorter budget, still runs every stage, each in its proportion, where stages
of a fixed iteration count would leave the last ones out.

Where the switch falls: Hyper-SD moves to the next stage before the iteration whose progress reaches the
share (``set_progress``), at the same iteration the trainer starts a phase with that ``start_fraction``
(its critic); progressive distillation ends a round after that iteration (``on_step_end``), where it hands
the round's student to the next round as its teacher, so the reaching iteration still trains the old round.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from ..errors import UserError


def share_bounds(shares: Optional[Sequence[float]], count: int, key: str, what: str = "stage") -> Optional[list[float]]:
    """The progress at which each stage but the last ends (cumulative shares over their sum), or None
    without shares; refuses (UserError) a list that is not one positive, finite share per stage (``what``
    names the stages in the message, with where their count comes from)."""
    if shares is None:
        return None
    try:
        values = [float(s) for s in shares]
    except (TypeError, ValueError):
        values = []
    if len(values) != count or not all(math.isfinite(s) and s > 0 for s in values):
        raise UserError(f"objective.{key} needs one positive share per {what} ({count}), got {shares!r}; "
                        f"e.g. {[1] * count}")
    total = sum(values)
    return [sum(values[:k + 1]) / total for k in range(count - 1)]


def stage_at(bounds: Sequence[float], progress: float, current: int = 0) -> int:
    """The stage a run at ``progress`` is in, never before ``current`` (a stage once reached stays)."""
    return max(current, sum(1 for b in bounds if progress >= b))


__all__ = ["share_bounds", "stage_at"]
