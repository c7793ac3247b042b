"""Measure features/s of every detector on this machine and write assets/benchmarks/detectors.md.

    python tools/bench_detectors.py [--num 100] [--batch 50] [--device cpu] [--out assets/benchmarks/detectors.md]

Inputs are 16x16 grayscale uint8 digits (the shipped default), so the time includes each detector's
own resize (Inception: clean-fid bicubic to 299x299). CLIP is measured when a model is given with
--clip PATH_OR_NAME.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from stepdistill.data import load_images
from stepdistill.errors import UserError
from stepdistill.eval.detectors import get_detector
from stepdistill.images import to_uint8


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, load average {load:.1f} when measured")


def bench(name: str, images: torch.Tensor, batch: int, device: str) -> tuple[float, int]:
    det = get_detector(name, device=device)
    det.extract(images[:batch], batch)  # warm-up at the timed batch shape (oneDNN picks kernels per shape)
    t0 = time.perf_counter()
    det.extract(images, batch)
    return len(images) / (time.perf_counter() - t0), det.dim


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num", type=int, default=100)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--clip", default=None)
    p.add_argument("--out", default="assets/benchmarks/detectors.md")
    args = p.parse_args(argv)
    images = to_uint8(load_images("digits-test").images)
    images = images.repeat((args.num + len(images) - 1) // len(images), 1, 1, 1)[:args.num]
    names = ["digits", "inception"] + ([f"clip:{args.clip}"] if args.clip else [])
    rows = []
    for name in names:
        try:
            n = args.num if name != "digits" else max(args.num, 5000)
            imgs = images if n == args.num else images.repeat(n // len(images) + 1, 1, 1, 1)[:n]
            batch = args.batch if name != "digits" else max(args.batch, 500)  # tiny net: per-call overhead
            rate, dim = bench(name, imgs, batch, args.device)
            rows.append(f"| {name} | {dim} | {len(imgs)} | {batch} | {rate:,.1f} |")
        except UserError as err:
            rows.append(f"| {name} | - | - | - | not measured: {err} |")
        print(rows[-1], flush=True)
    text = "\n".join([
        "# Detector throughput", "",
        f"Machine: {machine()}; device `{args.device}`.", "",
        f"Command: `python {' '.join(sys.argv)}`", "",
        "Input: 16x16 grayscale digits as uint8; the time includes each detector's resize "
        "(Inception: clean-fid PIL bicubic to 299x299) and runs in float32.", "",
        "| detector | feature dim | images | batch | features/s |", "|---|---|---|---|---|", *rows, "",
        "Shared machines give noisy timings: compare rows measured in the same run.", ""])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
