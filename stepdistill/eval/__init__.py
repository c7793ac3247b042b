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
from .detectors import DETECTORS, Detector, get_detector
from .harness import evaluate_generator
from .metrics import clip_score, frechet_distance, kid, precision_recall
from .stats import Stats, check_compatible, make_stats

__all__ = ["DETECTORS", "Detector", "get_detector", "evaluate_generator", "clip_score", "frechet_distance",
           "kid", "precision_recall", "Stats", "check_compatible", "make_stats"]
