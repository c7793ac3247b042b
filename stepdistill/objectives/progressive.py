"""Progressive distillation (Salimans & Ho, 2022, Alg. 2): a student learns to take one DDIM step
where its teacher takes two; after each round the student becomes the next round's teacher and the
step count halves, e.g. a 64-step teacher -> 32 -> 16 -> 8 -> 4-step student.

Grids. A round whose student takes N steps trains at the times of ``student_grid(schedule, N)`` (the
exported scheduler's grid); the teacher's intermediate time t' is the matching point of
``student_grid(schedule, 2N)`` when that grid contains the N grid (VP: the LCMScheduler grid nests at every
halving), so each round's teacher is only asked at the times it was trained
on. For grids that are not nested (EDM's Karras grid, flow's linspace) t' is the midpoint
(t + t'') / 2 in the schedule's own time, the paper's t' = t - 0.5/N. The last round trains on
``student_grid(schedule, K)``, whose first K times are the student's (and the exported scheduler's).

Target and weighting. Written with alpha(t), sigma(t) only, so it holds for VP, EDM and flow:
the x0 target x~ = (z'' - (sigma''/sigma) z) / (alpha'' - (sigma''/sigma) alpha) makes one student
DDIM step from z land exactly on the teacher's two-step result z'' (Alg. 2). The x0 error is
weighted by max(SNR, 1), the "truncated SNR" weighting of sec. 4 (= max(||x - x^||^2, ||eps - eps^||^2)).
Why this one: the eps loss (weight SNR on the x0 error) gives no weight to the high-noise end where a
few-step student starts and where eps = z carries no information, while plain x0 error neglects
low noise; the max is x0 error at high noise and eps error at low noise. "snr_plus_one" (the v-loss,
weight SNR + 1, also sec. 4) is offered as the alternative the paper reports as equally good.

Round teacher. With ``round_ema`` > 0 the student's weights are averaged over the round (an EMA
of that decay), and at the round's end the average becomes the next round's teacher and the next
student's starting point, instead of the last weights (Alg. 2 takes the student itself): the
average is a smoother teacher than any single iterate of a regression run at a constant rate.

Learning rate. With ``lr_anneal="linear"`` (default) the student's learning rate falls linearly to 0
over each round and restarts with the next, as in the paper's released configs (linear annealing over
the steps of each halving); the trainer multiplies its own schedule by ``lr_factor``. A round then ends
on settled weights, which become the next round's teacher.

Round lengths. ``iterations_per_round`` iterations each (the last running on until the run ends), or
``round_shares``: each round its share of the run (``stages.py``), which holds on a slower machine or a
shorter budget, where rounds of fixed length end the run before the last round (whose step count is the
exported student's) has begun.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, List, Optional

import torch

from ..denoisers import guided
from ..errors import UserError
from ..schedules import Schedule
from .base import Nets, Objective, register
from .common import WEIGHTINGS, Draws, copy_into, ema_update, grid_with_midpoints, pd_target, snr_weight, student_grid
from .stages import share_bounds, stage_at

LR_ANNEALS = ("linear", "none")


@register
class Progressive(Objective):
    name = "progressive"
    uses_real_data = True  # z_t is noised data (Alg. 2, line 3)

    @dataclass
    class Config:
        start_steps: int = 64           # DDIM steps of the round-1 teacher; round 1's student takes half
        final_steps: int = 4            # K: the last round's student steps (= the exported step count)
        iterations_per_round: int = 1000  # outer iterations per round; with lr_anneal=none the last round
                                          # runs on past its share (linear: max_steps <= rounds x this)
        round_shares: Optional[List[float]] = None  # the rounds as shares of the run instead (e.g. [1, 1, 2]): a
                                          # round ends where the run's progress reaches its cumulative share
                                          # (stages.py), so the last round is reached on a slower machine too
        guidance: float = 1.0           # CFG scale of the round-1 (real) teacher; 1 = plain conditional
        weighting: str = "truncated_snr"  # "truncated_snr": max(SNR, 1) (sec. 4); "snr_plus_one": SNR + 1
        lr_anneal: str = "linear"       # "linear": the student's lr falls linearly to 0 over each round and restarts
                                        # (the paper's code: learning_rate_anneal_type linear over steps_per_iter);
                                        # "none": the configured schedule alone
        round_ema: float = 0.0          # > 0: the next round starts from (and is taught by) an EMA of this round's
                                        # student with this decay; 0 = the student's last weights (Alg. 2)

    def __init__(self, cfg: Any = None):
        super().__init__(cfg)
        c = self.cfg
        if c.final_steps < 1 or c.start_steps <= c.final_steps:
            raise UserError(f"progressive: need start_steps > final_steps >= 1, got start_steps={c.start_steps}, "
                            f"final_steps={c.final_steps}; e.g. start_steps=64 final_steps=4")
        ratio = c.start_steps // c.final_steps
        if c.start_steps % c.final_steps or ratio & (ratio - 1):
            raise UserError(f"progressive: start_steps / final_steps must be a power of two (each round halves), "
                            f"got {c.start_steps} / {c.final_steps}; e.g. start_steps={c.final_steps * 16}")
        if c.iterations_per_round < 1:
            raise UserError(f"progressive: iterations_per_round must be >= 1, got {c.iterations_per_round}")
        if c.round_shares is not None and c.lr_anneal != "none":
            raise UserError("progressive: round_shares sizes rounds by the run's progress, and lr_anneal=linear "
                            "anneals over a round's iterations, which a share does not fix; set "
                            "objective.lr_anneal=none or objective.round_shares=null")
        if c.lr_anneal not in LR_ANNEALS:
            raise UserError(f"progressive: lr_anneal {c.lr_anneal!r} is unknown; use one of {', '.join(LR_ANNEALS)}")
        if c.weighting not in WEIGHTINGS:
            raise UserError(f"progressive: weighting {c.weighting!r} is unknown; use one of {', '.join(WEIGHTINGS)}")
        if not 0.0 <= c.round_ema < 1.0:
            raise UserError(f"progressive: round_ema must be in [0, 1), got {c.round_ema}; 0 = the student itself")
        # student step counts, one per round: start/2, start/4, ..., K
        self.rounds = [c.start_steps >> r for r in range(1, ratio.bit_length())]
        self.bounds = share_bounds(c.round_shares, len(self.rounds), "round_shares",
                                   f"round (start_steps {c.start_steps} halved to final_steps {c.final_steps})")
        self.progress = 0.0     # the run's progress, told before each iteration (round_shares)
        self.round = 0          # index into self.rounds
        self.iteration = 0      # outer iterations done in the current round
        self._grids: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    # -- rounds ---------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """The current round's student step count N."""
        return self.rounds[self.round]

    @property
    def total_iterations(self) -> int:
        """Outer iterations until the last round has had its share (a sensible max_steps)."""
        return len(self.rounds) * self.cfg.iterations_per_round

    def student_steps(self) -> int:
        return int(self.cfg.final_steps)

    def student_sampler(self) -> str:
        """DDIM: Alg. 2 trains one deterministic DDIM student step to land on two teacher steps, and
        the student is sampled that way (sec. 3); fresh noise between its steps would leave the
        trajectory it was trained on."""
        return "ddim"

    def set_progress(self, progress: float) -> None:
        self.progress = float(progress)

    def round_done(self) -> bool:
        """Whether the round ends with this iteration: its iterations_per_round are done, or (round_shares)
        the iteration began with the run's progress at the round's cumulative share."""
        if self.bounds is not None:
            return stage_at(self.bounds, self.progress) > self.round
        return self.iteration >= self.cfg.iterations_per_round

    def check_budget(self, max_steps: int) -> None:
        if self.cfg.lr_anneal == "linear" and max_steps > self.total_iterations:
            raise UserError(f"progressive: max_steps={max_steps} runs past the last round's share "
                            f"({len(self.rounds)} rounds x iterations_per_round={self.cfg.iterations_per_round} = "
                            f"{self.total_iterations}), where lr_anneal=linear has brought the learning rate to 0; "
                            f"set max_steps={self.total_iterations}, raise objective.iterations_per_round, or set "
                            "objective.lr_anneal=none")

    def lr_factor(self, net: str) -> float:
        """Linear annealing to 0 over each round, restarted by the next (the paper's released code anneals
        linearly over each halving's steps); 1 with lr_anneal=none."""
        if self.cfg.lr_anneal == "none":
            return 1.0
        return max(0.0, 1.0 - self.iteration / self.cfg.iterations_per_round)

    def build(self, teacher, student, context=None) -> dict:
        if student.first_timestep is not None:
            raise UserError("progressive: the student's grid is the halved teacher grid, which starts at the last "
                            "training timestep; set student.first_timestep=null")
        final = student_grid(student.schedule, self.cfg.final_steps)[:-1]
        if not torch.equal(student.timesteps.cpu(), final):
            raise UserError(f"progressive: the student samples at {student.timesteps.tolist()} but the last round "
                            f"trains at {final.tolist()}; build the student with steps={self.cfg.final_steps}")
        if self.cfg.guidance != 1.0 and not teacher.is_conditional:
            raise UserError(f"progressive: guidance={self.cfg.guidance} needs a conditional teacher; set guidance=1")
        # the frozen teacher of rounds 2.. (the previous round's student); a net, so it checkpoints
        nets = {"pd_teacher": copy.deepcopy(student).requires_grad_(False).eval()}
        if self.cfg.round_ema > 0:  # the round's running average of the student
            nets["pd_average"] = copy.deepcopy(student).requires_grad_(False).eval()
        return nets

    @torch.no_grad()
    def on_step_end(self, nets: Nets, step: int) -> None:
        self.iteration += 1
        average = nets.get("pd_average")
        if average is not None:
            ema_update(average, nets.student, float(self.cfg.round_ema))
        if self.round + 1 < len(self.rounds) and self.round_done():
            # Alg. 2, outer loop: this round's student (or its average) is the next round's (frozen)
            # teacher, and the next student starts from it
            copy_into(nets.pd_teacher, nets.student if average is None else average)
            if average is not None:
                copy_into(nets.student, average)
            self.round += 1
            self.iteration = 0

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "iteration": self.iteration, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        r = int(state["round"])
        if r >= len(self.rounds) or self.rounds[r] != int(state["steps"]):
            raise UserError(f"progressive: the checkpoint is in a round with a {int(state['steps'])}-step student, "
                            f"which rounds {self.rounds} do not have; resume with the run's own start_steps and "
                            "final_steps")
        self.round, self.iteration = r, int(state["iteration"])

    # -- loss -------------------------------------------------------------------------------------
    def _grid(self, schedule: Schedule, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self.steps, id(schedule))
        if key not in self._grids:
            self._grids[key] = grid_with_midpoints(schedule, self.steps)
        g, mid = self._grids[key]
        return g.to(device), mid.to(device)

    def teacher_denoiser(self, nets: Nets):
        """Round 1: the real teacher (with CFG); later rounds: the previous round's student."""
        if self.round == 0:
            return guided(nets.teacher, self.cfg.guidance)
        return nets.pd_teacher.denoise

    def weight(self, schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
        return snr_weight(schedule, t, self.cfg.weighting)

    def generator_loss(self, nets: Nets, batch: dict) -> dict[str, torch.Tensor]:
        x = batch["x0"]
        cond = batch.get("cond")
        schedule = nets.student.schedule
        grid, mid = self._grid(schedule, x.device)
        draws = Draws(batch)
        i = draws.randint(0, self.steps).to(x.device)  # Alg. 2: t on the student's grid
        t, t_mid, t_next = grid[i], mid[i], grid[i + 1]
        z = draws.noised(schedule, x, t)
        with torch.no_grad():
            x_tilde = pd_target(self.teacher_denoiser(nets), schedule, z, t, t_mid, t_next, cond)
        x_hat = nets.student.denoise(z, t, cond)
        err = (x_hat - x_tilde.to(x_hat.dtype)).square().flatten(1).mean(1)
        w = self.weight(schedule, t).to(err.dtype)
        return {"loss": w * err, "_x0_mse": err.detach(),
                "_round_steps": torch.full_like(err, float(self.steps)).detach()}
