"""How closely a consistency student trained on cached teacher trajectories fits its targets, and how
much high-frequency energy its samples and its teacher's carry.

    python tools/consistency_fit.py RUN [--num 500] [--out assets/benchmarks/consistency_fit.md]

RUN is a run of a consistency preset with ``objective.cache`` (its teacher and cache are read from the
run's config). On the cache's own noises (the ones the student trained on) and on fresh ones, the
student's K-step samples are compared with the teacher's solutions on the cache's solver, steps and
grid: RMS distance in data units ([-1, 1]). High-frequency energy: the pixel mean of |x - its 3x3 box
blur|, for the student, the cache's solver and the teacher's DDIM at the cache's steps, 50 steps and
the student's K. A student that fits its targets and carries their energy inherits whatever texture
its targets have. Writes a table to ``--out`` with the command and machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
BATCH = 250


def hf_energy(x: torch.Tensor) -> float:
    """Pixel mean of |x - 3x3 box blur(x)|."""
    return (x - F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)).abs().mean().item()


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).square().mean().sqrt().item()


@torch.no_grad()
def batched(fn, noise: torch.Tensor, cond: dict | None) -> torch.Tensor:
    """fn(noise, cond) over batches of BATCH."""
    out = []
    for i in range(0, len(noise), BATCH):
        sl = slice(i, i + BATCH)
        out.append(fn(noise[sl], None if cond is None else {k: v[sl] for k, v in cond.items()}))
    return torch.cat(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a consistency run with objective.cache")
    p.add_argument("--num", type=int, default=500, help="samples per comparison (at most the cache's size)")
    p.add_argument("--out", default=str(ROOT / "assets" / "benchmarks" / "consistency_fit.md"))
    args = p.parse_args()
    from stepdistill.cache import load_cache
    from stepdistill.errors import UserError
    from stepdistill.loaders import load_for_sampling
    from stepdistill.sampling import sample
    from stepdistill.teachers import load_teacher

    model = load_for_sampling(args.run)
    cache = (model.meta.get("config") or {}).get("objective", {}).get("cache")
    if not cache or not Path(cache).is_dir():
        raise UserError(f"run {args.run!r} has no teacher trajectory cache (objective.cache); train a consistency "
                        "preset with objective.cache set")
    pairs = load_cache(cache)
    teacher = load_teacher(model.meta["teacher"])
    m = pairs.manifest
    n = min(args.num, len(pairs))
    noise, x0 = pairs.noise[:n], pairs.x0[:n]
    cond = {k: v[:n] for k, v in pairs.cond.items()} or None
    grid = torch.tensor(m["grid"], dtype=torch.float64) if m.get("grid") else None

    def student(z, c):
        return model.generate(z, c)

    def teacher_solver(steps, sampler, ts=None):
        return lambda z, c: sample(teacher, z, steps, sampler=sampler, cond=c, ts=ts)

    fresh = torch.randn(noise.shape, generator=torch.Generator().manual_seed(123))
    k = int(model.meta["steps"])
    on_cache = batched(student, noise, cond)
    s_fresh = batched(student, fresh, cond)
    t_cache = batched(teacher_solver(m["steps"], m["sampler"], grid), fresh, cond)
    ddim = {s: batched(teacher_solver(s, "ddim"), fresh, cond) for s in sorted({m["steps"], 50, k})}
    label = f"{m['sampler']}, {m['steps']} steps (the cache's)"
    rows = [f"| student, {k} steps, on the cache's noises | {rms(on_cache, x0):.4f} (to the cache's solutions) | "
            f"{hf_energy(on_cache):.4f} |",
            f"| the cache's solutions | – | {hf_energy(x0):.4f} |",
            f"| student, {k} steps, fresh noises | {rms(s_fresh, t_cache):.4f} | {hf_energy(s_fresh):.4f} |",
            f"| teacher, {label} | 0 | {hf_energy(t_cache):.4f} |",
            *[f"| teacher, ddim, {s} steps | {rms(x, t_cache):.4f} | {hf_energy(x):.4f} |" for s, x in ddim.items()]]
    cmd = "python tools/consistency_fit.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        "# A cached-trajectory consistency student against its targets", "",
        f"`{cmd.strip()}`", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Run at step {model.meta['step']}, teacher "
        f"`{Path(str(model.meta['teacher'])).name}`, {n} samples (balanced classes where the teacher has them), "
        "fresh noises from seed 123.", "",
        f"RMS: distance, in data units, to the teacher's {label} solution of the same noise (first row: to the "
        "cached solution the student trained on). HF energy: pixel mean of |x - 3x3 box blur(x)|.", "",
        "| samples | RMS | HF energy |", "|---|---|---|", *rows, ""])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    from stepdistill.errors import UserError

    try:
        raise SystemExit(main())
    except UserError as err:  # bad input: one line that names the fix, no traceback
        raise SystemExit(f"error: {err}")
