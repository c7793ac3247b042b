"""The teacher-output cache: pairs equal the teacher sampler's output for the stored noise, the
manifest records how they were made, and a cache made otherwise (or by other weights) is refused."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_teacher
from stepdistill.cache import build_cache, ensure_cache, load_cache
from stepdistill.errors import UserError
from stepdistill.sampling import sample


def _teacher():
    t = tiny_teacher()
    t.meta = {"num_classes": 2, "null_class": 2, "in_channels": 1, "sample_size": 8}
    return t


def test_pairs_are_the_samplers_output(tmp_path):
    teacher = _teacher()
    build_cache(teacher, tmp_path / "c", num=5, steps=3, sampler="heun", guidance=1.5, seed=7, batch=2,
                trajectory=True)
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert (m["sampler"], m["steps"], m["guidance"], m["seed"], m["num"]) == ("heun", 3, 1.5, 7, 5)
    assert len(m["shards"]) == 3
    pairs = load_cache(tmp_path / "c", teacher)
    assert len(pairs) == 5 and pairs.trajectory.shape == (5, 4, 1, 8, 8)
    noise, x0, cond = pairs.get(torch.arange(5))
    assert cond["class_labels"].tolist() == [0, 1, 0, 1, 0]
    want = sample(teacher, noise, 3, sampler="heun", cond=cond, guidance=1.5)
    assert torch.allclose(x0, want, atol=1e-5)
    assert torch.allclose(pairs.trajectory[:, -1], x0)
    again = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(noise[:2], again[:2])  # noise from the recorded seed


def test_refuses_other_settings_and_other_teachers(tmp_path):
    teacher = _teacher()
    ensure_cache(teacher, tmp_path / "c", num=4, steps=2)
    assert len(ensure_cache(teacher, tmp_path / "c", num=3, steps=2)) == 4  # reused
    with pytest.raises(UserError, match="steps: cache 2 vs config 4"):
        ensure_cache(teacher, tmp_path / "c", num=4, steps=4)
    with pytest.raises(UserError, match="another teacher"):
        load_cache(tmp_path / "c", tiny_teacher(seed=1))
    with pytest.raises(UserError, match="already exists"):
        build_cache(teacher, tmp_path / "c", num=4, steps=2)
