"""Hybrid objectives (SANA-Sprint: sCM + LADD; rCM: sCM + DMD): the generator loss is the base's
plus each term's, weighted, on the same draws; every other phase of a term runs as its own, with
its networks, repeats and start; state round-trips per part; conflicting parts are refused."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_teacher
from stepdistill.errors import UserError
from stepdistill.generator import StudentConfig, build_student
from stepdistill.objectives import Nets, get_objective
from stepdistill.objectives.base import make_objective
from stepdistill.train.randomness import BatchRandom

RCM = {"name": "hybrid", "base": {"name": "scm", "tangent_warmup": 1},
       "terms": [{"name": "dmd2", "weight": 0.01, "gan_weight": 0.0, "critic_repeats": 3}]}
SPRINT = {"name": "hybrid", "base": {"name": "scm"},
          "terms": [{"name": "adversarial", "weight": 0.5, "distill": "none"}]}


def _nets(obj):
    torch.manual_seed(0)
    teacher = tiny_teacher().requires_grad_(False)
    student = build_student(teacher, StudentConfig(steps=1, sampler=obj.student_sampler()))
    return Nets(teacher=teacher, student=student, **obj.build(teacher, student))


def _batch():
    g = torch.Generator().manual_seed(3)
    return {"x0": torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, "cond": {"class_labels": torch.arange(4) % 2},
            "rng": BatchRandom(7, 4, slice(0, 4))}


@pytest.mark.parametrize("spec,term,key", [(RCM, "dmd2", "dmd"), (SPRINT, "adversarial", "gan_g")])
def test_generator_loss_is_base_plus_weighted_terms(spec, term, key):
    hybrid = make_objective(spec)
    nets = _nets(hybrid)
    torch.manual_seed(1)
    out = hybrid.losses("generator", nets, _batch())
    torch.manual_seed(1)
    batch = _batch()  # the same stream, read in the same order: base first, then the term
    base = hybrid.base.losses("generator", nets, batch)
    part = dict((n, p) for n, _, p in hybrid.terms)[term]
    alone = part.losses("generator", nets, batch)
    weight = spec["terms"][0]["weight"]
    torch.testing.assert_close(out["scm"], base["scm"])
    torch.testing.assert_close(out[f"{term}/{key}"], weight * alone[key])
    assert not any(k.startswith(f"{term}/_") for k in out)  # logged-only keys stay logged-only


def test_phases_merge_the_generators_and_keep_the_critics():
    hybrid = make_objective(RCM)
    phases = {ph.name: ph for ph in hybrid.phases()}
    assert list(phases) == ["dmd2_critic", "generator"]
    assert phases["dmd2_critic"].trains == ("fake_score",) and phases["dmd2_critic"].repeats == 3
    assert set(phases["generator"].trains) == {"student", "weighting"}
    nets = _nets(hybrid)
    losses = hybrid.losses("dmd2_critic", nets, _batch())
    assert set(losses) >= {"fake_dsm"}


def test_state_round_trips_per_part():
    hybrid = make_objective(RCM)
    hybrid.on_step_end(None, 42)
    fresh = make_objective(RCM)
    fresh.load_state_dict(hybrid.state_dict())
    assert fresh.base.iteration == 42 and fresh.state_dict() == hybrid.state_dict()


def test_each_network_takes_the_learning_rate_factor_of_the_part_that_built_it():
    hybrid = make_objective(RCM)
    _nets(hybrid)
    term = dict((n, p) for n, _, p in hybrid.terms)["dmd2"]
    term.lr_factor = lambda net: 0.25  # a term with its own schedule on its critic
    hybrid.base.lr_factor = lambda net: 0.5
    assert hybrid.lr_factor("fake_score") == 0.25  # built by the dmd2 term
    assert hybrid.lr_factor("weighting") == 0.5  # built by the base (sCM's log-variance head)
    assert hybrid.lr_factor("student") == 0.5


def test_conflicts_are_refused_with_one_line():
    with pytest.raises(UserError, match="appears twice"):
        make_objective({"name": "hybrid", "base": {"name": "dmd2"}, "terms": [{"name": "dmd2"}]})
    with pytest.raises(UserError, match="unknown objective"):
        make_objective({"name": "hybrid", "terms": [{"name": "dmdd"}]})
    both = make_objective({"name": "hybrid", "base": {"name": "dmd2", "gan_weight": 0.0},
                           "terms": [{"name": "sid"}]})
    with pytest.raises(UserError, match="network called 'fake_score'"):
        _nets(both)
    assert get_objective("hybrid").name == "hybrid"


def test_a_term_waits_for_its_start():
    """rCM runs no DMD term and no fake-score update before the tangent warm-up is over: a term's
    ``start`` holds its critic phases back and leaves its generator term out until that iteration;
    the iteration is checkpointed."""
    spec = {**RCM, "terms": [{**RCM["terms"][0], "start": 2}]}
    hybrid = make_objective(spec)
    phases = {ph.name: ph for ph in hybrid.phases()}
    assert phases["dmd2_critic"].start == 2 and phases["generator"].start == 0
    nets = _nets(hybrid)
    hybrid.on_step_end(nets, 1)  # as the trainer calls it after iteration 0: iteration 1 next, not yet
    assert set(hybrid.losses("generator", nets, _batch())) == set(hybrid.base.losses("generator", nets, _batch()))
    hybrid.on_step_end(nets, 2)  # iteration 2 next: the term joins with its critic
    assert "dmd2/dmd" in hybrid.losses("generator", nets, _batch())
    fresh = make_objective(spec)
    fresh.load_state_dict(hybrid.state_dict())
    assert fresh.iteration == 2 and "dmd2/dmd" in fresh.losses("generator", _nets(fresh), _batch())
    with pytest.raises(UserError, match="whole number of iterations"):
        make_objective({**RCM, "terms": [{**RCM["terms"][0], "start": -1}]})


def test_rcm_preset_builds_without_a_weighting_network():
    """digits/rcm in rCM's loss form: the base sCM has no learned weighting, the DMD term waits out the
    tangent warm-up and its fake score updates 4 times per student update."""
    from omegaconf import OmegaConf

    from stepdistill.resources import preset

    cfg = OmegaConf.to_container(OmegaConf.load(preset("digits/rcm")).objective)
    hybrid = make_objective(cfg)
    phases = {ph.name: ph for ph in hybrid.phases()}
    assert phases["generator"].trains == ("student",)
    assert phases["dmd2_critic"].start == cfg["base"]["tangent_warmup"] == 300
    assert phases["dmd2_critic"].repeats == 4
    assert _nets(hybrid).get("weighting") is None and _nets(hybrid).get("fake_score") is not None


def test_bad_term_starts_are_refused_with_one_line():
    term = RCM["terms"][0]
    for bad in (-1, 1.5, "300", True):
        with pytest.raises(UserError, match="whole number of iterations"):
            make_objective({**RCM, "terms": [{**term, "start": bad}]})
    with pytest.raises(UserError, match="has a phase that ends"):  # dmd2's warm-up phase stops
        make_objective({**RCM, "terms": [{**term, "start": 5, "regression_warmup": 3, "cache": "c"}]})
