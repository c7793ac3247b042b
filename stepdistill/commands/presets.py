"""``stepdistill presets [--path NAME]``: the presets shipped inside the package."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "presets", help="list the shipped presets (train digits/dmd2, accelerate launch configs, ...)",
        description="List the presets shipped with stepdistill, each with its first comment line. Any command "
                    "taking a config accepts a preset's name (e.g. `stepdistill train digits/dmd2`); --path prints "
                    "a preset's file, for tools that need one (accelerate launch --config_file).")
    p.add_argument("--path", metavar="NAME", default=None, help="print the file of preset NAME and exit")
    p.set_defaults(func=run)


def _summary(path) -> str:
    """A preset's first comment line (its one-line description)."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from ..resources import presets, shipped_teachers

    found = presets()
    if args.path is not None:
        name = args.path[:-5] if args.path.endswith(".yaml") else args.path
        if name not in found:
            raise UserError(f"no shipped preset {args.path!r}; `stepdistill presets` lists them "
                            f"({', '.join(sorted(found))})")
        print(found[name])
        return 0
    width = max(map(len, found))
    for name, path in found.items():
        print(f"{name:<{width}}  {_summary(path)}")
    print(f"\nshipped teachers: {', '.join(shipped_teachers())} (use as teacher=NAME)")
    return 0
