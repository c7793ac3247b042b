"""The eval harness: generate (batched, seeded), quantise to uint8 exactly as saved images, extract
detector features, score against reference statistics, and report every number with its protocol.

``evaluate_generator`` is the one entry point for the CLI, the trainer's periodic eval and the
benchmarks: it takes ``generate_fn(noise, labels) -> float images in [-1, 1]``.

Reproducibility: sample i always gets the noise drawn from ``Generator().manual_seed(seed * 1_000_003
+ i)`` and class label ``i % num_classes`` (balanced classes), so images do not depend on the batch
size or on how many were drawn before.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from ..images import to_uint8
from . import metrics
from .detectors import Detector, get_detector
from .stats import Stats, check_compatible, make_stats, protocol_for, stats_from_features

QUANTISE = "stepdistill.images.to_uint8: round((x + 1) * 127.5), clipped to [0, 255]"
NOISE = "sample i: torch.randn from Generator().manual_seed(seed * 1000003 + i); labels i % num_classes"
KID_SUBSETS, KID_SUBSET_SIZE, PR_K = 100, 1000, 3

_REF_CACHE: dict[tuple, Stats] = {}


def resolve_detector(detector: str | Detector, weights: str | None = None, device: str = "cpu") -> Detector:
    return detector if isinstance(detector, Detector) else get_detector(detector, weights, device)


def resolve_ref(ref: str | Stats, detector: Detector, batch_size: int = 64) -> Stats:
    """A Stats object, a stats ``.npz`` (checked against the detector's protocol) or a dataset spec
    (its statistics computed once per process and cached)."""
    if isinstance(ref, Stats):
        stats = ref
    elif str(ref).endswith(".npz") and Path(ref).is_file() and _is_stats_file(ref):
        stats = Stats.load(ref)
    else:
        key = (str(ref), detector.name, detector.weights_sha256)
        if key not in _REF_CACHE:
            _REF_CACHE[key] = make_stats(str(ref), detector, batch_size=batch_size)
        stats = _REF_CACHE[key]
    check_compatible(detector_protocol(detector), stats.protocol, "this detector", f"reference {ref}")
    return stats


def _is_stats_file(path) -> bool:
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        return "protocol" in z.files


def detector_protocol(detector: Detector) -> dict:
    return protocol_for(detector, count=0, seed=None, dataset="", dataset_sha256=None)


def balanced_labels(num: int, num_classes: int) -> torch.Tensor | None:
    return torch.arange(num) % num_classes if num_classes else None


def seeded_noise(start: int, stop: int, shape, seed: int) -> torch.Tensor:
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
                        for i in range(start, stop)])


def generate_images(generate_fn: Callable, num: int, sample_shape, *, seed: int, batch: int,
                    num_classes: int = 0, device="cpu", progress: bool = True,
                    description: str = "generating") -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 images [num, C, H, W] (quantised exactly as saved PNGs) and their class labels."""
    from ..progress import Counter

    labels = balanced_labels(num, num_classes)
    out = []
    with Counter(description, num, "images", enabled=progress) as bar:
        for i in range(0, num, batch):
            j = min(i + batch, num)
            noise = seeded_noise(i, j, sample_shape, seed).to(device)
            with torch.no_grad():
                x = generate_fn(noise, None if labels is None else labels[i:j].to(device))
            out.append(to_uint8(x).cpu())
            bar.advance(j - i)
    return torch.cat(out), labels


def score_images(images: torch.Tensor, labels: torch.Tensor | None, detector: Detector, ref: Stats,
                 *, seed: int, batch: int = 64) -> dict:
    """Every metric of uint8 images against reference statistics."""
    t0 = time.perf_counter()
    out = detector.extract(images, batch)
    feats = out["features"]
    res = {"count": len(images), "fid": fid_against(feats, ref)}
    if ref.features is not None:
        res["kid"], res["kid_std"] = metrics.kid(ref.features, feats.numpy(), subsets=KID_SUBSETS,
                                                 subset_size=KID_SUBSET_SIZE, seed=seed)
        res["precision"], res["recall"] = metrics.precision_recall(ref.features, feats.numpy(), k=PR_K)
    if labels is not None and "logits" in out:
        res["class_accuracy"] = metrics.class_accuracy(out["logits"], labels)
    res["seconds_features"] = round(time.perf_counter() - t0, 3)
    return res


def fid_against(feats: torch.Tensor, ref: Stats) -> float:
    """FID of features against reference statistics; when both sets are smaller than the feature
    size (small-sample Inception runs) the exact low-rank form avoids a d x d eigensolve."""
    if ref.features is not None and min(len(feats), len(ref.features)) < feats.shape[1]:
        return metrics.frechet_distance_low_rank(feats.numpy(), ref.features)
    s = stats_from_features(feats, {}, keep_features=False)
    return metrics.frechet_distance(s.mu, s.sigma, ref.mu, ref.sigma)


def protocol_block(detector: Detector, ref: Stats, *, num: int, seed: int, extra: dict | None = None) -> dict:
    return {**detector.protocol(), "num_samples": num, "seed": seed, "quantisation": QUANTISE,
            "noise_and_labels": NOISE,
            "reference": {k: ref.protocol.get(k) for k in ("dataset", "dataset_sha256", "count", "seed")},
            "kid": {"kernel": "(x.y/d + 1)^3", "subsets": KID_SUBSETS, "subset_size": KID_SUBSET_SIZE},
            "precision_recall": {"k": PR_K}, **(extra or {})}


def evaluate_generator(generate_fn: Callable, num: int, detector: str | Detector, ref: str | Stats, seed: int = 0,
                       batch: int = 100, *, sample_shape, num_classes: int = 0, device="cpu",
                       progress: bool = False) -> dict:
    """Generate ``num`` images with ``generate_fn(noise, labels)`` and score them: a dict of metrics
    plus a ``protocol`` block. Labels are balanced over ``num_classes`` (0 = unconditional)."""
    if num < 2:
        raise UserError(f"--num {num} is too small; FID needs at least 2 samples (use >= 1000 for numbers "
                        "you compare)")
    detector = resolve_detector(detector)
    ref_stats = resolve_ref(ref, detector, batch)
    t0 = time.perf_counter()
    images, labels = generate_images(generate_fn, num, sample_shape, seed=seed, batch=batch,
                                     num_classes=num_classes, device=device, progress=progress)
    gen_s = time.perf_counter() - t0
    res = score_images(images, labels, detector, ref_stats, seed=seed, batch=batch)
    res["seconds_generate"] = round(gen_s, 3)
    res["protocol"] = protocol_block(detector, ref_stats, num=num, seed=seed)
    return res


def protocol_line(p: dict) -> str:
    ref = p["reference"]
    return (f"protocol: detector={p['detector']} (weights sha256 {p['detector_weights_sha256'][:12]}), "
            f"resize={p['resize'].split(':')[0]} to {p['image_size']}px, N={p['num_samples']}, "
            f"seed={p['seed']}, ref={ref['dataset']} (N={ref['count']}, sha256 "
            f"{(ref['dataset_sha256'] or '')[:12]})")
