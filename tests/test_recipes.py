"""The text-to-image presets (stepdistill/presets/) load against the training config schema and name modules
that exist in their teacher's architecture (built on the meta device from the published config: no
download, no weights)."""
from __future__ import annotations


import pytest
from omegaconf import OmegaConf

from conftest import load_tool
from stepdistill.resources import preset

RECIPES = {  # recipe -> (objective, student steps, backbone in tools/memory_table.py)
    "sd15/dmd2_1step": ("dmd2", 1, "sd15"),
    "sd15/lcm_lora": ("consistency", 4, "sd15"),
    "sd15/guidance_distill": ("guidance_distill", 4, "sd15"),
    "sdxl/dmd2_4step_lora": ("dmd2", 4, "sdxl"),
    "sd3/sid_1step": ("sid", 1, "sd3"),
    "sd3/sana_sprint": ("hybrid", 1, "sd3"),
    "flux/dmd2_4step_lora": ("dmd2", 4, "flux"),
}


@pytest.fixture(scope="module")
def backbones():
    mod = load_tool("memory_table")
    cache = {}

    def get(key):
        if key not in cache:
            bb = mod.BACKBONES[key]
            cache[key] = mod.build(bb.cls, bb.config)
        return cache[key]

    return get


@pytest.mark.parametrize("path", sorted(RECIPES))
def test_recipe_resolves(path):
    from stepdistill.train.setup import resolve

    cfg, obj = resolve(path)  # a shipped preset by name
    name, steps, _ = RECIPES[path]
    assert obj.name == name
    assert cfg.student.steps == steps
    assert cfg.mixed_precision == "bf16" and cfg.gradient_checkpointing
    assert cfg.resolution in (512, 1024)
    assert set(cfg.optim) <= {"student", "fake_score", "disc", "weighting"}
    from stepdistill.train.setup import trained_nets

    assert set(trained_nets(obj)) <= set(cfg.optim), "a trained network without its optimiser settings"


def _matches(names: set[str], target: str) -> bool:
    """peft's rule: a module is adapted when its name is the target or ends with "." + target."""
    return any(n == target or n.endswith("." + target) for n in names)


@pytest.mark.parametrize("path", sorted(RECIPES))
def test_recipe_modules_exist_in_the_teacher(path, backbones):
    raw = OmegaConf.load(preset(path))
    model = backbones(RECIPES[path][2])
    names = {n for n, _ in model.named_modules()}
    targets = list(raw.student.get("lora_target_modules") or []) + list(raw.objective.get("fake_target_modules") or [])
    for target in targets:
        assert _matches(names, target), f"{path}: LoRA target {target!r} matches no module"
    for part in [raw.objective, *raw.objective.get("terms", [])]:  # a hybrid's terms read features too
        feature = part.get("feature_module")
        if feature and feature != "auto" and (part.get("gan_weight", 0) or part.get("name") == "adversarial"):
            for name in feature.split(","):  # one block, or several (SANA-Sprint's heads)
                model.get_submodule(name.strip())  # raises if absent
