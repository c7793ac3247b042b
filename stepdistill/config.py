"""Configs: a dataclass schema per command, YAML presets and ``key=value`` overrides (OmegaConf).

A config is values only; code is chosen by registered name. Unknown keys and wrong types stop with
one message naming the key and the nearest valid one. The resolved config is written next to
every output (``save_resolved``).
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from . import resources
from .errors import UserError


def _valid_keys(schema: Any, full_key: str) -> list[str]:
    """Valid keys at the level of `full_key` (dotted), for suggestions."""
    node = OmegaConf.structured(schema)
    parent = ".".join(full_key.split(".")[:-1])
    if parent:
        node = OmegaConf.select(node, parent)
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []


def _clash(node: Any, src: Any, prefix: str = "") -> str | None:
    """The dotted key where `src` puts a plain value on a section of the schema (OmegaConf's merge
    error for this case carries no key)."""
    if not isinstance(src, (dict, DictConfig)) or not isinstance(node, DictConfig):
        return None
    for k, v in src.items():
        child = node.get(k) if k in node else None
        if isinstance(child, DictConfig):
            if not isinstance(v, (dict, DictConfig)):
                return f"{prefix}{k}"
            found = _clash(child, v, f"{prefix}{k}.")
            if found:
                return found
    return None


def _explain(err: OmegaConfBaseException, schema: Any, where: str, src: Any = None) -> UserError:
    key = getattr(err, "full_key", None) or _clash(OmegaConf.structured(schema), src) or "?"
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        leaf = key.split(".")[-1]
        valid = _valid_keys(schema, key)
        near = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.0)
        hint = f"; did you mean {'.'.join(key.split('.')[:-1] + [near[0]])!r}?" if near else ""
        return UserError(f"{where}: unknown config key {key!r}{hint} (valid here: {', '.join(valid)})")
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return UserError(f"{where}: bad value for config key {key!r}: {msg}")
    return UserError(f"{where}: {str(err).splitlines()[0]}")


def merge(schema: Any, *sources: Any, where: str = "config") -> DictConfig:
    """Merge dict/DictConfig sources onto a structured schema, with clear errors."""
    base = OmegaConf.structured(schema)
    try:
        for src in sources:
            base = OmegaConf.merge(base, src)
    except OmegaConfBaseException as err:
        raise _explain(err, schema, where, src) from None
    return base


def parse_overrides(overrides: Iterable[str]) -> DictConfig:
    items = list(overrides)
    for item in items:
        if "=" not in item or item.startswith("="):
            raise UserError(f"override {item!r} is not of the form key=value (e.g. max_steps=200)")
    try:
        return OmegaConf.from_dotlist(items)
    except OmegaConfBaseException as err:
        raise UserError(f"could not parse overrides {items}: {err}") from None


def read_yaml(path: str | os.PathLike) -> DictConfig:
    p = resources.preset(path)
    if not p.is_file():
        raise UserError(f"config file {str(path)!r} does not exist; pass a YAML file or a shipped preset's name "
                        "such as digits/dmd2 (`stepdistill presets` lists them)")
    try:
        cfg = OmegaConf.load(p)
    except Exception as err:  # yaml syntax errors come in several types
        # OmegaConf also rejects a file holding a bare scalar or list here, so say both
        raise UserError(f"config file {str(p)!r} is not a valid YAML mapping of keys to values: {err}") from None
    if not isinstance(cfg, DictConfig):
        raise UserError(f"config file {str(p)!r} must hold a mapping of keys to values")
    return cfg


def load(schema: Any, path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Schema defaults <- YAML preset <- ``key=value`` overrides, validated against the schema."""
    sources = [read_yaml(path)] if path else []
    sources.append(parse_overrides(overrides))
    return merge(schema, *sources, where=str(path) if path else "overrides")


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def save_resolved(cfg: DictConfig | dict, folder: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the fully resolved config atomically into `folder`."""
    from .fsutil import atomic_write_text

    text = OmegaConf.to_yaml(cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg), resolve=True)
    return atomic_write_text(Path(folder) / name, text)


def lr_schedules() -> list[str]:
    """The schedule names ``diffusers.optimization.get_scheduler`` accepts."""
    from diffusers.optimization import SchedulerType

    return [s.value for s in SchedulerType]


def check_optimizer(where: str, *, lr: float, lr_schedule: str, warmup_steps: int, betas=(), eps: float = 1e-8,
                    weight_decay: float = 0.0) -> None:
    """AdamW and LR-schedule settings, checked with the config (``where``: the keys' prefix), so a
    bad value stops before any teacher or data is loaded."""
    import math

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(f"{where}{msg}")

    need(math.isfinite(lr) and lr > 0, f"lr must be a positive number, got {lr}; e.g. 1e-4")
    need(lr_schedule in lr_schedules(), f"lr_schedule {lr_schedule!r} is not a diffusers schedule; use one of "
         f"{', '.join(lr_schedules())}")
    need(warmup_steps >= 0, f"warmup_steps must be >= 0, got {warmup_steps}")
    for i, b in enumerate(betas, start=1):
        need(math.isfinite(b) and 0.0 <= b < 1.0, f"beta{i} must be in [0, 1), got {b}; Adam's defaults are 0.9 and 0.999")
    need(math.isfinite(eps) and eps > 0, f"eps must be > 0, got {eps}")
    need(math.isfinite(weight_decay) and weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay}")
