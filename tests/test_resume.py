"""Exact resume: a run killed with SIGKILL and re-run with the same command ends bit-for-bit where
an uninterrupted run ends (weights, EMA; hence RNG, data order, optimizer, LR schedule and
objective state were all restored)."""
from __future__ import annotations

import json
import signal
import time

import pytest
import torch

from trainer_runs import finish, start, train_cmd, weights, write_config


# by default the saved dataset read by 2 workers; the .npz without workers and the image folder under -m slow
@pytest.mark.parametrize("source,workers", [pytest.param("npz", 0, marks=pytest.mark.slow),
                                            pytest.param("folder", 2, marks=pytest.mark.slow), ("hf", 2)])
def test_sigkill_and_rerun_matches_uninterrupted_run(source, workers, tiny_teacher_dir, tiny_data_npz,
                                                     tiny_data_folder, tiny_data_hf, tmp_path):
    """With data workers the data is read from disk per batch: an image folder (``disk_data``) or a saved
    Hugging Face dataset (``hf_data``)."""
    data = {"npz": tiny_data_npz, "folder": tiny_data_folder, "hf": tiny_data_hf}[source]
    cfg = write_config(tmp_path / "cfg.yaml", tiny_teacher_dir, data, checkpoint_every=2, data_workers=workers,
                       objective={"name": "toy-regress", "delay": 0.25})
    full, killed = tmp_path / "full", tmp_path / "killed"
    steps = 8
    a = start(train_cmd(cfg, f"output_dir={full}", f"max_steps={steps}"), tmp_path / "full.log")
    b = start(train_cmd(cfg, f"output_dir={killed}", f"max_steps={steps}"), tmp_path / "killed.log")
    first = killed / "checkpoints" / "step-00000002"
    deadline = time.time() + 240
    while not first.exists() and b.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    b.send_signal(signal.SIGKILL)
    assert b.wait() == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    done = sorted(p.name for p in (killed / "checkpoints").iterdir() if not p.name.startswith("."))
    assert done and f"step-{steps:08d}" not in done, done  # really interrupted mid-run
    rerun = start(train_cmd(cfg, f"output_dir={killed}", f"max_steps={steps}"), tmp_path / "rerun.log")
    finish(rerun, tmp_path / "rerun.log")
    finish(a, tmp_path / "full.log")
    assert "resum" in (tmp_path / "rerun.log").read_text().lower()
    wa, wb = weights(full, steps), weights(killed, steps)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert not torch.equal(wa["nets/student.denoiser.backbone.conv_in.weight"],
                           weights(killed, 6)["nets/student.denoiser.backbone.conv_in.weight"])
    logged = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))
