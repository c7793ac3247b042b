"""tools/benchmark.py runs every distillation preset by default, and only those; the time budget ends
the runs, except where max_steps is part of the method."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import load_tool
from stepdistill.resources import PRESETS

ROOT = Path(__file__).resolve().parents[1]


def test_default_objectives_are_the_distillation_presets():
    names = load_tool("benchmark").distill_presets()
    configs = {p.stem: OmegaConf.load(p) for p in (PRESETS / "digits").glob("*.yaml")}
    assert names == sorted(k for k, c in configs.items() if "objective" in c and not k.endswith(("_edm", "_flow")))
    assert "dmd2_4step" in names and "teacher" not in names  # teacher.yaml is the pretrain config
    assert "sid_edm" in configs and "sid_edm" not in names  # a kind's variant stands in for its preset


@pytest.mark.parametrize("name, lifted", [("progressive", True), ("pd_linear", False), ("consistency", True),
                                          ("dmd2", True)])
def test_train_command_lifts_max_steps_except_for_fixed_length_presets(name, lifted, tmp_path, monkeypatch):
    """The budget alone ends a run, except where the objective refuses a longer one (progressive with
    lr_anneal=linear anneals over its rounds' iterations; with round_shares, as the shipped preset, it does not)."""
    tool = load_tool("benchmark")
    seen = []
    if name == "pd_linear":
        presets = tmp_path / "presets"
        presets.mkdir()
        (presets / "pd_linear.yaml").write_text("objective:\n  name: progressive\n  iterations_per_round: 100\n"
                                                "  lr_anneal: linear\nmax_steps: 400\n")
        monkeypatch.setattr(tool, "DIGITS", presets)

    def fake_run(cmd, log):
        seen.append(cmd)
        raise SystemExit("stop before training")

    monkeypatch.setattr(tool, "run", fake_run)
    with pytest.raises(SystemExit):
        tool.train(name, type("Args", (), {"minutes": None})(), tmp_path)
    (cmd,) = seen
    assert f"digits/{name}" in cmd and f"max_minutes={tool.BUDGET.get(name, tool.DEFAULT_BUDGET)}" in cmd
    assert ("max_steps=1000000" in cmd) == lifted
    assert not any(a.startswith("max_steps=") for a in cmd) or lifted  # a fixed length keeps its preset's
    if name == "pd_linear":
        return  # not a shipped preset
    # a preset's teacher-output cache is built in the run's own folder, charged to its budget
    from stepdistill.train.setup import resolve

    cfg, _ = resolve(cmd[cmd.index("train") + 1], [a for a in cmd if a.startswith("output_dir=")])
    cache = cfg.objective.get("cache")
    assert cache == (None if name == "progressive" else str(tmp_path / f"run_{name}" / "teacher_cache"))


def _fake_measurements(tool, monkeypatch, fid):
    """evaluate/train stand-ins: every model scores `fid` on seeds 0 and 1 (+0.5 on seed 1)."""
    def evaluate(model, steps, detector, args, work, tag):
        return {k: {"fid": [fid, fid + 0.5], "acc": [0.9, 0.9]} for k in steps}

    def train(name, args, work):
        return str(work / name), 1, {"iters": 7, "s_it": 0.5, "rss_gib": 0.7, "wall": 60.0, "minutes": 1.0,
                                     "threads": "default", "load": 2.0, "preset": tool.preset_id(name),
                                     "code": tool.code_of(name), "date": "today"}

    monkeypatch.setattr(tool, "evaluate", evaluate)
    monkeypatch.setattr(tool, "train", train)
    grids = []
    monkeypatch.setattr(tool, "grid", lambda model, out, work, steps=None: grids.append((Path(out).name, steps)))
    return grids


def _bench(tool, monkeypatch, tmp_path, *args):
    monkeypatch.setattr("sys.argv", ["benchmark.py", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w"),
                                     "--seeds", "0,1", *args])
    tool.main()
    return (tmp_path / "out" / "digits.md").read_text()


def test_presets_left_out_keep_their_earlier_rows_under_the_same_protocol(tmp_path, monkeypatch):
    tool = load_tool("benchmark")
    names = tool.distill_presets()
    _fake_measurements(tool, monkeypatch, 30.0)
    first = _bench(tool, monkeypatch, tmp_path)  # every preset measured
    assert all(f"| {n} (7 it) | 1 | 30.25 (30.00–30.50) |" in first for n in names)
    grids = _fake_measurements(tool, monkeypatch, 20.0)
    second = _bench(tool, monkeypatch, tmp_path, "--objectives", names[0])
    assert grids == [("teacher_50step.png", 50), (f"{names[0]}.png", None)]  # only what was measured now
    assert f"| {names[0]} (7 it) | 1 | 20.25 (20.00–20.50) |" in second  # re-measured
    for n in names[1:]:  # carried: the earlier numbers and their 'as measured' lines, one row each
        assert second.count(f"| {n} (7 it) | 1 | 30.25 (30.00–30.50) |") == 1
        assert second.count(f"- {n}: 1 min budget") == 1
    assert "Rows carried over from the earlier table" in second
    assert "| teacher | 50 | 30.25" in second and "Teacher evaluation carried over" in second  # same teacher files
    assert (tmp_path / "out" / "digits_fid_vs_nfe.png").stat().st_size > 0


def test_rows_under_another_protocol_are_not_carried(tmp_path, monkeypatch):
    tool = load_tool("benchmark")
    names = tool.distill_presets()
    _fake_measurements(tool, monkeypatch, 30.0)
    _bench(tool, monkeypatch, tmp_path)
    text = _bench(tool, monkeypatch, tmp_path, "--objectives", names[0], "--num", "500")  # another sample count
    assert all(f"| {n} (" not in text for n in names[1:]) and "carried over" not in text


def test_rows_of_a_preset_changed_since_are_not_carried(tmp_path, monkeypatch):
    tool = load_tool("benchmark")
    names = tool.distill_presets()
    _fake_measurements(tool, monkeypatch, 30.0)
    _bench(tool, monkeypatch, tmp_path)
    real = tool.preset_id
    monkeypatch.setattr(tool, "preset_id", lambda n: "0" * 12 if n == names[1] else real(n))  # names[1] edited
    text = _bench(tool, monkeypatch, tmp_path, "--objectives", names[0])
    assert f"| {names[1]} (" not in text and f"- {names[1]}: " not in text
    assert all(f"| {n} (7 it) |" in text for n in names[2:])  # unchanged presets keep their rows


def test_a_finished_run_of_other_preset_values_is_refused(tmp_path):
    tool = load_tool("benchmark")
    name = tool.distill_presets()[0]
    run_dir = tmp_path / f"run_{name}"
    run_dir.mkdir()
    (run_dir / "bench.json").write_text('{"student_steps": 1, "preset": "000000000000"}')
    with pytest.raises(SystemExit, match="remove that folder to re-measure"):
        tool.train(name, type("Args", (), {"minutes": None})(), tmp_path)
    (run_dir / "bench.json").write_text(f'{{"student_steps": 1, "preset": "{tool.preset_id(name)}"}}')
    with pytest.raises(SystemExit, match="other code of objective"):  # trained before code was fingerprinted
        tool.train(name, None, tmp_path)
    (run_dir / "bench.json").write_text(f'{{"student_steps": 1, "preset": "{tool.preset_id(name)}", '
                                        f'"code": "{tool.code_of(name)}"}}')
    assert tool.train(name, None, tmp_path)[1] == 1  # the same values and code: the finished run is reused


def test_an_interrupted_run_resumes_only_under_the_code_it_started_with(tmp_path, monkeypatch):
    tool = load_tool("benchmark")
    name = tool.distill_presets()[0]
    run_dir, seen = tmp_path / f"run_{name}", []

    def fake_run(cmd, log):
        seen.append(cmd)
        raise SystemExit("killed while training")

    monkeypatch.setattr(tool, "run", fake_run)
    with pytest.raises(SystemExit, match="killed"):
        tool.train(name, type("Args", (), {"minutes": None})(), tmp_path)
    start = json.loads((run_dir / "bench_start.json").read_text())
    assert start["code"] == tool.code_of(name) and start["preset"] == tool.preset_id(name)
    (run_dir / "checkpoints").mkdir()
    with pytest.raises(SystemExit, match="killed"):  # the same code: the rerun resumes it
        tool.train(name, type("Args", (), {"minutes": None})(), tmp_path)
    assert len(seen) == 2
    monkeypatch.setattr(tool, "code_of", lambda n: "0" * 12)  # the code changed in between
    with pytest.raises(SystemExit, match="interrupted run started with other values .* or other code"):
        tool.train(name, type("Args", (), {"minutes": None})(), tmp_path)
    (run_dir / "bench_start.json").unlink()
    with pytest.raises(SystemExit, match="did not record the code"):
        tool.train(name, type("Args", (), {"minutes": None})(), tmp_path)
    assert len(seen) == 2


def test_carried_rows_of_changed_code_are_named(tmp_path, monkeypatch):
    """A row whose objective's (or sampling) code changed since it was measured is carried (its numbers
    were measured) but the table names it, with the way to re-measure it."""
    tool = load_tool("benchmark")
    names = tool.distill_presets()
    _fake_measurements(tool, monkeypatch, 30.0)
    first = _bench(tool, monkeypatch, tmp_path)
    assert f"code {tool.code_of(names[1])}" in first and "measured with other code" not in first
    if (tool.ROOT / ".git").exists():  # a checkout: the commit measured at
        assert len(tool.commit().split("+")[0]) == 7 and tool.commit() != "unknown"
    real = tool.code_of
    monkeypatch.setattr(tool, "code_of", lambda n: "0" * 12 if n == names[1] else real(n))  # names[1]'s code edited
    text = _bench(tool, monkeypatch, tmp_path, "--objectives", names[0])
    assert f"| {names[1]} (7 it) |" in text  # still carried ...
    said = next(x for x in text.splitlines() if "measured with other code" in x)
    assert said.rstrip(".").endswith(f"re-measure with --objectives): {names[1]}")  # ... and named, alone


def test_preset_id_reads_values_not_comments(tmp_path, monkeypatch):
    tool = load_tool("benchmark")
    monkeypatch.setattr(tool, "DIGITS", tmp_path)
    f = tmp_path / "x.yaml"
    f.write_text("objective:\n  name: dmd\nbatch_size: 64\n")
    first = tool.preset_id("x")
    f.write_text("# a comment\nbatch_size: 64   # same value\nobjective: {name: dmd}\n")
    assert tool.preset_id("x") == first
    f.write_text("objective:\n  name: dmd\nbatch_size: 32\n")
    assert tool.preset_id("x") != first
    # where things are (teacher folder, run folder, cache folder) is not how the run trains
    f.write_text("teacher: digits16\noutput_dir: runs/x\nobjective:\n  name: dmd\n  cache: ${output_dir}/c\n"
                 "batch_size: 64\n")
    assert tool.preset_id("x") == first


def test_plot_point_reads_the_inception_cell():
    tool = load_tool("benchmark")
    assert tool.plot_point("| dmd2 (891 it) | 1 | 21.73 (20.92–22.84) | 3.11 (1.35–6.53) | 0.969 | 0.226 | – | – |") \
        == ("dmd2 (891 it)", 1, 21.73, 20.92, 22.84)
    assert tool.plot_point("| teacher | 4 | 53.29 | 13.95 | 0.990 | – | – | – |") == ("teacher", 4, 53.29, 53.29, 53.29)


def test_teacher_rows_are_carried_only_for_the_same_teacher_files_and_steps(tmp_path, monkeypatch):
    tool = load_tool("benchmark")
    name = tool.distill_presets()[0]
    _fake_measurements(tool, monkeypatch, 30.0)
    first = _bench(tool, monkeypatch, tmp_path, "--objectives", name)
    assert f"Teacher rows as measured: teacher {tool.teacher_id()}, steps 1,4,50, " in first
    _fake_measurements(tool, monkeypatch, 20.0)
    assert "| teacher | 50 | 30.25" in _bench(tool, monkeypatch, tmp_path, "--objectives", name)
    assert "| teacher | 50 | 20.25" in _bench(tool, monkeypatch, tmp_path, "--objectives", name, "--remeasure-teacher")
    _fake_measurements(tool, monkeypatch, 10.0)
    text = _bench(tool, monkeypatch, tmp_path, "--objectives", name, "--teacher-steps", "1,50")  # other steps
    assert "| teacher | 50 | 10.25" in text and "| teacher | 4 |" not in text
    _fake_measurements(tool, monkeypatch, 40.0)
    monkeypatch.setattr(tool, "teacher_id", lambda folder=tool.TEACHER: "f" * 12)  # the teacher's weights changed
    text = _bench(tool, monkeypatch, tmp_path, "--objectives", name, "--teacher-steps", "1,50")
    assert "| teacher | 50 | 40.25" in text and "teacher ffffffffffff" in text


def test_teacher_id_follows_the_weights_not_the_preview(tmp_path, monkeypatch):
    tool = load_tool("benchmark")
    (tmp_path / "t" / "unet").mkdir(parents=True)
    (tmp_path / "t" / "unet" / "w.safetensors").write_bytes(b"abc")
    (tmp_path / "t" / "samples.png").write_bytes(b"x")
    first = tool.teacher_id(str(tmp_path / "t"))
    (tmp_path / "t" / "samples.png").write_bytes(b"y")
    assert tool.teacher_id(str(tmp_path / "t")) == first
    (tmp_path / "t" / "unet" / "w.safetensors").write_bytes(b"abd")
    assert tool.teacher_id(str(tmp_path / "t")) != first


def test_other_teacher_kinds_take_the_same_presets_with_their_teacher(tmp_path, monkeypatch):
    tool = load_tool("benchmark")
    seen = []

    def fake_run(cmd, log):
        seen.append(cmd)
        raise SystemExit("stop before training")

    monkeypatch.setattr(tool, "run", fake_run)
    for kind in ("vp", "edm", "flow"):
        monkeypatch.setattr(tool, "TEACHER", tool.KINDS[kind][0])
        with pytest.raises(SystemExit):
            tool.train("dmd2", type("Args", (), {"minutes": None})(), tmp_path / kind)
    vp, edm, flow = seen
    assert not any(a.startswith("teacher=") for a in vp)
    assert "teacher=digits16_edm" in edm and "teacher=digits16_flow" in flow and "digits/dmd2" in edm


def test_a_kind_specific_preset_stands_in_for_its_preset_on_that_kind_only(tmp_path, monkeypatch):
    """digits/<preset>_<kind>.yaml measures <preset> in that kind's table (under the row's usual name, with
    its own fingerprint); other kinds keep the plain preset, and the variant is not a row of its own."""
    tool = load_tool("benchmark")
    monkeypatch.setattr(tool, "DIGITS", tmp_path)
    (tmp_path / "cm.yaml").write_text("objective:\n  name: consistency\n  solver: dpmpp2m\n")
    (tmp_path / "cm_flow.yaml").write_text("teacher: digits16_flow\nobjective:\n  name: consistency\n  solver: ddim\n")
    (tmp_path / "teacher_flow.yaml").write_text("model: {}\n")  # a pretrain config: no objective
    (tmp_path / "dmd_edmx.yaml").write_text("objective:\n  name: dmd\n")  # not a kind: a preset of its own
    assert tool.distill_presets() == ["cm", "dmd_edmx"]
    seen = []

    def fake_run(cmd, log):
        seen.append(cmd)
        raise SystemExit("stop before training")

    monkeypatch.setattr(tool, "run", fake_run)
    ids = {}
    for kind in ("vp", "edm", "flow"):
        monkeypatch.setattr(tool, "KIND", kind)
        monkeypatch.setattr(tool, "TEACHER", tool.KINDS[kind][0])
        ids[kind] = tool.preset_id("cm")
        with pytest.raises(SystemExit):
            tool.train("cm", type("Args", (), {"minutes": None})(), tmp_path / kind)
    vp, edm, flow = (cmd[cmd.index("train") + 1] for cmd in seen)
    assert (vp, edm, flow) == ("digits/cm", "digits/cm", "digits/cm_flow")
    assert ids["vp"] == ids["edm"] != ids["flow"]  # the variant's values (solver) are its own
    assert str(tmp_path / "flow" / "run_cm") in " ".join(seen[2])  # the row keeps the preset's name
    assert tool.variant_said("cm") == " (digits/cm_flow)"  # its 'as measured' line names the variant
    monkeypatch.setattr(tool, "KIND", "edm")
    assert tool.variant_said("cm") == ""


def test_evaluations_stay_with_the_model_they_scored(tmp_path):
    """A new run of a preset in the same work folder is evaluated anew: an earlier run's scores are
    kept in that run's own folder and never reused for another model."""
    import json

    tool = load_tool("benchmark")
    calls = []

    def fake_run(cmd, log):
        if "--make-stats" in cmd:
            Path(cmd[cmd.index("--out") + 1]).write_text("stats")
            return 0.0, 0.0
        calls.append(cmd[4])  # python -m stepdistill eval MODEL ...
        fid = 10.0 * len(calls)
        Path(cmd[cmd.index("--json") + 1]).write_text(json.dumps({"results": [{"steps": 1, "fid": fid}]}))
        return 0.0, 0.0

    tool.run = fake_run
    args = type("Args", (), {"ref": "digits", "seeds": [0], "num": 10})()
    work = tmp_path / "work"
    work.mkdir()
    first, second = work / "run_dmd", work / "run_dmd_again"
    for d in (first, second):
        d.mkdir()
        (d / "bench.json").write_text("{}")
    assert tool.evaluate(str(first), [1], "digits", args, work, "dmd")[1]["fid"] == [10.0]
    assert tool.evaluate(str(first), [1], "digits", args, work, "dmd")[1]["fid"] == [10.0]  # reused: same model
    assert tool.evaluate(str(second), [1], "digits", args, work, "dmd")[1]["fid"] == [20.0]  # a new model: scored
    assert calls == [str(first), str(second)] and (first / "bench_digits_s0.json").is_file()


def test_plot_kinds_reads_every_kinds_table_cell_for_cell(tmp_path):
    """tools/plot_kinds.py: the teacher and student points are the tables' Inception FID cells."""
    kinds = load_tool("plot_kinds")
    head = "| objective | steps | FID (Inception) | FID (digits) | class accuracy | s/it | peak RSS | wall time |\n|---|---|---|---|---|---|---|---|\n"
    (tmp_path / "digits.md").write_text(head + "| teacher | 1 | 124.76 (124.59–124.92) | 1 | 1 | – | – | – |\n"
                                        "| teacher | 50 | 27.32 (25.87–28.44) | 1 | 1 | – | – | – |\n"
                                        "| dmd2 (891 it) | 1 | 21.73 (20.92–22.84) | 3 | 1 | 0.2 | 1 GiB | 15 min |\n")
    (tmp_path / "digits_flow.md").write_text(head + "| teacher | 4 | 21.86 (21.00–23.17) | 1 | 1 | – | – | – |\n")
    teacher, students = kinds.read_table(tmp_path / "digits.md")
    assert teacher == [("teacher", 1, 124.76, 124.59, 124.92), ("teacher", 50, 27.32, 25.87, 28.44)]
    assert students == [("dmd2 (891 it)", 1, 21.73, 20.92, 22.84)]
    kinds.main(["--tables", str(tmp_path), "--out", str(tmp_path / "kinds.png")])
    assert (tmp_path / "kinds.png").stat().st_size > 1000


@pytest.mark.parametrize("warmup, switches, expected", [
    (["objective.regression_warmup=500", "objective.regression_warmup_fraction=null"], {},
     {"warmup": 500, "critic": 391, "generator": 391}),
    (["objective.regression_warmup=0", "objective.regression_warmup_fraction=0.2"], {"0.2": 420},
     {"warmup": 420, "critic": 471, "generator": 471}),
    # the fraction was never reached (a run cut short): the warm-up held every iteration
    (["objective.regression_warmup=0", "objective.regression_warmup_fraction=0.2"], {},
     {"warmup": 891, "critic": 0, "generator": 0}),
])
def test_phase_iterations_count_each_phase_from_iterations_or_recorded_fractions(warmup, switches, expected,
                                                                                tmp_path):
    """A row says how its run split into phases: a fixed warm-up by its iteration count, a fraction by the
    iteration the trainer recorded reaching it (trainer.json's phase_switches)."""
    from stepdistill.train.setup import resolve

    tool = load_tool("benchmark")
    cfg, _ = resolve(str(PRESETS / "digits" / "dmd2.yaml"), [f"output_dir={tmp_path}", *warmup])
    OmegaConf.save(cfg, tmp_path / "config.yaml")
    counts = tool.phase_iterations(tmp_path, {"step": 891, "phase_switches": switches})
    assert counts == expected
    assert tool.phases_said(counts) == ", ".join(f"{k} {v}" for k, v in expected.items())
    assert tool.phases_said({"generator": 891}) == ""  # one phase: nothing to split


def test_grid_settings_name_paths_inside_the_checkout():
    """The sample grids' settings files are committed: paths in the checkout become relative to it,
    a teacher's name and a folder elsewhere stay as they are."""
    tool = load_tool("benchmark")
    assert tool._in_checkout(tool.ROOT / "assets" / "benchmarks" / "grids" / "dmd2.png") == "assets/benchmarks/grids/dmd2.png"
    assert tool._in_checkout("digits16_flow") == "digits16_flow"
    assert tool._in_checkout("/elsewhere/run") == "/elsewhere/run"


def test_solver_check_refuses_an_unknown_kind_before_loading_anything(monkeypatch, tmp_path):
    tool = load_tool("solver_check")
    called = []
    monkeypatch.setattr(tool, "distances", lambda *a: called.append(a) or [])
    monkeypatch.setattr("sys.argv", ["solver_check.py", "--kinds", "vp,ve", "--out", str(tmp_path / "s.md")])
    with pytest.raises(SystemExit, match="unknown teacher kind 've'; choose from vp, edm, flow"):
        tool.main()
    assert not called and not (tmp_path / "s.md").exists()


def test_solver_check_writes_one_row_per_kind_and_grid(monkeypatch, tmp_path):
    tool = load_tool("solver_check")
    monkeypatch.setattr(tool, "distances", lambda kind, num, ref: [("own, 16 steps", 0.03, 0.04, 0.02)])
    monkeypatch.setattr("sys.argv", ["solver_check.py", "--kinds", "edm,flow", "--out", str(tmp_path / "s.md")])
    tool.main()
    text = (tmp_path / "s.md").read_text()
    assert "| edm | own, 16 steps | 0.0300 | 0.0400 | 0.0200 |" in text
    assert "| flow | own, 16 steps | 0.0300 | 0.0400 | 0.0200 |" in text and "| vp |" not in text
