"""One interface for every network: ``D(x_t, t, cond) -> x0`` in float32, with its schedule.

Adapters turn a diffusers backbone and its prediction type into that interface once (the idea of
k-diffusion's ``external.py`` wrappers and EDM's ``EDMPrecond``); nothing downstream knows whether
the backbone is a UNet or a transformer, or what it predicts. Classifier-free guidance is a
wrapper that is itself a denoiser.

``cond`` is a dict of batched tensors (or None for unconditional models):
  class_labels                       -- class-conditional UNet2DModel / DiT (long, [B])
  encoder_hidden_states              -- text tokens (UNet2DConditionModel, SD3)
  text_embeds, time_ids              -- SDXL's added conditions
  pooled_projections                 -- SD3's and FLUX's pooled text embedding
  guidance                           -- FLUX-dev's embedded guidance scale ([B], float)
  timestep_cond                      -- LCM's guidance-scale embedding (optional)
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from .errors import UserError
from .schedules import Schedule, bcast

Cond = Mapping[str, torch.Tensor] | None


class Denoiser(nn.Module):
    """Base: ``forward(x, t, cond) -> x0`` (float32); ``schedule``; ``null_cond(cond)``."""

    schedule: Schedule

    def null_cond(self, cond: Cond) -> Cond:
        """The unconditional counterpart of a batch of conditions (for CFG)."""
        raise UserError(f"{type(self).__name__} has no unconditional input; guidance needs one")

    @property
    def is_conditional(self) -> bool:
        return False


def _call_unet2d(net, x, t, cond):
    return net(x, t, class_labels=None if cond is None else cond.get("class_labels")).sample


def _call_guided_unet2d(net, x, t, cond):
    cond = cond or {}
    return net(x, t, class_labels=cond.get("class_labels"), timestep_cond=cond.get("timestep_cond")).sample


def _call_unet2d_condition(net, x, t, cond):
    cond = dict(cond or {})
    added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
    return net(x, t, encoder_hidden_states=cond.get("encoder_hidden_states"),
               timestep_cond=cond.get("timestep_cond"),
               added_cond_kwargs=added or None).sample


def _call_dit(net, x, t, cond):
    out = net(x, timestep=t, class_labels=None if cond is None else cond.get("class_labels")).sample
    # DiT learns the variance too (Peebles & Xie, 2023, sec. 3.1): keep the mean half
    return out[:, : x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out


def _call_sd3(net, x, t, cond):
    cond = dict(cond or {})
    return net(hidden_states=x, timestep=t, encoder_hidden_states=cond.get("encoder_hidden_states"),
               pooled_projections=cond.get("pooled_projections")).sample


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """FLUX's 2x2 patch packing [B, C, H, W] -> [B, HW/4, 4C] (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of ``pack_latents`` (FluxPipeline._unpack_latents, in latent units)."""
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def _call_flux(net, x, t, cond):
    # FLUX (Black Forest Labs, 2024) sees packed latents with positional ids and takes t / 1000;
    # the student and every objective see plain [B, C, H, W] latents.
    from diffusers import FluxPipeline

    cond = dict(cond or {})
    b, _, h, w = x.shape
    txt = cond.get("encoder_hidden_states")
    if txt is None:
        raise UserError("a FLUX teacher needs text conditioning (encoder_hidden_states); build a text cache")
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
    txt_ids = torch.zeros(txt.shape[1], 3, device=x.device, dtype=x.dtype)
    guidance = None
    if net.config.guidance_embeds:
        guidance = cond.get("guidance")
        if guidance is None:
            raise UserError("this FLUX transformer embeds a guidance scale; the text cache must provide 'guidance' "
                            "(text.embedded_guidance)")
        guidance = guidance.float()
    out = net(hidden_states=pack_latents(x), timestep=t / 1000, guidance=guidance,
              pooled_projections=cond.get("pooled_projections"), encoder_hidden_states=txt,
              txt_ids=txt_ids, img_ids=img_ids).sample
    return unpack_latents(out, h, w)


BACKBONE_CALLS: dict[str, Callable] = {
    "UNet2DModel": _call_unet2d,
    "GuidedUNet2DModel": _call_guided_unet2d,  # guided_unet: a class-conditional UNet2DModel with a w input
    "UNet2DConditionModel": _call_unet2d_condition,
    "DiTTransformer2DModel": _call_dit,
    "SD3Transformer2DModel": _call_sd3,
    "FluxTransformer2DModel": _call_flux,
}


class DiffusersDenoiser(Denoiser):
    """A diffusers backbone seen as an x0-predictor under its schedule.

    ``null_class``: the class index that means "no class" (class-conditional models with label
    dropout); ``null_text``: the empty-prompt condition, a dict of tensors with batch size 1.
    """

    def __init__(self, backbone: nn.Module, schedule: Schedule, *, null_class: int | None = None,
                 null_text: Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        name = type(backbone).__name__
        base = getattr(backbone, "base_model", None)  # peft wrappers keep the class underneath
        if name not in BACKBONE_CALLS and base is not None:
            name = type(getattr(base, "model", base)).__name__
        if name not in BACKBONE_CALLS:
            raise UserError(f"backbone {name!r} is not supported; supported: {', '.join(BACKBONE_CALLS)}")
        self.backbone = backbone
        self.schedule = schedule
        self._call = BACKBONE_CALLS[name]
        self.null_class = null_class
        self.null_text = {k: v for k, v in (null_text or {}).items()}

    @property
    def is_conditional(self) -> bool:
        return self.null_class is not None or bool(self.null_text)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def forward(self, x: torch.Tensor, t, cond: Cond = None) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        x = x.float()
        x_in = self.schedule.model_input(x, t).to(self.dtype)
        t_in = self.schedule.model_time(t).to(torch.float32)
        if cond is not None:
            cond = {k: (v.to(self.dtype) if v.is_floating_point() else v) for k, v in cond.items()}
        raw = self._call(self.backbone, x_in, t_in, cond).float()
        return self.schedule.raw_to_x0(raw, x, t)

    def null_cond(self, cond: Cond) -> Cond:
        if cond is None:
            return super().null_cond(cond)
        out = dict(cond)
        if "class_labels" in cond:
            if self.null_class is None:
                return super().null_cond(cond)
            out["class_labels"] = torch.full_like(cond["class_labels"], self.null_class)
        elif self.null_text:
            b = next(iter(cond.values())).shape[0]
            for k, v in self.null_text.items():
                out[k] = v.to(cond[k].device if k in cond else v.device).expand(b, *v.shape[1:])
        else:
            return super().null_cond(cond)
        return out


class GuidedDenoiser(Denoiser):
    """Classifier-free guidance (Ho & Salimans, 2022): D_u + w (D_c - D_u), with w = 1 the plain
    conditional model. ``scale`` is a float or a per-sample tensor (random scales, as in SNOOPI).
    The two branches run as one batch."""

    def __init__(self, denoiser: Denoiser, scale: float | torch.Tensor = 1.0):
        super().__init__()
        self.inner = denoiser
        self.schedule = denoiser.schedule
        self.scale = scale

    @property
    def is_conditional(self) -> bool:
        return self.inner.is_conditional

    def null_cond(self, cond):
        return self.inner.null_cond(cond)

    def forward(self, x, t, cond=None, scale=None):
        w = self.scale if scale is None else scale
        if cond is None or (not torch.is_tensor(w) and w == 1.0):
            return self.inner(x, t, cond)
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        uncond = self.inner.null_cond(cond)
        both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
        d_u, d_c = self.inner(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return d_u + bcast(torch.as_tensor(w, dtype=torch.float64), x) * (d_c - d_u)


def guided(denoiser: Denoiser, scale) -> Denoiser:
    """Wrap with CFG unless the scale is exactly 1 (then the model is returned unchanged)."""
    if not torch.is_tensor(scale) and float(scale) == 1.0:
        return denoiser
    return GuidedDenoiser(denoiser, scale)
