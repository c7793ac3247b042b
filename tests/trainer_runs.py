"""Helpers for tests that run ``stepdistill train`` in subprocesses (real kills, real launches)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

TOY = str(Path(__file__).with_name("trainer_toy.py"))


def write_config(path: Path, teacher, data, **kw) -> Path:
    cfg = dict(teacher=str(teacher), data=str(data), cpu=True, batch_size=4, seed=3, log_every=1,
               preview_every=None, progress=False, objective={"name": "toy-regress"})
    cfg.update(kw)
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    return path


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    e["PYTHONPATH"] = os.pathsep.join([str(Path(TOY).parent), e.get("PYTHONPATH", "")])
    return e


def train_cmd(config: Path, *overrides: str) -> list[str]:
    return [sys.executable, TOY, "train", str(config), *overrides]


def launch_cmd(nproc: int, config: Path, *overrides: str) -> list[str]:
    with socket.socket() as s:  # a free port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # --multi_gpu selects accelerate's torchrun launcher; the config's cpu=true makes each process a
    # CPU (gloo) rank. (--cpu would pick the simple launcher, which spawns one process without MPI.)
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), TOY, "train", str(config), *overrides]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    rc = proc.wait(timeout=timeout)
    assert rc == 0, f"exit {rc}:\n{log.read_text()[-3000:]}"


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    folder = run / "checkpoints" / f"step-{step:08d}"
    out = {f"nets/{k}": v for k, v in load_file(folder / "nets.safetensors").items()}
    out.update({f"ema/{k}": v for k, v in load_file(folder / "ema.safetensors").items()})
    return out
