"""The student's scheduler: one diffusers config from which both the student's training timesteps
and the exported pipeline's timesteps are computed, so the two cannot drift apart.

A K-step student (Song et al., 2023, Alg. 1; Yin et al., 2024b, sec. 4.5) predicts x0 at each of
its timesteps and re-noises that x0 with *fresh* noise to the next one. In diffusers this is:

* VP teachers: ``LCMScheduler`` (Luo et al., 2023), whose step is x_next = sqrt(ab_next) f +
  sqrt(1 - ab_next) z with f = c_skip x + c_out x0_hat. With ``original_inference_steps`` equal to
  ``num_train_timesteps`` its K-step grid is index-uniform over all training steps ([999, 749, 499,
  249] for K = 4), not LCM's default 50-step skeleton ([999, 759, 499, 259]) that peers make users
  override by hand. Its boundary condition (eq. 8, ``timestep_scaling``) is exactly the student's
  ``boundary="lcm"``; a student without it gets a ``timestep_scaling`` so large that c_skip and
  1 - c_out vanish to float precision at every timestep >= 1.
* Flow teachers: ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``, whose step is
  x_next = (1 - s_next) x0_hat + s_next z: the same re-noising on the rectified-flow path; its
  ``shift_terminal`` ends a K-step grid at the shifted 1/K rather than next to clean data.
* ``sampler="ddim"`` (multistep consistency students, whose step is deterministic): DDIM (Song et
  al., 2021, eq. 12) from the student's x0 to the next timestep, x_next = sqrt(ab_next) x0_hat +
  sqrt(1 - ab_next) eps_hat. VP teachers: ``DDIMScheduler`` (trailing spacing, alpha-bar 1 after the
  last step, eta 0 as every diffusers pipeline calls it); flow teachers: the same
  ``FlowMatchEulerDiscreteScheduler`` without ``stochastic_sampling``, whose Euler step on the
  rectified-flow path is that DDIM step.
* EDM teachers: ``EDMEulerScheduler`` with the student's sigma_max (its ``set_timesteps(K)`` gives
  the student's Karras grid, Karras et al., 2022, eq. 5, and a final 0) supplies the preconditioning
  (``precondition_inputs`` / ``_noise`` / ``_outputs``, Table 1). Its own step is Euler with churn,
  not "x0, then fresh noise", so the shipped ``pipeline.py`` takes x0 from ``precondition_outputs``
  and re-noises it, x_next = x0 + sigma_next z (``sampler="ddim"``: x0 + sigma_next (x - x0) / sigma,
  the Euler / DDIM step).

A student may sample at times of its own (``StudentConfig.timesteps``: sCM's 2-step sampler, whose second
step starts at TrigFlow t = 1.1, Lu & Song, 2024, sec. 5.2 and App. G.2). The exported scheduler then runs its K-step
grid only for other step counts; at the trained count the pipeline passes the times in:
``LCMScheduler.set_timesteps(timesteps=...)``, flow's ``set_timesteps(sigmas=...)`` (before the shift,
which it applies; no ``shift_terminal``, which would move the last one), EDM's sigmas directly.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import UserError
from ..schedules import EDMSchedule, FlowSchedule, Schedule, VPSchedule

#: LCM's c_skip/c_out scale (diffusers' LCMScheduler default, Luo et al., 2023, eq. 8)
LCM_TIMESTEP_SCALING = 10.0
#: for students without a boundary condition: at t >= 1, c_skip = 0.25 / (1e12 t^2 + 0.25) < 3e-13
#: and c_out = 1 to float32 precision, so the scheduler's step uses the network's x0 unchanged
NO_BOUNDARY_TIMESTEP_SCALING = 1e6
#: diffusers' LCMScheduler fixes sigma_data at 0.5 in get_scalings_for_boundary_condition_discrete
LCM_SIGMA_DATA = 0.5

#: the student's step between its timesteps: "renoise" (x0, then fresh noise) or "ddim" (deterministic)
SAMPLERS = ("renoise", "ddim", "tcd")
TCD_GRID_STEPS = 50  # the teacher grid of LCM and TCD training (N), TCDScheduler's original_inference_steps

_LCM_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
             "prediction_type", "set_alpha_to_one", "steps_offset", "rescale_betas_zero_snr",
             "timestep_spacing", "clip_sample")


def _boundary(boundary: str | None) -> str | None:
    if boundary in (None, "none"):
        return None
    if boundary != "lcm":
        raise UserError(f"student boundary {boundary!r} is not supported; use 'none' or 'lcm'")
    return boundary


def check_sampler(sampler: str | None, boundary: str | None = None, first_timestep: float | None = None) -> str:
    """The sampler name ("renoise" for None), refused where unknown or where the student's other
    options cannot go with it."""
    sampler = sampler or "renoise"
    if sampler not in SAMPLERS:
        raise UserError(f"student sampler {sampler!r} is not supported; use one of {', '.join(SAMPLERS)}")
    if sampler == "ddim" and boundary not in (None, "none"):
        raise UserError("a sampler 'ddim' student maps each timestep to the next, not to clean data, so the "
                        "consistency boundary condition does not apply; set student.boundary=null")
    if sampler == "tcd" and (boundary not in (None, "none") or first_timestep is not None):
        raise UserError("a sampler 'tcd' student steps as diffusers' TCDScheduler, which has no boundary condition "
                        "and starts at the last training timestep; set student.boundary=null and "
                        "student.first_timestep=null")
    if sampler == "ddim" and first_timestep is not None:
        raise UserError("a sampler 'ddim' student starts at the last training timestep, as the exported DDIMScheduler "
                        "does; set student.first_timestep=null")
    return sampler


def check_first_timestep(schedule: Schedule, first_timestep: float | None) -> float | int | None:
    """The generator's input time when it is not the noisiest one (SiD's sigma_init = 2.5: the
    generator reads sigma_init-scaled noise at sigma_init, Zhou et al., 2024, sec. 5), in the
    teacher's own time units, refused (one line) where the schedule cannot start there:
    * VP: a training timestep with T/2 <= t < T: LCMScheduler's grid is ``range(1, n + 1) * (T // n) - 1``
      for ``original_inference_steps`` n, which ends at n - 1 = t only while T // n == 1;
    * EDM: a sigma in (sigma_min, sigma_max] (the student's grid is EDM's Karras grid from there);
    * flow: a time in (0, T] (sigma = t / T; the student's grid is its K-step grid scaled by t / T)."""
    if first_timestep is None:
        return None
    if isinstance(schedule, EDMSchedule):
        s = float(first_timestep)
        if not schedule.sigma_min < s <= schedule.sigma_max:
            raise UserError(f"student.first_timestep is a sigma on EDM teachers and must lie in "
                            f"({schedule.sigma_min}, {schedule.sigma_max}], got {first_timestep}; SiD's sigma_init "
                            "is 2.5")
        return s
    if isinstance(schedule, FlowSchedule):
        t, n = float(first_timestep), schedule.num_train_timesteps
        if not 0 < t <= n:
            raise UserError(f"student.first_timestep is a time in (0, {n}] (sigma = t / {n}) on flow teachers, got "
                            f"{first_timestep}")
        return t
    if not isinstance(schedule, VPSchedule):
        raise UserError(f"student.first_timestep is not supported for {type(schedule).__name__}; set "
                        "student.first_timestep=null")
    t, n = int(first_timestep), int(schedule.num_train_timesteps)
    if t != first_timestep or not n // 2 <= t <= n - 1:
        raise UserError(f"student.first_timestep must be an integer in [{n // 2}, {n - 1}] (the exported LCMScheduler "
                        f"can start its grid only there), got {first_timestep}; SiD's sigma_init = 2.5 is about 625 "
                        "on SD's scaled_linear schedule")
    return t


def student_scheduler_config(schedule: Schedule, boundary: str | None = None,
                             steps: int | None = None, first_timestep: float | None = None,
                             sampler: str | None = "renoise", custom_times: bool = False) -> dict[str, Any]:
    """The diffusers scheduler config (with ``_class_name``) whose ``set_timesteps(K)`` gives a
    K-step student's timesteps and whose ``step`` is the student's sampling step (K = ``steps``;
    only flow grids depend on it; ``first_timestep`` moves a VP grid's first timestep down;
    ``sampler`` is the step between timesteps, "renoise" or "ddim"; ``custom_times``: the student
    samples its trained step count at times of its own, passed to ``set_timesteps``)."""
    boundary = _boundary(boundary)
    first_timestep = check_first_timestep(schedule, first_timestep)
    sampler = check_sampler(sampler, boundary, first_timestep)
    if isinstance(schedule, VPSchedule):
        cfg = {k: schedule.config[k] for k in _LCM_KEYS if k in schedule.config}
        cfg["clip_sample"] = False  # the student's x0 is never clipped
        if sampler == "ddim":
            n = int(schedule.num_train_timesteps)
            if steps and n % int(steps):
                # DDIMScheduler steps from t to t - n // K: the next grid point (and clean data after
                # the last) only when K divides n
                raise UserError(f"a sampler 'ddim' student needs a step count that divides the teacher's {n} "
                                f"training timesteps (the exported DDIMScheduler steps by {n} // K), got {steps}; "
                                "use e.g. 1, 2, 4 or 8")
            # index-uniform K-step grid from T - 1 ([999, 749, 499, 249]); the last step lands on alpha-bar 1
            cfg.update(timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=True)
            return {"_class_name": "DDIMScheduler", **cfg}
        if sampler == "tcd":  # TCD (Zheng et al., 2024): eta = gamma at call time
            # its K-step grid is taken from LCM's 50-step skipping grid (999, 979, ..., 19) on which the
            # objective trains (TCDScheduler's default original_inference_steps): 4 steps = 999, 759, 499, 259
            cfg["original_inference_steps"] = TCD_GRID_STEPS
            return {"_class_name": "TCDScheduler", **cfg}
        # every training index is on the grid: K-step timesteps are index-uniform ("trailing")
        # (or every index up to first_timestep: then set_timesteps(1) = [first_timestep])
        cfg["original_inference_steps"] = int(schedule.num_train_timesteps if first_timestep is None
                                              else first_timestep + 1)
        cfg["timestep_scaling"] = LCM_TIMESTEP_SCALING if boundary == "lcm" else NO_BOUNDARY_TIMESTEP_SCALING
        return {"_class_name": "LCMScheduler", **cfg}
    if isinstance(schedule, FlowSchedule):
        if first_timestep is not None:
            raise UserError("FlowMatchEulerDiscreteScheduler always starts its grid at sigma 1, so a flow student "
                            "with student.first_timestep cannot be exported to plain diffusers; sample it with "
                            "`stepdistill sample RUN_DIR`")
        if boundary is not None:
            raise UserError("boundary='lcm' has no flow-matching scheduler in diffusers; train the flow student "
                            "with student.boundary=null")
        cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler", **schedule.config,
               "stochastic_sampling": sampler == "renoise"}
        if steps and steps > 1 and not custom_times and not getattr(schedule, "linspace_sigmas", False):
            # set_timesteps(K) alone spaces K sigmas from 1 down to the training grid's last (~0.003 at
            # shift 3), so a K-step student's last step would sit at clean data. shift_terminal stretches
            # the grid to end at the shifted 1/K instead (the sigma of an evenly spaced K-step grid):
            # shift s / (K + s - 1) = s (1/K) / (1 + (s - 1) / K). FluxPipeline passes its own sigmas.
            cfg["shift_terminal"] = schedule.shift / (steps + schedule.shift - 1.0)
        return cfg
    if isinstance(schedule, EDMSchedule):
        if boundary is not None:
            raise UserError("boundary='lcm' is LCM's VP boundary condition; EDM's preconditioning is its own: train "
                            "the EDM student with student.boundary=null")
        cfg = {"_class_name": "EDMEulerScheduler", **schedule.config}
        if first_timestep is not None:  # the grid starts at sigma_init (SiD's 2.5)
            cfg["sigma_max"] = float(first_timestep)
        if steps and steps > 1 and not custom_times:
            # set_timesteps(K) spaces K sigmas down to sigma_min, where the last step would return its
            # input (c_out = sigma_min); the student's grid ends one Karras step above it instead
            # (student_timesteps), so sigma_min here is the student's last sigma, the teacher's is kept
            # (a private key plain diffusers ignores) for reloading the schedule
            cfg["sigma_min"] = float(student_timesteps(schedule, steps, first_timestep=first_timestep)[-1])
            cfg["_teacher_sigma_min"] = schedule.sigma_min
        return cfg
    raise UserError(f"schedule {type(schedule).__name__} cannot be exported; use a VP or flow-matching teacher")


def make_scheduler(config: dict[str, Any]):
    """Instantiate a scheduler config written by ``student_scheduler_config``."""
    import diffusers

    cls = getattr(diffusers, config["_class_name"])
    return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def student_timesteps(schedule: Schedule, steps: int, boundary: str | None = None,
                      first_timestep: float | None = None, sampler: str | None = "renoise",
                      custom_times: bool = False) -> torch.Tensor:
    """A K-step student's timesteps (float64, descending): what the exported scheduler's
    ``set_timesteps(K)`` produces (EDM: its sigmas without the final 0). On EDM the first K of a
    (K + 1)-point Karras grid (eq. 5, from sigma_init where given): the grid's last point, sigma_min,
    is dropped, as a VP student's K trailing timesteps stop at 1000/K and a flow student's at 1/K."""
    if steps < 1:
        raise UserError(f"student steps must be >= 1, got {steps}; use 1, 2 or 4")
    first_timestep = check_first_timestep(schedule, first_timestep)
    sampler = check_sampler(sampler)
    if isinstance(schedule, EDMSchedule):  # Karras et al., 2022, eq. 5, from sigma_init where given
        if steps == 1 or custom_times:  # a student with its own times exports the teacher's sigma_min
            return schedule.timesteps(steps, sigma_max=first_timestep)[:-1]
        end = float(schedule.timesteps(steps + 1, sigma_max=first_timestep)[steps - 1])
        return schedule.timesteps(steps, sigma_max=first_timestep, sigma_min=end)[:-1]  # as the export runs it
    if isinstance(schedule, FlowSchedule) and first_timestep is not None:
        full = student_timesteps(schedule, steps, sampler=sampler)
        return full * (first_timestep / float(full[0]))
    # the grid does not depend on the boundary condition; flow schedulers have none to configure
    sched = make_scheduler(student_scheduler_config(schedule, boundary if isinstance(schedule, VPSchedule) else None,
                                                    steps, first_timestep, sampler, custom_times))
    if isinstance(schedule, FlowSchedule):
        schedule.set_timesteps(sched, steps)  # FLUX: the pipeline's linspace sigmas
    else:
        sched.set_timesteps(steps)
    return sched.timesteps.to(torch.float64)


def check_timesteps(schedule: Schedule, timesteps, steps: int, sampler: str | None = "renoise",
                    first_timestep: float | None = None) -> torch.Tensor | None:
    """A student's own sampling times (``StudentConfig.timesteps``, the teacher's units: VP training
    timesteps, EDM sigmas, flow t = 1000 sigma) as a float64 tensor, or None; refused (one line) where
    the exported scheduler cannot take them at call time."""
    if timesteps is None:
        return None
    ts = torch.as_tensor([float(v) for v in timesteps], dtype=torch.float64)
    how = "student.timesteps lists the student's sampling times, noisiest first"
    if len(ts) != int(steps) or (len(ts) > 1 and not bool((ts[1:] < ts[:-1]).all())):
        raise UserError(f"{how}: {int(steps)} strictly decreasing values for {int(steps)} steps, got {ts.tolist()}")
    if first_timestep is not None:
        raise UserError("student.timesteps and student.first_timestep both set where the student starts; keep one")
    if (sampler or "renoise") != "renoise":
        raise UserError(f"student.timesteps needs the re-noising sampler (the exported scheduler takes the times at "
                        f"call time only then), got sampler {sampler!r}; set student.timesteps=null")
    if isinstance(schedule, VPSchedule):
        n = int(schedule.num_train_timesteps)
        if not bool((ts == ts.round()).all()) or float(ts.min()) < 0 or float(ts.max()) > n - 1:
            raise UserError(f"{how}: on a VP teacher integer training timesteps in [0, {n - 1}] (LCMScheduler takes "
                            f"no others), got {ts.tolist()}")
    elif isinstance(schedule, EDMSchedule):
        if float(ts.min()) <= schedule.sigma_min or float(ts.max()) > schedule.sigma_max:
            raise UserError(f"{how}: on an EDM teacher sigmas in ({schedule.sigma_min}, {schedule.sigma_max}], got "
                            f"{ts.tolist()}")
    elif isinstance(schedule, FlowSchedule):
        n = schedule.num_train_timesteps
        if schedule.config.get("use_dynamic_shifting") or getattr(schedule, "linspace_sigmas", False):
            raise UserError("student.timesteps is not supported on a flow teacher with resolution-dependent shifting "
                            "(its pipeline sets its own sigmas); set student.timesteps=null")
        moved = [k for k in ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
                 if schedule.config.get(k)]
        if moved:  # FlowMatchEulerDiscreteScheduler would move sigmas passed to it
            raise UserError(f"student.timesteps is not supported on a flow teacher whose scheduler sets {moved[0]} "
                            "(it would move the student's times); set student.timesteps=null")
        if float(ts.min()) <= 0 or float(ts.max()) > n:
            raise UserError(f"{how}: on a flow teacher times in (0, {n}] (sigma = t / {n}), got {ts.tolist()}")
    else:
        raise UserError(f"student.timesteps is not supported for {type(schedule).__name__}; set student.timesteps=null")
    return ts.float().double()  # as the exported pipeline holds them (float32 sigmas and timesteps)


def boundary_scalings(config: dict[str, Any], t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) that the exported LCMScheduler applies at timesteps t, in float64."""
    st = torch.as_tensor(t, dtype=torch.float64) * float(config["timestep_scaling"])
    return LCM_SIGMA_DATA**2 / (st**2 + LCM_SIGMA_DATA**2), st / (st**2 + LCM_SIGMA_DATA**2).sqrt()
