"""tools/trainer_overhead.py: the confidence interval of the median ratio, and the configs it times."""
from __future__ import annotations

import random

import pytest

from conftest import load_tool


def test_median_interval_is_the_binomial_order_statistics():
    tool = load_tool("trainer_overhead")
    xs = [float(i) for i in range(1, 21)]
    random.Random(0).shuffle(xs)
    med, lo, hi = tool.median_ci(xs)
    # n = 20: the 95 % interval is (x_(6), x_(15)) (Conover, Practical Nonparametric Statistics, table A3)
    assert (med, lo, hi) == (10.5, 6.0, 15.0)
    assert tool.median_ci([float(i) for i in range(1, 8)])[1:] == (1.0, 7.0)  # n = 7: (x_(1), x_(7)), 98.4 %


@pytest.mark.parametrize("hi, lo, expect", [(1.04, 0.98, "within"), (1.07, 1.02, "undecided"), (1.2, 1.06, "**over**")])
def test_verdict_reads_the_interval_not_the_median(hi, lo, expect):
    assert load_tool("trainer_overhead").verdict({"lo": lo, "hi": hi}, 0.05) == expect


def test_timed_configs_are_the_presets_without_io():
    from stepdistill.train import resolve

    tool = load_tool("trainer_overhead")
    path, over = tool.config_args("progressive", 64, "digits16", "/tmp/never-written")
    cfg, obj = resolve(path, over)
    assert obj.name == "progressive" and cfg.ema.decay is None and cfg.preview_every is None
    assert cfg.checkpoint_every >= 10**9 and cfg.log_every >= 10**9
    cfg, obj = resolve(*tool.config_args("sid", 64, "digits16", "/tmp/never-written"))
    assert obj.cfg.regression_warmup == 0 and [ph.start for ph in obj.phases()] == [0, 0]  # the main iterations
    cfg, obj = resolve(*tool.config_args("dmd2", 64, "digits16", "/tmp/never-written"))  # a warm-up by share
    assert obj.cfg.regression_warmup_fraction is None and [ph.name for ph in obj.phases()] == ["critic", "generator"]
    assert all(ph.start == 0 and ph.start_fraction is None for ph in obj.phases())
    _, over = tool.config_args("no-such-preset", 64, "t", "o")
    assert "objective.name=no-such-preset" in over
