"""Can a discriminator on the fake score's features tell a run's student samples from real images?

    python tools/disc_probe.py RUN [--modules mid_block up_blocks.2] [--t 0 0.01 0.05 0.25]
                              [--num 512] [--steps 150] [--out assets/benchmarks/disc_probe.md]

A GAN term (DMD2 sec. 4.3; the adversarial add-on of SiD) only helps when its classifier can
separate real from generated images at the noise levels it is shown. For each feature module and
time (a fraction of the noise range, as ``disc_t_range``), this noises ``--num`` real and as many
student images (same classes) once, takes the run's fake score's features there, trains a fresh
``DiscHead`` (Adam, lr 1e-3, non-saturating loss) on one half and reports the ROC AUC on the other
half: 0.5 is chance, 1.0 perfect. Where the run has its own trained head on that module, its AUC
on the same held-out half is reported too. The table goes to ``--out`` with the command and machine.
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


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """ROC AUC of scores (positives real) by the rank-sum (Mann-Whitney U) statistic, ties halved."""
    s = torch.cat([pos, neg]).double()
    ranks = s.argsort().argsort().double() + 1
    for v in s.unique():  # average ranks of ties
        m = s == v
        if m.sum() > 1:
            ranks[m] = ranks[m].mean()
    n1, n0 = len(pos), len(neg)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


@torch.no_grad()
def features(fake_score, module, x: torch.Tensor, frac: float, cond, seed: int) -> torch.Tensor:
    """``module``'s output of the fake score at x noised to the time at ``frac`` of the noise range."""
    from stepdistill.fake_score import forward_with_features, noise_grid

    grid = noise_grid(fake_score.schedule)
    t = grid[int(round(frac * (len(grid) - 1)))].repeat(x.shape[0])
    g = torch.Generator().manual_seed(seed)
    x_t = fake_score.schedule.add_noise(x, torch.randn(x.shape, generator=g).to(x), t)
    return forward_with_features(fake_score, module, x_t, t, cond, need_x0=False)[1]


def fresh_head_auc(f_real: torch.Tensor, f_fake: torch.Tensor, cond, num_classes, *, steps: int = 150,
                   batch: int = 64, lr: float = 1e-3, seed: int = 0) -> float:
    """Train a fresh DiscHead on the first half of each set, return its held-out AUC on the second."""
    from stepdistill.fake_score import DiscHead

    torch.manual_seed(seed)
    n = f_real.shape[0]
    half = n // 2
    labels = None if cond is None else cond.get("class_labels")

    def c(idx):
        return None if labels is None else {"class_labels": labels[idx]}

    head = DiscHead(f_real.shape[1:], None, num_classes)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        b = torch.randint(0, half, (min(batch, half),))
        loss = F.softplus(-head(f_real[b], c(b))).mean() + F.softplus(head(f_fake[b], c(b))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    held = torch.arange(half, n)
    with torch.no_grad():
        return auc(head(f_real[held], c(held)), head(f_fake[held], c(held)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--modules", nargs="+", default=None, help="feature modules (default: the run's, or mid_block, and up_blocks.-1)")
    ap.add_argument("--t", nargs="+", type=float, default=[0.0, 0.01, 0.05, 0.25])
    ap.add_argument("--num", type=int, default=512)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--out", default="assets/benchmarks/disc_probe.md")
    args = ap.parse_args(argv)

    from stepdistill.data import load_images
    from stepdistill.fake_score import FakeScore, build_disc_head, find_module
    from stepdistill.teachers import load_teacher
    from stepdistill.train import checkpoint as ckpt
    from stepdistill.loaders import load_run

    torch.manual_seed(0)
    student, meta = load_run(args.run)
    cfg = meta["config"]
    teacher = load_teacher(meta["teacher"])
    tensors = ckpt.load_tensors(Path(meta["checkpoint"]) / "nets.safetensors")
    fake = FakeScore(teacher)
    own = {k[len("fake_score."):]: v for k, v in tensors.items() if k.startswith("fake_score.")}
    if own:
        fake.load_state_dict(own)
    fake.eval()
    run_module = cfg["objective"].get("feature_module") or "auto"
    run_module = "mid_block" if run_module == "auto" else run_module
    disc = {k[len("disc."):]: v for k, v in tensors.items() if k.startswith("disc.")}
    modules = args.modules or [run_module, "up_blocks.-1"]
    ups = getattr(getattr(fake.denoiser, "backbone", None), "up_blocks", None)
    if ups is not None:  # "up_blocks.-1": the last (full-resolution) up block
        modules = [m.replace("up_blocks.-1", f"up_blocks.{len(ups) - 1}") for m in modules]

    data = load_images(cfg["data"])
    n = min(args.num, len(data.labels))
    idx = torch.randperm(len(data.labels))[:n]
    x_real, cond = data.rows(idx)
    with torch.no_grad():
        x_fake = student(torch.randn_like(x_real), cond)
    num_classes = (int(meta.get("null_class")) + 1) if meta.get("null_class") is not None else meta.get("num_classes")

    rows = []
    for name in modules:
        mod = find_module(fake, name)
        head = None
        if disc and name == run_module:
            head = build_disc_head(fake, name, teacher)
            head.load_state_dict(disc)
            head.eval()
        for frac in args.t:
            f_r = features(fake, mod, x_real, frac, cond, seed=1)
            f_f = features(fake, mod, x_fake, frac, cond, seed=2)
            fresh = fresh_head_auc(f_r, f_f, cond, num_classes, steps=args.steps)
            trained = None
            if head is not None:
                held = torch.arange(n // 2, n)
                c = None if cond is None else {k: v[held] for k, v in cond.items()}
                with torch.no_grad():
                    trained = auc(head(f_r[held], c), head(f_f[held], c))
            rows.append((name, tuple(f_r.shape[1:]), frac, fresh, trained))
            print(rows[-1], flush=True)

    lines = ["# Discriminator probe: can the fake score's features separate real from student images?", "",
             f"Run `{args.run}` (step {meta['step']}, {meta['objective']}), {n} real `{cfg['data']}` images and "
             f"{n} student samples of the same classes; a fresh head trained {args.steps} Adam steps on half, "
             "ROC AUC on the other half (0.5 = chance).", "",
             "| module | features | t (fraction of noise range) | fresh head AUC | run's head AUC |",
             "|---|---|---|---|---|"]
    for name, shape, frac, fresh, trained in rows:
        tr = "–" if trained is None else f"{trained:.3f}"
        lines.append(f"| {name} | {'x'.join(map(str, shape))} | {frac:g} | {fresh:.3f} | {tr} |")
    lines += ["", f"Command: `python tools/disc_probe.py {' '.join(sys.argv[1:] if argv is None else argv)}`  ",
              f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}, "
              f"Python {platform.python_version()}  ",
              f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
