"""Images in and out: float [-1, 1] <-> uint8, and PNG grids.

``to_uint8`` is the one quantisation used everywhere (PNG grids, ``.npz`` sample files, the
eval harness), so what is scored is bit-for-bit what is saved.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .fsutil import atomic_file


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float NCHW in [-1, 1] -> uint8 NCHW: ``((x + 1) * 127.5).round().clamp(0, 255)``.

    Values outside [-1, 1] are clipped. A uint8 input is returned unchanged.
    """
    if x.dtype == torch.uint8:
        return x
    return ((x.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [-1, 1], the inverse of ``to_uint8`` on the uint8 grid."""
    return x.float() / 127.5 - 1.0


def make_grid(x: torch.Tensor, nrow: int, padding: int = 1, pad_value: int = 0) -> np.ndarray:
    """A uint8 HxWxC array tiling the NCHW batch ``nrow`` images per row."""
    x = to_uint8(x).cpu()
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1|3, H, W], got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    nrow = max(1, min(int(nrow), n))
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value, np.uint8)
    arr = x.permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, col = divmod(i, nrow)
        y0, x0 = padding + r * (h + padding), padding + col * (w + padding)
        grid[y0:y0 + h, x0:x0 + w] = arr[i]
    return grid


def save_grid(x: torch.Tensor, path: str | os.PathLike, nrow: int = 8, *, min_size: int = 64,
              padding: int = 2, pad_value: int = 96) -> Path:
    """Save a batch (float in [-1, 1] or uint8, NCHW, 1 or 3 channels) as one PNG grid.

    Images smaller than ``min_size`` pixels are upscaled by an integer factor with nearest
    neighbour (each pixel becomes a block; nothing is interpolated), so 16x16 samples stay
    visible; a grey border separates the tiles. Written atomically: a temporary file in the same folder, then renamed.
    """
    from PIL import Image

    x = to_uint8(x)
    scale = max(1, -(-int(min_size) // max(int(x.shape[-1]), 1)))
    if scale > 1:
        x = x.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
    grid = make_grid(x, nrow, padding=padding, pad_value=pad_value)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    return _atomic_save(img, Path(path))


def image_format(path: str | os.PathLike) -> str:
    """The PIL format a file name's suffix names (``.png`` -> PNG, ``.jpg`` -> JPEG), or one clear error."""
    from PIL import Image

    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise UserError(f"{str(path)!r}: {Path(path).suffix or 'no suffix'} is not an image format this can write; "
                        "name the file .png (lossless) or .jpg")
    return fmt


def _atomic_save(img, path: Path) -> Path:
    fmt = image_format(path)  # the bytes match the suffix: a .jpg holds JPEG, not PNG
    with atomic_file(path) as f:
        img.save(f, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return path


__all__ = ["to_uint8", "from_uint8", "make_grid", "save_grid", "image_format"]
