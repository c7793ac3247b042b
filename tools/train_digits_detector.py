"""Train the digits detector shipped in stepdistill/assets/detectors/ (a few minutes on a laptop CPU).

    python tools/train_digits_detector.py [--epochs 40] [--seed 0] [--out stepdistill/assets/detectors/digits]

Trains ``stepdistill.eval.digits_detector.DigitsNet`` on digits-train with +-1 pixel shifts and
Gaussian input noise of random std (half the batches clean), minimising cross-entropy on the class
plus an auxiliary regression of the noise std from the pooled features (so the FID features see
noise). Writes ``<out>.safetensors`` and ``<out>.json`` with the architecture, the held-out
accuracy on digits-test and the command line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from stepdistill.data import load_images
from stepdistill.eval.digits_detector import DigitsNet
from stepdistill.images import from_uint8, to_uint8


def augment(x: torch.Tensor, g: torch.Generator, max_std: float):
    """Random +-1 pixel shift, then Gaussian noise with a per-image std (0 for half the images),
    quantised to uint8 as a saved image would be. Returns (images, noise std)."""
    n = len(x)
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2, n), generator=g)
    x = torch.stack([pad[i, :, dy[i]:dy[i] + 16, dx[i]:dx[i] + 16] for i in range(n)])
    std = torch.rand(n, generator=g) * max_std * (torch.rand(n, generator=g) < 0.5)
    x = x + std[:, None, None, None] * torch.randn(x.shape, generator=g)
    return from_uint8(to_uint8(x)), std


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-noise", type=float, default=0.3, help="largest noise std, [-1, 1] units")
    p.add_argument("--noise-weight", type=float, default=10.0, help="weight of the noise-std loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="stepdistill/assets/detectors/digits")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    train, test = load_images("digits-train"), load_images("digits-test")
    arch = {"widths": [32, 32, 64, 128], "hidden": 64, "num_classes": 10}
    net = DigitsNet(**arch)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * ((len(train) + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps)
    t0 = time.time()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(train), generator=g)
        for i in range(0, len(train), args.batch):
            idx = perm[i:i + args.batch]
            x, std = augment(train.images[idx], g, args.max_noise)
            _, logits, std_hat = net(x)
            loss = F.cross_entropy(logits, train.labels[idx]) + args.noise_weight * F.mse_loss(std_hat, std)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.4f}", flush=True)

    net.eval()
    with torch.no_grad():
        # equalise the feature groups: each dimension has unit std over clean digits-train
        net.feature_scale.copy_(net(train.images)[0].std(0).clamp_min(1e-3))
        _, logits, _ = net(test.images)
        acc = float((logits.argmax(1) == test.labels).float().mean())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out.with_suffix(".safetensors")))
    meta = {
        "name": "digits",
        "arch": arch,
        "input": "1x16x16 uint8 (RGB read as channel mean), mapped to [-1, 1]",
        "features": "concat(penultimate fc (64), spatial mean of conv1 (32), spatial mean of conv2 (32)), "
                    "each divided by its std over clean digits-train",
        "train_split": "digits-train", "train_sha256": train.sha256,
        "test_split": "digits-test", "test_sha256": test.sha256,
        "test_accuracy": round(acc, 4),
        "train_seconds": round(time.time() - t0, 1),
        "command": "python " + " ".join(sys.argv),
        "hyperparameters": {k: v for k, v in vars(args).items() if k != "out"},
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"held-out accuracy on digits-test: {acc:.4f}; wrote {out}.safetensors/.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
