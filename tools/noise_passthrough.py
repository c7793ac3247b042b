"""How much of its input noise does a teacher's x0 estimate keep at its noisiest time?

    python tools/noise_passthrough.py [--teachers digits16,digits16_edm,digits16_flow] [--num 256]
                                      [--out assets/benchmarks/noise_passthrough.md]

At the noisiest time T the exact denoiser E[x0 | x_T] hardly depends on the noise z in x_T: for a
flow teacher x_1 = z holds no signal at all, so E[x0 | z, class] is the class mean. A network's x0
estimate D(x_T) can still carry z: a flow network predicts the velocity v = z - x0, and x0 = z - v
cancels z only as precisely as the network copies its input, whereas a v-prediction VP network at
alpha-bar ~ 0 (x0 = -v) or EDM's preconditioning at sigma 80 (c_skip ~ 4e-5) outputs x0 directly.
A one-step student starts as the teacher there, so such a residual shows as pixel speckle in its
samples unless distillation removes it.

For each teacher and class this draws ``--num`` noises z (unit Gaussian, scaled to the teacher's
prior), takes x0_hat = D(x_T(z), T, class) and reports, per pixel over the draws, the regression of
x0_hat on the same pixel's z: its slope (how much of z passes through; the exact denoiser's is ~0) and
R^2 (the share of x0_hat's variance that pixel's own noise explains; noise elsewhere in the image is
not counted), averaged over pixels and classes, and the RMS of x0_hat around the class's mean estimate. Writes a table to ``--out`` with the
command and machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def passthrough(teacher, num: int, seed: int = 0) -> dict:
    """{r2, slope, rms}: averaged over classes (or the one unconditional set) and pixels."""
    from stepdistill.generator import StudentConfig, build_student

    student = build_student(teacher, StudentConfig(steps=1))  # the teacher's one-step sampler: its first time
    t = student.timesteps[:1]
    shape = (teacher.backbone.config.in_channels, teacher.backbone.config.sample_size,
             teacher.backbone.config.sample_size)
    classes = list(range(int(teacher.meta.get("num_classes") or 0))) or [None]
    g = torch.Generator().manual_seed(seed)
    r2s, slopes, rmss = [], [], []
    for c in classes:
        z = torch.randn((num, *shape), generator=g)
        x = student.prior(z, t[0])                                  # the sampler's input at T (EDM: sigma_max z)
        cond = None if c is None else {"class_labels": torch.full((num,), c, dtype=torch.long)}
        x0 = teacher(x, t.repeat(num), cond)
        dz, dx = z - z.mean(0), x0 - x0.mean(0)
        slope = (dz * dx).sum(0) / (dz * dz).sum(0)                   # per-pixel least-squares slope
        resid = dx - slope * dz
        r2 = 1 - (resid * resid).sum(0) / (dx * dx).sum(0).clamp_min(1e-20)
        r2s.append(float(r2.mean()))
        slopes.append(float(slope.mean()))
        rmss.append(float(dx.pow(2).mean().sqrt()))
    n = len(classes)
    return {"r2": sum(r2s) / n, "slope": sum(slopes) / n, "rms": sum(rmss) / n, "t": float(t[0])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teachers", default="digits16,digits16_edm,digits16_flow")
    p.add_argument("--num", type=int, default=256, help="noise draws per class")
    p.add_argument("--out", default=str(ROOT / "assets" / "benchmarks" / "noise_passthrough.md"))
    args = p.parse_args()
    from stepdistill.resources import TEACHERS
    from stepdistill.teachers import load_teacher

    rows = []
    for name in [s.strip() for s in args.teachers.split(",") if s.strip()]:
        path = TEACHERS / name if (TEACHERS / name).is_dir() else Path(name)
        teacher = load_teacher(path)
        res = passthrough(teacher, args.num)
        rows.append(f"| {name} | {teacher.schedule.kind} | {res['t']:g} | {res['r2']:.3f} | {res['slope']:+.4f} | "
                    f"{res['rms']:.4f} |")
        print(rows[-1], flush=True)
    cmd = "python tools/noise_passthrough.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        "# Input noise in the teacher's x0 estimate at its noisiest time", "",
        f"`{cmd.strip()}`", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. {args.num} noise draws per class.", "",
        "Per pixel, x0_hat over the draws regressed on the same pixel's input noise z: slope (how much of z passes "
        "through; the exact denoiser's is ~0) and R^2 (the share of x0_hat's variance that pixel's own noise "
        "explains); "
        "RMS: x0_hat's spread around the class's mean estimate, in data units ([-1, 1]).", "",
        "| teacher | kind | time T | R^2 (z) | slope | RMS spread |", "|---|---|---|---|---|---|", *rows, ""])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
