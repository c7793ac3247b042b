"""Row stores on disk: named tensors split into safetensors shards, read lazily row by row.

Layout::

    folder/
      manifest.json            {"format", "count", "keys", "shard_rows", "shards", "fingerprint", ...}
      rows-00000.safetensors   key -> tensor [rows in shard, ...]
      extra.safetensors        (optional) tensors that are not per row, e.g. the null text condition

Written into a temporary sibling folder renamed into place (``fsutil.atomic_folder``), so an
interrupted build leaves nothing that looks complete. Reading memory-maps each shard with
``safe_open`` and slices only the rows a batch asks for, so caches larger than memory work.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..errors import UserError
from ..fsutil import atomic_folder

MANIFEST = "manifest.json"
FORMAT = 1
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def storage_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"cache dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def write_rows(folder: Path, batches: Iterable[dict[str, torch.Tensor]], fingerprint: dict, *, dtype: str = "fp32",
               shard_rows: int = 1024, extra: dict[str, torch.Tensor] | None = None,
               progress: Callable[[int], None] | None = None) -> Path:
    """Write every batch's rows (float tensors stored as ``dtype``) and the manifest, atomically."""
    from safetensors.torch import save_file

    store = storage_dtype(dtype)
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        pending: dict[str, list[torch.Tensor]] = {}
        shards, count, keys = [], 0, None

        def flush():
            nonlocal pending
            if not pending:
                return
            name = f"rows-{len(shards):05d}.safetensors"
            save_file({k: torch.cat(v).contiguous() for k, v in pending.items()}, str(tmp / name))
            shards.append({"file": name, "rows": int(sum(t.shape[0] for t in next(iter(pending.values()))))})
            pending = {}

        for b in batches:
            b = {k: (v.to(store) if v.is_floating_point() else v).cpu() for k, v in b.items()}
            if keys is None:
                keys = sorted(b)
            elif sorted(b) != keys:
                raise ValueError(f"rows changed keys: {sorted(b)} vs {keys}")
            for k in keys:
                pending.setdefault(k, []).append(b[k])
            count += next(iter(b.values())).shape[0]
            if progress is not None:
                progress(count)
            if sum(t.shape[0] for t in pending[keys[0]]) >= shard_rows:
                flush()
        flush()
        if extra:
            save_file({k: v.to(store).contiguous() if v.is_floating_point() else v.contiguous()
                       for k, v in extra.items()}, str(tmp / "extra.safetensors"))
        manifest = {"format": FORMAT, "count": count, "keys": keys or [], "dtype": dtype, "shards": shards,
                    "fingerprint": fingerprint}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return folder


def read_manifest(folder: Path) -> dict | None:
    p = Path(folder) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def check_fingerprint(folder: Path, want: dict, what: str) -> bool:
    """True when ``folder`` holds a complete store built with ``want``; False when there is none;
    a ``UserError`` naming the first differing field when it was built with other settings."""
    folder = Path(folder)
    if not folder.exists():
        return False
    man = read_manifest(folder)
    if man is None or man.get("format") != FORMAT:
        raise UserError(f"{what} folder {str(folder)!r} exists but is not a complete cache (no readable manifest); "
                        "delete it, or point the config at another folder")
    have = man.get("fingerprint", {})
    for k in sorted(set(want) | set(have)):
        if have.get(k) != want.get(k):
            raise UserError(f"{what} {str(folder)!r} was built with {k}={have.get(k)!r}, but this run needs "
                            f"{k}={want.get(k)!r}; delete the folder to rebuild it, or choose another folder")
    return True


class ShardedRows:
    """Lazy reader: ``rows(idx) -> {key: float32 tensor [len(idx), ...]}``; ``extra()``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        man = read_manifest(self.folder)
        if man is None:
            raise UserError(f"{str(self.folder)!r} is not a cache folder (no {MANIFEST})")
        self.manifest = man
        self.keys = list(man["keys"])
        self._starts, start = [], 0
        for s in man["shards"]:
            self._starts.append(start)
            start += int(s["rows"])
        self._count = start
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return self._count

    def _handle(self, s: int):
        if s not in self._open:
            from safetensors import safe_open

            self._open[s] = safe_open(str(self.folder / self.manifest["shards"][s]["file"]), framework="pt")
        return self._open[s]

    def rows(self, idx) -> dict[str, torch.Tensor]:
        import bisect

        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1).tolist()
        out: dict[str, list[torch.Tensor]] = {k: [] for k in self.keys}
        for i in idx:
            if not 0 <= i < self._count:
                raise IndexError(f"row {i} outside a cache of {self._count}")
            s = bisect.bisect_right(self._starts, i) - 1
            f, j = self._handle(s), i - self._starts[s]
            for k in self.keys:
                out[k].append(f.get_slice(k)[j:j + 1])
        cat = {k: torch.cat(v) for k, v in out.items()}
        return {k: v.float() if v.is_floating_point() else v for k, v in cat.items()}

    def extra(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        p = self.folder / "extra.safetensors"
        return {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(p)).items()} if p.is_file() else {}

    def __getstate__(self):  # handles are not picklable; reopen lazily
        return {**self.__dict__, "_open": {}}


__all__ = ["write_rows", "ShardedRows", "check_fingerprint", "read_manifest", "storage_dtype"]
