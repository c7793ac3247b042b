"""tools/benchmark.py runs every distillation preset by default, and only those."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]


def test_default_objectives_are_the_distillation_presets():
    names = load_tool("benchmark").distill_presets()
    configs = {p.stem: OmegaConf.load(p) for p in (ROOT / "configs" / "digits").glob("*.yaml")}
    assert names == sorted(k for k, c in configs.items() if "objective" in c)
    assert "dmd2_4step" in names and "teacher" not in names  # teacher.yaml is the pretrain config
