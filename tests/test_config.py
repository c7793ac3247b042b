"""Configs: schema defaults <- YAML <- overrides; every mistake is one UserError naming the key."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from omegaconf import OmegaConf

from stepdistill.config import load, merge, save_resolved, to_dict
from stepdistill.errors import UserError


@dataclass
class Optim:
    lr: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.99])


@dataclass
class Schema:
    max_steps: int = 100
    teacher: str = "assets/teachers/digits16"
    sampler: str = "ddim"
    optim: Optim = field(default_factory=Optim)


def test_defaults_yaml_and_overrides_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_steps: 7\noptim:\n  lr: 0.01\n")
    cfg = load(Schema, path, ["optim.lr=0.5", "sampler=heun"])
    assert cfg.max_steps == 7 and cfg.optim.lr == 0.5 and cfg.sampler == "heun"
    assert cfg.optim.betas == [0.9, 0.99] and cfg.teacher == "assets/teachers/digits16"


@pytest.mark.parametrize("override,nearest", [("max_stesp=3", "'max_steps'"), ("optim.lrr=1", "'optim.lr'"),
                                              ("optim.beta=[1,2]", "'optim.betas'")])
def test_unknown_override_key_names_nearest(override, nearest):
    with pytest.raises(UserError, match=f"unknown config key.*did you mean {nearest}"):
        load(Schema, None, [override])


def test_unknown_yaml_key_names_nearest_and_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lrate: 0.1\n")
    with pytest.raises(UserError, match=r"bad\.yaml.*'optim\.lrate'.*did you mean 'optim\.lr'"):
        load(Schema, path)


@pytest.mark.parametrize("override,key", [("max_steps=abc", "max_steps"), ("optim.lr=fast", "optim.lr"),
                                          ("optim=3", "optim")])
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(UserError, match=f"bad value for config key '{key}'"):
        load(Schema, None, [override])


@pytest.mark.parametrize("override", ["max_steps", "=3"])
def test_malformed_override(override):
    with pytest.raises(UserError, match="not of the form key=value"):
        load(Schema, None, [override])


def test_missing_and_malformed_yaml(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load(Schema, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: [1,\n")
    with pytest.raises(UserError, match="not a valid YAML mapping"):
        load(Schema, bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(UserError, match="not a valid YAML mapping"):
        load(Schema, scalar)


def test_resolved_config_written_and_reloadable(tmp_path):
    cfg = load(Schema, None, ["max_steps=42", "optim.betas=[0.5,0.6]"])
    out = save_resolved(cfg, tmp_path / "run")
    assert out.is_file() and not list((tmp_path / "run").glob("*.tmp"))
    again = load(Schema, out)
    assert to_dict(again) == to_dict(cfg)
    assert OmegaConf.load(out).max_steps == 42
    # a plain dict works too, and merge applies it over the schema
    save_resolved({"sampler": "euler"}, tmp_path / "run", "extra.yaml")
    assert merge(Schema, OmegaConf.load(tmp_path / "run" / "extra.yaml")).sampler == "euler"
