"""Data parallel under ``accelerate launch`` (CPU, gloo): two processes with half the batch each
train the same weights as one process with the whole batch, and their checkpoints resume in one.

Equality holds by design, not by luck: per-sample noise and times are drawn for the global batch
from (seed, step) and split by rank; the data order is a global permutation split by rank."""
from __future__ import annotations

import torch

from trainer_runs import finish, launch_cmd, start, train_cmd, weights, write_config


def test_two_processes_equal_one_and_resume_in_one(tiny_teacher_dir, tiny_data_npz, tmp_path):
    # two phases with an update ratio: the generator phase leaves the critic unused (and vice versa)
    # Adam's eps = 1 makes its update a smooth function of the gradient (with the usual 1e-8, an
    # element whose true gradient is ~0 turns rounding noise into a full +-lr step)
    opt = {"lr": 0.1, "eps": 1.0}
    cfg = write_config(tmp_path / "cfg.yaml", tiny_teacher_dir, tiny_data_npz, checkpoint_every=1, batch_size=8,
                       objective={"name": "toy-critic"}, optim={"student": opt, "critic": opt})
    one, two = tmp_path / "one", tmp_path / "two"
    p1 = start(train_cmd(cfg, f"output_dir={one}", "max_steps=3"), tmp_path / "one.log")
    p2 = start(launch_cmd(2, cfg, f"output_dir={two}", "max_steps=2"), tmp_path / "two.log")
    finish(p2, tmp_path / "two.log")
    assert (two / "checkpoints" / "step-00000002" / "rng-rank1.pt").is_file()  # both processes ran
    p3 = start(train_cmd(cfg, f"output_dir={two}", "max_steps=3"), tmp_path / "resume.log")
    finish(p1, tmp_path / "one.log")
    finish(p3, tmp_path / "resume.log")
    init = weights(one, 1)
    for step in (2, 3):  # 3: the two-process checkpoint resumed in one process
        w1, w2 = weights(one, step), weights(two, step)
        assert w1.keys() == w2.keys()
        moved = max((w1[k] - init[k]).abs().max().item() for k in w1)
        assert moved > 1e-4  # training really changed the weights, so agreement below means something
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=f"step {step}: {k}")
