"""An image folder read image by image as batches ask for it, for folders too large to hold in
memory: with ``data_workers`` > 0 the trainer's DataLoader workers read and decode in parallel
(``train.batches``). Same folder rules as ``data.load_images``: images searched recursively, labels
from first-level subfolders when every image lies in one and there are at least two; every image
must have the first one's size and mode (checked as it is read).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .data import IMAGE_EXTENSIONS, _read_image
from .errors import UserError
from .images import from_uint8


def hash_files(h, named_files) -> str:
    """``h`` (a sha256 already salted) updated with each (name, path): the name, then the file's
    bytes read in chunks, never decoded."""
    for name, path in named_files:
        h.update(name.encode() + b"\0")
        with Path(path).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h


class LazyImages:
    """The ``data.ImageSet`` interface (``len``, ``rows``, ``labels``, ``sample_shape``, ...) over images
    decoded one by one as ``rows`` asks for them. Subclasses set ``name``, ``labels``, ``class_names``,
    ``_shape`` (H, W, C of the first image) and implement ``_array(i)`` (uint8 [H, W, C]) and
    ``_where(i)`` (how an error names image i)."""

    labels: torch.Tensor | None
    class_names: list[str] | None

    @property
    def channels(self) -> int:
        return int(self._shape[2])

    @property
    def size(self) -> tuple[int, int]:
        return int(self._shape[0]), int(self._shape[1])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.channels, *self.size)

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else 0

    def _u8(self, idx) -> torch.Tensor:
        """uint8 [n, C, H, W] of those rows; every image must have the first one's shape."""
        arrays = []
        for i in idx:
            a = self._array(i)
            if tuple(a.shape) != self._shape:
                raise UserError(f"images in {self.name!r} differ: {self._where(0)} is {self._shape} (H, W, C) "
                                f"but {self._where(i)} is {tuple(a.shape)}; resize/convert them to one size "
                                "and mode")
            arrays.append(torch.from_numpy(a.copy()))
        return torch.stack(arrays).permute(0, 3, 1, 2).contiguous()

    def rows(self, idx) -> tuple[torch.Tensor, dict | None]:
        """(images as float32 [n, C, H, W] in [-1, 1], condition) of those rows, read from disk."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        x = from_uint8(self._u8(idx.tolist()))
        return x, None if self.labels is None else {"class_labels": self.labels[idx]}


class FolderImages(LazyImages):
    """An image folder, file by file."""

    def __init__(self, root: str | Path):
        root = Path(root)
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.files:
            raise UserError(f"folder {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                            "point the data spec at a folder of images, an .npz file or 'digits'")
        self.name, self.root = str(root), root
        rel = [p.relative_to(root).parts for p in self.files]
        self.labels, self.class_names = None, None
        names = sorted({parts[0] for parts in rel}) if all(len(parts) >= 2 for parts in rel) else []
        if len(names) >= 2:
            index = {n: i for i, n in enumerate(names)}
            self.labels = torch.tensor([index[parts[0]] for parts in rel], dtype=torch.int64)
            self.class_names = names
        first = _read_image(self.files[0])
        self._shape = tuple(first.shape)  # H, W, C
        self.sha256 = self._hash(rel)

    def _hash(self, rel) -> str:
        """Identity of the set: relative paths, file bytes and labels (the files are read once, in
        chunks, never decoded; a changed image or label changes it)."""
        named = (("/".join(parts), p) for parts, p in zip(rel, self.files))
        h = hash_files(hashlib.sha256(b"stepdistill-folder-v1"), named)
        if self.labels is not None:
            h.update(self.labels.numpy().tobytes())
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self.files)

    def _array(self, i: int):
        return _read_image(self.files[i])

    def _where(self, i: int) -> str:
        return repr(str(self.files[i]))


__all__ = ["FolderImages", "LazyImages", "hash_files"]
