"""Distillation objectives, one file per family; see ``base`` for the contract.

Adding an objective means adding one file here (which registers itself with ``@register``), its
name in ``FAMILIES`` and one config; nothing else changes.
"""
import importlib

from .base import OBJECTIVES, Nets, Objective, Phase, get_objective, register

FAMILIES: list[str] = ["progressive", "consistency", "dmd", "sid", "adversarial", "scm", "hybrid", "tcd",
                       "swiftbrush", "hyper_sd", "guidance_distill", "phased_dmd"]


def load_all() -> dict:
    for fam in FAMILIES:
        importlib.import_module(f"{__name__}.{fam}")
    return OBJECTIVES


__all__ = ["OBJECTIVES", "FAMILIES", "Nets", "Objective", "Phase", "get_objective", "load_all", "register"]
