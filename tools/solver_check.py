"""How close each teacher sampler comes to the teacher's own ODE solution, on every shipped digits teacher.

    python tools/solver_check.py [--kinds vp,edm,flow] [--num 64] [--ref-steps 400] [--fid-kinds flow]
                                 [--out assets/benchmarks/solvers.md]

For each kind: the RMS distance (data units, images in [-1, 1]) from DDIM, from DPM-Solver++(2M) as
Lu et al.'s Alg. 2 writes it (min_ratio=0) and from stepdistill's dpmpp2m (a step more than three times as
long in log-SNR as the one before taken first order) to DDIM with --ref-steps steps from the same noise, on
the schedule's own 16- and 32-step grids and on the 32-step grid with the 4-step grid's times added
(cache.trajectory_grid, as a 4-step student's trajectory cache adds its times). A second-order solver should
come closer than DDIM at the same steps. ``--fid-kinds``: also the Inception FID (1,000 samples, seed 0,
all 1,797 real digits) of the teacher sampled with dpmpp2m and with DDIM at 32 steps, through
``stepdistill eval``. Writes a markdown table with the command and the machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"vp": "digits16", "edm": "digits16_edm", "flow": "digits16_flow"}


def distances(kind: str, num: int, ref_steps: int) -> list[tuple[str, float, float, float]]:
    """[(grid, ddim, dpmpp2m Alg. 2, dpmpp2m)] RMS distances to DDIM with ref_steps steps."""
    from stepdistill.cache import trajectory_grid
    from stepdistill.fake_score import sample_shape
    from stepdistill.resources import teacher as teacher_folder
    from stepdistill.sampling import ddim, dpmpp_2m
    from stepdistill.teachers import load_teacher

    teacher = load_teacher(teacher_folder(KINDS[kind])).eval()
    sched = teacher.schedule
    noise = torch.randn(num, *sample_shape(teacher), generator=torch.Generator().manual_seed(0))
    classes = getattr(teacher, "null_class", None)
    cond = None if classes is None else {"class_labels": torch.arange(num) % int(classes)}
    rows = []
    with torch.no_grad():
        ref_ts = sched.timesteps(ref_steps)
        ref = ddim(teacher, sched.prior(noise, ref_ts[0]), ref_ts, cond)

        def rms(y):
            return (y - ref).pow(2).mean().sqrt().item()

        grids = {"own, 16 steps": sched.timesteps(16), "own, 32 steps": sched.timesteps(32),
                 "32 steps + the 4-step grid's times": trajectory_grid(sched, 32, sched.timesteps(4)[:-1])}
        for name, ts in grids.items():
            x = sched.prior(noise, ts[0])
            rows.append((name, rms(ddim(teacher, x, ts, cond)),
                         rms(dpmpp_2m(teacher, x, ts, cond, min_ratio=0.0)), rms(dpmpp_2m(teacher, x, ts, cond))))
    return rows


def fid(kind: str, sampler: str, work: Path) -> float:
    """Inception FID of the teacher at 32 steps of `sampler` (seed 0, 1,000 samples), by the public CLI."""
    out = work / f"{kind}_{sampler}.json"
    stats = work / "ref_digits_inception.npz"
    if not stats.exists():
        subprocess.run([sys.executable, "-m", "stepdistill", "eval", "--make-stats", "digits", "--detector",
                        "inception", "--out", str(stats)], check=True, cwd=ROOT)
    from stepdistill.resources import teacher as teacher_folder

    subprocess.run([sys.executable, "-m", "stepdistill", "eval", str(teacher_folder(KINDS[kind])), "--steps", "32",
                    "--sampler", sampler, "--num", "1000", "--seed", "0", "--ref", str(stats), "--json", str(out)],
                   check=True, cwd=ROOT)
    return float(json.loads(out.read_text())["results"][0]["fid"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default="vp,edm,flow")
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--ref-steps", type=int, default=400)
    p.add_argument("--fid-kinds", default="", help="kinds to score by Inception FID too (about 10 minutes each)")
    p.add_argument("--work", default=None, help="folder for the FID reference statistics (default: a temporary one)")
    p.add_argument("--out", default="assets/benchmarks/solvers.md")
    args = p.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    bad = [k for k in kinds + [k for k in args.fid_kinds.split(",") if k] if k not in KINDS]
    if bad:
        raise SystemExit(f"error: unknown teacher kind {bad[0]!r}; choose from {', '.join(KINDS)}")
    lines = ["# Teacher samplers against the teacher's ODE solution", "",
             f"`{shlex.join(['python', 'tools/solver_check.py'] + sys.argv[1:])}`", "",
             f"Machine: {platform.machine()}, torch {torch.__version__}; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. {args.num} samples per kind (classes in turn), "
             f"noise seed 0. RMS distance, in data units, to DDIM with {args.ref_steps} steps from the same noise. "
             "Alg. 2: DPM-Solver++(2M) as Lu et al. (2022b) write it; dpmpp2m: stepdistill's, which takes a step "
             "first order where it is more than three times as long in log-SNR as the one before "
             "(sampling.MIN_RATIO).", "",
             "| teacher | grid | DDIM | DPM-Solver++(2M), Alg. 2 | dpmpp2m |", "|---|---|---|---|---|"]
    for kind in kinds:
        for grid, d, alg2, ours in distances(kind, args.num, args.ref_steps):
            lines.append(f"| {kind} | {grid} | {d:.4f} | {alg2:.4f} | {ours:.4f} |")
    fid_kinds = [k for k in args.fid_kinds.split(",") if k]
    if fid_kinds:
        lines += ["", "Inception FID, 32 steps (1,000 samples, seed 0, against all 1,797 real digits; "
                  "`stepdistill eval KIND --steps 32 --sampler S`):", "",
                  "| teacher | DDIM | dpmpp2m |", "|---|---|---|"]
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(args.work) if args.work else Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            for kind in fid_kinds:
                lines.append(f"| {kind} | {fid(kind, 'ddim', work):.2f} | {fid(kind, 'dpmpp2m', work):.2f} |")
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
