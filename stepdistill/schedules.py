"""Noise schedules in one continuous time.

Every schedule is an affine Gaussian path x_t = alpha(t) * x0 + sigma(t) * eps, with t in the
units its diffusers scheduler uses for `timesteps`:

* ``VPSchedule``   -- DDPM family; t is the (fractional) training index 0..T-1, and t = -1 is
  clean data (diffusers' ``set_alpha_to_one``). log alpha-bar is interpolated linearly between
  integer indices, so integer t reproduces the diffusers table exactly.
* ``EDMSchedule``  -- EDM / VE (Karras et al., 2022); t = sigma, alpha = 1.
* ``FlowSchedule`` -- rectified flow / flow matching (Lipman et al., 2023; Esser et al., 2024);
  t = sigma * num_train_timesteps, alpha = 1 - sigma.

Times, alphas and sigmas are computed in float64; they are cast to the data dtype only when
they multiply data. The conversions between the four parameterisations are exact for every
schedule (see ``convert``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from .errors import UserError

PREDICTIONS = ("x0", "eps", "v", "flow")
_DIFFUSERS_PREDICTION = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "flow": "flow"}


# ---------------------------------------------------------------------------------------------
# Exact conversions. x = alpha * x0 + sigma * eps;  v = alpha * eps - sigma * x0 (Salimans & Ho,
# 2022, sec. 4); flow velocity u = eps - x0 = dx/dsigma on the rectified-flow path (Liu et al.,
# 2023). Written for general (alpha, sigma), not only alpha^2 + sigma^2 = 1.
# ---------------------------------------------------------------------------------------------
def to_x0(pred: torch.Tensor, kind: str, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """The x0 implied by a prediction of `kind` at noisy input x."""
    if kind == "x0":
        return pred
    if kind == "eps":
        return (x - sigma * pred) / alpha
    if kind == "v":  # solve [alpha, sigma; -sigma, alpha] [x0; eps] = [x; v] for x0
        return (alpha * x - sigma * pred) / (alpha**2 + sigma**2)
    if kind == "flow":  # x = alpha x0 + sigma (u + x0)
        return (x - sigma * pred) / (alpha + sigma)
    raise ValueError(f"unknown prediction kind {kind!r}; expected one of {PREDICTIONS}")


def from_x0(x0: torch.Tensor, kind: str, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """The prediction of `kind` that corresponds to x0 at noisy input x."""
    if kind == "x0":
        return x0
    eps = (x - alpha * x0) / sigma
    if kind == "eps":
        return eps
    if kind == "v":
        return alpha * eps - sigma * x0
    if kind == "flow":
        return eps - x0
    raise ValueError(f"unknown prediction kind {kind!r}; expected one of {PREDICTIONS}")


def convert(pred: torch.Tensor, src: str, dst: str, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """Convert a prediction between parameterisations through x0."""
    if src == dst:
        return pred
    return from_x0(to_x0(pred, src, x, alpha, sigma), dst, x, alpha, sigma)


def bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars shaped to broadcast against a batch, in the batch's dtype."""
    v = torch.as_tensor(v, device=like.device)
    if v.ndim == 0:
        v = v.expand(like.shape[0])
    return v.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class Schedule(ABC):
    """An affine Gaussian path with its sampling grids and its backbone's parameterisation."""

    kind: str
    #: what the backbone outputs: "eps", "v", "x0", "flow" or "edm" (EDM's F with c_skip/c_out)
    prediction_type: str
    #: the time at which sigma = 0
    t_clean: float
    #: how Euler/Heun scale the state: "ve" (x/alpha, sigma/alpha; EDM, k-diffusion) or "flow"
    #: (x/(alpha+sigma); rectified flow). Both are defined where alpha > 0; "flow" also at alpha = 0.
    ode_space: str = "ve"

    @abstractmethod
    def alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha(t), sigma(t) in float64."""

    @abstractmethod
    def timesteps(self, n: int, **kw) -> torch.Tensor:
        """The n-step sampling grid, n + 1 descending float64 times ending at t_clean, exactly as
        this schedule's diffusers scheduler produces them (so an exported scheduler agrees)."""

    @abstractmethod
    def sample_t(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training times for denoising score matching, the distribution the teacher was trained on."""

    @abstractmethod
    def to_diffusers_config(self) -> dict[str, Any]:
        """The diffusers scheduler config (class name included) that reproduces this schedule."""

    @property
    @abstractmethod
    def t_max(self) -> float:
        """The noisiest time the backbone was trained on."""

    @abstractmethod
    def t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        """The time whose log(alpha / sigma) is ``lam``: the inverse of ``log_snr``, differentiable in
        ``lam`` (a TrigFlow time maps onto this schedule through it, ``trigflow.py``)."""

    # -- backbone interface -----------------------------------------------------------------
    def model_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the backbone is fed for x_t (EDM scales by c_in; others feed x_t)."""
        return x

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the backbone is fed as its timestep."""
        return t

    def raw_to_x0(self, raw: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.alpha_sigma(t)
        return to_x0(raw, self.prediction_type, x, bcast(a, x), bcast(s, x))

    def x0_to_raw(self, x0: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The backbone output that would yield x0: the regression target of its own loss."""
        a, s = self.alpha_sigma(t)
        return from_x0(x0, self.prediction_type, x, bcast(a, x), bcast(s, x))

    def is_clean_end(self, t_end) -> torch.Tensor:
        """Where a jump to t_end returns the x0 estimate itself: at t_clean (where sampling returns
        x0, even where that time keeps some noise) or wherever sigma(t_end) = 0."""
        t_end = torch.as_tensor(t_end, dtype=torch.float64)
        return (t_end == float(self.t_clean)) | (self.alpha_sigma(t_end)[1] == 0)

    # -- paths --------------------------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        a, s = self.alpha_sigma(t)
        return bcast(a, x0) * x0 + bcast(s, x0) * eps

    def prior(self, noise: torch.Tensor, t) -> torch.Tensor:
        """Initial state at time t from unit noise, scaled as diffusers' `init_noise_sigma`:
        sqrt(alpha^2 + sigma^2) (1 for VP and flow, sqrt(sigma_max^2 + 1) for EDM)."""
        a, s = self.alpha_sigma(torch.as_tensor(t, dtype=torch.float64))
        return noise * bcast((a**2 + s**2).sqrt(), noise)

    def snr(self, t) -> torch.Tensor:
        a, s = self.alpha_sigma(t)
        return (a / s) ** 2

    def _t(self, t) -> torch.Tensor:
        return torch.as_tensor(t, dtype=torch.float64)


class VPSchedule(Schedule):
    """Variance-preserving DDPM family, built from a diffusers scheduler config."""

    kind = "vp"

    def __init__(self, config: dict[str, Any] | None = None, prediction_type: str | None = None):
        from diffusers import DDIMScheduler

        config = {k: v for k, v in dict(config or {}).items() if not k.startswith("_")}
        config.setdefault("timestep_spacing", "trailing")  # 1-step grids start at T-1, not 0
        config.setdefault("clip_sample", False)
        config.setdefault("set_alpha_to_one", True)
        if prediction_type is not None:
            config["prediction_type"] = prediction_type
        ptype = config.get("prediction_type", "epsilon")
        if ptype not in _DIFFUSERS_PREDICTION or ptype == "flow":
            raise UserError(
                f"VP schedule: prediction_type {ptype!r} is not supported; use 'epsilon', "
                "'v_prediction' or 'sample'"
            )
        self.prediction_type = _DIFFUSERS_PREDICTION[ptype]
        self._scheduler = DDIMScheduler.from_config(config)  # the diffusers beta tables, reused
        self.config = {k: v for k, v in self._scheduler.config.items() if not k.startswith("_")}
        ab = self._scheduler.alphas_cumprod.to(torch.float64)
        self.num_train_timesteps = len(ab)
        # index -1 is clean data (alpha-bar 1), as diffusers' set_alpha_to_one uses for the last step
        self._log_ab = torch.cat([torch.zeros(1, dtype=torch.float64), ab.clamp_min(1e-300).log()])
        self._zero_terminal = bool(ab[-1] == 0)
        if self._zero_terminal and self.prediction_type == "eps":
            # at alpha = 0 the noise carries no information about x0 (Lin et al., 2024, sec. 3.2)
            raise UserError("VP schedule: rescale_betas_zero_snr makes the last step pure noise, where an "
                            "epsilon prediction cannot give x0; use prediction_type 'v_prediction'")
        self.t_clean = -1.0 if self.config["set_alpha_to_one"] else 0.0
        self.ode_space = "flow" if self._zero_terminal else "ve"

    @property
    def t_max(self) -> float:
        return float(self.num_train_timesteps - 1)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._log_ab[1:].exp()

    def alpha_sigma(self, t):
        t = self._t(t)
        pos = (t + 1.0).clamp(0.0, float(self.num_train_timesteps))
        lo = pos.floor().clamp(max=self.num_train_timesteps - 1).long()
        frac = pos - lo
        log_ab = self._log_ab.to(t.device)
        la = torch.lerp(log_ab[lo], log_ab[(lo + 1).clamp(max=self.num_train_timesteps)], frac)
        ab = la.exp()
        if self._zero_terminal:
            ab = torch.where(pos >= self.num_train_timesteps, torch.zeros_like(ab), ab)
        return ab.sqrt(), (1.0 - ab).clamp_min(0.0).sqrt()

    def t_from_log_snr(self, lam):
        # alpha-bar = sigmoid(2 lam); invert the piecewise-linear log alpha-bar of ``alpha_sigma``
        # exactly: find the table interval, then the fraction inside it
        target = torch.nn.functional.logsigmoid(2.0 * self._t(lam))
        log_ab = self._log_ab.to(target.device)
        top = self.num_train_timesteps
        lo = (torch.searchsorted(-log_ab, -target.detach().contiguous()) - 1).clamp(0, top - 1)
        frac = (target - log_ab[lo]) / (log_ab[lo + 1] - log_ab[lo])
        return (lo.to(torch.float64) + frac.clamp(0.0, 1.0)) - 1.0

    def timesteps(self, n: int, **kw) -> torch.Tensor:
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(self.config)
        sched.set_timesteps(n)
        return torch.cat([sched.timesteps.to(torch.float64), torch.tensor([self.t_clean], dtype=torch.float64)])

    def sample_t(self, n, generator=None):
        # DDPM (Ho et al., 2020, Alg. 1): t uniform over the training indices
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator).to(torch.float64)

    def to_diffusers_config(self):
        return {"_class_name": "DDIMScheduler", **self.config}


class EDMSchedule(Schedule):
    """EDM (Karras et al., 2022): alpha = 1, t = sigma, preconditioning of Table 1."""

    kind = "edm"
    t_clean = 0.0
    ode_space = "ve"

    def __init__(self, config: dict[str, Any] | None = None):
        cfg = dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0, sigma_schedule="karras",
                   num_train_timesteps=1000, prediction_type="epsilon", final_sigmas_type="zero")
        cfg.update({k: v for k, v in dict(config or {}).items() if not k.startswith("_")})
        if dict(config or {}).get("_teacher_sigma_min") is not None:  # a K-step student's exported scheduler:
            cfg["sigma_min"] = float(config["_teacher_sigma_min"])    # its sigma_min ends the student's grid
        if cfg["prediction_type"] not in ("epsilon", "v_prediction"):
            raise UserError(f"EDM schedule: prediction_type {cfg['prediction_type']!r} is not supported; "
                            "use 'epsilon' (EDM's F) or 'v_prediction'")
        self.config = cfg
        self.sigma_min, self.sigma_max = float(cfg["sigma_min"]), float(cfg["sigma_max"])
        self.sigma_data = float(cfg["sigma_data"])
        self.prediction_type = "edm"
        self._out_sign = 1.0 if cfg["prediction_type"] == "epsilon" else -1.0  # diffusers' convention
        self.p_mean, self.p_std = -1.2, 1.2  # EDM training noise distribution (sec. 5)

    @property
    def t_max(self) -> float:
        return self.sigma_max

    def alpha_sigma(self, t):
        t = self._t(t)
        return torch.ones_like(t), t

    def t_from_log_snr(self, lam):
        return (-self._t(lam)).exp()  # sigma = exp(-lambda)

    def timesteps(self, n: int, sigma_max: float | None = None, sigma_min: float | None = None, **kw):
        """EDM's Karras grid (eq. 5) from sigma_max down to sigma_min (default the schedule's), then 0."""
        from diffusers import EDMEulerScheduler

        cfg = {**self.config, **({"sigma_max": float(sigma_max)} if sigma_max is not None else {}),
               **({"sigma_min": float(sigma_min)} if sigma_min is not None else {})}
        sched = EDMEulerScheduler.from_config(cfg)
        sched.set_timesteps(n)
        return sched.sigmas.to(torch.float64)

    def sample_t(self, n, generator=None):
        return (torch.randn(n, generator=generator, dtype=torch.float64) * self.p_std + self.p_mean).exp()

    def model_input(self, x, t):
        s = bcast(self._t(t), x)
        return x / (s**2 + self.sigma_data**2).sqrt()  # c_in

    def model_time(self, t):
        return 0.25 * self._t(t).log()  # c_noise

    def _c_skip_out(self, x, t):
        s, sd = bcast(self._t(t), x), self.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = self._out_sign * s * sd / (s**2 + sd**2).sqrt()
        return c_skip, c_out

    def raw_to_x0(self, raw, x, t):
        c_skip, c_out = self._c_skip_out(x, t)
        return c_skip * x + c_out * raw  # D = c_skip x + c_out F (Karras et al., 2022, eq. 7)

    def x0_to_raw(self, x0, x, t):
        c_skip, c_out = self._c_skip_out(x, t)
        return (x0 - c_skip * x) / c_out  # the effective training target F (eq. 8)

    def to_diffusers_config(self):
        return {"_class_name": "EDMEulerScheduler", **self.config}


class FlowSchedule(Schedule):
    """Rectified flow: x = (1 - s) x0 + s eps, s = t / T, velocity prediction eps - x0."""

    kind = "flow"
    t_clean = 0.0
    ode_space = "flow"

    def __init__(self, config: dict[str, Any] | None = None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        cfg = {k: v for k, v in dict(config or {}).items() if not k.startswith("_")}
        self._scheduler = FlowMatchEulerDiscreteScheduler.from_config(cfg)
        self.config = {k: v for k, v in self._scheduler.config.items() if not k.startswith("_")}
        self.num_train_timesteps = int(self.config["num_train_timesteps"])
        self.shift = float(self.config["shift"])
        self.prediction_type = "flow"
        # FluxPipeline passes sigmas = linspace(1, 1/n, n) to set_timesteps (SD3's pipeline does not);
        # set by the FLUX teacher loader so that teacher and student grids are the pipeline's own
        self.linspace_sigmas = False

    def set_timesteps(self, sched, n: int, mu: float | None = None) -> None:
        """``sched.set_timesteps(n)`` as this teacher's diffusers pipeline calls it."""
        kw = {} if mu is None else {"mu": mu}
        if self.linspace_sigmas:
            import numpy as np

            sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n), **kw)
        else:
            sched.set_timesteps(n, **kw)

    @property
    def t_max(self) -> float:
        return float(self.num_train_timesteps)

    def alpha_sigma(self, t):
        s = self._t(t) / self.num_train_timesteps
        return 1.0 - s, s

    def t_from_log_snr(self, lam):
        return torch.sigmoid(-self._t(lam)) * self.num_train_timesteps  # s / (1 - s) = exp(-lambda)

    def timesteps(self, n: int, mu: float | None = None, **kw):
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(self.config)
        if self.config.get("use_dynamic_shifting") and mu is None:
            raise UserError("this flow schedule shifts by resolution (use_dynamic_shifting); pass mu")
        self.set_timesteps(sched, n, mu)
        return sched.sigmas.to(torch.float64) * self.num_train_timesteps

    def sample_t(self, n, generator=None):
        # logit-normal(0, 1) sigmas, then the schedule's shift (Esser et al., 2024, sec. 3.1, eq. 23)
        s = torch.sigmoid(torch.randn(n, generator=generator, dtype=torch.float64))
        s = self.shift * s / (1 + (self.shift - 1) * s)
        return s * self.num_train_timesteps

    def to_diffusers_config(self):
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", **self.config}


_BY_CLASS = {
    "DDPMScheduler": VPSchedule, "DDIMScheduler": VPSchedule, "LCMScheduler": VPSchedule,
    "EulerDiscreteScheduler": VPSchedule, "PNDMScheduler": VPSchedule,
    "DPMSolverMultistepScheduler": VPSchedule, "EulerAncestralDiscreteScheduler": VPSchedule,
    "UniPCMultistepScheduler": VPSchedule, "HeunDiscreteScheduler": VPSchedule,
    "TCDScheduler": VPSchedule,
    "EDMEulerScheduler": EDMSchedule, "EDMDPMSolverMultistepScheduler": EDMSchedule,
    "FlowMatchEulerDiscreteScheduler": FlowSchedule, "FlowMatchHeunDiscreteScheduler": FlowSchedule,
}


def schedule_from_config(config: dict[str, Any]) -> Schedule:
    """Build a schedule from a diffusers scheduler config (its `_class_name` picks the family)."""
    name = config.get("_class_name", "DDPMScheduler")
    cls = _BY_CLASS.get(name)
    if cls is None:
        raise UserError(f"scheduler class {name!r} is not supported; supported: {', '.join(sorted(_BY_CLASS))}")
    if cls is VPSchedule:
        keep = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "prediction_type", "timestep_spacing", "set_alpha_to_one", "steps_offset",
                "rescale_betas_zero_snr", "clip_sample"}
        return VPSchedule({k: v for k, v in config.items() if k in keep})
    return cls(config)


def log_snr(schedule: Schedule, t) -> torch.Tensor:
    """lambda(t) = log(alpha / sigma) (Lu et al., 2022), +inf at clean data, -inf at alpha = 0."""
    a, s = schedule.alpha_sigma(t)
    return a.log() - s.log()


__all__ = [
    "Schedule", "VPSchedule", "EDMSchedule", "FlowSchedule", "schedule_from_config",
    "to_x0", "from_x0", "convert", "bcast", "log_snr", "PREDICTIONS",
]
