"""What ``stepdistill eval MODEL`` can score, behind one function: ``load_source(path)``.

A source is either a fixed set of images (a folder, an ``.npz``, a dataset spec: no generation) or
something that generates from noise in a given number of steps (a teacher folder; run folders and
exported pipelines through ``stepdistill.models.load_for_sampling`` where that module exists).
Supporting a new kind of model is one more loader in ``LOADERS``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError


@dataclass
class Source:
    name: str
    kind: str                                   # "images" or "generator"
    images: torch.Tensor | None = None          # uint8 NCHW, for kind == "images"
    labels: torch.Tensor | None = None
    # (steps) -> generate_fn(noise, labels) -> float images in [-1, 1]
    sampler_for: Callable[[int], Callable] | None = None
    sample_shape: tuple[int, int, int] | None = None
    num_classes: int = 0
    info: dict = field(default_factory=dict)


def _is_image_set(path: Path) -> bool:
    from ..data import IMAGE_EXTENSIONS

    if path.suffix == ".npz" or str(path).startswith("digits"):
        return True
    if _is_run_dir(path):  # a training run holds preview PNGs but is a model, not an image set
        return False
    return path.is_dir() and not any((path / f).exists() for f in
                                     ("stepdistill.json", "model_index.json", "unet", "config.json")) \
        and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*"))


def _is_run_dir(path: Path) -> bool:
    try:
        from ..train.run import is_run_dir
    except ImportError:
        return False
    return bool(is_run_dir(path))


def _load_images(path: Path) -> Source | None:
    if not _is_image_set(path):
        return None
    from ..data import load_images
    from ..images import to_uint8

    ds = load_images(str(path))
    return Source(str(path), "images", images=to_uint8(ds.images), labels=ds.labels,
                  num_classes=ds.num_classes, info={"dataset_sha256": ds.sha256})


def _denoiser_source(den, path: Path, sampler: str, guidance: float) -> Source:
    from ..sampling import nfe, sample

    meta = dict(getattr(den, "meta", {}) or {})
    num_classes = int(meta.get("num_classes") or 0) if meta.get("null_class") is not None or \
        meta.get("kind") == "class-conditional" else 0

    def sampler_for(steps: int):
        def generate(noise, labels):
            cond = None if labels is None else {"class_labels": labels.to(noise.device)}
            return sample(den, noise, steps, sampler=sampler, cond=cond, guidance=guidance)
        generate.nfe = nfe(sampler, steps)
        return generate

    size = meta.get("sample_size")
    size = (size, size) if isinstance(size, int) else tuple(size)
    return Source(str(path), "generator", sampler_for=sampler_for,
                  sample_shape=(int(meta.get("in_channels", 3)), *size), num_classes=num_classes,
                  info={"sampler": sampler, "guidance": guidance})


def _model_source(model, path: Path, sampler: str, guidance: float) -> Source:
    from ..sampling import nfe

    def sampler_for(steps: int):
        def generate(noise, labels):
            return model.generate(noise, model.make_cond(labels), steps, sampler=sampler, guidance=guidance)
        generate.nfe = nfe(sampler, steps) if sampler in getattr(model, "samplers", ()) else steps
        return generate

    return Source(str(path), "generator", sampler_for=sampler_for, sample_shape=tuple(model.shape),
                  num_classes=int(model.num_classes), info={"sampler": sampler, "guidance": guidance,
                                                            "model_type": type(model).__name__})


def _load_via_models(path: Path, sampler: str, guidance: float) -> Source | None:
    try:
        models = importlib.import_module("stepdistill.models")
    except ModuleNotFoundError:
        return None
    fn = getattr(models, "load_for_sampling", None)
    if fn is None:
        return None
    obj = fn(str(path))
    if hasattr(obj, "generate"):   # .generate(noise, cond, steps, sampler=, guidance=)
        return _model_source(obj, path, sampler, guidance)
    if hasattr(obj, "schedule"):   # a bare denoiser: sample it like a teacher
        return _denoiser_source(obj, path, sampler, guidance)
    raise UserError(f"{str(path)!r} loaded as {type(obj).__name__}, which eval cannot sample yet; "
                    "evaluate its teacher folder or a folder of its images instead")


def _load_teacher(path: Path, sampler: str, guidance: float) -> Source | None:
    if not (path / "stepdistill.json").is_file() and not (path / "model_index.json").is_file():
        return None
    from ..teachers import load_teacher

    return _denoiser_source(load_teacher(str(path)), path, sampler, guidance)


LOADERS = [
    lambda p, s, g: _load_images(p),
    _load_via_models,
    _load_teacher,
]


def load_source(path: str, *, sampler: str = "ddim", guidance: float = 1.0) -> Source:
    p = Path(path)
    if not p.exists() and not str(path).startswith("digits"):
        raise UserError(f"model {path!r} does not exist; pass a teacher folder, a run folder, an "
                        "exported pipeline or a folder/.npz of images")
    for loader in LOADERS:
        src = loader(p, sampler, guidance)
        if src is not None:
            return src
    raise UserError(f"{path!r} is neither a teacher folder (stepdistill.json), a diffusers pipeline "
                    "(model_index.json) nor a folder/.npz of images; pass one of those")
