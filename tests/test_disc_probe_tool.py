"""tools/disc_probe.py: its AUC against scikit-learn's, and a fresh head's held-out AUC on features
that differ (near 1) and on features from one distribution (near chance)."""
from __future__ import annotations

import torch
from sklearn.metrics import roc_auc_score

from conftest import load_tool


def test_auc_matches_scikit_learn_with_ties():
    tool = load_tool("disc_probe")
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 6, (40,), generator=g).float()  # many ties
    neg = torch.randint(0, 5, (50,), generator=g).float()
    ref = roc_auc_score([1] * 40 + [0] * 50, torch.cat([pos, neg]).numpy())
    assert abs(tool.auc(pos, neg) - ref) < 1e-12
    assert tool.auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0


def test_fresh_head_separates_shifted_features_and_not_identical_ones():
    tool = load_tool("disc_probe")
    g = torch.Generator().manual_seed(1)
    n = 256
    labels = torch.randint(0, 10, (n,), generator=g)
    cond = {"class_labels": labels}
    real = torch.randn(n, 8, 4, 4, generator=g)
    shifted = torch.randn(n, 8, 4, 4, generator=g)
    shifted[:, 0, :2] += 2.0  # a local difference in the top half of one channel (Bayes AUC ~1)
    same = torch.randn(n, 8, 4, 4, generator=g)
    assert tool.fresh_head_auc(real, shifted, cond, 11, steps=150) > 0.9
    # 128 held-out pairs: the AUC of a chance classifier has a standard deviation of about 0.036
    assert abs(tool.fresh_head_auc(real, same, cond, 11, steps=150) - 0.5) < 0.15
