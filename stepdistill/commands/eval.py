"""``stepdistill eval``: score a model (or a folder of images) with its protocol stated.

    stepdistill eval MODEL --steps 1,2,4,50 --num N --detector D --ref DATASET_OR_STATS --seed S \
        --json results.json [--plot fid_vs_nfe.png] [--prompts FILE --clip CLIP_MODEL]   (text-to-image)
    stepdistill eval --make-stats DATASET --detector D --out stats.npz
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from ..errors import UserError
from ..fsutil import atomic_write_text
from ..outputs import check_outputs


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="FID/KID/precision/recall/accuracy of a model, with its protocol",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="teacher folder, run folder, exported pipeline, or images")
    p.add_argument("--steps", default=None,
                   help="comma-separated step counts (default: a student's trained count; 1,2,4,50 for a teacher)")
    p.add_argument("--num", type=int, default=1000, help="samples per step count (default 1000)")
    p.add_argument("--detector", default="inception", help="inception | digits | clip[:PATH] (default inception)")
    p.add_argument("--detector-weights", default=None, help="weights file overriding the detector's default")
    p.add_argument("--ref", help="dataset spec (digits-test, a folder, an .npz) or stats .npz")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=100, help="generation and feature batch size")
    p.add_argument("--sampler", default="ddim", help="teacher sampler: ddim | euler | heun | dpmpp2m")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--prompts", default=None,
                   help="text-to-image models: prompt list (.txt, .csv, .jsonl), cycled over the samples")
    p.add_argument("--clip", default=None, metavar="PATH",
                   help="text-to-image models: also report the CLIP score with this CLIP model (folder or hub name)")
    p.add_argument("--resolution", type=int, default=None, help="text-to-image teachers: image size in pixels")
    p.add_argument("--no-ema", dest="ema", action="store_false",
                   help="a run folder: score the raw student weights instead of their EMA")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", dest="json_out", help="write results here")
    p.add_argument("--plot", help="write FID against NFE here (.png)")
    p.add_argument("--make-stats", metavar="DATASET", help="write reference statistics of DATASET to --out")
    p.add_argument("--out", help="stats .npz path for --make-stats")
    p.set_defaults(func=run)


def _parse_steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        steps = []
    if not steps or any(s < 1 for s in steps):
        raise UserError(f"--steps {text!r} is not a list of positive integers; pass e.g. --steps 1,2,4,50")
    return steps


def _validate(args) -> None:
    if args.make_stats:
        if not args.out or not args.out.endswith(".npz"):
            raise UserError("--make-stats needs --out PATH.npz; pass e.g. --out stats.npz")
        return
    if not args.model:
        raise UserError("no MODEL given; pass a teacher folder or a folder of images (or use --make-stats)")
    if not args.ref:
        raise UserError("no --ref given; pass a dataset (e.g. --ref digits-test) or a stats .npz")
    if args.steps is not None:
        _parse_steps(args.steps)
    if args.num < 2:
        raise UserError(f"--num {args.num} is too small; FID needs at least 2 samples")
    if args.plot and not args.plot.endswith(".png"):
        raise UserError(f"--plot {args.plot!r} must end in .png")
    if args.ref.endswith(".npz") and not Path(args.ref).is_file():
        raise UserError(f"--ref {args.ref!r} does not exist; make it with --make-stats or pass a dataset")
    check_outputs(args.model, {"--json": args.json_out, "--plot": args.plot})


def run(args) -> int:
    from rich.console import Console

    _validate(args)
    console = Console()
    command = "stepdistill " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""
    from ..eval import harness

    detector = harness.resolve_detector(args.detector, args.detector_weights, args.device)
    if args.make_stats:
        from ..eval.stats import make_stats

        stats = make_stats(args.make_stats, detector, seed=args.seed, batch_size=args.batch)
        stats.save(args.out)
        console.print(f"wrote {args.out}: {stats.count} images of {args.make_stats!r}; protocol "
                      f"{json.dumps(stats.protocol)}", highlight=False, soft_wrap=True)
        return 0

    from ..eval.report import evaluate_model, print_results

    steps = _parse_steps(args.steps) if args.steps is not None else None
    prompts = None
    if args.prompts:
        from ..t2i.prompts import read_prompts

        prompts = read_prompts(args.prompts).prompts
    clip = None
    if args.clip:
        from ..eval.clip import CLIPDetector

        clip = CLIPDetector(args.clip)
    report = evaluate_model(args.model, steps=steps, num=args.num, detector=detector, ref=args.ref,
                            seed=args.seed, batch=args.batch, sampler=args.sampler,
                            guidance=args.guidance, device=args.device, console=console, prompts=prompts,
                            clip=clip, resolution=args.resolution, ema=args.ema)
    report["command"] = command
    report["plot"] = args.plot  # marks the plot as this report's output (outputs.earlier_outputs)
    print_results(report, console)
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {args.json_out}")
    if args.plot:
        from ..eval.plot import plot_fid_vs_nfe

        p = report["protocol"]
        plot_fid_vs_nfe(report["results"], args.plot,
                        f"{Path(args.model).name}: {p['detector']} FID vs {p['reference']['dataset']}, N={args.num}")
        console.print(f"wrote {args.plot}")
    return 0
