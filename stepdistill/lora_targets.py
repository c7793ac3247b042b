"""Which LoRA target names name a module of a backbone (peft's rule), for the student's LoRA
(``generator``) and the fake score's (``fake_score``)."""
from __future__ import annotations

from typing import Sequence

from torch import nn


def matching_targets(backbone: nn.Module, targets: Sequence[str]) -> list[str]:
    """The LoRA target names that name some module, by peft's rule (the full name, or a suffix
    after a dot: "ff.net.0.proj" matches "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj")."""
    names = [n for n, _ in backbone.named_modules()]
    return [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]


__all__ = ["matching_targets"]
