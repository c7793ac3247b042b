"""SwiftBrush v2's clamped CLIP loss (Dao et al., 2024, "SwiftBrush v2: Make Your One-step Diffusion
Model Better Than Its Teacher", sec. 4.3, eq. 5):

    L_CLIP = max(0, tau - <E_image(D(f_theta(z, y))), E_text(y)>)

with <.,.> the cosine similarity of CLIP's image and text embeddings, D the VAE decoder (the paper uses
TinyVAE, sec. 4.4, to save memory), tau = 0.35, and a weight that starts at 0.1 and falls to zero by
the end of distillation (sec. 5.1; the paper does not give the shape of the fall: linear here). The
clamp stops pushing an image once it agrees with its prompt by tau, so the student is not driven into
CLIP's adversarial directions. CLIP is read from a local folder (``CLIPModel.save_pretrained`` with its
tokenizer); nothing is downloaded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..eval.clip import CLIPDetector

_embeds = CLIPDetector._embeds  # the projected embeddings, from transformers 4.x and 5.x alike

#: CLIP's image normalisation (CLIPImageProcessor's defaults), used where the folder has no processor
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clamped_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, margin: float) -> torch.Tensor:
    """Per sample max(0, tau - cos(image, text)) (SwiftBrush v2, eq. 5)."""
    cos = F.cosine_similarity(image_features.float(), text_features.float(), dim=-1)
    return torch.relu(float(margin) - cos)


def clip_weight(start: float, progress: float) -> float:
    """The CLIP term's weight: ``start`` at the run's start, falling linearly to 0 at its end (``progress``:
    the share of the run done; SwiftBrush v2 sec. 5.1: "starting with a weight of 0.1 and gradually reducing
    to zero")."""
    return float(start) * min(1.0, max(0.0, 1.0 - float(progress)))


class CLIPScorer(nn.Module):
    """Frozen CLIP image and text towers with a differentiable image path: images in [-1, 1] resized
    (bicubic, antialiased) to CLIP's resolution, scaled to [0, 1] and normalised by CLIP's mean/std."""

    def __init__(self, folder: str):
        super().__init__()
        from transformers import CLIPModel

        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval().requires_grad_(False)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load CLIP from {folder!r} ({str(err).splitlines()[0]}); objective.clip_model "
                            "must be a local folder saved with CLIPModel.save_pretrained (and its tokenizer)") from None
        try:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError):
            raise UserError(f"CLIP folder {folder!r} has no tokenizer; save one next to the model "
                            "(tokenizer.save_pretrained) for the CLIP loss") from None
        mean, std = CLIP_MEAN, CLIP_STD
        try:
            from transformers import CLIPImageProcessor

            proc = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
            mean, std = tuple(proc.image_mean), tuple(proc.image_std)
        except (OSError, ValueError):
            pass
        self.size = int(self.model.config.vision_config.image_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def text_features(self, texts: list[str], batch: int = 64) -> torch.Tensor:
        feats = []
        for i in range(0, len(texts), batch):
            tok = self.tokenizer(list(texts[i:i + batch]), padding=True, truncation=True, return_tensors="pt")
            dev = self.mean.device
            feats.append(_embeds(self.model.get_text_features(
                input_ids=tok["input_ids"].to(dev), attention_mask=tok["attention_mask"].to(dev))).float())
        return torch.cat(feats)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings of images in [-1, 1] (B, C, H, W), with gradient to the images."""
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        if (h, w) != (self.size, self.size):  # as CLIPImageProcessor: the short side to size, then a centre crop
            s = self.size / min(h, w)
            hh, ww = max(self.size, round(h * s)), max(self.size, round(w * s))
            x = F.interpolate(x, size=(hh, ww), mode="bicubic", align_corners=False, antialias=True)
            top, left = (hh - self.size) // 2, (ww - self.size) // 2
            x = x[..., top:top + self.size, left:left + self.size]
        x = ((x + 1) / 2 - self.mean) / self.std
        dtype = next(self.model.parameters()).dtype
        return _embeds(self.model.get_image_features(pixel_values=x.to(dtype))).float()


__all__ = ["clamped_clip_loss", "clip_weight", "CLIPScorer"]
