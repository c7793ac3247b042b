"""``optim.<net>.lr_decay``: a learning-rate decay over the run's progress, the larger of step / max_steps
and the share of the time budget spent (``Trainer.progress``), so a run its time budget ends still decays
to its floor at its end, which diffusers' schedules over max_steps cannot."""
from __future__ import annotations

import math

from ..errors import UserError

#: the decay's shapes
RUN_DECAYS = ("cosine", "linear")


def run_decay(kind: str | None, floor: float, progress: float) -> float:
    """The factor the lr is multiplied by at a share ``progress`` of the run: 1 at its start, ``floor``
    at its end; cosine (SGDR, Loshchilov & Hutter 2017, eq. 5, one cycle) or linear; 1 with no decay."""
    if kind is None:
        return 1.0
    p = min(max(float(progress), 0.0), 1.0)
    shape = 0.5 * (1.0 + math.cos(math.pi * p)) if kind == "cosine" else 1.0 - p
    return floor + (1.0 - floor) * shape


def check_run_decay(where: str, kind: str | None, floor: float, lr_schedule: str) -> None:
    """One line naming the bad value and the fix, before any teacher or data is loaded."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(f"{where}{msg}")

    need(kind is None or kind in RUN_DECAYS, f"lr_decay {kind!r} is not a decay; use one of {', '.join(RUN_DECAYS)} "
         "or null")
    need(kind is None or lr_schedule in ("constant", "constant_with_warmup"),
         f"lr_decay {kind!r} multiplies the lr schedule, and {lr_schedule!r} decays too; use lr_schedule "
         "constant_with_warmup with lr_decay, or lr_decay null")
    need(kind is not None or floor == 0.0, f"lr_decay_floor {floor} is set but lr_decay is null, so nothing decays; "
         f"set lr_decay ({' or '.join(RUN_DECAYS)}), or drop lr_decay_floor")
    need(math.isfinite(floor) and 0.0 <= floor <= 1.0, f"lr_decay_floor must be in [0, 1] (a fraction of the lr), "
         f"got {floor}")
