"""``stepdistill pretrain CONFIG [key=value ...]``: train a teacher and write its folder."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="train a small pixel-space teacher on digits, an image folder or an .npz",
        description="Train a diffusion teacher (UNet2DModel) and write it as a teacher folder: unet/, "
                    "scheduler/, stepdistill.json, the resolved config.yaml and a preview grid samples.png. "
                    "output_dir must be new or empty: nothing there is ever replaced.")
    p.add_argument("config", help="YAML file or shipped preset, e.g. digits/teacher")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=200 data=my.npz")
    p.add_argument("--dry-run", action="store_true", help="validate the config and data, print it, train nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .. import config as config_mod
    from ..data import load_images
    from ..images import save_grid
    from ..pretrain import (PretrainConfig, build_backbone, check_output_dir, check_settings, pretrain, preview,
                            resolve_classes)

    cfg = config_mod.load(PretrainConfig, args.config, args.overrides)
    console = Console(stderr=True)
    obj: PretrainConfig = OmegaConf.to_object(cfg)
    check_settings(obj)
    check_output_dir(obj)
    data = load_images(obj.data)  # fail on bad data before anything else
    num_classes = resolve_classes(obj, data)
    build_backbone(obj, data.channels, data.size[0], num_classes)  # fail on a bad model config now
    if args.dry_run:
        console.print(OmegaConf.to_yaml(cfg), highlight=False)
        console.print(f"data {data.name!r}: {len(data)} images {data.channels}x{data.size[0]}x{data.size[1]}, "
                      f"{num_classes} classes", highlight=False)
        return 0

    def extras(den, folder: Path) -> None:
        config_mod.save_resolved(cfg, folder)
        if obj.grid_num > 0:
            x, nrow = preview(den, obj.grid_num, obj.grid_steps, obj.seed)
            save_grid(x, folder / "samples.png", nrow)

    columns = (TextColumn("[bold]pretrain"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.2f} it/s"))
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("pretrain", total=obj.max_steps, loss=float("nan"), rate=0.0)
        every = max(1, obj.max_steps // 20)

        def on_step(step: int, loss: float, elapsed: float) -> None:
            bar.update(task, completed=step, loss=loss, rate=step / max(elapsed, 1e-9))
            if not console.is_terminal and (step % every == 0 or step == obj.max_steps):
                # logs and pipes get a plain line instead of the live bar
                console.print(f"step {step}/{obj.max_steps}  loss {loss:.4f}  {step / max(elapsed, 1e-9):.2f} it/s  "
                              f"{elapsed:.0f} s", highlight=False)

        den, summary = pretrain(obj, on_step=on_step, extras=extras)
    console.print(f"wrote {den.meta['path']}: {summary['steps']} steps in {summary['train_seconds']} s "
                  f"({summary['sec_per_step']} s/step), final loss {summary['final_loss_ema']}", highlight=False)
    return 0
