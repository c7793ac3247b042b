"""What ``stepdistill eval MODEL`` can score, behind one function: ``load_source(path)``.

A source is either a fixed set of images (a folder, an ``.npz``, a dataset spec: no generation) or
something that generates from noise in a given number of steps: whatever
``stepdistill.loaders.load_for_sampling`` loads (a teacher folder, a run folder, an exported
pipeline). Supporting a new kind of model is one more branch there.
"""
from __future__ import annotations

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
    default_steps: tuple[int, ...] = (1, 2, 4, 50)  # a student: its trained step count
    prompts: list[str] | None = None            # text-to-image: sample i uses prompts[label i]


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
    from ..loaders import is_run_dir

    return bool(is_run_dir(path))


def _load_images(path: Path) -> Source | None:
    if not _is_image_set(path):
        return None
    from ..data import load_images
    from ..images import to_uint8

    ds = load_images(str(path))
    return Source(str(path), "images", images=to_uint8(ds.images), labels=ds.labels,
                  num_classes=ds.num_classes, info={"dataset_sha256": ds.sha256})


def _model_source(model, path: Path, sampler: str, guidance: float, prompts: list[str] | None = None) -> Source:
    from ..sampling import nfe

    text = None
    if model.is_text_to_image:
        if not prompts:
            raise UserError(f"{str(path)!r} is a text-to-image model; give the prompts to sample with: --prompts FILE "
                            "(.txt, .csv or .jsonl)")
        text = model.text_cond(prompts)  # once, by the pipeline's own encoders, which are then freed
    elif prompts:
        raise UserError("--prompts applies to text-to-image models; this one is class-conditional or unconditional")

    def sampler_for(steps: int):
        def generate(noise, labels):
            # text-to-image: the "labels" are prompt indices (balanced over the prompts, cycled)
            cond = {k: v[labels.cpu()].to(noise.device) for k, v in text.items()} if text is not None \
                else model.make_cond(labels)
            return model.to_pixels(model.generate(noise, cond, steps, sampler=sampler, guidance=guidance))
        generate.nfe = nfe(sampler, steps) if sampler in getattr(model, "samplers", ()) else steps
        return generate

    trained = model.meta.get("steps")
    info = {"sampler": sampler, "guidance": guidance, "model_type": type(model).__name__}
    if text is not None:
        import hashlib

        info["prompts_sha256"] = hashlib.sha256("\0".join(prompts).encode()).hexdigest()[:16]
        info["resolution"] = model.meta.get("resolution")
    shape = tuple(model.shape)
    return Source(str(path), "generator", sampler_for=sampler_for, sample_shape=shape,
                  num_classes=len(prompts) if text is not None else int(model.num_classes), info=info,
                  default_steps=(int(trained),) if trained else Source.default_steps, prompts=prompts if text else None)


def _load_model(path: Path, sampler: str, guidance: float, prompts=None, resolution=None, ema=True) -> Source:
    from ..loaders import load_for_sampling

    return _model_source(load_for_sampling(str(path), resolution=resolution, ema=ema), path, sampler, guidance,
                         prompts)


def load_source(path: str, *, sampler: str = "ddim", guidance: float = 1.0, prompts: list[str] | None = None,
                resolution: int | None = None, ema: bool = True) -> Source:
    from ..resources import teacher

    path = teacher(path)  # a shipped teacher by name (digits16_edm), not the digits data specs
    p = Path(path)
    if not p.exists() and not str(path).startswith("digits"):
        raise UserError(f"model {path!r} does not exist; pass a teacher folder, a run folder, an "
                        "exported pipeline or a folder/.npz of images")
    return _load_images(p) or _load_model(p, sampler, guidance, prompts, resolution, ema)
