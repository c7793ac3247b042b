"""Atomic checkpoints of a run: ``checkpoints/step-00000100/``.

A checkpoint is written into ``checkpoints/.tmp-step-.../`` and becomes visible only through one
``os.replace``; a run killed mid-write leaves a temp folder that the next start deletes, and the
last complete checkpoint stays the newest. Contents (the teacher is not saved, only its path):

  nets.safetensors      every network but the teacher (a LoRA student: only its adapters)
  ema.safetensors       the student's EMA weights
  optim.pt              optimizer, LR-scheduler and grad-scaler states, objective state
                        (tensors and numbers only; loaded with ``weights_only=True``)
  rng-rank{r}.pt/.json  torch (CPU, CUDA) / numpy / python generator states of each process
  trainer.json          step, draw counter, update counts, skip counters, EMA scalars, teacher path
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PATTERN = re.compile(r"^step-(\d{8})$")
TMP_PREFIX = ".tmp-"


def folder_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (temp folders are never listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and PATTERN.match(p.name) and (p / "trainer.json").is_file()]
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))


def latest(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def clean_partial(run_dir: str | os.PathLike) -> list[Path]:
    """Delete leftovers of interrupted writes; returns what was removed."""
    root = Path(run_dir) / "checkpoints"
    gone = [p for p in root.glob(TMP_PREFIX + "*")] if root.is_dir() else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def temp_folder(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{TMP_PREFIX}{folder_name(step)}"


def commit(tmp: Path, keep: int) -> Path:
    """Make a fully written temp folder the checkpoint (atomic rename), then prune to `keep`."""
    final = tmp.parent / tmp.name[len(TMP_PREFIX):]
    if final.exists():  # same step written again (e.g. a rerun of a finished run): swap atomically
        old = tmp.parent / f"{TMP_PREFIX}old-{final.name}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for old in list_checkpoints(tmp.parent.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


# -- tensors ------------------------------------------------------------------------------------
def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def save_torch(obj, path: Path) -> None:
    torch.save(obj, path)


def load_torch(path: Path):
    """Optimizer/scheduler states: tensors and plain values only; nothing executable is unpickled."""
    return torch.load(path, map_location="cpu", weights_only=True)


def write_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path: Path):
    return json.loads(path.read_text())


# -- generator states -----------------------------------------------------------------------------
def save_rng(folder: Path, rank: int) -> None:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    save_torch(state, folder / f"rng-rank{rank}.pt")
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    write_json({"numpy": [name, keys.tolist(), pos, has_gauss, gauss],
                "python": [version, list(py_state), py_gauss]}, folder / f"rng-rank{rank}.json")


def load_rng(folder: Path, rank: int) -> bool:
    """Restore this process's generators (rank 0's when the checkpoint had fewer processes)."""
    r = rank if (folder / f"rng-rank{rank}.pt").is_file() else 0
    state = load_torch(folder / f"rng-rank{r}.pt")
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    js = read_json(folder / f"rng-rank{r}.json")
    name, keys, pos, has_gauss, gauss = js["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = js["python"]
    random.setstate((version, tuple(py_state), py_gauss))
    return r == rank
