"""Trainer overhead: seconds per iteration of ``stepdistill.train.Trainer`` against a bare PyTorch
loop doing the same work (same objective losses, same networks, same batches, AdamW steps), both in
this process. Writes assets/benchmarks/trainer_overhead.md.

    python tools/trainer_overhead.py [--objectives progressive,consistency,dmd,sid] [--pairs 20] [--block 4]

Design: a paired, interleaved measurement. One Trainer and one bare loop are built side by side; the
tool then times ``--pairs`` pairs of blocks, each block ``--block`` iterations of one loop, the two
blocks of a pair in alternating order (ABBA), so slow drifts of the machine (clock, other work, cache)
fall on both sides of every pair. The reported overhead is the median of the per-pair ratios
trainer / bare, with a distribution-free 95 % confidence interval of that median (order statistics
of the binomial, no normality assumed). The Trainer's iteration is ``Trainer.train_step``: every
phase's forward, backward, NaN/Inf guard, gradient clipping, optimizer and LR-schedule step, loss
bookkeeping and the objective's end-of-step hook; its periodic I/O (log lines, previews,
checkpoints) is configurable and left out of both sides. EMA is off in both.

The teacher is the shipped digits16 when present, else a random teacher of the same
architecture (timing does not depend on the weights); data: digits-train.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from stepdistill.resources import PRESETS, TEACHERS

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


def config_args(objective: str, batch: int, teacher, out) -> tuple[str | None, list[str]]:
    """(preset path or None, overrides): the digits preset's objective, optimizers and max_steps (only
    the LR schedules read it; ``train_step`` runs past it), with every periodic I/O and the EMA off.
    A regression warm-up is switched off, so that both loops time the objective's main iterations
    (every phase) rather than the warm-up's regression-only ones."""
    from omegaconf import OmegaConf

    preset = PRESETS / "digits" / f"{objective}.yaml"
    path, base = (str(preset), []) if preset.is_file() else (None, [f"objective.name={objective}"])
    section = OmegaConf.load(path).get("objective", {}) if path else {}
    if section.get("regression_warmup"):
        base = base + ["objective.regression_warmup=0"]
    if section.get("regression_warmup_fraction") is not None:
        base = base + ["objective.regression_warmup_fraction=null"]
    return path, base + [
        f"teacher={teacher}", "data=digits-train", f"output_dir={out}", f"batch_size={batch}", "max_minutes=null",
        "log_every=1000000000", "checkpoint_every=1000000000", "preview_every=null", "eval_every=null",
        "collapse_every=null", "progress=false", "cpu=true", "ema.decay=null"]


class BareLoop:
    """The same forward and backward passes with nothing around them: plain AdamW, no clipping,
    no guard, no accelerate, no bookkeeping."""

    def __init__(self, cfg, obj):
        from stepdistill.train.batches import BatchStream
        from stepdistill.train.setup import build_nets, load_teacher_and_data

        teacher, data = load_teacher_and_data(cfg, obj)
        self.obj, self.nets = obj, build_nets(cfg, obj, teacher).nets
        self.phases = obj.phases()
        trained = {n for ph in self.phases for n in ph.trains}
        for n in trained:
            self.nets.get(n).train()
        self.opts = {n: torch.optim.AdamW([p for p in self.nets.get(n).parameters() if p.requires_grad], lr=1e-5)
                     for n in trained}
        self.stream = BatchStream(data, cfg.batch_size, cfg.seed, 0, 1)
        self.step = self.draw = 0

    def train_step(self) -> None:
        for ph in self.phases:
            if self.step < ph.start or (ph.stop is not None and self.step >= ph.stop):
                continue
            for r in range(ph.repeats):
                batch = self.stream.batch(self.draw, step=self.step, phase=ph.name, repeat=r, micro=0)
                self.draw += 1
                losses = self.obj.losses(ph.name, self.nets, batch)
                sum(v.mean() for k, v in losses.items() if not k.startswith("_")).backward()
                for n in ph.trains:
                    self.opts[n].step()
                self.nets.zero_grad(set_to_none=True)
        self.obj.on_step_end(self.nets, self.step + 1)
        self.step += 1


def median_ci(xs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Median and a distribution-free confidence interval: the order statistics x_(j), x_(n-j+1)
    with j the largest rank for which P(Binomial(n, 1/2) < j) <= (1 - level) / 2."""
    from scipy.stats import binom

    s, n = sorted(xs), len(xs)
    med = s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
    j = max(1, int(binom.ppf((1 - level) / 2, n, 0.5)))
    while j > 1 and binom.cdf(j - 1, n, 0.5) > (1 - level) / 2:
        j -= 1
    return med, s[j - 1], s[n - j]


def measure(objective: str, args, teacher: Path, tmp: Path) -> dict:
    from accelerate.state import AcceleratorState

    from stepdistill.train import resolve
    from stepdistill.train.logging import Window
    from stepdistill.train.trainer import Trainer

    cfg, obj = resolve(*config_args(objective, args.batch, teacher, tmp / f"{objective}-trainer"))
    trainer = Trainer(cfg, obj)
    cfg_b, obj_b = resolve(*config_args(objective, args.batch, teacher, tmp / f"{objective}-bare"))
    bare = BareLoop(cfg_b, obj_b)
    window = Window()

    def block(run) -> float:
        t0 = time.perf_counter()
        for _ in range(args.block):
            run()
        return (time.perf_counter() - t0) / args.block

    def trainer_step():
        trainer.train_step(window)
        if window.steps >= 50:  # what a log line does to the window, without its I/O
            window.means()
            window.reset()

    for _ in range(args.warmup):  # allocator, autograd graph and Adam state warm on both sides
        trainer_step()
        bare.train_step()
    ratios, tr, br = [], [], []
    for i in range(args.pairs):
        if i % 2 == 0:
            a = block(trainer_step)
            b = block(bare.train_step)
        else:
            b = block(bare.train_step)
            a = block(trainer_step)
        tr.append(a)
        br.append(b)
        ratios.append(a / b)
    AcceleratorState._reset_state(True)
    med, lo, hi = median_ci(ratios)
    row = {"objective": objective, "trainer": sorted(tr)[len(tr) // 2], "bare": sorted(br)[len(br) // 2],
           "median": med, "lo": lo, "hi": hi, "spread": max(tr) / min(tr)}
    print(f"{objective}: trainer {row['trainer']:.4f} s/it, bare {row['bare']:.4f} s/it, paired ratio "
          f"{med:.4f} (95 % CI {lo:.4f}-{hi:.4f})", flush=True)
    return row


def verdict(row: dict, bound: float) -> str:
    if row["hi"] <= 1 + bound:
        return "within"
    if row["lo"] > 1 + bound:
        return "**over**"
    return "undecided"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objectives", default="progressive,consistency,dmd,sid",
                   help="digits presets (or registered objective names), comma-separated")
    p.add_argument("--pairs", type=int, default=20, help="trainer/bare block pairs per objective")
    p.add_argument("--block", type=int, default=4, help="iterations per timed block")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations of each loop first")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--bound", type=float, default=0.05, help="the overhead bound under test")
    p.add_argument("--out", default=str(ROOT / "assets" / "benchmarks" / "trainer_overhead.md"))
    args = p.parse_args()
    if args.pairs < 6:
        raise SystemExit("--pairs must be >= 6 for a 95 % confidence interval of the median")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")  # before this tool's threads
    torch.set_num_threads(max(1, torch.get_num_threads()))
    teacher = TEACHERS / "digits16"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not teacher.is_dir():
            teacher = random_digits_teacher(Path(tmp) / "teacher")
        for name in [s.strip() for s in args.objectives.split(",") if s.strip()]:
            rows.append(measure(name, args, teacher, Path(tmp)))
    cmd = "python tools/trainer_overhead.py " + " ".join(sys.argv[1:])
    text = (f"# Trainer overhead\n\n`{cmd.strip()}`\n\n"
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU; 1-minute load average "
            f"before the measurement {load:.2f}. Batch {args.batch}; teacher "
            f"{'digits16 (shipped)' if teacher == TEACHERS / 'digits16' else 'a random digits-size UNet'}.\n\n"
            f"Paired and interleaved in one process: {args.pairs} pairs of {args.block}-iteration blocks per objective "
            f"(ABBA order) after {args.warmup} warm-up iterations of each loop; the overhead is the median of the "
            "per-pair ratios with its distribution-free 95 % confidence interval. The Trainer's iteration is "
            "`Trainer.train_step` (forward, backward, NaN/Inf guard, gradient clipping, optimizer and LR schedule, "
            "loss bookkeeping, end-of-step hook); the bare loop is forward, backward and AdamW. EMA is off in both; "
            "periodic I/O (logs, previews, checkpoints) is in neither.\n\n"
            f"| objective (preset) | trainer s/it | bare s/it | overhead (median ratio) | 95 % CI | within {100 * args.bound:.0f} %? |\n"
            "|---|---|---|---|---|---|\n")
    for r in rows:
        text += (f"| {r['objective']} | {r['trainer']:.4f} | {r['bare']:.4f} | {100 * (r['median'] - 1):+.1f} % | "
                 f"{100 * (r['lo'] - 1):+.1f} % to {100 * (r['hi'] - 1):+.1f} % | {verdict(r, args.bound)} |\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
