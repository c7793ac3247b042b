"""``stepdistill train CONFIG [key=value ...]``: distil a teacher into a student (resumes)."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="distil a teacher into a few-step student",
                              description="Train a student with an objective. Re-running the same command "
                                          "resumes from the newest checkpoint in output_dir.")
    p.add_argument("config", nargs="?", default=None, help="YAML file or shipped preset (e.g. digits/dmd2; `stepdistill presets` lists them); omit to use only overrides")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=200 objective.name=dmd")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and parameter counts, then exit")
    p.add_argument("--allow-changes", action="store_true",
                   help="resume a run with settings other than its config.yaml (the old config is kept beside it as "
                        "config.before-step-N.yaml); without it such a resume is refused with the differences")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.setup import resolve

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]  # only overrides were given
    cfg, objective = resolve(config, overrides)
    if args.dry_run:
        return _dry_run(cfg, objective)
    from ..train.trainer import Trainer

    trainer = Trainer(cfg, objective, allow_changes=args.allow_changes)
    result = trainer.train()
    if trainer.main:
        print(f"trained to step {result['step']} ({result['skipped']} skipped updates); "
              f"checkpoint: {result['checkpoint']}")
    return 0


def _dry_run(cfg, objective) -> int:
    from omegaconf import OmegaConf
    from rich.console import Console
    from rich.table import Table

    from ..objectives.base import BuildContext
    from ..train.setup import build_nets, load_teacher_and_data, parameter_counts

    teacher, data = load_teacher_and_data(cfg)
    context = BuildContext.for_data(data, load_caches=False)
    nets = build_nets(cfg, objective, teacher, context).nets
    console = Console()
    console.print(OmegaConf.to_yaml(cfg, resolve=True), highlight=False, markup=False)
    table = Table(title="parameters")
    for col in ("network", "total", "trainable"):
        table.add_column(col)
    for name, c in parameter_counts(nets).items():
        table.add_row(name, f"{c['total']:,}", f"{c['trainable']:,}")
    console.print(table)
    return 0
