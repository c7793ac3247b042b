"""The two caches a text-to-image run fills once, before training, and reuses on resume and across
runs with the same settings:

* the **text-embedding cache**: every prompt's condition (``TextEncoders.encode``) and the null
  condition for CFG, so the text encoders can leave the accelerator for the whole run;
* the **latent cache**: the VAE latents of the real images of image-text pairs (objectives with a
  real-data term), so the VAE encoder never runs during training.

A cache records the settings it was built with (its fingerprint); a run with other settings is
refused with the field that differs, never silently mixed.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..errors import UserError
from ..progress import Counter
from .pipeline import TextToImageInfo
from .prompts import PromptSet
from .shards import ShardedRows, check_fingerprint, write_rows


def encoders_id(info: TextToImageInfo) -> str:
    """A hash of the text encoders' configs and weight file sizes (their identity, cheaply)."""
    h = hashlib.sha256()
    for part in sorted(p for p in info.path.iterdir() if p.name.startswith(("text_encoder", "tokenizer"))):
        for f in sorted(part.rglob("*")):
            if f.is_file():
                h.update(f"{f.relative_to(info.path)}:{f.stat().st_size}".encode())
                if f.suffix == ".json":
                    h.update(f.read_bytes())
    return h.hexdigest()[:16]


def text_fingerprint(info: TextToImageInfo, prompts: PromptSet, *, negative_prompt: str, max_sequence_length,
                     embedded_guidance: float, dtype: str) -> dict:
    fp = {"teacher": info.name, "pipeline": info.kind, "encoders": encoders_id(info), "prompts": prompts.sha256,
          "count": len(prompts), "negative_prompt": negative_prompt or "", "max_sequence_length": max_sequence_length,
          "dtype": dtype}
    if info.kind == "sdxl":
        fp["resolution"] = info.resolution  # in SDXL's time ids
    if info.kind == "flux" and info.backbone_config.get("guidance_embeds"):
        fp["embedded_guidance"] = float(embedded_guidance)
    return fp


class TextCache:
    """``rows(idx)``: the condition dict of those prompts; ``null``: the unconditional one (batch 1)."""

    def __init__(self, folder: Path):
        self.store = ShardedRows(folder)
        self.null = {k[len("null."):]: v for k, v in self.store.extra().items() if k.startswith("null.")}
        self.fingerprint = self.store.manifest["fingerprint"]

    def __len__(self) -> int:
        return len(self.store)

    def rows(self, idx) -> dict[str, torch.Tensor]:
        return self.store.rows(idx)


def ensure_text_cache(info: TextToImageInfo, prompts: PromptSet, folder, *, negative_prompt: str = "",
                      max_sequence_length: int | None = None, embedded_guidance: float = 3.5, dtype: str = "fp16",
                      batch: int = 16, device=None, log=print) -> TextCache:
    """Open the cache at ``folder``, building it first if it does not exist."""
    from .pipeline import TextEncoders

    folder = Path(folder)
    fp = text_fingerprint(info, prompts, negative_prompt=negative_prompt, max_sequence_length=max_sequence_length,
                          embedded_guidance=embedded_guidance, dtype=dtype)
    if not check_fingerprint(folder, fp, "text-embedding cache"):
        enc = TextEncoders(info, device=device, negative_prompt=negative_prompt,
                           max_sequence_length=max_sequence_length, embedded_guidance=embedded_guidance)
        log(f"encoding {len(prompts)} prompts into {folder} ...")
        null = enc.null()
        with Counter("text-embedding cache", len(prompts), "prompts") as bar:
            def batches():
                for i in range(0, len(prompts), batch):
                    yield enc.encode(prompts.prompts[i:i + batch])
                    bar.advance(min(batch, len(prompts) - i))

            write_rows(folder, batches(), fp, dtype=dtype, extra={f"null.{k}": v for k, v in null.items()})
        enc.offload()
    cache = TextCache(folder)
    if len(cache) != len(prompts):
        raise UserError(f"text-embedding cache {str(folder)!r} holds {len(cache)} rows for {len(prompts)} prompts; "
                        "delete it to rebuild")
    return cache


# -- latents of real images ---------------------------------------------------------------------
def load_image(path: Path, resolution: int) -> torch.Tensor:
    """An image as [3, R, R] in [-1, 1]: shorter side resized to R (bicubic), centre crop (the
    diffusers text-to-image training scripts' default preprocessing)."""
    from PIL import Image

    try:
        im = Image.open(path).convert("RGB")
    except OSError as err:
        raise UserError(f"could not read image {str(path)!r} ({err}); remove it from the data or fix it") from None
    w, h = im.size
    s = resolution / min(w, h)
    im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    import numpy as np

    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def latent_fingerprint(info: TextToImageInfo, prompts: PromptSet) -> dict:
    vae = json.dumps(info.vae_config, sort_keys=True, default=str).encode()
    sizes = sum(f.stat().st_size for f in (info.path / "vae").glob("*.safetensors"))
    return {"teacher": info.name, "vae": hashlib.sha256(vae + str(sizes).encode()).hexdigest()[:16],
            "images": prompts.sha256, "count": len(prompts), "resolution": info.resolution,
            "preprocess": "resize-shorter-bicubic+center-crop", "posterior": "mean"}


def ensure_latent_cache(info: TextToImageInfo, prompts: PromptSet, folder, *, batch: int = 8, device=None,
                        log=print) -> ShardedRows:
    from .pipeline import encode_images, load_vae

    if prompts.images is None:
        raise UserError(f"data {prompts.name!r} is a prompt list without images; the objective uses real images, so "
                        "give image-text pairs (a folder of images with .txt captions, or .jsonl with image and text)")
    folder = Path(folder)
    fp = latent_fingerprint(info, prompts)
    if not check_fingerprint(folder, fp, "latent cache"):
        vae = load_vae(info, device=device)
        log(f"encoding {len(prompts)} images into {folder} ...")
        imgs = prompts.images

        with Counter("latent cache", len(imgs), "images") as bar:
            def batches():
                for i in range(0, len(imgs), batch):
                    x = torch.stack([load_image(p, info.resolution) for p in imgs[i:i + batch]])
                    yield {"latents": encode_images(vae, x)}
                    bar.advance(len(x))

            write_rows(folder, batches(), fp, dtype="fp32")
        del vae
    return ShardedRows(folder)


__all__ = ["TextCache", "ensure_text_cache", "ensure_latent_cache", "text_fingerprint", "load_image"]
