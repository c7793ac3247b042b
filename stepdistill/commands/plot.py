"""``stepdistill plot RUN_DIR [--out FILE.png]``: a run's training curves."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plot", help="draw a run's training curves (losses, gradient norms, skipped updates, eval) as a PNG",
        description="Draw each phase's losses, the gradient norm of every trained network, skipped updates and "
                    "in-training evaluation against steps from a run's metrics.jsonl. The trainer also refreshes "
                    "RUN_DIR/curves.png at each checkpoint.")
    p.add_argument("run_dir", help="output_dir of a `stepdistill train` run")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/curves.png)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..plots import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0
