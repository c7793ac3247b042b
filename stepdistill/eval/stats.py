"""Reference statistics with their protocol: what a number was measured against, stored so that two
numbers are only ever compared when they were measured the same way.

A stats file (``.npz``, read with ``allow_pickle=False``) holds ``mu`` and ``sigma`` (float64),
optionally the ``features`` themselves (float32; KID and precision/recall need them) and
``protocol``: a JSON record of the detector (name, sha256 of its weights, feature size), the resize
method, the image size, the image count, the seed, the dataset name and its content hash.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .detectors import Detector
from .metrics import FeatureStats

FORMAT = "stepdistill-stats-v1"
# fields that must agree for two sets of features to be comparable at all
MUST_MATCH = ("format", "detector", "detector_weights_sha256", "feature_dim", "image_size", "resize")


@dataclass
class Stats:
    mu: np.ndarray
    sigma: np.ndarray
    protocol: dict
    features: np.ndarray | None = None
    logits: np.ndarray | None = field(default=None, repr=False)

    @property
    def count(self) -> int:
        return int(self.protocol["count"])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != ".npz":
            raise UserError(f"stats file {str(path)!r} must end in .npz; pass e.g. --out stats.npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": self.mu, "sigma": self.sigma, "protocol": np.array(json.dumps(self.protocol))}
        if self.features is not None:
            arrays["features"] = self.features.astype(np.float32)
        np.savez(path, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Stats":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"stats file {str(path)!r} does not exist; make one with "
                            "`stepdistill eval --make-stats DATASET --detector D --out stats.npz`")
        try:
            with np.load(path, allow_pickle=False) as z:
                protocol = json.loads(str(z["protocol"]))
                feats = z["features"] if "features" in z.files else None
                out = cls(z["mu"].astype(np.float64), z["sigma"].astype(np.float64), protocol, feats)
        except (KeyError, ValueError, OSError) as err:
            raise UserError(f"{str(path)!r} is not a stepdistill stats file ({err}); remake it with "
                            "`stepdistill eval --make-stats`") from None
        if protocol.get("format") != FORMAT:
            raise UserError(f"{str(path)!r} has format {protocol.get('format')!r}, expected {FORMAT!r}; "
                            "remake it with `stepdistill eval --make-stats`")
        return out


def protocol_for(detector: Detector, *, count: int, seed: int | None, dataset: str,
                 dataset_sha256: str | None) -> dict:
    return {"format": FORMAT, **detector.protocol(), "count": int(count), "seed": seed,
            "dataset": dataset, "dataset_sha256": dataset_sha256}


def check_compatible(a: dict, b: dict, what_a: str = "samples", what_b: str = "reference") -> None:
    """Refuse to compare features measured under different protocols, naming the first field that
    differs and both values."""
    for key in MUST_MATCH:
        if a.get(key) != b.get(key):
            raise UserError(
                f"protocol mismatch in {key!r}: {what_a} used {a.get(key)!r} but {what_b} used "
                f"{b.get(key)!r}; remake the reference statistics with the same detector "
                "(`stepdistill eval --make-stats DATASET --detector D --out stats.npz`)")


def stats_from_features(features: torch.Tensor, protocol: dict, keep_features: bool = True,
                        logits: torch.Tensor | None = None) -> Stats:
    acc = FeatureStats(features.shape[1], keep_features=keep_features)
    acc.update(features)
    s = acc.compute()
    return Stats(s["mu"], s["sigma"], protocol, s.get("features"),
                 None if logits is None else logits.numpy())


def make_stats(dataset: str, detector: Detector, *, seed: int = 0, num: int | None = None,
               batch_size: int = 64, keep_features: bool = True) -> Stats:
    """Statistics of a dataset (any ``stepdistill.data.load_images`` spec); ``num`` draws a seeded
    random subset without replacement."""
    from ..data import load_images
    from ..images import to_uint8

    ds = load_images(dataset)
    images = to_uint8(ds.images)
    if num is not None:
        if num > len(images):
            raise UserError(f"--num {num} exceeds the {len(images)} images in {dataset!r}; pass at most "
                            f"{len(images)}")
        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:num]
        images = images[idx.sort().values]
    out = detector.extract(images, batch_size, progress=f"reference statistics ({dataset}, {detector.name})")
    protocol = protocol_for(detector, count=len(images), seed=seed if num is not None else None,
                            dataset=dataset, dataset_sha256=ds.sha256)
    return stats_from_features(out["features"], protocol, keep_features, out.get("logits"))
