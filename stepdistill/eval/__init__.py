"""Evaluation: detectors (TF-FID Inception, the digits classifier, CLIP), metrics (FID, KID,
precision/recall, class accuracy, CLIP score), reference statistics with their protocol, and the
harness behind ``stepdistill eval``.

    from stepdistill.eval import evaluate_generator, get_detector
    res = evaluate_generator(generate_fn, 1000, "digits", "digits-test", seed=0, batch=100,
                             sample_shape=(1, 16, 16), num_classes=10)

Protocol (printed with every result and stored in results.json): the detector's name and weights
hash, its resize (clean-fid's PIL bicubic on float channels, not re-quantised), its input size,
the sample count and seed, images quantised to uint8 exactly as saved PNGs, and the reference's
dataset, count and content hash. Statistics of different protocols are never compared.
"""
from importlib import import_module

# loaded on first use (PEP 562): ``eval.report`` (the model card's number format) without torchmetrics
_WHERE = {"DETECTORS": "detectors", "Detector": "detectors", "get_detector": "detectors",
          "evaluate_generator": "harness", "clip_score": "metrics", "frechet_distance": "metrics",
          "kid": "metrics", "precision_recall": "metrics", "Stats": "stats", "check_compatible": "stats",
          "make_stats": "stats"}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
