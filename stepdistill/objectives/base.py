"""The objective contract (cf. EDM's ``EDMLoss``, SiD's ``generator_loss``).

An objective holds only its hyperparameters (a dataclass, ``Config``), declares its phases and
returns named per-sample losses from one method per phase, ``<phase>_loss(nets, batch)``. It never
calls ``backward``, steps an optimizer or moves devices: the trainer sums the returned losses
(each a float tensor of shape [B], already weighted; keys starting with "_" are logged only and
not summed), backpropagates into the networks the phase ``trains`` and steps their optimizers.

``nets`` (a ``Nets``) holds ``teacher`` (frozen ``Denoiser``), ``student`` (``Student``) and the
extra networks the objective ``build``s (e.g. ``fake_score``, ``disc``, a frozen progressive
teacher, a consistency target). ``batch`` is a dict: ``x0`` (real images in [-1, 1], float32,
[B, C, H, W]; for data-free objectives only a source of shapes), ``cond`` (dict of tensors or None).
Randomness comes from torch's global generator, which the trainer seeds per process and restores
on resume.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..errors import UserError


@dataclass(frozen=True)
class Phase:
    name: str                 # the method called is f"{name}_loss"
    trains: tuple[str, ...]   # keys of `nets` whose parameters this phase updates
    repeats: int = 1          # updates per outer iteration (DMD2's two time-scale rule: critic 5)
    start: int = 0            # the first outer iteration (0-based) the phase runs in (a critic waiting out a warm-up)
    stop: int | None = None   # the outer iteration it stops before (a warm-up); None = never
    # the same as shares of the run instead (a warm-up sized to the machine): the phase starts / stops at
    # the first iteration where the run's progress, the larger of step / max_steps and the share of
    # max_minutes left after setup (teacher-output caches) that training has spent, has reached the
    # fraction; the trainer records that iteration in its checkpoints
    start_fraction: float | None = None
    stop_fraction: float | None = None
    # a phase that stops (a warm-up) hands its nets on with fresh optimizer moments: at the iteration it stops
    # their Adam state (moments and step counts) is dropped, as a separate run that loads only the weights
    # (DMD2's stages, tianweiy/DMD2 --ckpt_only_path: "checkpoints without optimizer states"); a regression
    # warm-up's second moments, sized by its small gradients, would otherwise scale up the next objective's
    # first hundreds of updates several times over
    fresh_moments_after: bool = False

    def span(self, switches: dict[str, int]) -> tuple[float, int | None]:
        """(start, stop) iterations, given the iterations at which the run reached each fraction
        (``switches``, keyed by ``repr(float(fraction))``): a fraction not yet reached counts as never."""
        start = self.start if self.start_fraction is None else switches.get(repr(float(self.start_fraction)), math.inf)
        stop = self.stop if self.stop_fraction is None else switches.get(repr(float(self.stop_fraction)))
        return start, stop


@dataclass
class BuildContext:
    """What ``build`` may use besides the networks. The trainer builds on its main process first and
    then on the others (accelerate's main_process_first), so what ``build`` writes (a teacher-output
    cache) is made once and read by the rest."""

    prompts: Any = None        # a text-to-image run's training prompts (``cache.CachePrompts``), else None
    texts: Any = None          # ... and their text, row for row (a list of str), else None
    load_caches: bool = True   # False: a dry run; caches are checked, not built
    log: Callable[[str], None] = print

    @classmethod
    def for_data(cls, data, **kw) -> "BuildContext":
        """The context of a run on ``data``: a text-to-image set's prompts (cached embeddings and text)."""
        return cls(prompts=getattr(data, "cache_prompts", None),
                   texts=getattr(getattr(data, "prompts", None), "prompts", None), **kw)


class Nets(nn.Module):
    """A named bag of networks; attribute access (nets.teacher, nets.student, nets.fake_score)."""

    def __init__(self, **modules: nn.Module):
        super().__init__()
        for k, v in modules.items():
            self.add_module(k, v)

    def get(self, name: str, default=None):
        return self._modules.get(name, default)


class Objective:
    """Base class. Subclasses set ``name`` and ``Config`` and implement ``<phase>_loss``."""

    name: ClassVar[str] = ""

    @dataclass
    class Config:
        pass

    #: whether the objective needs real images in `batch["x0"]` (GAN terms, adversarial)
    uses_real_data: ClassVar[bool] = False

    def __init__(self, cfg: Any = None):
        self.cfg = cfg if cfg is not None else self.Config()

    def phases(self) -> list[Phase]:
        return [Phase("generator", ("student",))]

    def build(self, teacher: nn.Module, student: nn.Module,
              context: BuildContext | None = None) -> dict[str, nn.Module]:
        """Extra networks this objective needs (trainable ones are named in `phases`), and what it
        reads from disk (teacher-output caches: loaded here when a ``context`` says so, else at first use)."""
        return {}

    def student_steps(self) -> int | None:
        """The step count the student is trained for, if the objective fixes it."""
        return None

    def needs_cache(self) -> bool:
        """Whether ``objective.cache`` must name a teacher-output cache folder; when unset, the trainer
        fills in the run folder's ``teacher_cache`` (built there on first use)."""
        return False

    def student_sampler(self) -> str | None:
        """The student's step between timesteps ("renoise" or "ddim"), if the objective fixes it."""
        return None

    def student_timesteps(self, teacher, steps: int) -> list[float] | None:
        """The student's own sampling times for ``steps`` steps in the ``teacher`` schedule's units, where
        the method prescribes them (sCM's 2-step sampler); None = the scheduler's K-step grid. Used where
        ``student.timesteps`` is unset."""
        return None

    def student_experts(self) -> list[int] | None:
        """The steps each expert of a mixture-of-experts student takes (``StudentConfig.experts``), if
        the objective fixes them."""
        return None

    def on_step_end(self, nets: Nets, step: int) -> None:
        """Called after each outer iteration (target EMA, progressive rounds); ``step`` is the number of
        iterations done, so the next iteration is ``step`` (0-based), the index ``Phase.start`` counts."""

    def set_progress(self, progress: float) -> None:
        """Told before each outer iteration: the share of the run done (the larger of step / max_steps
        and of the time budget's share spent), for weights scheduled over the run (SwiftBrush v2's CLIP
        weight)."""

    def check_budget(self, max_steps: int) -> None:
        """Refuse (UserError) a run length the objective cannot use; called before any compute."""

    def lr_factor(self, net: str) -> float:
        """A factor on the configured learning rate of `net` at the coming update, for schedules tied
        to the objective's own state (progressive distillation's per-round annealing). The trainer
        applies it; the objective never touches an optimizer. Derived from the state, so it resumes."""
        return 1.0

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def losses(self, phase: str, nets: Nets, batch: dict) -> dict[str, torch.Tensor]:
        return getattr(self, f"{phase}_loss")(nets, batch)


OBJECTIVES: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make an objective available under its ``name`` in configs."""
    if not cls.name or cls.name in OBJECTIVES:
        raise ValueError(f"objective name {cls.name!r} is empty or taken")
    if not dataclasses.is_dataclass(cls.Config):
        raise TypeError(f"{cls.__name__}.Config must be a dataclass")
    OBJECTIVES[cls.name] = cls
    return cls


def make_objective(spec: Any) -> Objective:
    """An objective from its config section: ``name`` picks the class, the rest fills its ``Config``."""
    from omegaconf import OmegaConf

    from ..config import merge

    spec = dict(spec or {})
    name = spec.pop("name", "") or ""
    if not name:
        from . import load_all

        names = ", ".join(sorted(load_all())) or "none registered"
        raise UserError(f"no objective given; set objective.name (registered: {names})")
    cls = get_objective(str(name))
    return cls(OmegaConf.to_object(merge(cls.Config, spec, where=f"objective {name!r}")))


def get_objective(name: str) -> type[Objective]:
    from . import load_all

    load_all()

    if name not in OBJECTIVES:
        near = difflib.get_close_matches(name, OBJECTIVES, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise UserError(f"unknown objective {name!r}{hint} (registered: {', '.join(sorted(OBJECTIVES))})")
    return OBJECTIVES[name]
