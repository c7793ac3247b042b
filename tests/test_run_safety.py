"""What a run folder promises: a NaN streak never rotates the good checkpoints out and a resume with a
lower learning rate trains with it; a replaced teacher is noticed; a second trainer is refused with the
holder's PID while a killed one's lock never blocks the resume; SIGTERM and SIGINT end with a final
checkpoint from which the run continues bit for bit, and a second Ctrl-C exits at once."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import trainer_toy  # noqa: F401  (registers the toy objectives)
from stepdistill.errors import UserError
from trainer_runs import env, finish, start, train_cmd, weights, write_config


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


def _trainer(teacher, data, out, allow_changes=False, **kw):
    from stepdistill.train import resolve
    from stepdistill.train.trainer import Trainer

    base = dict(teacher=str(teacher), data=str(data), output_dir=str(out), cpu="true", batch_size=4, max_steps=3,
                checkpoint_every=1, log_every=1, preview_every="null", progress="false")
    base.update(kw)
    base.setdefault("objective.name", "toy-regress")
    cfg, obj = resolve(None, [f"{k}={v}" for k, v in base.items()])
    return Trainer(cfg, obj, allow_changes=allow_changes)


def _names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_nan_streak_keeps_the_good_checkpoint_and_a_lower_lr_resumes(tiny_teacher_dir, tiny_data_npz, tmp_path):
    from accelerate.state import AcceleratorState

    from stepdistill.train.trainer import TrainingDiverged

    run = tmp_path / "run"
    bad = dict(max_steps=10, keep_checkpoints=1, max_nonfinite_in_a_row=3,
               **{"objective.nan_after": 3, "optim.student.lr": 1e-2})
    with pytest.raises(TrainingDiverged) as err:  # steps 4, 5, 6 are skipped; the 3rd skip stops the run
        _trainer(tiny_teacher_dir, tiny_data_npz, run, **bad).train()
    assert "step-00000003" in str(err.value)
    assert _names(run) == ["step-00000003"]  # nothing written during the streak, nothing good pruned
    state = json.loads((run / "checkpoints" / "step-00000003" / "trainer.json").read_text())
    assert state["nonfinite_in_row"] == 0
    assert all(torch.isfinite(v).all() for v in load_file(run / "checkpoints" / "step-00000003" / "nets.safetensors").values())
    AcceleratorState._reset_state(True)

    lower = dict(bad, **{"objective.nan_after": -1, "optim.student.lr": 1e-3})
    with pytest.raises(UserError, match=r"optim.student.lr: 0.01 -> 0.001.*--allow-changes"):
        _trainer(tiny_teacher_dir, tiny_data_npz, run, **lower)
    AcceleratorState._reset_state(True)
    t = _trainer(tiny_teacher_dir, tiny_data_npz, run, allow_changes=True, **lower)
    assert t.step == 3 and t.opts["student"].param_groups[0]["lr"] == 1e-3  # not the checkpoint's 1e-2
    assert t.train()["step"] == 10
    kept = (run / "config.before-step-00000003.yaml").read_text()
    assert "lr: 0.01" in kept and "nan_after: 3" in kept
    assert "lr: 0.001" in (run / "config.yaml").read_text()


def test_unchanged_resume_restores_the_optimizer_exactly(tiny_teacher_dir, tiny_data_npz, tmp_path):
    from accelerate.state import AcceleratorState

    kw = dict(max_steps=2, **{"optim.student.lr_schedule": "cosine", "optim.student.warmup_steps": 1,
                              "optim.student.beta1": 0.5, "optim.student.weight_decay": 0.01})
    a = _trainer(tiny_teacher_dir, tiny_data_npz, tmp_path / "run", **kw)
    a.train()
    groups = a.opts["student"].state_dict()["param_groups"]
    AcceleratorState._reset_state(True)
    b = _trainer(tiny_teacher_dir, tiny_data_npz, tmp_path / "run", **kw)
    assert b.opts["student"].state_dict()["param_groups"] == groups
    assert b.scheds["student"].get_last_lr() == a.scheds["student"].get_last_lr()


def test_no_checkpoint_of_nonfinite_weights(tiny_teacher_dir, tiny_data_npz, tmp_path):
    t = _trainer(tiny_teacher_dir, tiny_data_npz, tmp_path / "run", max_steps=1)
    t.train()
    with torch.no_grad():
        next(iter(t.params["student"])).view(-1)[0] = float("inf")
    assert t.healthy() is False and t.checkpoint() is False
    assert _names(tmp_path / "run") == ["step-00000001"]
    t.release()


def test_replaced_teacher_is_refused_on_resume(tiny_teacher_dir, tiny_data_npz, tmp_path):
    import shutil

    from accelerate.state import AcceleratorState

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    _trainer(teacher, tiny_data_npz, tmp_path / "run", max_steps=1).train()
    AcceleratorState._reset_state(True)
    weights_file = teacher / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights_file)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3  # same path, same architecture, other weights
    save_file(tensors, weights_file)
    with pytest.raises(UserError, match="teacher .* has changed since checkpoint"):
        _trainer(teacher, tiny_data_npz, tmp_path / "run", max_steps=2)


def _wait(cond, proc, timeout=240):
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, "the run ended early"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _logged(run: Path) -> list[int]:
    f = run / "metrics.jsonl"
    return [json.loads(x)["step"] for x in f.read_text().splitlines()] if f.is_file() else []


def test_second_trainer_is_refused_and_a_killed_ones_lock_does_not_block(tiny_teacher_dir, tiny_data_npz, tmp_path):
    import subprocess

    cfg = write_config(tmp_path / "cfg.yaml", tiny_teacher_dir, tiny_data_npz, checkpoint_every=1,
                       objective={"name": "toy-regress", "delay": 0.3})
    run = tmp_path / "run"
    a = start(train_cmd(cfg, f"output_dir={run}", "max_steps=200"), tmp_path / "a.log")
    try:
        _wait(lambda: len(_logged(run)) >= 1, a)
        b = subprocess.run(train_cmd(cfg, f"output_dir={run}", "max_steps=200"), env=env(), capture_output=True,
                           text=True, timeout=240)
        assert b.returncode == 2, b.stderr
        assert f"is in use by another stepdistill process (pid {a.pid} on" in b.stderr
        assert "Traceback" not in b.stderr
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
    done = _logged(run)[-1]
    c = start(train_cmd(cfg, f"output_dir={run}", f"max_steps={done + 1}"), tmp_path / "c.log")
    finish(c, tmp_path / "c.log")
    assert "resuming from" in (tmp_path / "c.log").read_text()


def test_sigterm_writes_a_final_checkpoint_and_the_run_continues_exactly(tiny_teacher_dir, tiny_data_npz, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_teacher_dir, tiny_data_npz, checkpoint_every=1000,
                       objective={"name": "toy-regress", "delay": 0.2})
    run = tmp_path / "run"
    a = start(train_cmd(cfg, f"output_dir={run}", "max_steps=500"), tmp_path / "a.log")
    _wait(lambda: len(_logged(run)) >= 2, a)
    a.send_signal(signal.SIGTERM)
    assert a.wait(timeout=120) == 128 + signal.SIGTERM
    log = (tmp_path / "a.log").read_text()
    stopped = _logged(run)[-1]
    assert f"stopped by SIGTERM at step {stopped}" in log and "Traceback" not in log, log[-2000:]
    assert _names(run) == [f"step-{stopped:08d}"]  # checkpoint_every=1000: this one is the signal's
    total = stopped + 2
    rerun = start(train_cmd(cfg, f"output_dir={run}", f"max_steps={total}"), tmp_path / "rerun.log")
    straight = start(train_cmd(cfg, f"output_dir={tmp_path / 'straight'}", f"max_steps={total}"),
                     tmp_path / "straight.log")
    finish(rerun, tmp_path / "rerun.log")
    finish(straight, tmp_path / "straight.log")
    wa, wb = weights(run, total), weights(tmp_path / "straight", total)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_second_ctrl_c_exits_at_once_with_one_line(tiny_teacher_dir, tiny_data_npz, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_teacher_dir, tiny_data_npz, checkpoint_every=1000,
                       objective={"name": "toy-regress", "delay": 3.0})
    run = tmp_path / "run"
    a = start(train_cmd(cfg, f"output_dir={run}", "max_steps=500"), tmp_path / "a.log")
    _wait(lambda: len(_logged(run)) >= 1, a)
    a.send_signal(signal.SIGINT)
    time.sleep(0.3)
    a.send_signal(signal.SIGINT)  # the update in flight sleeps 3 s more: only the second signal ends it now
    t0 = time.time()
    assert a.wait(timeout=60) == 130
    assert time.time() - t0 < 2.5
    log = (tmp_path / "a.log").read_text()
    assert "interrupted (Ctrl-C)" in log and "Traceback" not in log, log[-2000:]
    from stepdistill.train.checkpoint import list_checkpoints

    assert list_checkpoints(run) == []  # stopped at once: no final checkpoint was owed to the second signal


def test_folder_claim_is_exclusive_and_a_failed_start_removes_only_an_empty_folder_it_made(tmp_path):
    from stepdistill.runfolder import FolderClaim

    a = FolderClaim(tmp_path / "new")
    with pytest.raises(UserError, match=r"in use by another stepdistill process \(pid \d+ on"):
        FolderClaim(tmp_path / "new")
    (tmp_path / "new" / "checkpoints").mkdir()
    a.release(failed=True)  # made by the claim, nothing in it but empty folders: gone
    assert not (tmp_path / "new").exists()
    b = FolderClaim(tmp_path / "new")
    (tmp_path / "new" / "cache.bin").write_bytes(b"work")
    b.release(failed=True)  # something was written: kept
    assert (tmp_path / "new" / "cache.bin").read_bytes() == b"work"
    (tmp_path / "mine").mkdir()
    c = FolderClaim(tmp_path / "mine")
    c.release(failed=True)  # the user's own (empty) folder is never removed
    assert (tmp_path / "mine").is_dir()
    FolderClaim(tmp_path / "mine").release()  # released claims leave the folder free


def test_a_killed_holders_forked_children_do_not_keep_its_lock(tmp_path):
    """DataLoader workers are forked children: they must not hold the claim after their parent is
    SIGKILLed (orphaned workers live on for seconds and used to block the immediate resume)."""
    import os
    import subprocess
    import sys

    from stepdistill.runfolder import FolderClaim

    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time\n"
        "from stepdistill.runfolder import FolderClaim\n"
        f"claim = FolderClaim({str(folder)!r})\n"
        "child = os.fork()\n"
        "if child == 0:\n"  # one write() per line: with unbuffered stdout (PYTHONUNBUFFERED) print() writes
        # the text and its newline apart, and the two processes' lines could interleave on the shared pipe
        "    os.write(1, b'child running\\n'); time.sleep(60); os._exit(0)\n"  # past its fork handlers
        "os.write(1, f'{child}\\n'.encode()); time.sleep(60)\n")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    lines = [holder.stdout.readline().strip() for _ in range(2)]
    pids = [line for line in lines if line.isdigit()]
    if not pids:  # the holder did not start as written: say what it printed, not a bare StopIteration
        holder.kill()
        out, err = holder.communicate()
        pytest.fail(f"the lock holder printed {lines + out.splitlines()!r}; stderr: {err[-2000:]}")
    child = int(pids[0])
    try:
        with pytest.raises(UserError, match="in use"):
            FolderClaim(folder)  # the live parent holds it
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)  # the forked child is still alive ...
        FolderClaim(folder).release()  # ... and the folder is free at once
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
