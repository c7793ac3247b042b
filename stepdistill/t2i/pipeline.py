"""Text-to-image teachers from diffusers pipeline folders (a local path or a hub name).

The four layouts users have, told apart by ``model_index.json``:

=======  ==========================  =====================  ===========================================
kind     pipeline                    backbone               condition (the denoiser's ``cond`` keys)
=======  ==========================  =====================  ===========================================
sd       StableDiffusionPipeline     UNet2DConditionModel   encoder_hidden_states
sdxl     StableDiffusionXLPipeline   UNet2DConditionModel   encoder_hidden_states, text_embeds, time_ids
sd3      StableDiffusion3Pipeline    SD3Transformer2DModel  encoder_hidden_states, pooled_projections
flux     FluxPipeline                FluxTransformer2DModel encoder_hidden_states, pooled_projections,
                                                            guidance (FLUX-dev's embedded guidance)
=======  ==========================  =====================  ===========================================

Only the backbone and the scheduler are loaded for training (``load_t2i_teacher``); the text
encoders are loaded on their own, by the pipeline class itself, to fill the text-embedding cache
(``TextEncoders``, which calls the pipeline's own ``encode_prompt``), and the VAE to fill the latent
cache and to decode previews (``load_vae``). Students live in the VAE's normalised latent space:
z = (E(x) - shift_factor) * scaling_factor, as every one of these pipelines decodes it.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError

PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
             "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
BACKBONE = {"sd": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}
#: files a training run needs from the hub: safetensors weights and JSON/tokenizer files, never pickles
HUB_PATTERNS = ["model_index.json", "*/config.json", "*/*.safetensors", "*/*.safetensors.index.json",
                "scheduler/*.json", "tokenizer*/*"]


def is_hub_name(name: str | os.PathLike) -> bool:
    """Whether ``name`` reads as a hub repo id ("owner/name") rather than a local path."""
    text = str(name)
    return text.count("/") == 1 and not text.startswith((".", "/", "~"))


def resolve_path(name: str | os.PathLike) -> Path:
    """A local pipeline folder, or a hub repo id fetched (safetensors only) into the hub cache."""
    p = Path(name).expanduser()
    if p.exists():
        return p
    text = str(name)
    if not is_hub_name(text):
        raise UserError(f"teacher {text!r} does not exist; pass a pipeline folder or a hub name like "
                        "stable-diffusion-v1-5/stable-diffusion-v1-5")
    from huggingface_hub import snapshot_download

    try:  # the local hub cache first: no network needed once a pipeline was fetched
        return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except Exception:  # noqa: BLE001 -- not cached: fetch it
        pass
    try:
        return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS))
    except Exception as err:  # noqa: BLE001 -- offline, gated or misspelt repos raise different types
        raise UserError(f"teacher {text!r} is not a local folder, and fetching it as a Hugging Face hub repo failed "
                        f"({type(err).__name__}: {err}); fix the path, or check the repo name and your network / "
                        "HF_TOKEN, or download the pipeline and pass its folder") from None


def read_index(path: Path) -> dict:
    try:
        return json.loads((path / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"could not read {str(path / 'model_index.json')!r} ({err}); pass a diffusers pipeline "
                        "folder") from None


def pipeline_kind(index: dict, where: Path) -> str:
    """sd | sdxl | sd3 | flux, from the pipeline class (or, for renamed classes, its components)."""
    name = str(index.get("_class_name", ""))
    if name in PIPELINES:
        return PIPELINES[name]
    backbone = (index.get("transformer") or index.get("unet") or [None, None])[1]
    if backbone == "FluxTransformer2DModel":
        return "flux"
    if backbone == "SD3Transformer2DModel":
        return "sd3"
    if backbone == "UNet2DConditionModel":
        return "sdxl" if "text_encoder_2" in index else "sd"
    raise UserError(f"text-to-image pipeline {name!r} in {str(where)!r} is not supported; supported: "
                    f"{', '.join(PIPELINES)}")


def vae_scale_factor(vae_config: dict) -> int:
    return 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)


def flux_mu(scheduler_config: dict, image_seq_len: int) -> float:
    """The resolution-dependent shift mu, by diffusers' own ``calculate_shift`` (linear in the
    number of image tokens between (base_image_seq_len, base_shift) and (max_..., max_shift))."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = scheduler_config
    return calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                           c.get("base_shift", 0.5), c.get("max_shift", 1.15))


@dataclass
class TextToImageInfo:
    """What a text-to-image teacher folder declares, without loading any weights."""

    path: Path                 # local folder
    name: str                  # as the user gave it (folder or hub name)
    kind: str                  # sd | sdxl | sd3 | flux
    pipeline_class: str
    backbone_folder: str       # unet | transformer
    backbone_config: dict
    scheduler_config: dict
    vae_config: dict
    resolution: int            # pixels (square)

    @property
    def scale(self) -> int:
        return vae_scale_factor(self.vae_config)

    @property
    def latent_channels(self) -> int:
        return int(self.vae_config.get("latent_channels", 4))

    @property
    def latent_size(self) -> int:
        return self.resolution // self.scale

    @property
    def patch(self) -> int:
        """Latent pixels per image token side: FLUX packs 2x2, SD3 patchifies by patch_size."""
        return {"flux": 2, "sd3": int(self.backbone_config.get("patch_size", 2) or 1)}.get(self.kind, 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.latent_channels, self.latent_size, self.latent_size


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"could not read {str(path)!r} ({err}); the pipeline folder is incomplete") from None


def inspect_pipeline(name: str | os.PathLike, resolution: int | None = None) -> TextToImageInfo:
    path = resolve_path(name)
    index = read_index(path)
    kind = pipeline_kind(index, path)
    folder = BACKBONE[kind]
    for part in (folder, "scheduler", "vae"):
        if part not in index or not (path / part).is_dir():
            raise UserError(f"text-to-image pipeline {str(path)!r} lacks its {part}/ folder")
    bcfg = _json(path / folder / "config.json")
    vcfg = _json(path / "vae" / "config.json")
    scfg = _json(path / "scheduler" / "scheduler_config.json")
    sample = bcfg.get("sample_size") or 64
    sample = sample if isinstance(sample, int) else sample[0]
    if kind == "flux":  # FLUX's transformer config has no sample size: FluxPipeline's default is 128 latents
        sample = 128
    res = int(resolution or int(sample) * vae_scale_factor(vcfg))
    info = TextToImageInfo(path, str(name), kind, str(index.get("_class_name")), folder, bcfg, scfg, vcfg, res)
    step = info.scale * info.patch  # latents must split into the backbone's patches
    if res <= 0 or res % step:
        raise UserError(f"resolution {res} does not suit {kind} teacher {str(name)!r}: it must be a positive multiple "
                        f"of {step} (VAE factor x patch size); e.g. resolution={max(step, res // step * step)}")
    return info


def teacher_schedule(info: TextToImageInfo):
    """The teacher's schedule; a resolution-dependent shift (FLUX, SD3.5-style use_dynamic_shifting)
    is fixed at the training resolution: exp(mu) as a constant shift is the same time shift
    (Esser et al., 2024, eq. 23)."""
    from ..schedules import schedule_from_config

    cfg = dict(info.scheduler_config)
    if info.kind == "flux" or cfg.get("use_dynamic_shifting"):
        seq = (info.latent_size // info.patch) ** 2  # image tokens, as the pipelines compute image_seq_len
        cfg.update(use_dynamic_shifting=False, shift=math.exp(flux_mu(cfg, seq)))
    schedule = schedule_from_config(cfg)
    if info.kind == "flux":
        schedule.linspace_sigmas = True
    return schedule


def load_t2i_teacher(name: str | os.PathLike, dtype: torch.dtype | None = None, *, resolution: int | None = None,
                     trust_pickle: bool = False):
    """The teacher's backbone as a frozen ``DiffusersDenoiser`` in latent space, with ``.meta``
    (kind text-to-image, pipeline kind, latent shape, resolution). Its ``null_text`` (the empty or
    negative prompt's embedding, for CFG) is set from the text cache (``attach_null_text``)."""
    from ..denoisers import DiffusersDenoiser
    from ..teachers import _load_backbone

    info = inspect_pipeline(name, resolution)
    backbone = _load_backbone(info.path / info.backbone_folder, dtype, trust_pickle)
    den = DiffusersDenoiser(backbone, teacher_schedule(info))
    den.requires_grad_(False).eval()
    c, s, _ = info.latent_shape
    den.meta = {"kind": "text-to-image", "pipeline": info.kind, "pipeline_class": info.pipeline_class,
                "path": str(info.path), "name": info.name, "resolution": info.resolution,
                "in_channels": c, "sample_size": s, "vae_scale_factor": info.scale,
                "num_classes": 0, "null_class": None, "class_names": None}
    den.info = info
    return den


def attach_null_text(denoiser, null: dict[str, torch.Tensor]) -> None:
    """Give the denoiser (and anything sharing it) its unconditional text condition (batch 1)."""
    denoiser.null_text = {k: v[:1].clone() for k, v in null.items()}


# -- encoders and VAE (loaded only when needed; never part of the trained networks) ----------------
def _device_dtype(device, dtype):
    device = torch.device(device or "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


class TextEncoders:
    """The pipeline's text encoders and tokenizers behind the pipeline's own ``encode_prompt``.

    ``encode(prompts)`` returns the denoiser's condition dict for those prompts (float32, CPU);
    ``null()`` the unconditional one: the negative-prompt embedding exactly as the pipeline builds it
    under CFG (SDXL's force_zeros_for_empty_prompt included)."""

    def __init__(self, info: TextToImageInfo, *, device=None, dtype=None, negative_prompt: str = "",
                 max_sequence_length: int | None = None, embedded_guidance: float = 3.5):
        import diffusers

        self.info, self.negative_prompt = info, negative_prompt or ""
        self.max_len, self.embedded_guidance = max_sequence_length, float(embedded_guidance)
        self.device, dtype = _device_dtype(device, dtype)
        cls = getattr(diffusers, info.pipeline_class, None) or diffusers.DiffusionPipeline
        skip = {info.backbone_folder: None, "vae": None}
        if info.kind == "sd":
            skip.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if info.kind == "sdxl":
            skip.update(image_encoder=None, feature_extractor=None)
        try:
            self.pipe = cls.from_pretrained(info.path, dtype=dtype, use_safetensors=True, local_files_only=True,
                                            **skip)
        except Exception as err:  # noqa: BLE001
            raise UserError(f"could not load the text encoders of {info.name!r} ({type(err).__name__}: {err}); the "
                            "pipeline folder needs text_encoder*/ and tokenizer*/ in safetensors") from None
        self.pipe.to(self.device)

    def _time_ids(self, n: int) -> torch.Tensor:
        # SDXL's micro-conditioning (Podell et al., 2023, sec. 2.2): original size, crop (0, 0), target size
        r = self.info.resolution
        return torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32).expand(n, 6).clone()

    @torch.no_grad()
    def _encode(self, prompts: list[str], negative: bool) -> dict[str, torch.Tensor]:
        kind, pipe, dev = self.info.kind, self.pipe, self.device
        L = {} if self.max_len is None else {"max_sequence_length": int(self.max_len)}
        n = len(prompts)
        # None (not [""]) for an empty negative prompt: SDXL then zeroes it (force_zeros_for_empty_prompt)
        negs = [self.negative_prompt] * n if negative and self.negative_prompt else None
        if kind == "sd":
            pos, neg = pipe.encode_prompt(prompts, dev, 1, negative, negs)
            out = {"encoder_hidden_states": neg if negative else pos}
        elif kind == "sdxl":
            pos, neg, pooled, npooled = pipe.encode_prompt(
                prompt=prompts, device=dev, do_classifier_free_guidance=negative, negative_prompt=negs)
            out = {"encoder_hidden_states": neg if negative else pos, "text_embeds": npooled if negative else pooled,
                   "time_ids": self._time_ids(n)}
        elif kind == "sd3":
            pos, neg, pooled, npooled = pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=dev, do_classifier_free_guidance=negative,
                negative_prompt=negs, **L)
            out = {"encoder_hidden_states": neg if negative else pos,
                   "pooled_projections": npooled if negative else pooled}
        else:  # flux: no negative branch in the pipeline; the unconditional text is the negative prompt
            text = [self.negative_prompt] * n if negative else prompts
            pos, pooled, _ = pipe.encode_prompt(prompt=text, prompt_2=None, device=dev, **L)
            out = {"encoder_hidden_states": pos, "pooled_projections": pooled}
            if self.info.backbone_config.get("guidance_embeds"):
                out["guidance"] = torch.full((n,), self.embedded_guidance)
        return {k: v.float().cpu().contiguous() for k, v in out.items()}

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self._encode(list(prompts), negative=False)

    def null(self) -> dict[str, torch.Tensor]:
        return self._encode([""], negative=True)

    def offload(self) -> None:
        """Free the encoders (they are needed only while filling the cache)."""
        self.pipe = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load_vae(info: TextToImageInfo, *, device=None, dtype=None):
    from diffusers import AutoencoderKL

    device, dtype = _device_dtype(device, dtype)
    try:
        vae = AutoencoderKL.from_pretrained(info.path, subfolder="vae", dtype=dtype, use_safetensors=True,
                                            local_files_only=True)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"could not load the VAE of {info.name!r} ({type(err).__name__}: {err})") from None
    return vae.to(device).requires_grad_(False).eval()


def _factors(vae) -> tuple[float, float]:
    cfg = vae.config
    return float(cfg.scaling_factor), float(getattr(cfg, "shift_factor", None) or 0.0)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> normalised latents (the posterior mean; deterministic, so a cache is
    reproducible): z = (mean - shift_factor) * scaling_factor."""
    scale, shift = _factors(vae)
    p = next(vae.parameters())
    mean = vae.encode(images.to(p.device, p.dtype)).latent_dist.mean
    return ((mean.float() - shift) * scale).cpu()


@torch.no_grad()
def decode_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """Normalised latents -> images in [-1, 1] (float32, CPU), as the pipelines decode them."""
    scale, shift = _factors(vae)
    p = next(vae.parameters())
    x = vae.decode((z.float() / scale + shift).to(p.device, p.dtype)).sample
    return x.float().clamp(-1, 1).cpu()


def is_text_to_image(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a diffusers text-to-image pipeline folder (local)."""
    p = Path(path)
    if not (p / "model_index.json").is_file():
        return False
    index: dict[str, Any] = read_index(p)
    return any(k in index for k in ("text_encoder", "text_encoder_2", "text_encoder_3"))


__all__ = ["load_t2i_teacher", "inspect_pipeline", "TextToImageInfo", "TextEncoders", "load_vae", "encode_images",
           "decode_latents", "attach_null_text", "is_text_to_image", "resolve_path", "teacher_schedule", "flux_mu"]
