"""The attention kernel of every diffusers backbone in a run (``attention: auto | sdpa | xformers``),
switched through diffusers' own processors: "sdpa" keeps diffusers' default processors (PyTorch's
scaled_dot_product_attention); "xformers" calls each model's ``enable_xformers_memory_efficient_
attention`` (xformers' memory-efficient kernel, CUDA only); "auto" is xformers where CUDA and the
xformers package are both present, SDPA otherwise."""
from __future__ import annotations

import importlib.util

import torch

from .errors import UserError

ATTENTION = ("auto", "sdpa", "xformers")


def resolve_attention(name: str, cpu: bool = False) -> str:
    """The kernel a run uses, or one line saying why the asked one cannot run (before any compute)."""
    if name not in ATTENTION:
        raise UserError(f"attention {name!r} is not one of {', '.join(ATTENTION)}")
    cuda = torch.cuda.is_available() and not cpu
    have = importlib.util.find_spec("xformers") is not None
    if name == "auto":
        return "xformers" if cuda and have else "sdpa"
    if name == "xformers" and not have:
        raise UserError("attention=xformers but the xformers package is not installed; pip install -e "
                        "'.[xformers]' (matching your torch and CUDA), or set attention=sdpa")
    if name == "xformers" and not cuda:
        raise UserError("attention=xformers needs a CUDA device (xformers has no CPU kernel); set attention=sdpa "
                        "or auto")
    return name


def apply_attention(module: torch.nn.Module, kernel: str) -> int:
    """Switch every diffusers model inside ``module`` to ``kernel``; the number of models switched."""
    if kernel != "xformers":
        return 0  # diffusers' default processors are SDPA already
    from diffusers import ModelMixin

    models = [m for m in module.modules() if isinstance(m, ModelMixin)]
    for m in models:
        m.enable_xformers_memory_efficient_attention()
    return len(models)


__all__ = ["ATTENTION", "resolve_attention", "apply_attention"]
