"""Data parallel under ``accelerate launch`` (CPU, gloo): two processes with half the batch each
train the same weights as one process with the whole batch, and their checkpoints resume in one.

Equality holds by design, not by luck: per-sample noise and times are drawn for the global batch
from (seed, step) and split by rank; the data order is a global permutation split by rank."""
from __future__ import annotations

import pytest
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


#: every objective at toy size; SiD without SiDA's GAN term, whose batch means are per process as in
#: the authors' loop (sida_training_loop.py), so it alone is not split-invariant
OBJECTIVES = {
    "progressive": {"name": "progressive", "start_steps": 4, "final_steps": 2, "iterations_per_round": 2},
    "consistency": {"name": "consistency", "teacher_steps": 8},
    "dmd": {"name": "dmd", "cache_num": 8, "cache_steps": 2, "regression_batch": None},
    "dmd2": {"name": "dmd2", "critic_repeats": 2, "gan_weight": 1e-2},
    "sid": {"name": "sid", "fake_lora_rank": 2},
    "adversarial": {"name": "adversarial", "r1_weight": 1e-3},
    "scm": {"name": "scm", "tangent_warmup": 1},
    "tcd": {"name": "tcd", "teacher_steps": 8},
    "swiftbrush": {"name": "swiftbrush", "fake_lora_rank": 2},
    "hyper_sd": {"name": "hyper_sd", "teacher_steps": 8, "iterations_per_stage": 1},
    "phased_dmd": {"name": "phased_dmd", "experts": [1, 1], "critic_repeats": 1},  # phase 2 from the second step
    "guidance_distill": {"name": "guidance_distill", "stage1_iterations": 1, "start_steps": 4, "final_steps": 2,
                         "iterations_per_round": 1},  # stage 1, then stage 2's 4 -> 2 round
    "hybrid": {"name": "hybrid", "base": {"name": "scm", "tangent_warmup": 1},  # rCM: sCM + DMD with its critic
               "terms": [{"name": "dmd2", "weight": 0.5, "gan_weight": 0.0, "critic_repeats": 2}]},
}


#: in the default run: the teacher-output cache built once (dmd), a LoRA fake score (sid) and a hybrid
#: (sCM's JVP and weighting head with DMD2's critic); the rest under -m slow
DEFAULT_RUN = ("dmd", "sid", "hybrid")


@pytest.mark.parametrize("name", [n if n in DEFAULT_RUN else pytest.param(n, marks=pytest.mark.slow) for n in OBJECTIVES])
def test_every_objective_trains_the_same_weights_on_two_processes(name, tiny_teacher_dir, tiny_data_npz, tmp_path):
    """Two processes with half the batch each train the same weights as one process with all of it,
    for every objective: per-sample noise, times, step indices and regression pairs come from the
    trainer's stream. DMD's teacher-output cache is built once, by the main process, in build()."""
    opt = {"lr": 0.05, "eps": 1.0}
    one, two = tmp_path / "one", tmp_path / "two"
    procs = []
    for run, launch in ((one, False), (two, True)):
        obj = dict(OBJECTIVES[name])
        if name == "dmd":
            obj["cache"] = str(run) + "-pairs"
        trained = {"progressive": ["student"], "consistency": ["student"], "adversarial": ["student", "disc"],
                   "dmd2": ["student", "fake_score", "disc"], "scm": ["student", "weighting"], "tcd": ["student"], "swiftbrush": ["student", "fake_score"], "hyper_sd": ["student"],
                   "phased_dmd": ["student", "fake_score_1", "fake_score_2"], "guidance_distill": ["student"], "hybrid": ["student", "weighting", "fake_score"]}.get(name, ["student", "fake_score"])
        more = {"student": {"steps": 2, "sampler": "ddim", "time_cond_proj_dim": 16}} if name == "guidance_distill" else {}
        cfg = write_config(tmp_path / f"{run.name}.yaml", tiny_teacher_dir, tiny_data_npz, checkpoint_every=1,
                           batch_size=8, objective=obj, optim={n: opt for n in trained}, **more)
        cmd = (launch_cmd(2, cfg, f"output_dir={run}", "max_steps=2") if launch else
               train_cmd(cfg, f"output_dir={run}", "max_steps=2"))
        procs.append((start(cmd, tmp_path / f"{run.name}.log"), tmp_path / f"{run.name}.log"))
    for p, log in procs:
        finish(p, log)
    if name == "dmd":
        assert (tmp_path / "two.log").read_text().count("teacher-output cache: sampling") == 1
    w1, w2, init = weights(one, 2), weights(two, 2), weights(one, 1)
    assert w1.keys() == w2.keys()
    assert max((w1[k] - init[k]).abs().max().item() for k in w1) > 1e-5  # training moved the weights
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")


@pytest.mark.parametrize("cpu", [True, False])
def test_the_fsdp_launch_config_on_cpu_stops_with_one_line(cpu, tiny_teacher_dir, tiny_data_npz, tmp_path):
    """The shipped FSDP launch config (2 processes here) on a machine without GPUs: accelerate falls
    back to DDP over gloo (cpu=true) or to independent processes (cpu=false) without saying so; the
    trainer refuses both before it claims the run folder."""
    import subprocess
    import sys

    from omegaconf import OmegaConf

    from stepdistill.resources import PRESETS
    from trainer_runs import TOY, env

    acc = OmegaConf.load(PRESETS / "accelerate" / "fsdp.yaml")
    acc.num_processes, acc.mixed_precision = 2, "no"
    (tmp_path / "fsdp.yaml").write_text(OmegaConf.to_yaml(acc))
    cfg = write_config(tmp_path / "cfg.yaml", tiny_teacher_dir, tiny_data_npz, cpu=cpu, max_steps=1)
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp.yaml"),
                          TOY, "train", str(cfg), f"output_dir={out}"], env=env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode != 0
    said = "the launch config asks for FSDP" if cpu else "launched as 2 processes"
    assert f"error: {said}" in res.stderr
    assert not out.exists()
