"""LoRA adapters (Hu et al., 2022) out of a student and back: peft's key format, the LoraConfig in
the safetensors header under diffusers' ``lora_adapter_metadata`` key, keys prefixed ``unet.`` as
diffusers' pipeline-level LoRA files are."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from .pipeline import LORA_METADATA_KEY, LORA_WEIGHT_NAME, _unload

#: the LoraConfig fields that change what the adapters compute (the rest are training-time options)
CONFIG_FIELDS = ("r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora", "use_dora", "rank_pattern",
                 "alpha_pattern", "bias", "fan_in_fan_out")


def has_lora(backbone: torch.nn.Module) -> bool:
    return any("lora_" in name for name, _ in backbone.named_parameters())


def lora_config(backbone: torch.nn.Module, adapter: str = "default") -> dict:
    cfg = backbone.peft_config[adapter]
    out = {}
    for k in CONFIG_FIELDS:
        v = getattr(cfg, k)
        out[k] = sorted(v) if isinstance(v, (set, frozenset)) else v
    return out


def save_lora(backbone: torch.nn.Module, folder: Path, adapter: str = "default") -> Path:
    """Write the adapters as ``folder/pytorch_lora_weights.safetensors``."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(backbone, adapter_name=adapter)
    meta = {f"unet.{k}": v for k, v in lora_config(backbone, adapter).items()}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LORA_WEIGHT_NAME
    save_file({f"unet.{k}": v.detach().cpu().contiguous() for k, v in state.items()}, str(path),
              metadata={"format": "pt", LORA_METADATA_KEY: json.dumps(meta, sort_keys=True)})
    return path


def base_copy(backbone: torch.nn.Module) -> torch.nn.Module:
    """A copy of the backbone without its adapters: the frozen teacher weights underneath."""
    out = copy.deepcopy(backbone)
    _unload(out)
    _drop_peft_attrs(out)
    return out


def merged_copy(backbone: torch.nn.Module) -> torch.nn.Module:
    """A copy with the adapters merged into the base weights (W + scale B A)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = copy.deepcopy(backbone)
    for module in out.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    _unload(out)
    _drop_peft_attrs(out)
    return out


def _drop_peft_attrs(model: torch.nn.Module) -> None:
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in model.__dict__:
            delattr(model, attr)


def load_lora(backbone: torch.nn.Module, file: Path, adapter: str = "default", prefix: str = "unet") -> torch.nn.Module:
    """Inject and load the adapters of ``file`` into ``backbone`` (safetensors only: no code runs);
    ``prefix``: the pipeline component the keys name (unet, or transformer for SD3/FLUX)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..errors import UserError

    with safe_open(str(file), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(LORA_METADATA_KEY, "{}"))
    cfg = {k[len(prefix) + 1:]: v for k, v in meta.items() if k.startswith(f"{prefix}.")}
    if not cfg:
        raise UserError(f"{str(file)!r} carries no LoRA config in its header; re-export it with stepdistill export --lora")
    state = {k[len(prefix) + 1:]: v for k, v in load_file(str(file)).items() if k.startswith(f"{prefix}.")}
    inject_adapter_in_model(LoraConfig(**cfg), backbone, adapter_name=adapter)
    set_peft_model_state_dict(backbone, state, adapter_name=adapter)
    return backbone
