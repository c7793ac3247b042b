"""CLIP (Radford et al., 2021) through transformers' ``CLIPModel``, from a local folder or a hub name.

Image features are the projected image embeddings of images prepared by the model's own
``CLIPImageProcessor`` (bicubic resize of the short side, centre crop, CLIP mean/std), so they match
what the model was trained on; text features come from its tokenizer. CLIP score is
``metrics.clip_score``: 100 * max(cos, 0) averaged over pairs (Hessel et al., 2021).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..errors import UserError
from .detectors import Detector


def state_dict_sha256(module: torch.nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor: the weights' identity whatever file
    format or hub snapshot they came from."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class CLIPDetector(Detector):
    name = "clip"

    def __init__(self, model: str):
        super().__init__()
        from transformers import CLIPImageProcessor, CLIPModel

        try:
            self.model = CLIPModel.from_pretrained(model).eval()
        except OSError as err:
            raise UserError(f"cannot load CLIP model {model!r} ({str(err).splitlines()[0]}); pass a local "
                            "folder saved with CLIPModel.save_pretrained, or a hub name already in the "
                            "cache (--detector clip:PATH)") from None
        size = self.model.config.vision_config.image_size
        try:
            self.processor = CLIPImageProcessor.from_pretrained(model)
        except OSError:
            self.processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        try:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model)
        except (OSError, ValueError):
            self.tokenizer = None
        self.source = model
        self.name = f"clip:{Path(model).name if Path(model).exists() else model}"
        self.dim = self.model.config.projection_dim
        self.image_size = size
        self.resize = "CLIPImageProcessor (bicubic short side, centre crop, CLIP mean/std)"
        self.weights_sha256 = state_dict_sha256(self.model)

    @staticmethod
    def _embeds(out) -> torch.Tensor:  # also CLIPScorer's (objectives/clip_loss.py)
        # transformers 4.x returns the projected tensor; 5.x a model output with pooler_output
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def _extract(self, images):
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        pix = self.processor(images=list(images.cpu()), return_tensors="pt")["pixel_values"]
        feats = self._embeds(self.model.get_image_features(pixel_values=pix.to(self.device, torch.float32)))
        return {"features": feats}

    @torch.inference_mode()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise UserError(f"CLIP model {self.source!r} has no tokenizer files; save one next to it "
                            "(tokenizer.save_pretrained) to compute CLIP scores")
        tok = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        out = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                           attention_mask=tok["attention_mask"].to(self.device))
        return self._embeds(out).float().cpu()

    def clip_score(self, images: torch.Tensor, texts: list[str]) -> float:
        from .metrics import clip_score

        if len(images) != len(texts):
            raise UserError(f"{len(images)} images but {len(texts)} prompts; CLIP score pairs them one to one")
        return clip_score(self.features(images), self.text_features(texts))
