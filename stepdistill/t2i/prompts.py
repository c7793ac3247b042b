"""Prompt lists and image-text pairs for text-to-image teachers.

Specs accepted by ``read_prompts``:

* ``prompts.txt`` -- one prompt per line (blank lines skipped);
* ``prompts.csv`` -- a header row with a ``prompt``, ``text`` or ``caption`` column, and optionally an
  ``image`` (or ``file``/``path``) column, which makes it image-text pairs;
* ``pairs.jsonl`` -- one JSON object per line with ``prompt``/``text``/``caption`` and optionally
  ``image``;
* a folder of images, each with a caption file of the same stem (``cat.png`` + ``cat.txt``): pairs.

Relative image paths are relative to the list's own folder. Pairs feed the objectives that use
real data (DMD2's GAN term, adversarial distillation); every objective can use the prompts.
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..data import IMAGE_EXTENSIONS
from ..errors import UserError

TEXT_KEYS = ("prompt", "text", "caption")
IMAGE_KEYS = ("image", "file", "path")


@dataclass
class PromptSet:
    prompts: list[str]
    images: list[Path] | None     # one image per prompt for pairs, else None
    name: str                     # the spec

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for i, p in enumerate(self.prompts):
            h.update(p.encode() + b"\0")
            if self.images is not None:
                h.update(str(self.images[i]).encode() + b"\0")
        return h.hexdigest()[:16]


def _pick(row: dict, keys, where: str, what: str, required: bool = True):
    for k in keys:
        if k in row and row[k] not in (None, ""):
            return str(row[k])
    if required:
        raise UserError(f"{where}: no {what} field (expected one of {', '.join(keys)}); add it or fix the file")
    return None


def _read_csv(path: Path) -> tuple[list[str], list[Path] | None]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise UserError(f"{str(path)!r} has no rows below its header; add a 'prompt' column with one prompt per row")
    cols = set(rows[0])
    if not cols & set(TEXT_KEYS):
        raise UserError(f"{str(path)!r} has columns {sorted(cols)}; it needs a prompt column named one of "
                        f"{', '.join(TEXT_KEYS)}")
    prompts = [_pick(r, TEXT_KEYS, f"{path} row {i + 2}", "prompt") for i, r in enumerate(rows)]
    has_img = bool(cols & set(IMAGE_KEYS))
    images = [path.parent / _pick(r, IMAGE_KEYS, f"{path} row {i + 2}", "image") for i, r in enumerate(rows)] \
        if has_img else None
    return prompts, images


def _read_jsonl(path: Path) -> tuple[list[str], list[Path] | None]:
    prompts, images = [], []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{str(path)!r} line {i + 1} is not JSON ({err}); one object per line, e.g. "
                            '{"prompt": "a red fox"}') from None
        if not isinstance(row, dict):
            raise UserError(f"{str(path)!r} line {i + 1} is not a JSON object")
        prompts.append(_pick(row, TEXT_KEYS, f"{path} line {i + 1}", "prompt"))
        img = _pick(row, IMAGE_KEYS, f"{path} line {i + 1}", "image", required=False)
        images.append(None if img is None else path.parent / img)
    have = [im is not None for im in images]
    if any(have) and not all(have):
        raise UserError(f"{str(path)!r}: {have.count(False)} of {len(have)} lines have no image; give every line "
                        "an image (pairs) or none (a prompt list)")
    return prompts, (images if all(have) and images else None)


def _read_folder(root: Path) -> tuple[list[str], list[Path]]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UserError(f"{str(root)!r} holds no images; image-text pairs are images with same-name .txt captions")
    missing = [p for p in files if not p.with_suffix(".txt").is_file()]
    if missing:
        raise UserError(f"{len(missing)} of {len(files)} images in {str(root)!r} have no caption file (e.g. "
                        f"{str(missing[0].with_suffix('.txt'))!r}); write one .txt per image")
    return [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in files], files


def read_prompts(spec: str) -> PromptSet:
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"prompt data {spec!r} does not exist; for a text-to-image teacher, data is a prompt list "
                        "(.txt, .csv, .jsonl) or image-text pairs (a folder of images with .txt captions, or .jsonl)")
    images = None
    if path.is_dir():
        prompts, images = _read_folder(path)
    elif path.suffix == ".txt":
        prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    elif path.suffix == ".csv":
        prompts, images = _read_csv(path)
    elif path.suffix in (".jsonl", ".json"):
        prompts, images = _read_jsonl(path)
    else:
        raise UserError(f"prompt data {spec!r} has an unknown type {path.suffix!r}; use .txt, .csv, .jsonl or a folder")
    if not prompts:
        raise UserError(f"prompt data {spec!r} holds no prompts")
    if images is not None:
        gone = [p for p in images if not p.is_file()]
        if gone:
            raise UserError(f"{len(gone)} images named in {spec!r} do not exist (e.g. {str(gone[0])!r}); fix the paths "
                            "(relative paths are relative to the list's folder)")
    return PromptSet(prompts, images, str(spec))


__all__ = ["PromptSet", "read_prompts"]
