"""Shared fixtures: tiny random diffusers backbones built in code (no downloads) and a Gaussian
teacher whose x0-predictor and probability-flow ODE are known in closed form."""
from __future__ import annotations

import pytest
import torch

from stepdistill.denoisers import Denoiser

# The test models are tiny: with intra-op threads, scheduling overhead dominates and on a shared
# 2-core machine oversubscription made the suite several times slower.
torch.set_num_threads(1)


def load_tool(name: str):
    """A script in tools/ imported as a module (``tools`` is not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    if str(path.parent) not in sys.path:  # as when the script runs: its siblings import by name
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def fill_zero_params(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give zero-initialised layers (output projections, adaLN-zero) random values, so a random
    backbone's output depends on every input and comparisons are not trivially zero == zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def tiny_unet2d(num_class_embeds: int | None = 11, channels: int = 1, seed: int = 0):
    """A class-conditional UNet2DModel (8x8); class `num_class_embeds - 1` serves as the null class."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    net = UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                      layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                      num_class_embeds=num_class_embeds)
    return fill_zero_params(net, seed)


def tiny_unet2d_condition(sdxl: bool = False, seed: int = 0):
    """A cross-attention UNet2DConditionModel (4x8x8, 8-dim tokens); `sdxl` adds the text_time
    conditioning (text_embeds [B, 8], time_ids [B, 6])."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=8 + 6 * 4) if sdxl else {}
    net = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                               layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                               attention_head_dim=2, norm_num_groups=4, **extra)
    return fill_zero_params(net, seed)


def tiny_dit(seed: int = 0):
    """A DiTTransformer2DModel with learned sigma (8 output channels for 4 input), 10 classes
    (+ the null class 10 that label dropout adds)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    net = DiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_attention_heads=2,
                                attention_head_dim=4, num_layers=1, num_embeds_ada_norm=10)
    return fill_zero_params(net, seed)


def tiny_sd3(seed: int = 0):
    """An SD3Transformer2DModel (4x8x8 latents, 16-dim tokens, 8-dim pooled embedding)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    net = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=16)
    return fill_zero_params(net, seed)


class GaussianTeacher(Denoiser):
    """Data ~ N(mu, s^2) independently per dimension. Under x = a x0 + sigma eps the posterior mean is
    E[x0 | x] = mu + a s^2 / (a^2 s^2 + sigma^2) (x - a mu), and the probability-flow ODE keeps
    (x - a mu) / sqrt(a^2 s^2 + sigma^2) constant: an exact teacher and an exact solution."""

    def __init__(self, schedule, mu: torch.Tensor, s: torch.Tensor):
        super().__init__()
        self.schedule, self.mu, self.s = schedule, mu.double(), s.double()

    def _as(self, t, x):
        a, sig = self.schedule.alpha_sigma(torch.as_tensor(t, dtype=torch.float64))
        shape = (-1,) + (1,) * (x.ndim - 1)
        return a.expand(x.shape[0]).reshape(shape), sig.expand(x.shape[0]).reshape(shape)

    def forward(self, x, t, cond=None):
        a, sig = self._as(t, x)
        return self.mu + a * self.s**2 / (a**2 * self.s**2 + sig**2) * (x - a * self.mu)

    def exact(self, x, t_from, t_to):
        """The probability-flow ODE solution at t_to from state x at t_from."""
        a, sig = self._as(t_from, x)
        a2, sig2 = self._as(t_to, x)
        z = (x - a * self.mu) / (a**2 * self.s**2 + sig**2).sqrt()
        return a2 * self.mu + (a2**2 * self.s**2 + sig2**2).sqrt() * z


@pytest.fixture
def gaussian_data():
    """Per-dimension mean and std of a 4-dimensional Gaussian data distribution (float64)."""
    return torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64), torch.tensor([0.3, 1.0, 0.7, 0.5],
                                                                                  dtype=torch.float64)


# -- trainer fixtures: a tiny class-conditional teacher folder and a matching dataset ---------------
def tiny_teacher(seed: int = 0):
    """UNet2DModel (8x8, 1 channel, block channels (8, 16)) with 2 classes + null class 2, VP
    scaled_linear v-prediction, trailing spacing: the digits teacher's kind at toy size."""
    from stepdistill.denoisers import DiffusersDenoiser
    from stepdistill.schedules import VPSchedule

    sched = VPSchedule({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                        "prediction_type": "v_prediction", "timestep_spacing": "trailing"})
    return DiffusersDenoiser(tiny_unet2d(num_class_embeds=3, channels=1, seed=seed), sched, null_class=2)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """The tiny teacher saved as a teacher folder (unet/, scheduler/, stepdistill.json)."""
    from stepdistill.teachers import save_teacher

    path = tmp_path_factory.mktemp("teachers") / "tiny"
    save_teacher(tiny_teacher(), path, {"kind": "class-conditional", "num_classes": 2, "null_class": 2})
    return path


@pytest.fixture(scope="session")
def tiny_data_npz(tmp_path_factory):
    """40 random 8x8 grey images with labels 0/1, as an .npz dataset spec."""
    from stepdistill.data import save_npz

    g = torch.Generator().manual_seed(0)
    images = torch.rand(40, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.arange(40) % 2
    return save_npz(tmp_path_factory.mktemp("data") / "tiny.npz", images, labels)


@pytest.fixture(scope="session")
def tiny_data_folder(tiny_data_npz, tmp_path_factory):
    """The same 40 images as PNG files in class subfolders 0/ and 1/ (an image-folder dataset spec)."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("folder") / "tiny"
    with np.load(tiny_data_npz) as z:
        images, labels = z["images"], z["labels"]
    for i, (img, y) in enumerate(zip(images, labels)):
        (root / str(int(y))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0]).save(root / str(int(y)) / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_data_hf(tiny_data_npz, tmp_path_factory):
    """The same 40 images as a Hugging Face dataset saved with save_to_disk (Image + ClassLabel columns)."""
    import datasets
    import numpy as np
    from PIL import Image

    with np.load(tiny_data_npz) as z:
        images, labels = z["images"], z["labels"]
    feats = datasets.Features({"img": datasets.Image(), "digit": datasets.ClassLabel(names=["zero", "one"])})
    ds = datasets.Dataset.from_dict({"img": [Image.fromarray(a[..., 0]) for a in images],
                                     "digit": [int(y) for y in labels]}, features=feats)
    root = tmp_path_factory.mktemp("hf") / "tiny"
    ds.save_to_disk(str(root))
    return root
