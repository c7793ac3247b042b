"""The mode-collapse watchdog wired into the trainer: a student that still samples like its teacher
keeps most of the real data's feature diversity; one that emits a single image trips the warning."""
from __future__ import annotations

import json

import pytest
import torch

import trainer_toy  # noqa: F401  (registers the toy objectives)
from stepdistill.train import resolve
from stepdistill.train.trainer import Trainer

TEACHER = "digits16"


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


def _trainer(tmp_path, **kw):
    o = dict(teacher=TEACHER, data="digits-train", output_dir=str(tmp_path / "run"), cpu="true", batch_size=8,
             max_steps=1, log_every=1, preview_every="null", progress="false", collapse_every=1,
             collapse_samples=100, **{"objective.name": "toy-regress", "student.steps": 4})
    o.update(kw)
    cfg, obj = resolve(None, [f"{k}={v}" for k, v in o.items()])
    return Trainer(cfg, obj)


def test_watchdog_logs_a_healthy_ratio_during_training(tmp_path):
    tr = _trainer(tmp_path)
    tr.train()
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    col = [r["collapse"] for r in recs if "collapse" in r]
    assert len(col) == 1 and col[0]["samples"] == 100
    # a 4-step student at initialisation samples legible, varied digits: most of real diversity
    assert 0.6 < col[0]["diversity_ratio"] < 1.5 and not col[0]["collapsed"]


def test_watchdog_warns_when_every_sample_is_the_same(tmp_path):
    tr = _trainer(tmp_path)
    one = tr.data.rows(torch.tensor([0]))[0]
    tr.student.denoise = lambda x, t, cond=None: one.expand_as(x)  # a collapsed student: always the same digit
    with pytest.warns(RuntimeWarning, match="mode collapse"):
        res = tr.monitors.watch_collapse()
    assert res["collapsed"] and res["diversity_ratio"] < 0.2
