"""Weight-space merging of two students of one teacher (SwiftBrush v2, Dao et al., 2024, sec. 3.3:
the distilled student interpolated with a regression-trained one, theta = (1 - alpha) theta_A +
alpha theta_B), exported as any student is.

The two must be the same network sampling the same way: same parameters and shapes, the same
timesteps, sampler, boundary condition and experts; LoRA students are merged as their fused weights.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..errors import UserError
from .lora import has_lora, merged_copy


def _fused(student):
    """A copy of ``student`` whose experts carry their LoRA adapters merged into the weights."""
    out = copy.deepcopy(student)
    for expert in out.experts:
        if has_lora(expert.backbone):
            expert.backbone = merged_copy(expert.backbone)
    return out


def _weights(student) -> dict[str, torch.Tensor]:
    """Every expert's backbone weights, by name."""
    return {f"{i}.{k}": v for i, e in enumerate(student.experts) for k, v in e.backbone.state_dict().items()}


def merge_students(a, b, alpha: float):
    """A copy of student ``a`` whose weights are (1 - alpha) a + alpha b (LoRA adapters fused first)."""
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"--alpha must lie in [0, 1] (the share of the second student), got {alpha}")
    same = (a.timesteps.tolist() == b.timesteps.tolist() and a.sampler == b.sampler and a.boundary == b.boundary
            and a.steps_per_expert == b.steps_per_expert and a.custom_times == b.custom_times)
    if not same:
        raise UserError(f"the students sample differently (timesteps {a.timesteps.tolist()} / {b.timesteps.tolist()}, "
                        f"sampler {a.sampler} / {b.sampler}, boundary {a.boundary} / {b.boundary}, experts "
                        f"{a.steps_per_expert} / {b.steps_per_expert}); merge students trained for the same sampling")
    out = _fused(a)
    wa, wb = _weights(out), _weights(_fused(b))
    if wa.keys() != wb.keys() or any(wa[k].shape != wb[k].shape for k in wa):
        diff = sorted(set(wa) ^ set(wb)) or [k for k in wa if wa[k].shape != wb[k].shape]
        raise UserError(f"the students are different networks (e.g. {diff[0]!r}); merge two students of one teacher")
    with torch.no_grad():
        for key, v in wa.items():  # wa shares the storage of out's weights: written in place
            if v.is_floating_point():
                v.copy_(torch.lerp(v, wb[key].to(v.dtype), alpha))
    return out


def merge_runs(run_a, run_b, out, *, alpha: float = 0.5, ema: bool = True) -> Path:
    """Merge the (EMA) students of two ``stepdistill train`` runs and export the result to ``out``."""
    from ..loaders import load_run
    from .writer import export_student

    a, meta = load_run(run_a, ema=ema)
    b, meta_b = load_run(run_b, ema=ema)
    if meta.get("teacher") != meta_b.get("teacher"):
        raise UserError(f"the runs distil different teachers ({meta.get('teacher')} / {meta_b.get('teacher')}); "
                        "merge two students of one teacher")
    merged = merge_students(a, b, alpha)
    meta = {**meta, "objective": f"merge of {meta.get('objective')} and {meta_b.get('objective')}",
            "merge": {"runs": [str(run_a), str(run_b)], "alpha": float(alpha)}}
    return export_student(merged, meta, out)


__all__ = ["merge_students", "merge_runs"]
