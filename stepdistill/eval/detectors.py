"""Detectors: networks that turn uint8 NCHW images into float features (and, for classifiers, logits).

Every detector takes images exactly as they would be saved (uint8, NCHW, 1 or 3 channels) and owns
its own resize and normalisation, so a number depends only on the images and on the detector's
protocol (name, weights hash, resize method, input size), which ``protocol()`` reports.

Resize follows clean-fid's default ("clean" mode, Parmar et al., 2022): each channel is resized as a
float32 PIL image with bicubic filtering and clipped to [0, 255], without re-quantising, before the
network's own normalisation.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import UserError

CLEAN_RESIZE = "clean-fid: PIL bicubic on float32 channels, clipped to [0, 255], not re-quantised"


def clean_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 NCHW -> float32 NCHW in [0, 255] at ``size`` x ``size`` (clean-fid's resize); images
    already at that size are converted without interpolation."""
    x = images.detach().cpu()
    if x.shape[-2:] == (size, size):
        return x.float()
    from PIL import Image

    arr = x.numpy().astype(np.float32)
    out = np.empty((*arr.shape[:2], size, size), np.float32)
    for i in range(arr.shape[0]):
        for c in range(arr.shape[1]):
            img = Image.fromarray(arr[i, c], mode="F").resize((size, size), resample=Image.BICUBIC)
            out[i, c] = np.asarray(img).clip(0, 255)
    return torch.from_numpy(out)


def check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 \
            or images.shape[1] not in (1, 3):
        got = getattr(images, "dtype", type(images).__name__), tuple(getattr(images, "shape", ()))
        raise UserError(f"detectors take uint8 images [N, 1|3, H, W], got {got}; quantise with "
                        "stepdistill.images.to_uint8 first")
    return images


@functools.lru_cache(maxsize=None)
def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Detector(nn.Module):
    """Base: ``extract(uint8 images) -> {"features": float32 [N, dim], "logits": ... (classifiers)}``.

    Subclasses set ``name``, ``dim``, ``image_size``, ``resize``, ``weights_sha256`` and
    ``num_classes`` (None unless the detector classifies), and implement ``_extract``.
    """

    name: str = "detector"
    dim: int = 0
    image_size: int | None = None
    resize: str = CLEAN_RESIZE
    weights_sha256: str = ""
    num_classes: int | None = None

    @torch.inference_mode()
    def extract(self, images: torch.Tensor, batch_size: int = 64, progress: str | None = None) -> dict[str, torch.Tensor]:
        """Features (and logits, where the detector classifies) of uint8 images; ``progress``: a label
        under which to report count, rate and ETA (``stepdistill.progress``), None = silent."""
        from ..progress import Counter

        check_images(images)
        outs: dict[str, list] = {}
        with Counter(progress or "", len(images), "images", enabled=progress is not None) as bar:
            for i in range(0, len(images), batch_size):
                for k, v in self._extract(images[i:i + batch_size]).items():
                    outs.setdefault(k, []).append(v.float().cpu())
                bar.advance(min(batch_size, len(images) - i))
        return {k: torch.cat(v) for k, v in outs.items()}

    def features(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        return self.extract(images, batch_size)["features"]

    def _extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def protocol(self) -> dict:
        """What a number measured with this detector depends on, besides the images."""
        return {"detector": self.name, "detector_weights_sha256": self.weights_sha256,
                "feature_dim": self.dim, "image_size": self.image_size, "resize": self.resize}


def _build(name: str, weights: str | None, device: str) -> Detector:
    kind, _, arg = name.partition(":")
    if kind == "inception":
        from .inception import InceptionDetector
        det = InceptionDetector(weights)
    elif kind == "digits":
        from .digits_detector import DigitsDetector
        det = DigitsDetector.from_file(weights)
    elif kind == "clip":
        from .clip import CLIPDetector
        det = CLIPDetector(arg or weights or "openai/clip-vit-base-patch32")
    else:
        raise UserError(f"unknown detector {name!r}; choose one of: {', '.join(DETECTORS)} "
                        "(clip:PATH_OR_HUB_NAME for a given CLIP model)")
    return det.to(device).eval()


DETECTORS = ["inception", "digits", "clip"]


@functools.lru_cache(maxsize=8)
def get_detector(name: str, weights: str | None = None, device: str = "cpu") -> Detector:
    """The detector called ``name`` ("inception", "digits", "clip" or "clip:PATH_OR_HUB_NAME"),
    built once per process and cached; ``weights`` overrides where its weights come from."""
    if weights is not None and not name.startswith("clip") and not Path(weights).exists():
        raise UserError(f"detector weights {weights!r} do not exist; pass an existing file")
    return _build(name, weights, str(device))
