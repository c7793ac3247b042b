"""EMA of the student's trainable weights (diffusers ``EMAModel``), used for previews, eval and
export. Parameters are tracked by name so the shadow copy saves to safetensors."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .config import EMAConfig


class StudentEMA:
    def __init__(self, module: nn.Module, cfg: EMAConfig):
        from diffusers.training_utils import EMAModel

        self.module = module
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.ema = EMAModel(self.params(), decay=float(cfg.decay), update_after_step=int(cfg.update_after_step),
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
