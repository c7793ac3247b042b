"""Where a command's outputs may go: never onto a file of the model folder it reads (a run's
config.yaml, a teacher's weights, an export's model card), while a file that an earlier ``sample``
or ``eval`` wrote there may be written again (re-running a command is always fine)."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

SAMPLE_KEYS = {"model", "steps", "sampler", "out"}   # a .yaml holding these is a ``sample`` run's settings
REPORT_KEYS = {"results", "protocol", "command"}     # a .json holding these is an ``eval`` report


def earlier_outputs(folder: Path) -> set[Path]:
    """Files in ``folder`` that ``sample`` or ``eval`` wrote: their settings and reports, and the grids,
    arrays and plots those name."""
    from omegaconf import OmegaConf

    found: set[Path] = set()
    for f in folder.glob("*.yaml"):
        try:
            d = OmegaConf.to_container(OmegaConf.load(f))
        except Exception:  # noqa: BLE001 -- unreadable: not a settings file of ours
            continue
        if isinstance(d, dict) and SAMPLE_KEYS <= set(d):
            found |= {f.resolve(), *(Path(d[k]).resolve() for k in ("out", "npz") if d.get(k))}
    for f in folder.glob("*.json"):
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and REPORT_KEYS <= set(d):
            found |= {f.resolve(), *([Path(d["plot"]).resolve()] if d.get("plot") else [])}
    return found


def check_outputs(model: str | Path, paths: dict[str, Path | str | None]) -> None:
    """Refuse (before any compute) an output path that would overwrite a file of the folder ``model``."""
    root = Path(model).resolve()
    if not root.is_dir():
        return
    for flag, path in paths.items():
        if path is None:
            continue
        p = Path(path).resolve()
        if p.exists() and (p == root or root in p.parents) and p not in earlier_outputs(p.parent):
            raise UserError(f"{flag} {str(path)!r} would overwrite {p.relative_to(root).as_posix() or '.'}, a file of "
                            f"{str(model)!r}; write the output elsewhere or under another name")


__all__ = ["check_outputs", "earlier_outputs"]
