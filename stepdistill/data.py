"""Image datasets: the embedded digits, image folders and ``.npz`` arrays, as one ``ImageSet``.

Specs accepted by ``load_images``:

* ``"digits"``, ``"digits-train"``, ``"digits-test"`` -- scikit-learn's handwritten digits (1,797
  8x8 images, values 0..16, ink bright on black). The 8x8 images are upsampled to 16x16 with
  bilinear interpolation (half-pixel centres, ``align_corners=False``; antialiasing only acts when
  shrinking, so it changes nothing here) and quantised to uint8, so they are exactly what a PNG or
  ``.npz`` export of them holds. The split is fixed: train = the first 1,400 images, test = the
  last 397 (written by other people, as in the UCI data's own writer split).
* a folder of images (png, jpg, bmp, gif, webp, tif; searched recursively). If every image lies in
  a first-level subfolder and there are at least two of them, the sorted subfolder names are the
  class names and give the labels.
* an ``.npz`` file with ``images`` (uint8, [N, H, W, C], C = 1 or 3) and optional ``labels``
  (integers, [N]). Read with ``allow_pickle=False``: loading never executes code.
* a Hugging Face ``datasets`` dataset saved with ``save_to_disk`` (``hf_data``): its first Image
  column, labels and class names from its first ClassLabel column.

Images come back as float32 [N, C, H, W] in [-1, 1] on the uint8 grid (``images.from_uint8``).
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import UserError
from .images import from_uint8, to_uint8

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DIGITS_TRAIN = 1400  # first 1,400 digits train; the remaining 397 (other writers) test
DIGITS_SPECS = ("digits", "digits-train", "digits-test")


@dataclass
class ImageSet:
    images: torch.Tensor                  # float32 [N, C, H, W] in [-1, 1]
    labels: torch.Tensor | None           # int64 [N] or None
    name: str                             # the spec it was loaded from
    sha256: str                           # content hash of the uint8 pixels and the labels
    class_names: list[str] | None = field(default=None)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.images.shape[1:])

    def rows(self, idx) -> tuple[torch.Tensor, dict | None]:
        """(images, condition) of those rows: class labels where the set has them."""
        return self.images[idx], None if self.labels is None else {"class_labels": self.labels[idx]}

    @property
    def num_classes(self) -> int:
        """Number of classes (0 when unlabelled)."""
        if self.labels is None:
            return 0
        if self.class_names:
            return len(self.class_names)
        return int(self.labels.max()) + 1 if len(self.labels) else 0


def content_hash(images_u8: torch.Tensor, labels: torch.Tensor | None) -> str:
    """sha256 over the shape, the uint8 NCHW pixels (C order) and the labels as little-endian
    int64 -- the identity of a dataset in protocol records, independent of file format."""
    h = hashlib.sha256(b"stepdistill-imageset-v1")
    h.update(repr(tuple(images_u8.shape)).encode())
    h.update(np.ascontiguousarray(images_u8.cpu().numpy(), dtype=np.uint8).tobytes())
    if labels is None:
        h.update(b"no-labels")
    else:
        h.update(b"labels")
        h.update(np.ascontiguousarray(labels.cpu().numpy(), dtype="<i8").tobytes())
    return h.hexdigest()


def _make(u8: torch.Tensor, labels: torch.Tensor | None, name: str, class_names=None) -> ImageSet:
    labels = None if labels is None else labels.to(torch.int64)
    return ImageSet(from_uint8(u8).contiguous(), labels, name, content_hash(u8, labels), class_names)


# -- digits ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _digits_u8() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # [1797, 1, 8, 8] in [0, 1]
    x = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False,
                                        antialias=True)
    return to_uint8(x * 2.0 - 1.0), torch.from_numpy(d.target.astype(np.int64))


def _load_digits(spec: str) -> ImageSet:
    u8, y = _digits_u8()
    if spec == "digits-train":
        u8, y = u8[:DIGITS_TRAIN], y[:DIGITS_TRAIN]
    elif spec == "digits-test":
        u8, y = u8[DIGITS_TRAIN:], y[DIGITS_TRAIN:]
    return _make(u8.clone(), y.clone(), spec, [str(i) for i in range(10)])


# -- folders --------------------------------------------------------------------------------------
_TO_RGB = {"P", "CMYK", "YCbCr", "LAB", "HSV"}


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return image_array(img, repr(str(path)))
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"could not read image {str(path)!r} ({err}); remove or re-save it") from None


def image_array(img, where: str) -> np.ndarray:
    """A PIL image as uint8 [H, W, C] (C = 1 or 3); images with alpha or of 16-bit/float modes refused."""
    mode = img.mode
    if mode in ("LA", "RGBA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        raise UserError(f"image {where} has an alpha channel ({mode}); save it as RGB or "
                        "grayscale (e.g. PIL's img.convert('RGB')) and load again")
    if mode == "1":
        img = img.convert("L")
    elif mode in _TO_RGB:
        img = img.convert("RGB")
    elif mode not in ("L", "RGB"):
        raise UserError(f"image {where} has mode {mode!r} (16-bit or float); convert it to "
                        "8-bit grayscale ('L') or RGB and load again")
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def _load_folder(root: Path) -> ImageSet:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise UserError(f"folder {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                        "point the data spec at a folder of images, an .npz file or 'digits'")
    arrays, first = [], None
    for p in files:
        a = _read_image(p)
        if first is None:
            first = (p, a.shape)
        elif a.shape != first[1]:
            what = lambda s: f"{s[0]}x{s[1]} {'grayscale' if s[2] == 1 else 'RGB'}"  # noqa: E731
            raise UserError(f"images in {str(root)!r} differ: {str(first[0])!r} is {what(first[1])} but "
                            f"{str(p)!r} is {what(a.shape)}; resize/convert them to one size and mode")
        arrays.append(a)
    u8 = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    rel = [p.relative_to(root).parts for p in files]
    labels, names = None, None
    if all(len(parts) >= 2 for parts in rel):
        names = sorted({parts[0] for parts in rel})
        if len(names) >= 2:
            index = {n: i for i, n in enumerate(names)}
            labels = torch.tensor([index[parts[0]] for parts in rel], dtype=torch.int64)
        else:
            names = None
    return _make(u8, labels, str(root), names)


# -- npz --------------------------------------------------------------------------------------------
def _load_npz(path: Path) -> ImageSet:
    with path.open("rb") as f:
        magic = f.read(4)
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):  # an .npz is a zip archive (local header or empty)
        raise UserError(f"{str(path)!r} is not an .npz file (no zip header); write it with "
                        "np.savez(path, images=uint8_NHWC, labels=int_N)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as err:
        raise UserError(f"{str(path)!r} holds pickled objects ({err}); store plain arrays: "
                        "np.savez(path, images=uint8_NHWC, labels=int_N)") from None
    except Exception as err:  # noqa: BLE001 -- zip/format errors come in several types
        raise UserError(f"could not read {str(path)!r} as .npz ({err}); write it with "
                        "np.savez(path, images=uint8_NHWC, labels=int_N)") from None
    if "images" not in arrays:
        raise UserError(f"{str(path)!r} has no 'images' array (found: {', '.join(arrays) or 'none'}); "
                        "write it with np.savez(path, images=uint8_NHWC, labels=int_N)")
    x = arrays["images"]
    if x.dtype != np.uint8:
        raise UserError(f"{str(path)!r}: 'images' has dtype {x.dtype}, expected uint8 in 0..255; "
                        "convert with ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8) for [-1, 1] data")
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise UserError(f"{str(path)!r}: 'images' has shape {x.shape}, expected [N, H, W, C] with C = 1 or 3 "
                        "(channels last; add a trailing axis of 1 for grayscale: x[..., None])")
    if x.shape[0] == 0:
        raise UserError(f"{str(path)!r}: 'images' is empty; store at least one image")
    labels = None
    if "labels" in arrays:
        y = arrays["labels"]
        if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
            raise UserError(f"{str(path)!r}: 'labels' must be a 1-D integer array, got {y.dtype} {y.shape}")
        if len(y) != len(x):
            raise UserError(f"{str(path)!r}: {len(y)} labels for {len(x)} images; store one label per image")
        if len(y) and y.min() < 0:
            raise UserError(f"{str(path)!r}: labels must be >= 0 (class indices), found {int(y.min())}")
        labels = torch.from_numpy(y.astype(np.int64))
    u8 = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()
    return _make(u8, labels, str(path))


def load_images(spec: str, split: str | None = None) -> ImageSet:
    """Load a dataset spec (see the module docstring). ``split`` ("train", "test", "all") is a
    shorthand for the digits splits: ``load_images("digits", "train") == load_images("digits-train")``."""
    spec = str(spec)
    if split is not None:
        if spec != "digits":
            raise UserError(f"split {split!r} is only defined for 'digits'; for {spec!r} point the spec "
                            "at the split's own folder or .npz file")
        if split not in ("train", "test", "all"):
            raise UserError(f"unknown digits split {split!r}; use 'train', 'test' or 'all'")
        spec = "digits" if split == "all" else f"digits-{split}"
    if spec in DIGITS_SPECS:
        return _load_digits(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"dataset {spec!r} does not exist; give 'digits', 'digits-train', 'digits-test', "
                        "a folder of images, an .npz file or a Hugging Face dataset saved with save_to_disk")
    from .hf_data import HFDiskImages, is_hf_dataset

    if is_hf_dataset(path):
        return HFDiskImages(path).load_all()
    if path.is_dir():
        return _load_folder(path)
    if path.suffix.lower() == ".npz":
        return _load_npz(path)
    raise UserError(f"dataset {spec!r} is a file but not an .npz; give a folder of images or an .npz "
                    "with 'images' (uint8 NHWC) and optional 'labels'")


def save_npz(path: str | Path, images: torch.Tensor, labels: torch.Tensor | None = None) -> Path:
    """Write images (float [-1, 1] or uint8, NCHW) as the ``.npz`` format ``load_images`` reads."""
    from .fsutil import atomic_file

    arrays = {"images": to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()}
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy().astype(np.int64)
    with atomic_file(path) as f:
        np.savez(f, **arrays)
    return Path(path)


# -- training batches -------------------------------------------------------------------------------
class ImageDataset(Dataset):
    """An ``ImageSet`` as a torch Dataset; items and batches are dicts ``{"x0", "cond"}`` (the batch
    format objectives read), ``cond = {"class_labels": LongTensor}`` or None when unlabelled."""

    def __init__(self, data: ImageSet):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])

    def __getitems__(self, idx: list[int]) -> dict:
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        y = self.data.labels
        return {"x0": self.data.images[idx_t], "cond": None if y is None else {"class_labels": y[idx_t]}}


class SeededSampler(Sampler):
    """A fresh permutation per epoch drawn from ``seed`` and the epoch number alone, so any
    (epoch, position) can be restored exactly on resume (``set_epoch``, ``start``)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = int(n), int(seed), shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        yield from self.order(self.epoch)[self.start:].tolist()

    def __len__(self) -> int:
        return self.n - self.start


def make_loader(data: ImageSet, batch_size: int, seed: int, *, shuffle: bool = True,
                drop_last: bool = True) -> DataLoader:
    """Batches ``{"x0", "cond"}`` in a seeded order (``loader.sampler`` is a ``SeededSampler``;
    call ``loader.sampler.set_epoch(e)`` each epoch). Data lives in memory: no worker processes."""
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    if drop_last and len(data) < batch_size:
        raise UserError(f"dataset {data.name!r} has {len(data)} images, fewer than one batch of "
                        f"{batch_size}; lower the batch size")
    return DataLoader(ImageDataset(data), batch_size=batch_size, sampler=SeededSampler(len(data), seed, shuffle),
                      drop_last=drop_last, collate_fn=lambda b: b)


def infinite_batches(loader: DataLoader, start_epoch: int = 0):
    """Yield batches forever, advancing the sampler's epoch each pass."""
    epoch = start_epoch
    while True:
        if isinstance(loader.sampler, SeededSampler):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


__all__ = ["ImageSet", "load_images", "save_npz", "content_hash", "ImageDataset", "SeededSampler",
           "make_loader", "infinite_batches", "DIGITS_SPECS"]
