"""Sample-quality metrics over detector features: FID, KID, precision/recall, class accuracy, CLIP score.

Feature statistics are accumulated in a torchmetrics ``Metric`` (sum-reduced float64 states), so they
sync across processes for free; the distances themselves are written here where torchmetrics has no
public function (FID's matrix square root, k-NN precision/recall) and borrowed where it does
(the KID polynomial-kernel MMD).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.image.kid import poly_mmd


class FeatureStats(Metric):
    """Running mean/covariance of features in float64 (and, optionally, the features themselves,
    which KID and precision/recall need)."""

    full_state_update = False

    def __init__(self, dim: int, keep_features: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.keep_features = int(dim), keep_features
        self.add_state("n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(self.dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("outer", torch.zeros(self.dim, self.dim, dtype=torch.float64), dist_reduce_fx="sum")
        if keep_features:
            self.add_state("features", [], dist_reduce_fx="cat")

    def update(self, feats: torch.Tensor) -> None:
        f = feats.detach().to(torch.float64).reshape(len(feats), -1)
        if f.shape[1] != self.dim:
            raise ValueError(f"expected {self.dim}-d features, got {f.shape[1]}")
        self.n += len(f)
        self.total += f.sum(0)
        self.outer += f.T @ f
        if self.keep_features:
            self.features.append(feats.detach().float().cpu())

    def compute(self) -> dict:
        n = float(self.n)
        if n < 2:
            raise ValueError("need at least 2 samples for a covariance")
        mu = self.total / n
        # unbiased covariance, as numpy.cov(rowvar=False) and every FID implementation use
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        out = {"mu": mu.cpu().numpy(), "sigma": sigma.cpu().numpy(), "count": int(n)}
        if self.keep_features:
            feats = self.features
            out["features"] = (torch.cat(feats) if isinstance(feats, list) else feats).numpy()
        return out


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FID (Heusel et al., 2017, eq. 6): |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}), in float64.

    Tr (S1 S2)^{1/2} is computed as the sum of the singular values of S1^{1/2} S2^{1/2}: their
    squares are the eigenvalues of S1^{1/2} S2 S1^{1/2}, which is similar to S1 S2. This is real
    where ``scipy.linalg.sqrtm(S1 @ S2)`` can return complex round-off on rank-deficient covariances,
    and accurate to round-off of the largest eigenvalue: taking square roots of the eigenvalues of
    S1^{1/2} S2 S1^{1/2} instead turns the round-off in its near-zero ones into errors of
    sqrt(eps) (identical statistics then scored about -1e-6 instead of 0).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    tr_covmean = np.linalg.svd(_sqrt_psd(s1) @ _sqrt_psd(s2), compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def frechet_distance_low_rank(f1, f2) -> float:
    """The same FID from the features themselves, exact at any rank and cheap when a set has fewer
    samples than dimensions. With A, B the centred features scaled by 1/sqrt(n - 1), S1 = A'A and
    S2 = B'B; the non-zero eigenvalues of S1 S2 are those of (AB')(AB')', so
    Tr (S1 S2)^{1/2} is the sum of the singular values of AB' (an n1 x n2 matrix)."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    a = (f1 - mu1) / np.sqrt(len(f1) - 1)
    b = (f2 - mu2) / np.sqrt(len(f2) - 1)
    nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2.0 * nuclear)


def kid(f_real, f_fake, *, subsets: int = 100, subset_size: int = 1000, degree: int = 3,
        gamma: float | None = None, coef: float = 1.0, seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al., 2018, sec. 3): the unbiased MMD^2 with the kernel
    k(x, y) = (x.y / d + 1)^3, averaged over random equal-size subsets; returns (mean, std over
    subsets). Subset size is capped by the smaller set, as in torchmetrics and torch-fidelity."""
    fr = torch.as_tensor(np.asarray(f_real), dtype=torch.float64)
    ff = torch.as_tensor(np.asarray(f_fake), dtype=torch.float64)
    m = min(subset_size, len(fr), len(ff))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(subsets):
        ir = torch.randperm(len(fr), generator=g)[:m]
        jf = torch.randperm(len(ff), generator=g)[:m]
        vals.append(poly_mmd(fr[ir], ff[jf], degree, gamma, coef))
    v = torch.stack(vals)
    return float(v.mean()), float(v.std(unbiased=False))


def _kth_nn_radius(f: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    radii = []
    for i in range(0, len(f), chunk):
        d = torch.cdist(f[i:i + chunk], f)
        # k+1: the nearest point is the sample itself at distance 0
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _coverage(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    inside = []
    for i in range(0, len(query), chunk):
        d = torch.cdist(query[i:i + chunk], support)
        inside.append((d <= radii[None]).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(f_real, f_fake, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019, eqs. 1-2): each set's manifold is
    the union of balls reaching each sample's k-th nearest neighbour (k = 3 in the paper);
    precision = share of fakes inside the real manifold, recall = share of reals inside the fake one."""
    fr = torch.as_tensor(np.asarray(f_real), dtype=torch.float64)
    ff = torch.as_tensor(np.asarray(f_fake), dtype=torch.float64)
    if min(len(fr), len(ff)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    precision = _coverage(ff, fr, _kth_nn_radius(fr, k))
    recall = _coverage(fr, ff, _kth_nn_radius(ff, k))
    return precision, recall


def class_accuracy(logits, labels) -> float:
    """Share of samples whose detector prediction is the class they were generated for."""
    from torchmetrics.functional.classification import multiclass_accuracy

    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels).long()
    return float(multiclass_accuracy(logits, labels, num_classes=logits.shape[1], average="micro"))


def clip_score(image_features, text_features) -> float:
    """CLIP score (Hessel et al., 2021, eq. 1 with w = 100 as in torchmetrics): 100 * max(cos, 0),
    averaged over image-text pairs."""
    a = torch.nn.functional.normalize(torch.as_tensor(image_features, dtype=torch.float64), dim=-1)
    b = torch.nn.functional.normalize(torch.as_tensor(text_features, dtype=torch.float64), dim=-1)
    return float((100.0 * (a * b).sum(-1)).clamp_min(0).mean())


def finite(x: float) -> float | None:
    """JSON-safe number: None for NaN/inf."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None
