"""The objective contract, checked on every registered objective with tiny CPU networks: per phase,
losses are finite float tensors of shape [B]; backpropagating a phase's loss gives gradients to
the networks that phase trains and to no other (never the teacher's own weights: a LoRA fake score
on the teacher's backbone trains only its adapters); objective state survives a checkpoint round
trip (saved and loaded the way the trainer does)."""
from __future__ import annotations

import pytest
import torch

import trainer_toy
from conftest import tiny_teacher
from stepdistill.generator import StudentConfig, build_student
from stepdistill.objectives import Nets, load_all
from stepdistill.train.randomness import BatchRandom

#: objectives whose student needs an input the tiny class-conditional UNet2DModel lacks (a w input:
#: UNet2DConditionModel's time_cond_proj_dim); their contract is checked on a tiny SD pipeline in their own file
NEEDS_TEXT_UNET = {"guidance_distill"}  # tests/test_guidance_distill.py
NAMES = sorted((set(load_all()) - NEEDS_TEXT_UNET) | {trainer_toy.ToyRegress.name, trainer_toy.ToyCritic.name})
B = 4
#: objectives whose defaults need resources beyond the networks (a teacher-pair cache on disk):
#: the contract runs them without those terms
WITHOUT_RESOURCES = {"dmd": {"regression_weight": 0.0}}
#: every objective with its defaults, and those with a fake score also with LoRA adapters on the
#: teacher's own backbone (one copy of the weights)
CASES = [(n, {}) for n in NAMES] + [
    (n, {"fake_lora_rank": 2}) for n in NAMES
    if "fake_lora_rank" in getattr(load_all().get(n), "Config", type).__dataclass_fields__] + [
    ("consistency", {"multistep": True}),  # a deterministic "ddim" student with per-segment targets
    ("consistency", {"multistep": True, "teacher_steps": 4, "teacher_substeps": 3}),  # one link per segment
    ("consistency", {"multistep": True, "weighting": "truncated_snr"}),  # loss on x0 estimates, target net asked
    ("consistency", {"multistep": True, "teacher_steps": 4, "cache": "TMP", "cache_num": 6, "cache_steps": 8}),
    ("sid", {"gan_weight": 1.0, "gan_form": "sida"}),  # SiDA: the classifier shares the fake score's passes
    ("progressive", {"round_ema": 0.9}),  # the round's average teaches the next round
    ("scm", {"tangent": "finite_difference"}),
    ("hyper_sd", {"dmd_weight": 0.5}),  # the one-step score-distillation stage's critic
    ("hybrid", {"terms": [{"name": "adversarial", "weight": 0.5, "distill": "none"}]}),  # SANA-Sprint
    ("hybrid", {"terms": [{"name": "dmd2", "weight": 0.01, "gan_weight": 0.0, "critic_repeats": 2}]})]  # rCM
#: "TMP" in a case stands for a fresh folder of the test's own (a cache built there on first use)


def _setup(name, extra=None):
    from stepdistill.objectives import get_objective

    torch.manual_seed(0)
    cls = get_objective(name)
    obj = cls(cls.Config(**{**WITHOUT_RESOURCES.get(name, {}), **(extra or {})}))
    teacher = tiny_teacher().requires_grad_(False)
    if (extra or {}).get("cache"):  # a cache draws balanced labels from the teacher folder's metadata
        teacher.meta = {"num_classes": 2, "null_class": 2, "in_channels": 1, "sample_size": 8}
    student = build_student(teacher, StudentConfig(steps=obj.student_steps() or (2 if obj.student_sampler() else 1),
                                                   sampler=obj.student_sampler(), experts=obj.student_experts()))
    nets = Nets(teacher=teacher, student=student, **(obj.build(teacher, student) or {}))
    return obj, nets


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x0": torch.rand(B, 1, 8, 8, generator=g) * 2 - 1, "cond": {"class_labels": torch.arange(B) % 2},
            "rng": BatchRandom(seed, B, slice(0, B))}


@pytest.mark.parametrize("name,extra", CASES, ids=[n + "".join(f"-{k}" if k != "terms" else "-" + "+".join(t["name"] for t in e[k])
                                                                 for k in e) for n, e in CASES])
def test_losses_and_gradients_per_phase(name, extra, tmp_path):
    obj, nets = _setup(name, {k: str(tmp_path / k) if v == "TMP" else v for k, v in extra.items()})
    assert not any(p.requires_grad for k, p in nets.teacher.named_parameters() if "lora_" not in k)
    phases = obj.phases()
    assert phases
    for ph in phases:
        assert "teacher" not in ph.trains and all(nets.get(n) is not None for n in ph.trains), ph
        nets.zero_grad(set_to_none=True)
        losses = obj.losses(ph.name, nets, _batch())
        assert losses and any(not k.startswith("_") for k in losses), ph.name
        for k, v in losses.items():
            assert torch.is_tensor(v) and v.is_floating_point() and v.shape == (B,), (ph.name, k, getattr(v, "shape", v))
            assert torch.isfinite(v).all(), (ph.name, k)
        total = sum(v.mean() for k, v in losses.items() if not k.startswith("_"))
        total.backward()
        trained_params = {id(p) for n in ph.trains for p in nets.get(n).parameters() if p.requires_grad}
        assert all(p.grad is None for p in nets.teacher.parameters() if id(p) not in trained_params), \
            f"{ph.name}: the teacher got gradients"
        for n in ph.trains:
            grads = [p.grad for p in nets.get(n).parameters() if p.requires_grad]
            # reached by backprop (zero is allowed: DMD-type gradients vanish while critic == teacher)
            assert any(g is not None for g in grads), f"{ph.name}: {n} got no gradient"
        for n, mod in nets.named_children():
            if n in ph.trains or n == "teacher":
                continue
            for pname, p in mod.named_parameters():
                if id(p) in trained_params:
                    continue  # shared with a trained network
                assert p.grad is None or not p.grad.abs().sum(), f"{ph.name}: {n}.{pname} got a gradient"


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trips_through_a_checkpoint(name, tmp_path):
    from stepdistill.objectives import get_objective
    from stepdistill.train import checkpoint as ckpt

    obj, nets = _setup(name)
    for step in (1, 2):
        for ph in obj.phases():
            obj.losses(ph.name, nets, _batch(step))
        obj.on_step_end(nets, step)
    state = obj.state_dict()
    ckpt.save_torch({"objective": state}, tmp_path / "optim.pt")
    cls = get_objective(name)
    fresh = cls(cls.Config(**WITHOUT_RESOURCES.get(name, {})))
    fresh.load_state_dict(ckpt.load_torch(tmp_path / "optim.pt")["objective"])
    again = fresh.state_dict()
    assert again.keys() == state.keys()
    for k in state:
        a, b = state[k], again[k]
        assert (torch.equal(a, b) if torch.is_tensor(a) else a == b), k
    # schedules tied to the objective's state resume with it (Objective.lr_factor)
    for net in {n for ph in obj.phases() for n in ph.trains}:
        f = obj.lr_factor(net)
        assert isinstance(f, float) and 0.0 <= f <= 1.0 and fresh.lr_factor(net) == f, (net, f)


def test_no_objective_module_imports_another():
    """Objectives are built from shared parts (common, critic, regression, trajectories, gan); none
    imports or inherits from another objective's module."""
    import ast
    from pathlib import Path

    from stepdistill.objectives import FAMILIES

    root = Path(__file__).resolve().parents[1] / "stepdistill" / "objectives"
    for fam in FAMILIES:
        tree = ast.parse((root / f"{fam}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}
        assert not imported & set(FAMILIES), f"{fam}.py imports {imported & set(FAMILIES)}"


def test_the_folder_loaders_sit_below_train_export_and_eval():
    """``stepdistill.loaders`` (run and export folders back into models) imports none of the trainer,
    export or eval packages, which all import it: no loop between them."""
    import subprocess
    import sys

    code = ("import sys, stepdistill.loaders; print(sorted(m for m in sys.modules if m.startswith("
            "('stepdistill.train', 'stepdistill.export', 'stepdistill.eval', 'stepdistill.commands'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out
