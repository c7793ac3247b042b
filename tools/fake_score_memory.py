"""Peak memory of a fake score kept as a full trainable copy of the teacher against LoRA adapters
on the teacher's own backbone (one copy of the weights), for DMD/DMD2/SiD-style critics.

    python tools/fake_score_memory.py [--out assets/benchmarks/fake_score_memory.md]

Each configuration runs in its own process: load the teacher, build the fake score, AdamW on its
trainable parameters, then three fake-score updates (denoising score matching at batch 16). The
number reported is that process's peak RSS (ru_maxrss), so it includes weights, gradients,
optimizer states and activations. Sizes: the shipped digits teacher and a larger random
UNet2DModel built in code (class-conditional, 3x64x64), where the difference is no longer lost in
the interpreter's baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    "digits16": None,  # the shipped teacher
    "unet64": dict(sample_size=64, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 512),
                   layers_per_block=2, num_class_embeds=11,
                   down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
}


def child(size: str, rank: int) -> dict:
    import torch

    from stepdistill.fake_score import FakeScore, denoising_loss

    torch.manual_seed(0)
    if SIZES[size] is None:
        from stepdistill.teachers import load_teacher

        teacher = load_teacher("digits16")
    else:
        from diffusers import UNet2DModel

        from stepdistill.denoisers import DiffusersDenoiser
        from stepdistill.schedules import VPSchedule

        teacher = DiffusersDenoiser(UNet2DModel(**SIZES[size]), VPSchedule({"prediction_type": "v_prediction"}),
                                    null_class=10)
    teacher.requires_grad_(False)
    cfg = teacher.backbone.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    fake = FakeScore(teacher, lora_rank=rank)
    params = [p for p in fake.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    for _ in range(3):
        x0 = torch.rand(16, *shape) * 2 - 1
        cond = {"class_labels": torch.randint(0, 10, (16,))}
        loss = denoising_loss(fake, x0, cond).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"size": size, "rank": rank, "trainable": sum(p.numel() for p in params),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="assets/benchmarks/fake_score_memory.md")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the shared-weights fake score")
    p.add_argument("--child", nargs=2, metavar=("SIZE", "RANK"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    rows = []
    for size in SIZES:
        for rank in (0, args.rank):
            res = subprocess.run([sys.executable, __file__, "--child", size, str(rank)], cwd=ROOT,
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    lines = ["# Fake score memory: full copy vs LoRA on the shared teacher backbone", "",
             "Peak RSS of a process that loads the teacher, builds the fake score and runs three fake-score",
             "updates (AdamW, batch 16): weights, gradients, optimizer states and activations together.", "",
             "| teacher | fake score | trainable parameters | peak RSS |", "|---|---|---|---|"]
    for r in rows:
        kind = "full copy" if r["rank"] == 0 else f"LoRA rank {r['rank']} (shared weights)"
        lines.append(f"| {r['size']} | {kind} | {r['trainable']:,} | {r['peak_rss_mib']:,.0f} MiB |")
    for size in SIZES:
        full, lora = (next(r for r in rows if r["size"] == size and r["rank"] == k) for k in (0, args.rank))
        state = (full["trainable"] - lora["trainable"]) * 16 / 2**20  # copy + grad + 2 AdamW moments, fp32
        lines.append(f"\n{size}: LoRA saves {full['peak_rss_mib'] - lora['peak_rss_mib']:,.0f} MiB "
                     f"({100 * (1 - lora['peak_rss_mib'] / full['peak_rss_mib']):.0f} % of the full-copy peak); "
                     f"by arithmetic the copy, its gradients and AdamW moments are {state:,.0f} MiB, not all of "
                     "which is resident at the activation peak.")
    lines += ["", f"Command: `python tools/fake_score_memory.py --rank {args.rank}`  ",
              f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}, "
              f"Python {platform.python_version()}  ", f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    out = ROOT / args.out
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
