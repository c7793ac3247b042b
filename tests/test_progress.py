"""Long phases outside the training loop report count, rate and ETA; off a terminal as plain lines."""
from __future__ import annotations

import io
import re

from conftest import tiny_teacher
from stepdistill.progress import Counter, clock


def test_counter_writes_plain_lines_off_a_terminal():
    out = io.StringIO()  # not a TTY, as under nohup or SLURM
    with Counter("teacher-output cache", 10, "pairs", stream=out, every=0.0) as bar:
        for _ in range(5):
            bar.advance(2)
    lines = out.getvalue().splitlines()
    assert lines[0] == "teacher-output cache: 10 pairs to do"
    assert re.fullmatch(r"teacher-output cache: 2/10 pairs, [\d.e+]+/s, eta \d:\d\d:\d\d", lines[1])
    assert len(lines) == 1 + 4 + 1  # the start, each step but the last, the end
    assert re.fullmatch(r"teacher-output cache: 10 pairs in \d:\d\d:\d\d \([\d.e+]+/s\)", lines[-1])


def test_counter_rate_limits_and_disables():
    out = io.StringIO()
    with Counter("x", 100, "images", stream=out, every=3600.0) as bar:
        for _ in range(10):
            bar.advance(10)
    assert len(out.getvalue().splitlines()) == 2  # start and end only: no line more often than `every`
    quiet = io.StringIO()
    with Counter("x", 3, stream=quiet, enabled=False) as bar:
        bar.advance(3)
    assert quiet.getvalue() == "" and bar.done == 3
    assert clock(3725.2) == "1:02:05" and clock(float("nan")) == "-:--:--"


def test_building_a_teacher_output_cache_reports_progress(tmp_path, capsys):
    from stepdistill.cache import ensure_cache

    said, teacher = [], tiny_teacher()
    teacher.meta = {"num_classes": 2, "null_class": 2, "in_channels": 1, "sample_size": 8}
    ensure_cache(teacher, tmp_path / "cache", num=6, steps=2, batch=4, log=said.append)
    out = capsys.readouterr().out
    assert said and "sampling 6 pairs" in said[0]
    assert "teacher-output cache: 6 pairs to do" in out and re.search(r"teacher-output cache: 6 pairs in ", out)
    ensure_cache(teacher, tmp_path / "cache", num=6, steps=2, batch=4, log=said.append)  # loaded: silent
    assert capsys.readouterr().out == ""


def test_reference_statistics_report_progress(capsys):
    from stepdistill.eval import get_detector
    from stepdistill.eval.stats import make_stats

    make_stats("digits-test", get_detector("digits"), num=40, batch_size=16)
    out = capsys.readouterr().out
    assert "reference statistics (digits-test, digits): 40 images to do" in out
    assert "reference statistics (digits-test, digits): 40 images in " in out
