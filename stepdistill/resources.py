"""Files shipped inside the package: presets (``stepdistill/presets``) and assets (the digits teacher
and detector, ``stepdistill/assets``), found from any working directory after a plain ``pip install``.

A path the user gives always wins when it exists. Otherwise a preset may be named as
``digits/dmd2`` (or ``digits/dmd2.yaml``, or ``configs/digits/dmd2.yaml`` as older docs and run
folders wrote it), and a shipped teacher as ``digits16`` (or ``assets/teachers/digits16``).
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
PRESETS = PACKAGE / "presets"
ASSETS = PACKAGE / "assets"
TEACHERS = ASSETS / "teachers"
DETECTORS = ASSETS / "detectors"
_LEGACY = {"configs": PRESETS, "assets": ASSETS}  # the top-level folders these lived in before packaging


def presets() -> dict[str, Path]:
    """Every shipped preset by name (``digits/dmd2``), sorted; the accelerate launch configs included."""
    return {str(p.relative_to(PRESETS).with_suffix("")): p for p in sorted(PRESETS.rglob("*.yaml"))}


def shipped_teachers() -> dict[str, Path]:
    return {p.name: p for p in sorted(TEACHERS.iterdir()) if p.is_dir()}


def _packaged(raw: str) -> Path | None:
    parts = Path(raw).parts
    if len(parts) > 1 and parts[0] in _LEGACY:
        candidate = _LEGACY[parts[0]].joinpath(*parts[1:])
        if candidate.exists():
            return candidate
    return None


def preset(path: str | os.PathLike) -> Path:
    """The YAML file a config argument names: an existing file, else a shipped preset by name or by
    its pre-packaging ``configs/...`` path; the name itself (for the caller's error) when neither."""
    raw = str(path)
    p = Path(raw).expanduser()
    if p.is_file():
        return p
    found = _packaged(raw)
    if found is not None and found.is_file():
        return found
    name = raw[:-5] if raw.endswith(".yaml") else raw[:-4] if raw.endswith(".yml") else raw
    return presets().get(name, p)


def teacher(path: str | os.PathLike) -> str:
    """The folder a teacher argument names: an existing path, else a shipped teacher by name
    (``digits16``) or by its pre-packaging ``assets/teachers/...`` path; unchanged when none matches
    (a hub name, or a missing folder the loader reports)."""
    raw = str(path)
    if Path(raw).expanduser().exists():
        return raw
    found = _packaged(raw)
    if found is not None and found.is_dir():
        return str(found)
    return str(shipped_teachers().get(raw, raw))


__all__ = ["PRESETS", "ASSETS", "TEACHERS", "DETECTORS", "presets", "shipped_teachers", "preset", "teacher"]
