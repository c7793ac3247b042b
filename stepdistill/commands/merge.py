"""``stepdistill merge RUN_A RUN_B --alpha A --out DIR``: two students interpolated in weight space."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "merge", help="interpolate two students of one teacher in weight space and export the result",
        description="SwiftBrush v2's weight merging: the (EMA) students of two `stepdistill train` runs of the same "
                    "teacher and sampling (e.g. a score-distilled and a regression-trained one) combined as "
                    "(1 - alpha) A + alpha B, written as `stepdistill export` writes a student.")
    p.add_argument("run_a", help="output_dir of the first run")
    p.add_argument("run_b", help="output_dir of the second run")
    p.add_argument("--alpha", type=float, default=0.5, help="share of the second student (default 0.5)")
    p.add_argument("--out", required=True, help="folder to write (new, empty, or an earlier export)")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="merge the raw weights instead of their EMA")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export.merge import merge_runs

    print(f"wrote {merge_runs(args.run_a, args.run_b, args.out, alpha=args.alpha, ema=args.ema)}")
    return 0
