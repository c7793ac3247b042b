"""Small objectives for trainer tests, and a CLI entry that registers them first
(``python tests/trainer_toy.py train CONFIG ...`` is ``stepdistill train`` with these available)."""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass

import torch

from stepdistill.objectives import OBJECTIVES, Objective, Phase, register
from stepdistill.sampling import sample


class ToyRegress(Objective):
    """Regress the student's one-step output onto the teacher's `teacher_steps`-step DDIM sample
    from the same noise (the simplest distillation: Luhman & Luhman, 2021)."""

    name = "toy-regress"

    @dataclass
    class Config:
        teacher_steps: int = 2
        weight: float = 1.0
        nan_after: int = -1     # from this outer step on, return NaN losses (tests the guard)
        delay: float = 0.0      # seconds of sleep per update (gives a kill test time to strike)

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.steps_done = 0

    def generator_loss(self, nets, batch):
        if self.cfg.delay:
            time.sleep(self.cfg.delay)
        x0, cond = batch["x0"], batch["cond"]
        noise = batch["rng"].randn_like(x0)
        with torch.no_grad():
            target = sample(nets.teacher, noise, self.cfg.teacher_steps, cond=cond)
        out = nets.student(noise, cond)
        loss = self.cfg.weight * ((out - target) ** 2).flatten(1).mean(1)
        if 0 <= self.cfg.nan_after <= self.steps_done:
            loss = loss * float("nan")
        return {"mse": loss, "_abs": (out - target).abs().flatten(1).mean(1).detach()}

    def on_step_end(self, nets, step):
        self.steps_done = step

    def state_dict(self):
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state):
        self.steps_done = int(state["steps_done"])


class ToyCritic(Objective):
    """Two phases and an update ratio: a critic (a trainable copy of the teacher) learns to denoise
    the student's samples (twice per iteration); the student moves its samples towards where the
    teacher and the critic disagree (the DMD direction, Yin et al., 2024a, eq. 7), critic frozen."""

    name = "toy-critic"

    @dataclass
    class Config:
        critic_repeats: int = 2

    def phases(self):
        return [Phase("critic", ("critic",), self.cfg.critic_repeats), Phase("generator", ("student",))]

    def build(self, teacher, student, context=None):
        critic = copy.deepcopy(teacher)
        critic.requires_grad_(True).train()
        return {"critic": critic}

    def _fake(self, nets, batch):
        noise = batch["rng"].randn_like(batch["x0"])
        return nets.student(noise, batch["cond"])

    def critic_loss(self, nets, batch):
        with torch.no_grad():
            x = self._fake(nets, batch)
        rng = batch["rng"]
        t = rng.sample_t(nets.teacher.schedule).to(x.device)
        xt = nets.teacher.schedule.add_noise(x, rng.randn_like(x), t)
        return {"dsm": ((nets.critic(xt, t, batch["cond"]) - x) ** 2).flatten(1).mean(1)}

    def generator_loss(self, nets, batch):
        x = self._fake(nets, batch)
        rng = batch["rng"]
        t = rng.sample_t(nets.teacher.schedule).to(x.device)
        xt = nets.teacher.schedule.add_noise(x, rng.randn_like(x), t)
        with torch.no_grad():
            direction = nets.critic(xt, t, batch["cond"]) - nets.teacher(xt, t, batch["cond"])
        target = (x - direction).detach()
        return {"dmd": 0.5 * ((x - target) ** 2).flatten(1).mean(1)}


for _cls in (ToyRegress, ToyCritic):
    if _cls.name not in OBJECTIVES:
        register(_cls)


if __name__ == "__main__":
    from stepdistill import cli

    cli.COMMANDS[:] = ["train"]  # the one command these runs drive
    sys.exit(cli.main())
