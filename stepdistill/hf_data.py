"""A Hugging Face ``datasets`` dataset saved with ``save_to_disk`` as training images, read row by row
from its memory-mapped Arrow files as batches ask for them (with ``data_workers`` > 0 the trainer's
DataLoader workers decode in parallel; ``train.batches``).

The images are the dataset's first ``datasets.Image`` column; labels and class names come from its
first ``ClassLabel`` column, if any. Every image must have the first one's size and mode (checked as
it is read). A ``DatasetDict`` folder (one subfolder per split) is refused with its splits named:
point ``data`` at the split's own folder.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .data import _make, image_array
from .disk_data import LazyImages, hash_files
from .errors import UserError


def is_hf_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    path = Path(path)
    return path.is_dir() and ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()
                              or (path / "dataset_dict.json").is_file())


class HFDiskImages(LazyImages):
    """A saved dataset, row by row (``disk_data.LazyImages``)."""

    def __init__(self, root: str | Path):
        root = Path(root)
        if (root / "dataset_dict.json").is_file():
            splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
            raise UserError(f"{str(root)!r} is a DatasetDict with splits {splits}; point data at one split's folder, "
                            f"e.g. {str(root / (splits[0] if splits else 'train'))!r}")
        try:
            import datasets
        except ImportError:
            raise UserError(f"{str(root)!r} is a Hugging Face dataset; install the datasets package "
                            "(pip install 'stepdistill[datasets]') to read it") from None
        self.name, self.root = str(root), root
        self.ds = datasets.load_from_disk(str(root))
        feats = self.ds.features
        images = [k for k, f in feats.items() if isinstance(f, datasets.Image)]
        if not images:
            raise UserError(f"dataset {self.name!r} has no Image column (columns: {list(feats)}); cast the image "
                            "column with dataset.cast_column(name, datasets.Image()) and save it again")
        if len(self.ds) == 0:
            raise UserError(f"dataset {self.name!r} has no rows")
        self.image_column = images[0]
        classes = [k for k, f in feats.items() if isinstance(f, datasets.ClassLabel)]
        self.labels, self.class_names = None, None
        if classes:
            self.labels = torch.as_tensor(self.ds[classes[0]], dtype=torch.int64)
            self.class_names = list(feats[classes[0]].names)
        self._shape = tuple(self._array(0).shape)  # H, W, C
        self.sha256 = self._hash()

    def _array(self, i: int):
        return image_array(self.ds[int(i)][self.image_column], f"{self.image_column}[{int(i)}] of {self.name!r}")

    def _where(self, i: int) -> str:
        return f"row {int(i)}"

    def _hash(self) -> str:
        """Identity of the set: the bytes of its Arrow files and its labels (read in chunks, never decoded)."""
        files = sorted(self.root.glob("*.arrow"))
        h = hash_files(hashlib.sha256(b"stepdistill-hf-v1"), ((f.name, f) for f in files))
        if self.labels is not None:
            h.update(self.labels.numpy().tobytes())
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self.ds)

    def load_all(self):
        """The whole set in memory, as ``data.load_images`` returns other specs."""
        return _make(self._u8(range(len(self))), self.labels, self.name, self.class_names)


__all__ = ["HFDiskImages", "is_hf_dataset"]
