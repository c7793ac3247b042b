"""``stepdistill pretrain | train | sample | eval | export | plot | presets``.

Each subcommand lives in ``stepdistill/commands/<name>.py`` and exposes ``register(subparsers)``,
which adds its parser and sets ``func`` (called with the parsed args; returns an exit code).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import Interrupted, UserError

COMMANDS = ["pretrain", "sample", "train", "eval", "export", "merge", "plot", "presets"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepdistill",
        description="Distil a many-step diffusion or flow teacher into a 1-4 step student.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"stepdistill.commands.{name}").register(sub)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line; key=value overrides may also follow an option
    (``train digits/dmd2 --dry-run max_steps=10``), which argparse alone refuses."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        args.overrides = list(args.overrides) + extra  # after the earlier ones: a later key wins, as typed
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        return _say("error", err, 2)
    except Interrupted as err:  # a run stopped by SIGINT/SIGTERM after writing its checkpoint
        return _say("stopped", err, err.code)
    except KeyboardInterrupt:
        return _say("stopped", "interrupted (Ctrl-C); files are written through temporary names and one rename, "
                    "so nothing half-written is left: re-run the command to resume or start again", 130)


def _say(tag: str, message, code: int) -> int:
    """One line on stderr, no traceback."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[bold red]{tag}:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
