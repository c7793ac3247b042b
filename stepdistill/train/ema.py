"""EMA of the student's trainable weights (diffusers ``EMAModel``), used for previews, eval and
export. Parameters are tracked by name so the shadow copy saves to safetensors.

The decay ramps up three ways: diffusers' default ``(1 + t) / (10 + t)``, its ``warmup`` power law,
or EDM's ramp-up (``halflife_ratio``; Karras et al., 2022, training loop, also SiD's): the half-life
is at most ``halflife_ratio`` times the updates done so far, so the average always spans the same
fraction of the run however long it is. Each is capped at ``decay``."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .config import EMAConfig


def _edm_ema_model(halflife_ratio: float):
    from diffusers.training_utils import EMAModel

    class EDMRampEMA(EMAModel):
        def get_decay(self, optimization_step: int) -> float:
            step = max(0, optimization_step - self.update_after_step - 1)  # updates averaged so far
            if step <= 0:
                return 0.0  # plain copy, as EMAModel does
            # EDM: half-life = min(cap, ratio * images seen); beta = 0.5 ** (batch / half-life), in updates here
            return min(0.5 ** (1.0 / (halflife_ratio * step)), self.decay)

    return EDMRampEMA


class StudentEMA:
    def __init__(self, module: nn.Module, cfg: EMAConfig):
        from diffusers.training_utils import EMAModel

        cls = EMAModel if cfg.halflife_ratio is None else _edm_ema_model(float(cfg.halflife_ratio))
        self.module = module
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.ema = cls(self.params(), decay=float(cfg.decay), update_after_step=int(cfg.update_after_step),
                            use_ema_warmup=bool(cfg.warmup), foreach=True)

    def params(self) -> list[nn.Parameter]:
        named = dict(self.module.named_parameters())
        return [named[n] for n in self.names]

    @torch.no_grad()
    def step(self) -> None:
        self.ema.step(self.params())

    def shadow(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.ema.shadow_params))

    def scalars(self) -> dict:
        return {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}

    def load(self, shadow: dict[str, torch.Tensor], scalars: dict) -> None:
        missing = sorted(set(self.names) - set(shadow))
        if missing:
            raise KeyError(f"EMA state lacks {missing[:3]}")
        state = dict(scalars, shadow_params=[shadow[n].to(p.device, p.dtype) for n, p in zip(self.names, self.params())])
        self.ema.load_state_dict(state)

    @contextlib.contextmanager
    def applied(self):
        """Temporarily put the EMA weights into the module (restored exactly afterwards)."""
        params = self.params()
        saved = [p.detach().clone() for p in params]
        self.ema.copy_to(params)
        try:
            yield self.module
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
