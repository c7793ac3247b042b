"""A teacher-output cache: noise -> image pairs (and optionally whole trajectories) produced once
by a teacher sampler and reused by any objective (DMD's regression loss, Yin et al., 2024, sec. 3.3;
trajectory-based objectives).

Layout of a cache folder::

    manifest.json            teacher hash, sampler, steps, guidance, seed, count, shape, shards, grid
    shard-00000.safetensors  noise [n,C,H,W], x0 [n,C,H,W], cond.<key> [n,...], trajectory [n,S+1,C,H,W]

Samples are written in shards as they are produced and the manifest last, into a temporary
folder renamed into place, so an interrupted build leaves nothing that looks complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .denoisers import Denoiser
from .errors import UserError

MANIFEST = "manifest.json"
FORMAT = 1


def teacher_hash(teacher: Denoiser) -> str:
    """sha256 over the teacher's weights (names, shapes, dtypes, bytes); adapter weights excluded."""
    h = hashlib.sha256()
    for name, t in sorted(teacher.state_dict().items()):
        if "lora_" in name:
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _labels(teacher: Denoiser, num: int):
    meta = dict(getattr(teacher, "meta", None) or {})
    classes = meta.get("num_classes")
    if not classes or getattr(teacher, "null_class", None) is None:
        return None
    return torch.arange(num) % int(classes)  # balanced classes, deterministic


@dataclass(frozen=True)
class CachePrompts:
    """A text-to-image run's training prompts as a teacher-output cache pairs them with noise:
    ``rows(idx)`` gives the cached text embeddings of prompts idx, ``count`` how many there are,
    ``id`` their sha256 (a cache made for other prompts is refused)."""

    rows: Callable[[torch.Tensor], dict]
    count: int
    id: str


def _conds(prompts: CachePrompts | None, labels, i: int, n: int, device):
    """The conditions of pairs i..i+n: balanced class labels, or for text-to-image teachers the
    training prompts' cached embeddings in order, cycled."""
    if prompts is not None:
        return {k: v.to(device) for k, v in prompts.rows(torch.arange(i, i + n) % prompts.count).items()}
    return None if labels is None else {"class_labels": labels[i:i + n].to(device)}


def own_grid(schedule, steps: int) -> torch.Tensor:
    """The schedule's `steps`-step grid, clean end included. EDM: as a K-step student's grid
    (``export.scheduler.student_timesteps``), the first `steps` points of the (steps + 1)-point
    Karras grid, then 0: no step is spent at sigma_min (where D(x) = x), and the grid holds every
    K-step student's sigmas where K divides `steps` (Karras grids nest when their interval counts do)."""
    if getattr(schedule, "kind", None) == "edm":
        from .objectives.common import student_grid  # the one rule for EDM's K-step grids

        return student_grid(schedule, int(steps)).to(torch.float64).cpu()
    return schedule.timesteps(int(steps)).to(torch.float64).cpu()


def trajectory_grid(schedule, steps: int, hold=None) -> torch.Tensor:
    """The grid a trajectory cache samples on: the schedule's own `steps`-step grid (``own_grid``), with
    the times in `hold` (a multi-step student's timesteps) added where it lacks them. VP's trailing
    grids and EDM's (``own_grid``) nest, so there a grid of a multiple of the student's steps already
    holds them and nothing is added; the flow grid (which ends at sigma 1/1000) does not nest."""
    grid = own_grid(schedule, steps)
    if hold is None:
        return grid
    hold = torch.as_tensor(hold, dtype=torch.float64).reshape(-1).cpu()
    new = hold[~torch.isclose(hold[:, None], grid[None, :], rtol=1e-9, atol=1e-9).any(1)]
    return torch.cat([grid, new]).unique().flip(0) if len(new) else grid


def build_cache(teacher: Denoiser, out_dir, num: int, steps: int, sampler: str = "ddim", guidance: float = 1.0,
                seed: int = 0, batch: int = 256, *, trajectory: bool = False, shape=None,
                prompts: CachePrompts | None = None, progress: bool = False, grid=None) -> Path:
    """Sample `num` teacher pairs in `steps` steps of `sampler` (CFG `guidance`) from noise seeded by
    `seed`, and write them to `out_dir` (which must not exist yet); ``grid``: the descending times to
    sample on (``trajectory_grid``; default the schedule's `steps`-step grid); ``progress``: report
    count, rate and ETA (``stepdistill.progress``)."""
    from safetensors.torch import save_file

    from .progress import Counter

    from .fake_score import sample_shape
    from .sampling import get_sampler, sample

    out = Path(out_dir)
    if out.exists():
        raise UserError(f"cache folder {str(out)!r} already exists; choose a new folder or delete it")
    if num < 1 or steps < 1 or batch < 1:
        raise UserError(f"build_cache needs num, steps and batch >= 1 (got {num}, {steps}, {batch})")
    get_sampler(sampler)
    shape = tuple(shape or sample_shape(teacher))
    device = next(teacher.parameters()).device if any(True for _ in teacher.parameters()) else torch.device("cpu")
    gen = torch.Generator().manual_seed(int(seed))
    labels = _labels(teacher, num)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    shards = []
    ts = teacher.schedule.timesteps(int(steps)) if grid is None else torch.as_tensor(grid, dtype=torch.float64)
    grid_list = [float(t) for t in ts] if trajectory else None  # the float64 times (a student's own among them)
    try:
        with Counter("teacher-output cache", num, "pairs", enabled=progress) as bar:
            for s, i in enumerate(range(0, num, batch)):
                n = min(batch, num - i)
                noise = torch.randn((n, *shape), generator=gen)
                cond = _conds(prompts, labels, i, n, device)
                res = sample(teacher, noise.to(device), steps, sampler=sampler, cond=cond, guidance=guidance,
                             generator=gen, return_trajectory=trajectory, ts=ts)
                x0, traj = (res if trajectory else (res, None))
                tensors = {"noise": noise, "x0": x0.float().cpu()}
                if cond is not None:
                    tensors.update({f"cond.{k}": v.cpu() for k, v in cond.items()})
                if traj is not None:
                    tensors["trajectory"] = torch.stack([st.float().cpu() for st in traj.states], 1)
                name = f"shard-{s:05d}.safetensors"
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / name))
                shards.append(name)
                bar.advance(n)
        manifest = {"format": FORMAT, "teacher_hash": teacher_hash(teacher), "sampler": sampler, "steps": int(steps),
                    "guidance": float(guidance), "seed": int(seed), "num": int(num), "shape": list(shape),
                    "trajectory": bool(trajectory), "grid": grid_list, "shards": shards,
                    "cond_keys": sorted(cond) if cond is not None else [],
                    "prompts": None if prompts is None else prompts.id}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@dataclass
class TeacherPairs:
    """A loaded cache, held in memory: ``get(idx)`` -> (noise, x0, cond)."""

    manifest: dict
    noise: torch.Tensor
    x0: torch.Tensor
    cond: dict
    trajectory: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.noise.shape[0]

    def get(self, idx: torch.Tensor, device=None):
        cond = {k: v[idx].to(device) for k, v in self.cond.items()} or None
        return self.noise[idx].to(device), self.x0[idx].to(device), cond

    def grid_index(self, times: torch.Tensor) -> torch.Tensor:
        """Positions of `times` on the trajectories' grid; a UserError names the times it lacks."""
        if self.trajectory is None:
            raise UserError("this teacher-output cache holds no trajectories; build it with trajectory=True in a "
                            "new folder")
        return grid_positions(torch.tensor(self.manifest["grid"], dtype=torch.float64), times, self.manifest["steps"],
                              "build the cache with a step count whose grid holds them (for a student's timesteps, "
                              "a multiple of its steps)")

    def states(self, idx: torch.Tensor, pos: torch.Tensor, device=None) -> torch.Tensor:
        """x on trajectory idx[i] at its grid position pos[i]."""
        return self.trajectory[idx.cpu(), pos.cpu()].to(device)


def read_manifest(path) -> dict | None:
    f = Path(path) / MANIFEST
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{str(f)!r} is not valid JSON ({err}); delete the cache folder and rebuild it") from None


def load_cache(path, teacher: Denoiser | None = None) -> TeacherPairs:
    """Load a cache folder; with `teacher`, refuse a cache built by different weights."""
    from safetensors.torch import load_file

    m = read_manifest(path)
    if m is None:
        raise UserError(f"{str(path)!r} is not a teacher-output cache (no {MANIFEST}); build one with "
                        "stepdistill.cache.build_cache")
    if teacher is not None and m["teacher_hash"] != teacher_hash(teacher):
        raise UserError(f"cache {str(path)!r} was built by another teacher (hash {m['teacher_hash']}); rebuild it "
                        "for this teacher in a new folder")
    parts: dict[str, list] = {}
    for name in m["shards"]:
        for k, v in load_file(str(Path(path) / name)).items():
            parts.setdefault(k, []).append(v)
    cat = {k: torch.cat(v) for k, v in parts.items()}
    cond = {k[5:]: v for k, v in cat.items() if k.startswith("cond.")}
    return TeacherPairs(m, cat["noise"], cat["x0"], cond, cat.get("trajectory"))


def check_cache_settings(path, *, num: int, steps: int, sampler: str = "ddim", guidance: float = 1.0,
                         seed: int = 0, prompts: str | None = None, trajectory: bool = False,
                         grid=None) -> dict | None:
    """The manifest at `path` if it matches these settings (trajectories on `grid`, where given), None
    if there is no cache yet; a UserError naming each difference otherwise."""
    p = Path(path)
    m = read_manifest(p)
    if m is None:
        if p.exists() and (not p.is_dir() or any(p.iterdir())):
            raise UserError(f"{str(p)!r} exists but is not a teacher-output cache; choose another objective.cache")
        return None
    want = {"sampler": sampler, "steps": int(steps), "guidance": float(guidance), "seed": int(seed)}
    if prompts is not None:  # text-to-image: pairs made for other prompts are refused too
        want["prompts"] = prompts
    diff = {k: (m.get(k), v) for k, v in want.items() if m.get(k) != v}
    if m.get("num", 0) < num:
        diff["num"] = (m.get("num"), num)
    if trajectory and not m.get("trajectory"):
        diff["trajectory"] = (False, True)
    if trajectory and grid is not None and m.get("trajectory"):
        want_grid = [round(float(t), 6) for t in grid]
        have = [round(float(t), 6) for t in m.get("grid") or []]
        if have != want_grid:
            only = sorted(set(want_grid) ^ set(have), reverse=True)
            diff["grid"] = (f"{len(have)} times", f"{len(want_grid)} times; they differ at {only[:6]}")
    if diff:
        said = ", ".join(f"{k}: cache {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise UserError(f"cache {str(p)!r} was built with other settings ({said}); point objective.cache at a "
                        "new folder or match the settings")
    return m


def grid_positions(grid: torch.Tensor, times, steps: int, fix: str) -> torch.Tensor:
    """Positions of `times` on a trajectory grid (of `steps` steps); a UserError names the times it
    lacks and `fix`."""
    times = torch.as_tensor(times, dtype=torch.float64).reshape(-1).cpu()
    hit = torch.isclose(times[:, None], grid.to(torch.float64).cpu()[None, :], rtol=1e-9, atol=1e-9)
    if not bool(hit.any(1).all()):
        missing = sorted({float(t) for t in times[~hit.any(1)]})
        raise UserError(f"the cache's {int(steps)}-step grid lacks the times {missing}; {fix}")
    return hit.float().argmax(1)


def ensure_cache(teacher: Denoiser, path, *, num: int, steps: int, sampler: str = "ddim", guidance: float = 1.0,
                 seed: int = 0, batch: int = 256, trajectory: bool = False, prompts: CachePrompts | None = None,
                 log=None, grid=None) -> TeacherPairs:
    """Load the cache at `path` if it matches these settings, this teacher and these prompts (with
    trajectories on `grid`, where asked); build it if absent (saying so through ``log``)."""
    if check_cache_settings(path, num=num, steps=steps, sampler=sampler, guidance=guidance, seed=seed,
                            prompts=None if prompts is None else prompts.id, trajectory=trajectory,
                            grid=grid) is None:
        if Path(path).exists():
            Path(path).rmdir()  # an empty folder
        if log is not None:
            log(f"teacher-output cache: sampling {num} pairs ({sampler}, {steps} steps) into {path}")
        build_cache(teacher, path, num, steps, sampler, guidance, seed, batch, trajectory=trajectory, prompts=prompts,
                    progress=log is not None, grid=grid)
    return load_cache(path, teacher)


__all__ = ["own_grid", "trajectory_grid", "build_cache", "load_cache", "ensure_cache", "check_cache_settings", "teacher_hash",
           "TeacherPairs", "CachePrompts", "MANIFEST"]
