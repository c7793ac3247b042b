"""Every shipped training preset resolves as `stepdistill train PRESET` reads it, before any compute:
its objective exists, its optimizer entries name networks the objective trains, its budget and phases
pass the trainer's checks. A preset left behind by a change to its objective fails here, not at the
start of a 25-minute benchmark run."""
from __future__ import annotations

import pytest

from stepdistill.resources import presets
from stepdistill.train.setup import resolve

PRESETS = presets()  # accelerate launch configs and teacher pretrain configs are not training presets
NAMES = [n for n, p in PRESETS.items() if p.parent.name != "accelerate" and not p.stem.startswith("teacher")]


def test_the_presets_are_found():
    assert "digits/sida" in NAMES and "digits/dmd2" in NAMES and len(NAMES) > 20


@pytest.mark.parametrize("name", NAMES)
def test_preset_resolves(name, tmp_path):
    cfg, objective = resolve(str(PRESETS[name]), [f"output_dir={tmp_path / 'run'}"])
    assert cfg.objective.name == objective.name
    assert not (tmp_path / "run").exists()  # resolving writes nothing
