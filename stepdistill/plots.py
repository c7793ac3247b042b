"""Training curves from a run's ``metrics.jsonl``: each phase's losses, the gradient norm of every
trained network, skipped updates and in-training evaluation against steps, in one PNG
(``stepdistill plot RUN``; the trainer refreshes ``RUN/curves.png`` at each checkpoint)."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .errors import UserError
from .fsutil import atomic_file


def read_metrics(run_dir) -> list[dict]:
    """The run's log records (lines cut by a kill are skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{str(run_dir)!r} has no metrics.jsonl; pass the output_dir of a `stepdistill train` run "
                        "that has logged at least one step")
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def curves(records: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{panel: {series: [(step, value)]}}: a panel per phase (its losses), "gradient norm" (per network
    and phase), "skipped updates" (cumulative) and "eval" (in-training metrics), where logged."""
    panels: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        step = rec.get("step")
        for key, v in (rec.get("losses") or {}).items():
            phase, _, name = key.partition("/")
            if not isinstance(v, (int, float)):
                continue
            if name.startswith("_grad_norm/"):
                panels["gradient norm"][f"{name.split('/', 1)[1]} ({phase})"].append((step, v))
            elif not name.startswith("_"):
                panels[f"{phase} losses"][name].append((step, v))
        if "skipped_total" in rec:
            panels["skipped updates"]["total"].append((step, rec["skipped_total"]))
        for name, v in (rec.get("eval") or {}).items():
            panels["eval"][name].append((step, v))
    return {k: dict(v) for k, v in panels.items()}


def plot_run(run_dir, out=None) -> Path:
    """Draw the run's curves into ``out`` (default ``RUN/curves.png``), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = curves(read_metrics(run_dir))
    if not panels:
        raise UserError(f"{str(run_dir)!r}: metrics.jsonl holds no logged steps yet; train longer or lower log_every")
    out = Path(out) if out is not None else Path(run_dir) / "curves.png"
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {str(out)!r}: the plot is a PNG; name a .png file")
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.4 * len(panels)), sharex=True, squeeze=False)
    for ax, (title, series) in zip(axes[:, 0], panels.items()):
        for name, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, linewidth=1)
        ax.set_title(title, fontsize=9)
        if title in ("gradient norm",) or title.endswith("losses") and _spans_decades(series):
            ax.set_yscale("log")
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    with atomic_file(out) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return out


def _spans_decades(series) -> bool:
    vals = [p[1] for pts in series.values() for p in pts if p[1] > 0]
    return bool(vals) and max(vals) > 100 * min(vals) and all(p[1] > 0 for pts in series.values() for p in pts)


__all__ = ["read_metrics", "curves", "plot_run"]
