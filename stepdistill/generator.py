"""The student: a backbone initialised from the teacher that maps noise (+ condition) to samples
in 1..K steps on a declared list of timesteps, the same ones its exported scheduler produces.

Between steps the student re-noises its x0 estimate with fresh noise to the next timestep, as
multi-step consistency models (Song et al., 2023, Alg. 1) and DMD2 students (Yin et al., 2024b,
sec. 4.5) do. ``boundary="lcm"`` wraps the x0 prediction in the consistency boundary condition
f = c_skip(t) x + c_out(t) x0_hat of LCM (Luo et al., 2023, eq. 8; diffusers' LCMScheduler with
timestep_scaling 10), so that f(x, t) -> x as t -> 0 exactly as the exported LCMScheduler computes it.

``sampler="tcd"`` is TCD's strategic stochastic sampling (Zheng et al., 2024, sec. 4.3; diffusers'
TCDScheduler.step with eta = ``gamma``): from (x, t) the DDIM jump of the x0 estimate to
s = floor((1 - gamma) t_next), then forward noise from s to t_next; the last step ends at s = 0 (the
scheduler's final timestep), and gamma = 0 is deterministic.

``sampler="ddim"`` makes the step between timesteps deterministic instead: DDIM (Song et al., 2021,
eq. 12) from the x0 estimate to the next timestep, the sampler of multistep consistency models
(Heek et al., 2024, Alg. 2) and phased consistency models (Wang et al., 2024, sec. 3), whose
consistency function on the segment [t_{i+1}, t_i] is that DDIM jump (``Student.jump``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from .denoisers import Cond, Denoiser
from .errors import UserError
from .schedules import bcast


class Student(nn.Module):
    def __init__(self, denoiser: Denoiser, timesteps: Sequence[float], *, boundary: str | None = None,
                 sigma_data: float = 0.5, timestep_scaling: float = 10.0, first_timestep: float | None = None,
                 sampler: str | None = "renoise", gamma: float = 0.3, experts: Sequence[Denoiser] = (),
                 steps_per_expert: Sequence[int] | None = None, custom_times: bool = False):
        """``experts``: the networks after ``denoiser`` of a mixture-of-experts student, each taking
        the run of steps that ``steps_per_expert`` gives it (``experts.py``). ``custom_times``: the
        timesteps are the student's own (``StudentConfig.timesteps``), not its scheduler's K-step grid."""
        super().__init__()
        from .export.scheduler import check_first_timestep, check_sampler

        self.sampler = check_sampler(sampler, boundary, first_timestep)
        if boundary not in (None, "none", "lcm"):
            raise UserError(f"student boundary {boundary!r} is not supported; use 'none' or 'lcm'")
        ts = torch.as_tensor(list(timesteps), dtype=torch.float64)
        if ts.ndim != 1 or len(ts) == 0 or not bool((ts[:-1] > ts[1:]).all()):
            raise UserError(f"student timesteps must be a non-empty descending list, got {ts.tolist()}")
        self.denoiser = denoiser
        self.schedule = denoiser.schedule
        self.register_buffer("timesteps", ts, persistent=False)
        self.custom_times = bool(custom_times)
        self.boundary = None if boundary in (None, "none") else boundary
        self.sigma_data, self.timestep_scaling = sigma_data, timestep_scaling
        self.first_timestep = check_first_timestep(denoiser.schedule, first_timestep)  # see StudentConfig
        if self.sampler == "tcd" and denoiser.schedule.kind != "vp":
            raise UserError("student sampler 'tcd' is TCDScheduler's, a DDPM-family scheduler; use it with a VP "
                            "teacher, or sampler 'renoise' / 'ddim'")
        if not 0.0 <= float(gamma) <= 1.0:
            raise UserError(f"student.gamma must lie in [0, 1] (TCD's eta), got {gamma}")
        self.gamma = float(gamma)
        from .experts import check_steps_per_expert, expert_bounds

        self.steps_per_expert = check_steps_per_expert(steps_per_expert, len(ts))
        if len(experts) + 1 != len(self.steps_per_expert or [1]):
            raise UserError(f"the student has {len(experts) + 1} networks for experts {self.steps_per_expert}")
        self.more_experts = nn.ModuleList(experts)
        bounds = expert_bounds(ts, self.steps_per_expert) if self.steps_per_expert else ts[:0]
        self.register_buffer("expert_bounds", bounds, persistent=False)

    @property
    def experts(self) -> list:
        """Every network of the student, noisiest times first (one unless it is a mixture of experts)."""
        return [self.denoiser, *self.more_experts]

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def boundary_scalings(self, t: torch.Tensor):
        """LCM's c_skip, c_out at discrete timestep t (diffusers LCMScheduler, timestep_scaling=10)."""
        st = torch.as_tensor(t, dtype=torch.float64) * self.timestep_scaling
        c_skip = self.sigma_data**2 / (st**2 + self.sigma_data**2)
        c_out = st / (st**2 + self.sigma_data**2).sqrt()
        return c_skip, c_out

    def denoise(self, x: torch.Tensor, t, cond: Cond = None) -> torch.Tensor:
        """One evaluation: the student's x0 estimate at (x, t) (by the expert of t)."""
        if self.steps_per_expert:
            from .experts import denoise_by_expert

            x0 = denoise_by_expert(self.experts, self.expert_bounds, x, t, cond)
        else:
            x0 = self.denoiser(x, t, cond)
        if self.boundary == "lcm":
            c_skip, c_out = self.boundary_scalings(torch.as_tensor(t, dtype=torch.float64, device=x.device))
            x0 = bcast(c_skip, x) * x + bcast(c_out, x) * x0
        return x0

    def forward(self, noise: torch.Tensor, cond: Cond = None, *, steps: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample with `steps` timesteps (default: the trained ones). Fresh noise between steps is
        drawn from `generator` (or the global generator); a "ddim" student draws none."""
        ts = self.timesteps if steps is None else self.timesteps_for(steps)
        return self._chain(noise, cond, ts, lambda like: self.fresh_noise(like, generator))

    def sample(self, noise: torch.Tensor, cond: Cond = None, *, grad_at: torch.Tensor | None = None,
               renoise=None, with_input: bool = False):
        """Samples whose graph holds one student evaluation: per sample i the x0 estimate of step
        ``grad_at[i]`` of its own sampling chain, the steps before it run without gradient (backward
        simulation, DMD2 sec. 4.5; SiD's uniform mixture over the K steps). ``grad_at=None``: the
        whole chain with gradient (``forward``). ``renoise(like)`` draws the fresh noise of a
        re-noising student (default: the global generator). ``with_input``: also return each
        sample's input to that step (x at its time ts[grad_at]), without gradient."""
        renoise = renoise or self.fresh_noise
        if grad_at is None:
            return self._chain(noise, cond, self.timesteps, renoise)
        ts, k = self.timesteps, torch.as_tensor(grad_at).cpu()
        x = x_at = self.prior(noise, ts[0])
        with torch.no_grad():
            for i in range(int(k.max())):
                x = self._step(x, self.denoise(x, ts[i], cond), ts[i], ts[i + 1], noise, renoise)
                x_at = torch.where(bcast(k == i + 1, x).bool(), x, x_at)
        x0 = self.denoise(x_at, ts[k.to(ts.device)], cond)
        return (x0, x_at) if with_input else x0

    def prior(self, noise, t0):
        """The generator's input from unit noise. EDM: sigma z, the noise of Karras et al. (2022,
        Alg. 1, x ~ N(0, sigma_max^2)) and SiD's generator input z * sigma_init (Zhou et al., 2024),
        not diffusers' init_noise_sigma sqrt(sigma^2 + 1), which differs by 7.7 % at sigma_init 2.5;
        VP and flow: the schedule's prior."""
        if self.schedule.kind == "edm":
            return noise * bcast(torch.as_tensor(t0, dtype=torch.float64), noise).to(noise.dtype)
        return self.schedule.prior(noise, t0)

    def _chain(self, noise, cond, ts, renoise):
        x = self.prior(noise, ts[0])
        for i, t in enumerate(ts):
            x0 = self.denoise(x, t, cond)
            if i + 1 == len(ts):
                return self._tcd(x, x0, t, 0.0, noise, renoise, last=True) if self.sampler == "tcd" else x0
            x = self._step(x, x0, t, ts[i + 1], noise, renoise)
        raise AssertionError("unreachable")

    def _step(self, x, x0, t, t_next, noise, renoise):
        """From (x, t) with x0 estimate x0 to t_next: DDIM, TCD's step, or x0 re-noised with fresh noise."""
        if self.sampler == "ddim":
            return self.ddim_to(x, x0, t, t_next)
        if self.sampler == "tcd":
            return self._tcd(x, x0, t, t_next, noise, renoise)
        return self.schedule.add_noise(x0, renoise(noise), t_next)

    def _tcd(self, x, x0, t, t_next, noise, renoise, last: bool = False):
        """TCD's strategic stochastic step (Zheng et al., 2024, Alg. 4; TCDScheduler.step): x_s by DDIM at
        s = floor((1 - gamma) t_next), then x_{t_next} = sqrt(ab_next / ab_s) x_s + sqrt(1 - ab_next / ab_s) z."""
        t_next = torch.as_tensor(t_next, dtype=torch.float64)
        s = torch.floor((1.0 - self.gamma) * t_next)
        x_s = self.ddim_to(x, x0, t, s)
        if last or self.gamma == 0:
            return x_s
        ratio = (self.schedule.alpha_sigma(t_next)[0] / self.schedule.alpha_sigma(s)[0]) ** 2
        ratio = bcast(ratio.to(x.device), x)
        return ratio.sqrt() * x_s + (1 - ratio).sqrt() * renoise(noise)

    def ddim_to(self, x: torch.Tensor, x0: torch.Tensor, t, t_next) -> torch.Tensor:
        """Deterministic DDIM step (Song et al., 2021, eq. 12) from (x, t) with x0 estimate x0 to
        t_next (per-sample times allowed): sqrt(ab_next) x0 + sqrt(1 - ab_next) eps_hat."""
        from .sampling import ddim_step

        a, s = (bcast(v, x) for v in self.schedule.alpha_sigma(torch.as_tensor(t, device=x.device)))
        an, sn = (bcast(v, x) for v in self.schedule.alpha_sigma(torch.as_tensor(t_next, device=x.device)))
        return ddim_step(x, x0, a, s, an, sn).to(x.dtype)

    def segment_end(self, t: torch.Tensor) -> torch.Tensor:
        """Per sample, the lower end of the sampling segment that t lies in: the next of the
        student's timesteps below t, or clean data below the last (times above the first belong
        to the first segment)."""
        t = torch.as_tensor(t, dtype=torch.float64, device=self.timesteps.device)
        ends = torch.cat([self.timesteps[1:], self.timesteps.new_tensor([self.schedule.t_clean])])
        # segment i is (ts[i+1], ts[i]] (ts descending): ts[0..i] are >= t, so i = count - 1
        i = ((self.timesteps[None, :] >= t.reshape(-1, 1)).sum(1) - 1).clamp_min(0)
        return ends[i]

    def jump(self, x: torch.Tensor, t, t_end, cond: Cond = None) -> torch.Tensor:
        """The multistep consistency function (Heek et al., 2024; Wang et al., 2024, eq. 6): the
        x0 estimate at (x, t), carried by DDIM to t_end; at the schedule's clean end (``t_clean``,
        where sampling returns the x0 estimate, even where that time keeps some noise) it is the
        x0 estimate."""
        x0 = self.denoise(x, t, cond)
        t_end = torch.as_tensor(t_end, dtype=torch.float64, device=x.device).expand(x.shape[0])
        out = self.ddim_to(x, x0, t, t_end)
        return torch.where(bcast(self.schedule.is_clean_end(t_end), x).bool(), x0, out)

    def fresh_noise(self, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The re-noising draw between steps, in the layout the exported pipeline's scheduler draws
        it: FLUX's scheduler sees packed latents [B, HW/4, 4C], so the same numbers are drawn in
        that shape and unpacked (FluxPipeline reproduces the student's samples for a seed)."""
        if getattr(getattr(self.denoiser, "_call", None), "__name__", "") == "_call_flux":  # a FLUX backbone
            from .denoisers import unpack_latents

            b, c, h, w = like.shape
            z = torch.randn((b, (h // 2) * (w // 2), c * 4), generator=generator, device=like.device, dtype=like.dtype)
            return unpack_latents(z, h, w)
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)

    def timesteps_for(self, steps: int) -> torch.Tensor:
        if steps == self.steps:
            return self.timesteps
        if steps < 1:
            raise UserError(f"steps must be >= 1, got {steps}")
        if self.schedule.kind == "edm":  # as the exported EDMEulerScheduler runs `steps`: Karras from the
            # first sigma down to its sigma_min, which is a K-step student's last sigma (export.scheduler)
            end = float(self.timesteps[-1]) if self.steps > 1 and not self.custom_times else None
            return self.schedule.timesteps(steps, sigma_max=self.first_timestep, sigma_min=end)[:-1]
        from .export.scheduler import student_timesteps  # as the exported scheduler runs `steps`
        return student_timesteps(self.schedule, steps, self.boundary, self.first_timestep, self.sampler,
                                 self.custom_times)


# -- building a student from a teacher --------------------------------------------------------------
from dataclasses import dataclass, field  # noqa: E402


@dataclass
class StudentConfig:
    steps: Optional[int] = None          # K sampling steps; None = what the objective fixes, else 1
    boundary: Optional[str] = None       # None or "lcm" (consistency boundary condition, LCM eq. 8)
    first_timestep: Optional[float] = None  # the generator's input time, where noise enters (SiD's generator
                                         # f(sigma_init z, sigma_init)): a VP training timestep (sigma_init 2.5 is
                                         # t ~ 625 on SD's schedule), an EDM sigma (2.5), a flow time (t = 1000
                                         # sigma); None = the noisiest time
    time_cond_proj_dim: Optional[int] = None  # add a guidance-scale (w) embedding input of this width to a
                                         # UNet2DConditionModel student (LCM: 256) or a class-conditional
                                         # UNet2DModel one (guided_unet); None = the teacher's inputs
    sampler: Optional[str] = None        # step between timesteps: "renoise" (fresh noise, consistency/DMD2
                                         # students), "ddim" (deterministic) or "tcd" (TCD's strategic
                                         # stochastic sampling); None = what the objective fixes, else "renoise"
    gamma: float = 0.3                   # TCD's gamma (TCDScheduler's eta) for sampler "tcd"
    timesteps: Optional[List[float]] = None  # the student's own sampling times, noisiest first, in the teacher's
                                         # units (VP training timesteps, EDM sigmas, flow t = 1000 sigma); None
                                         # = what the objective fixes (scm's 2-step sampler), else the
                                         # exported scheduler's K-step grid
    experts: Optional[List[int]] = None  # a mixture of experts: the steps each expert takes, noisiest first
                                         # ([2, 2]: two networks, two steps each; Phased DMD); None = one network
    lora_rank: int = 0                   # 0 = train full weights; > 0 = LoRA adapters of this rank
    lora_alpha: Optional[float] = None   # LoRA scale numerator (None = rank, i.e. scale 1)
    lora_dropout: float = 0.0
    # modules that receive adapters (peft names); the attention and conv layers of diffusers UNets
    lora_target_modules: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0",
                                                                     "conv1", "conv2", "time_emb_proj"])


def _add_lora(backbone: nn.Module, cfg: StudentConfig) -> nn.Module:
    """LoRA (Hu et al., 2022) through peft: the base weights freeze, only the adapters train. Models
    with diffusers' ``PeftAdapterMixin`` take ``add_adapter``; others get peft's in-place injection."""
    from peft import LoraConfig, inject_adapter_in_model

    from .lora_targets import matching_targets

    targets = matching_targets(backbone, cfg.lora_target_modules)
    if not targets:
        raise UserError(f"student.lora_target_modules {list(cfg.lora_target_modules)} match no module of "
                        f"{type(backbone).__name__}; name some of its layers (e.g. to_q, conv1)")
    lcfg = LoraConfig(r=int(cfg.lora_rank), lora_alpha=float(cfg.lora_alpha or cfg.lora_rank),
                      lora_dropout=float(cfg.lora_dropout), target_modules=targets, init_lora_weights="gaussian")
    backbone.requires_grad_(False)
    if hasattr(backbone, "add_adapter"):
        backbone.add_adapter(lcfg)
    else:
        inject_adapter_in_model(lcfg, backbone)
    for name, p in backbone.named_parameters():
        p.requires_grad_("lora_" in name)
    return backbone


def _with_w_input(backbone: nn.Module, dim: int) -> nn.Module:
    """A copy of a UNet2DConditionModel with a ``timestep_cond`` input of width `dim` (LCM's
    guidance-scale embedding, Luo et al., 2023, sec. 4.2; diffusers' time_cond_proj_dim). The
    teacher's weights load unchanged; the new projection starts at zero, so the student starts as
    the teacher for every w."""
    if type(backbone).__name__ == "UNet2DModel":  # class-conditional: the w input through its class embedding
        from .guided_unet import with_w_input

        return with_w_input(backbone, dim)
    if type(backbone).__name__ != "UNet2DConditionModel":
        raise UserError(f"student.time_cond_proj_dim needs a UNet2DConditionModel or class-conditional UNet2DModel "
                        f"teacher; this one is {type(backbone).__name__}; drop student.time_cond_proj_dim")
    have = backbone.config.get("time_cond_proj_dim")
    if have and int(have) != int(dim):
        raise UserError(f"the teacher already has time_cond_proj_dim={have}; set student.time_cond_proj_dim={have} "
                        "or null")
    cfg = {k: v for k, v in backbone.config.items() if not k.startswith("_")}
    cfg["time_cond_proj_dim"] = int(dim)
    new = type(backbone).from_config(cfg).to(next(backbone.parameters()).dtype)
    missing, unexpected = new.load_state_dict(backbone.state_dict(), strict=False)
    if unexpected or any("cond_proj" not in k for k in missing):
        raise UserError(f"could not add a w input to the student (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        new.time_embedding.cond_proj.weight.zero_()
    return new


def build_student(teacher: Denoiser, cfg: StudentConfig | None = None, *, steps: int | None = None) -> Student:
    """A student initialised from the teacher: a deep copy of its backbone (trainable), or the copy
    frozen with LoRA adapters, sampling on the timesteps that the exported diffusers scheduler's
    ``set_timesteps(K)`` produces (``export.scheduler.student_timesteps``), or on ``cfg.timesteps``
    where given (which the exported pipeline passes to its scheduler at the trained step count).
    ``cfg.experts``: one such copy per expert."""

    cfg = cfg or StudentConfig()
    k = int(steps if steps is not None else (cfg.steps or 1))
    if k < 1:
        raise UserError(f"student steps must be >= 1, got {k}; set student.steps=1 (or 2, 4)")
    backbone = getattr(teacher, "backbone", None)
    if backbone is None:
        raise UserError(f"teacher {type(teacher).__name__} has no diffusers backbone to initialise a student from")
    from .experts import check_steps_per_expert

    per_expert = check_steps_per_expert(cfg.experts, k)
    nets = [_student_denoiser(teacher, backbone, cfg) for _ in (per_expert or [k])]  # each expert from the teacher
    from .export.scheduler import check_timesteps, student_timesteps  # the exported scheduler's set_timesteps(K)
    ft, sampler = cfg.first_timestep, cfg.sampler or "renoise"
    own = check_timesteps(teacher.schedule, cfg.timesteps, k, sampler, ft)
    ts = own if own is not None else student_timesteps(teacher.schedule, k, cfg.boundary, ft, sampler)
    return Student(nets[0], ts, boundary=cfg.boundary, first_timestep=ft, sampler=sampler, gamma=cfg.gamma,
                   experts=nets[1:], steps_per_expert=per_expert, custom_times=own is not None)


def _student_denoiser(teacher: Denoiser, backbone: nn.Module, cfg: StudentConfig):
    """A trainable copy of the teacher's backbone (or the copy frozen with LoRA adapters) as a denoiser."""
    import copy

    backbone = _with_w_input(backbone, cfg.time_cond_proj_dim) if cfg.time_cond_proj_dim else copy.deepcopy(backbone)
    backbone.train()
    if cfg.lora_rank and cfg.lora_rank > 0:
        if type(backbone).__name__ == "GuidedUNet2DModel":
            raise UserError("student.lora_rank with student.time_cond_proj_dim on a UNet2DModel: LoRA would freeze the new "
                            "w input; train full weights (student.lora_rank=0)")
        _add_lora(backbone, cfg)  # the frozen base keeps the teacher's dtype
        for name, p in backbone.named_parameters():
            if p.requires_grad:  # adapters train in float32 (mixed precision autocasts their matmuls)
                p.data = p.data.float()
    else:
        backbone.float().requires_grad_(True)  # full weights train in float32 even from a bf16 teacher
    from .denoisers import DiffusersDenoiser

    return DiffusersDenoiser(backbone, teacher.schedule, null_class=getattr(teacher, "null_class", None),
                             null_text=getattr(teacher, "null_text", None))


# -- the w input of a guidance-conditioned student (LCM, sec. 4.2) --------------------------------
def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's guidance-scale embedding of w - 1, computed by diffusers' own
    ``LatentConsistencyModelPipeline.get_guidance_scale_embedding`` (sinusoids of 1000 (w - 1)),
    bit for bit what an exported LCM pipeline feeds the student."""
    from diffusers import LatentConsistencyModelPipeline

    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1).cpu()
    return LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w - 1.0, embedding_dim=dim)


def cond_proj_dim(student) -> Optional[int]:
    """The width of the student backbone's ``timestep_cond`` input (diffusers' time_cond_proj_dim)."""
    backbone = getattr(student.denoiser, "backbone", None)
    base = getattr(backbone, "base_model", None)
    for m in (backbone, getattr(base, "model", base)):
        dim = getattr(getattr(m, "config", None), "time_cond_proj_dim", None)
        if dim:
            return int(dim)
    return None
