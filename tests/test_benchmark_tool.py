"""tools/benchmark.py runs every distillation preset by default, and only those; the time budget ends
the runs, except where max_steps is part of the method."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]


def test_default_objectives_are_the_distillation_presets():
    names = load_tool("benchmark").distill_presets()
    configs = {p.stem: OmegaConf.load(p) for p in (ROOT / "configs" / "digits").glob("*.yaml")}
    assert names == sorted(k for k, c in configs.items() if "objective" in c)
    assert "dmd2_4step" in names and "teacher" not in names  # teacher.yaml is the pretrain config


@pytest.mark.parametrize("name, lifted", [("progressive", False), ("consistency", True)])
def test_train_command_lifts_max_steps_except_for_fixed_length_presets(name, lifted, tmp_path, monkeypatch):
    tool = load_tool("benchmark")
    seen = []

    def fake_run(cmd, log):
        seen.append(cmd)
        raise SystemExit("stop before training")

    monkeypatch.setattr(tool, "run", fake_run)
    with pytest.raises(SystemExit):
        tool.train(name, type("Args", (), {"minutes": None})(), tmp_path)
    (cmd,) = seen
    assert f"configs/digits/{name}.yaml" in cmd and f"max_minutes={tool.BUDGET[name]}" in cmd
    assert ("max_steps=1000000" in cmd) == lifted
    assert not any(a.startswith("max_steps=") for a in cmd) or lifted  # progressive keeps its preset's rounds
