"""The digits detector: a small CNN trained on digits-train (``tools/train_digits_detector.py``),
shipped as ``stepdistill/assets/detectors/digits.safetensors`` + ``digits.json`` (architecture, held-out accuracy
on digits-test, the command that trained it).

Its logits give class accuracy. Its FID/KID features are the penultimate layer *concatenated with
the spatially pooled first two conv layers*, each dimension divided by its std over clean
digits-train (``feature_scale``, fixed at training time). A classifier's last layer alone is blind
to pixel noise (it is trained to ignore it), so a student with speckle would score like a clean
teacher; the early maps respond to local texture, an auxiliary head trained to regress the std of
Gaussian noise added to the input keeps them responsive, and the scaling stops the 64 semantic
dimensions from drowning them. ``tests/test_eval_digits.py`` checks that noise of std 0.1 raises
FID far above the real-vs-real value. For photographs, trust the Inception detector.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..resources import DETECTORS
from .detectors import CLEAN_RESIZE, Detector, clean_resize, file_sha256

ASSET_DIR = DETECTORS
DEFAULT_WEIGHTS = ASSET_DIR / "digits.safetensors"


class DigitsNet(nn.Module):
    """1x16x16 in [-1, 1] -> (features, class logits, predicted noise std)."""

    def __init__(self, widths=(32, 32, 64, 128), hidden: int = 64, num_classes: int = 10):
        super().__init__()
        w1, w2, w3, w4 = widths
        self.conv1 = nn.Conv2d(1, w1, 3, padding=1)
        self.conv2 = nn.Conv2d(w1, w2, 3, padding=1)
        self.conv3 = nn.Conv2d(w2, w3, 3, padding=1)
        self.conv4 = nn.Conv2d(w3, w4, 3, padding=1)
        self.fc = nn.Linear(w4, hidden)
        self.head = nn.Linear(hidden, num_classes)
        self.noise_head = nn.Linear(w1 + w2 + hidden, 1)
        self.dim = w1 + w2 + hidden
        self.register_buffer("feature_scale", torch.ones(self.dim))

    def forward(self, x):
        c1 = F.relu(self.conv1(x))
        c2 = F.relu(self.conv2(c1))
        c3 = F.relu(self.conv3(F.max_pool2d(c2, 2)))
        c4 = F.relu(self.conv4(F.max_pool2d(c3, 2)))
        h = F.relu(self.fc(c4.mean((2, 3))))
        feats = torch.cat([h, c1.mean((2, 3)), c2.mean((2, 3))], dim=1)
        # the noise head reads unscaled features: the scale is fixed only after training
        return feats / self.feature_scale, self.head(h), self.noise_head(feats).squeeze(1)


class DigitsDetector(Detector):
    name = "digits"
    image_size = 16
    resize = CLEAN_RESIZE + "; RGB read as the mean of its channels"

    def __init__(self, net: DigitsNet, weights_sha256: str, meta: dict):
        super().__init__()
        self.net, self.weights_sha256, self.meta = net, weights_sha256, meta
        self.dim, self.num_classes = net.dim, net.head.out_features

    @classmethod
    def from_file(cls, path: str | Path | None = None) -> "DigitsDetector":
        from safetensors.torch import load_file

        path = Path(path) if path else DEFAULT_WEIGHTS
        meta_path = path.with_suffix(".json")
        if not path.is_file() or not meta_path.is_file():
            raise UserError(f"digits detector {path} (+ {meta_path.name}) not found; train it with "
                            "`python tools/train_digits_detector.py`")
        meta = json.loads(meta_path.read_text())
        net = DigitsNet(**meta["arch"])
        net.load_state_dict(load_file(str(path)))
        return cls(net.eval(), file_sha256(str(path)), meta)

    def _extract(self, images):
        x = clean_resize(images, self.image_size)
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        x = (x / 127.5 - 1.0).to(self.device)
        feats, logits, _ = self.net(x)
        return {"features": feats, "logits": logits}
