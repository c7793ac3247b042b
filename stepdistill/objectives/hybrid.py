"""Hybrid objectives as configuration: a base objective plus weighted generator terms of others.

    objective:
      name: hybrid
      base: {name: scm, ...}                       # its phases and its student
      terms:
        - {name: adversarial, weight: 0.5, ...}    # each term: any registered objective and a weight

The generator phases of base and terms become one phase: one student update on
L_base + sum_i weight_i L_i, which trains the union of the networks they train (sCM's weighting
network with the student). Every other phase of a term (DMD2's fake-score critic, LADD's
discriminator) keeps its networks, repeats and start, under the term's name (``dmd2_critic``).
This is how the sCM hybrids are built:

* SANA-Sprint (Chen et al., 2025, sec. 3.3, eq. 8): sCM + LADD's adversarial loss on the frozen
  teacher's features (``adversarial`` with ``disc: teacher``, ``distill: none``), weight 0.5.
* rCM (Zheng et al., 2025, sec. 4): sCM + DMD's reverse-divergence term with its fake score
  (NVlabs/rcm ``t2v_model_distill_rcm.py``): the sCM loss without adaptive weighting, its tangent
  L2-normalised, summed over elements and scaled by ``loss_scale`` 100; DMD's summed with
  ``loss_scale_dmd`` 1; the fake score updated 4 times per student update (``student_update_freq``
  5); DMD and its fake score join once the tangent warm-up is over (the term's ``start``).

A term may wait: ``start: N`` (iterations) holds its critic phases back until N and adds its
generator term from iteration N on.

Networks of different parts must not share a name (two critics called ``disc`` are refused).
Each part is created by the registry (``make_objective``), so no objective module is imported here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List

from ..errors import UserError
from .base import BuildContext, Nets, Objective, Phase, make_objective, register

GENERATOR = "generator"


@register
class Hybrid(Objective):
    name = "hybrid"

    @dataclass
    class Config:
        base: Dict[str, Any] = field(default_factory=lambda: {"name": "scm"})
        terms: List[Dict[str, Any]] = field(default_factory=list)  # each {name, weight, <its config>}

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.base = make_objective(dict(self.cfg.base))
        self.terms: list[tuple[str, float, Objective]] = []
        self.starts: dict[str, int] = {}
        self.iteration = 0
        seen = {self.base.name}
        for spec in self.cfg.terms:
            spec = dict(spec)
            weight = float(spec.pop("weight", 1.0))
            start = spec.pop("start", 0)
            if isinstance(start, bool) or not isinstance(start, int) or start < 0:
                raise UserError(f"objective hybrid: a term's start is a whole number of iterations >= 0, got {start!r}")
            part = make_objective(spec)
            self.starts[part.name] = start
            if part.name in seen or part.name == self.name:
                raise UserError(f"objective hybrid: {part.name!r} appears twice; give each objective once")
            seen.add(part.name)
            if not any(ph.name == GENERATOR for ph in part.phases()):
                raise UserError(f"objective hybrid: {part.name!r} has no generator phase to add to the base's")
            self.terms.append((part.name, weight, part))
        self.uses_real_data = self.base.uses_real_data or any(p.uses_real_data for _, _, p in self.terms)
        self._owner: dict[str, tuple[Objective, str]] = {}
        self._net_part: dict[str, Objective] = {}  # which part built each extra network (its lr_factor)
        self.phases()  # fills _owner: which part answers each phase

    def _parts(self):
        return [(self.base.name, 1.0, self.base)] + self.terms

    def phases(self) -> list[Phase]:
        base = self.base.phases()
        gen = next((ph for ph in base if ph.name == GENERATOR), None)
        if gen is None:
            raise UserError(f"objective hybrid: the base {self.base.name!r} has no generator phase")
        trains = list(gen.trains)
        out = []
        for ph in base:
            if ph.name != GENERATOR:
                out.append(ph)
                self._owner[ph.name] = (self.base, ph.name)
        for name, _, part in self.terms:
            for ph in part.phases():
                if ph.name == GENERATOR:
                    trains += [n for n in ph.trains if n not in trains]
                    continue
                key = f"{name}_{ph.name}"
                start = self.starts.get(name, 0)
                if start and (ph.start_fraction is not None or ph.stop is not None or ph.stop_fraction is not None):
                    raise UserError(f"objective hybrid: {name!r} has a phase that ends ({ph.name}: a warm-up) or is "
                                    "sized as a share of the run; give that term no start")
                out.append(dataclasses.replace(ph, name=key, start=max(ph.start, start)))
                self._owner[key] = (part, ph.name)
        return out + [dataclasses.replace(gen, trains=tuple(trains))]

    def build(self, teacher, student, context: BuildContext | None = None):
        nets: dict = {}
        for name, _, part in self._parts():
            for k, v in (part.build(teacher, student, context) or {}).items():
                if k in nets:
                    raise UserError(f"objective hybrid: two parts build a network called {k!r}; combine "
                                    "objectives whose extra networks differ")
                nets[k] = v
                self._net_part[k] = part
        return nets

    def __getattr__(self, name: str):
        """``<phase>_loss`` for the phases taken over from the terms (the contract's one method per phase)."""
        owner = self.__dict__.get("_owner", {})
        if name.endswith("_loss") and name[: -len("_loss")] in owner:
            return lambda nets, batch: self.losses(name[: -len("_loss")], nets, batch)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def losses(self, phase: str, nets: Nets, batch: dict):
        if phase != GENERATOR:
            part, own = self._owner[phase]
            return part.losses(own, nets, batch)
        return self.generator_loss(nets, batch)

    def generator_loss(self, nets: Nets, batch: dict):
        out = dict(self.base.losses(GENERATOR, nets, batch))
        for name, weight, part in self.terms:
            if self.iteration < self.starts.get(name, 0):
                continue  # the term has not joined yet
            for k, v in part.losses(GENERATOR, nets, batch).items():
                out[f"{name}/{k}" if not k.startswith("_") else f"_{name}/{k[1:]}"] = v if k.startswith("_") else weight * v
        return out

    # -- the rest follows the base (the student's steps and sampler) and every part (state) ---------
    def student_steps(self):
        return self.base.student_steps()

    def student_sampler(self):
        return self.base.student_sampler()

    def student_timesteps(self, teacher, steps):
        return self.base.student_timesteps(teacher, steps)

    def needs_cache(self):
        return False  # a part with a teacher-output cache names its folder itself (cache: ...)

    def check_budget(self, max_steps: int) -> None:
        for _, _, part in self._parts():
            part.check_budget(max_steps)

    def on_step_end(self, nets: Nets, step: int) -> None:
        self.iteration = step  # iterations done (the trainer passes its step count)
        for _, _, part in self._parts():
            part.on_step_end(nets, step)

    def set_progress(self, progress: float) -> None:
        for _, _, part in self._parts():
            part.set_progress(progress)

    def lr_factor(self, net: str) -> float:
        """The factor of the part that built ``net`` (a term's critic follows its own schedule); the
        student and the networks the base builds follow the base."""
        return self._net_part.get(net, self.base).lr_factor(net)

    def state_dict(self):
        return {"iteration": self.iteration, **{name: part.state_dict() for name, _, part in self._parts()}}

    def load_state_dict(self, state):
        self.iteration = int(state.get("iteration", 0))
        for name, _, part in self._parts():
            part.load_state_dict(state.get(name, {}))


__all__ = ["Hybrid"]
