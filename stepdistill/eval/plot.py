"""FID against the number of network evaluations (matplotlib, Agg: no display needed)."""
from __future__ import annotations

from pathlib import Path


def plot_fid_vs_nfe(rows: list[dict], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted((r["nfe"], r["fid"]) for r in rows if r.get("nfe"))
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
    ax.set_xscale("log")
    ax.set_xticks([p[0] for p in pts], [str(p[0]) for p in pts])
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel("FID")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
