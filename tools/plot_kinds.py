"""FID against NFE for every teacher kind in one plot, from the benchmark tables.

    python tools/plot_kinds.py [--tables assets/benchmarks] [--out assets/benchmarks/digits_kinds_fid_vs_nfe.png]

Reads the tables ``tools/benchmark.py`` writes (``digits.md`` for the VP teacher, ``digits_edm.md``,
``digits_flow.md``; a missing one is skipped) and draws, per kind in one colour, the teacher's DDIM
curve (1, 4, 50 steps: NFE = steps) and each measured student (NFE = its step count) with the
min-max of its three sampling seeds. Nothing is computed here: every point is a table cell.
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLES = {"VP (v-prediction)": "digits.md", "EDM": "digits_edm.md", "flow matching": "digits_flow.md"}
MARKERS = "sDv^<>pP*Xhd8H"


def _plot_point():
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "tools" / "benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.plot_point


def read_table(path: Path) -> tuple[list, list]:
    """(teacher points, student points), each (label, steps, mean, min, max), from a benchmark table."""
    plot_point = _plot_point()
    teacher, students = [], []
    for line in path.read_text().splitlines():
        if not line.startswith("| ") or line.startswith("| objective") or line.startswith("|---"):
            continue
        point = plot_point(line)
        (teacher if point[0] == "teacher" else students).append(point)
    return teacher, students


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tables", default=str(ROOT / "assets" / "benchmarks"))
    p.add_argument("--out", default=str(ROOT / "assets" / "benchmarks" / "digits_kinds_fid_vs_nfe.png"))
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    tables = {kind: read_table(Path(args.tables) / f) for kind, f in TABLES.items() if (Path(args.tables) / f).is_file()}
    names = sorted({s[0].split(" (")[0] for _, students in tables.values() for s in students})
    marker = {n: MARKERS[i % len(MARKERS)] for i, n in enumerate(names)}  # one marker per preset, on every kind
    drawn = []
    for (kind, (teacher, students)), colour in zip(tables.items(), ("tab:blue", "tab:orange", "tab:green")):
        ax.plot([t[1] for t in teacher], [t[2] for t in teacher], "o-", color=colour, label=f"{kind} teacher (DDIM)")
        for label, k, mean, lo, hi in students:
            ax.errorbar([k], [mean], yerr=[[mean - lo], [hi - mean]], fmt=marker[label.split(" (")[0]], color=colour,
                        mfc="none", label=f"{kind}: {label}")
        drawn.append(kind)
    if not drawn:
        raise SystemExit(f"no benchmark tables in {args.tables} ({', '.join(TABLES.values())})")
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("NFE"), ax.set_ylabel("FID (Inception, 3 seeds)")
    ax.legend(fontsize=5.5, ncol=2)
    ax.set_title("digits benchmark: every teacher kind", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=130)
    print(f"wrote {args.out} ({', '.join(drawn)})")


if __name__ == "__main__":
    main()
