"""Trainer overhead: seconds per iteration of ``stepdistill.train.Trainer`` against a bare PyTorch
loop doing the same work (same objective losses, same networks, same batches, AdamW steps), with
no checkpoint, preview or log I/O inside the timed steps. Writes assets/benchmarks/trainer_overhead.md.

    python tools/trainer_overhead.py [--objective consistency] [--steps 30] [--batch 64]

The teacher is assets/teachers/digits16 when present, else a random teacher of the same
architecture (timing does not depend on the weights); data: digits-train.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def random_digits_teacher(path: Path) -> Path:
    from diffusers import UNet2DModel

    from stepdistill.denoisers import DiffusersDenoiser
    from stepdistill.schedules import VPSchedule
    from stepdistill.teachers import save_teacher

    torch.manual_seed(0)
    net = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                      layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), num_class_embeds=11)
    sched = VPSchedule({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                        "prediction_type": "v_prediction", "timestep_spacing": "trailing"})
    save_teacher(DiffusersDenoiser(net, sched, null_class=10), path,
                 {"kind": "class-conditional", "num_classes": 10, "null_class": 10})
    return path


def overrides(args, teacher, out) -> list[str]:
    return [f"teacher={teacher}", "data=digits-train", f"output_dir={out}", f"objective.name={args.objective}",
            f"batch_size={args.batch}", f"max_steps={2 * args.steps}", f"log_every={args.steps}",
            "checkpoint_every=1000000000", "preview_every=null", "progress=false", "cpu=true", "ema.decay=null"]


def time_trainer(args, teacher, out) -> float:
    from accelerate.state import AcceleratorState

    from stepdistill.train import resolve
    from stepdistill.train.trainer import Trainer

    cfg, obj = resolve(None, overrides(args, teacher, out))
    Trainer(cfg, obj).train()
    AcceleratorState._reset_state(True)
    lines = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return 1.0 / lines[-1]["it_s"]  # the second window: steps N+1..2N, no I/O inside


def time_bare(args, teacher, out) -> float:
    from stepdistill.train import resolve
    from stepdistill.train.batches import BatchStream
    from stepdistill.train.setup import build_nets, load_teacher_and_data

    cfg, obj = resolve(None, overrides(args, teacher, out))
    teacher_net, data = load_teacher_and_data(cfg)
    nets = build_nets(cfg, obj, teacher_net).nets
    phases = obj.phases()
    trained = {n for ph in phases for n in ph.trains}
    opts = {n: torch.optim.AdamW([p for p in nets.get(n).parameters() if p.requires_grad], lr=1e-5) for n in trained}
    stream = BatchStream(data, cfg.batch_size, cfg.seed, 0, 1)
    draw, t0 = 0, None
    for step in range(2 * args.steps):
        if step == args.steps:
            t0 = time.perf_counter()
        for ph in phases:
            for r in range(ph.repeats):
                batch = stream.batch(draw, step=step, phase=ph.name, repeat=r, micro=0)
                draw += 1
                losses = obj.losses(ph.name, nets, batch)
                sum(v.mean() for k, v in losses.items() if not k.startswith("_")).backward()
                for n in ph.trains:
                    opts[n].step()
                nets.zero_grad(set_to_none=True)
        obj.on_step_end(nets, step + 1)
    return (time.perf_counter() - t0) / args.steps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objective", default="consistency")
    p.add_argument("--steps", type=int, default=30, help="timed steps (after as many warm-up steps)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="alternating trainer/bare measurements; medians reported")
    p.add_argument("--out", default=str(ROOT / "assets" / "benchmarks" / "trainer_overhead.md"))
    args = p.parse_args()
    # other work on the cores, before this tool's own threads count towards the load average
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        teacher = ROOT / "assets" / "teachers" / "digits16"
        if not teacher.is_dir():
            teacher = random_digits_teacher(Path(tmp) / "teacher")
        tr, bare = [], []
        for i in range(args.repeats):
            tr.append(time_trainer(args, teacher, Path(tmp) / f"run{i}"))
            bare.append(time_bare(args, teacher, Path(tmp) / f"bare{i}"))
            print(f"repeat {i}: trainer {tr[-1]:.4f} s/it, bare {bare[-1]:.4f} s/it", flush=True)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    t, b = med(tr), med(bare)
    cmd = "python tools/trainer_overhead.py " + " ".join(sys.argv[1:])
    text = (f"# Trainer overhead\n\n`{cmd.strip()}`\n\n"
            f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, CPU. Objective `{args.objective}`, batch {args.batch}, "
            f"{args.steps} timed steps after {args.steps} warm-up steps, {args.repeats} alternating repeats "
            f"(medians). Teacher: {'assets/teachers/digits16' if (ROOT / 'assets/teachers/digits16').is_dir() else 'random digits-size UNet (1.1 M-class architecture)'}. "
            "EMA off in both; the trainer also clips gradients and checks them for NaN/Inf.\n\n"
            "| loop | s/it (median) | all repeats |\n|---|---|---|\n"
            f"| stepdistill Trainer | {t:.4f} | {', '.join(f'{x:.4f}' for x in tr)} |\n"
            f"| bare PyTorch loop | {b:.4f} | {', '.join(f'{x:.4f}' for x in bare)} |\n\n"
            f"Overhead: {100 * (t / b - 1):+.1f} % (target: within 5 %).\n")
    spread = max(max(tr) / min(tr), max(bare) / min(bare))
    text += f"\nLoad average (1 min) before the measurement: {load:.2f} on {os.cpu_count()} cores.\n"
    if spread > 1.1:
        text += (f"\n**Not resolved:** repeats of the same loop differ by up to {spread:.2f}x, more than the 5 % "
                 "under test; more repeats (--repeats) narrow the medians.\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
