"""The trainer on tiny CPU networks: student construction, phases and update ratios, run folder,
NaN guard, bad input, resume refusal, partial checkpoints, LoRA, mixed precision, load_run."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import trainer_toy  # noqa: F401  (registers the toy objectives)
from conftest import tiny_teacher
from stepdistill.errors import UserError
from stepdistill.generator import StudentConfig, build_student


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


def overrides(teacher, data, out, **kw):
    base = dict(teacher=str(teacher), data=str(data), output_dir=str(out), cpu="true", batch_size=4,
                max_steps=3, checkpoint_every=2, log_every=1, preview_every="null", progress="false")
    base.update(kw)
    base.setdefault("objective.name", "toy-regress")
    return [f"{k}={v}" for k, v in base.items()]


def run(*args, **kw):
    from stepdistill.train import resolve
    from stepdistill.train.trainer import Trainer

    cfg, obj = resolve(None, overrides(*args, **kw))
    trainer = Trainer(cfg, obj)
    return trainer, trainer.train()


# -- student ------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 4])
def test_student_timesteps_are_the_exported_schedulers(k):
    from diffusers import DDIMScheduler

    teacher = tiny_teacher()
    student = build_student(teacher, StudentConfig(steps=k))
    ref = DDIMScheduler.from_config(teacher.schedule.config)
    ref.set_timesteps(k)
    assert student.timesteps.tolist() == ref.timesteps.double().tolist()


@pytest.mark.parametrize("lora", [0, 4])
def test_student_starts_as_the_teacher(lora):
    teacher = tiny_teacher().requires_grad_(False)
    student = build_student(teacher, StudentConfig(steps=1, lora_rank=lora))
    x, t, c = torch.randn(3, 1, 8, 8), torch.full((3,), 999.0, dtype=torch.float64), {"class_labels": torch.tensor([0, 1, 2])}
    torch.testing.assert_close(student.denoise(x, t, c), teacher(x, t, c), rtol=0, atol=1e-6)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    if lora:
        assert trainable and all("lora_" in n for n in trainable)
    else:
        assert len(trainable) == len(list(teacher.parameters()))
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(student.parameters(), teacher.parameters()))


# -- a run ----------------------------------------------------------------------------------------
def test_two_phase_run_folder(tiny_teacher_dir, tiny_data_npz, tmp_path):
    out = tmp_path / "run"
    before = {k: v.clone() for k, v in tiny_teacher().backbone.state_dict().items()}
    trainer, res = run(tiny_teacher_dir, tiny_data_npz, out, **{"objective.name": "toy-critic", "max_steps": 3,
                                                                "keep_checkpoints": 1, "preview_every": 3,
                                                                "optim.critic.lr": 1e-3})
    assert res["step"] == 3 and res["skipped"] == 0
    assert trainer.updates == {"critic": 6, "student": 3}  # repeats 2 : 1
    assert trainer.scheds["critic"].get_last_lr()[0] == 1e-3 and trainer.scheds["student"].get_last_lr()[0] == 5e-5
    for k, v in trainer.teacher.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in trainer.teacher.parameters())
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-00000003"]  # keep_checkpoints=1 pruned step 2
    saved = load_file(out / "checkpoints" / "step-00000003" / "nets.safetensors")
    assert any(k.startswith("critic.") for k in saved) and not any(k.startswith("teacher.") for k in saved)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert {"critic/dsm", "generator/dmd"} <= set(lines[-1]["losses"]) and "lr" in lines[-1] and "it_s" in lines[-1]
    assert (out / "previews" / "step-00000003.png").is_file() and (out / "config.yaml").is_file()
    # the student moved, its EMA lags behind it
    st = {k[len("student."):]: v for k, v in saved.items() if k.startswith("student.")}
    ema = load_file(out / "checkpoints" / "step-00000003" / "ema.safetensors")
    name = next(iter(ema))
    assert not torch.equal(ema[name], st[name])


def test_nonfinite_guard_stops_and_keeps_last_good_checkpoint(tiny_teacher_dir, tiny_data_npz, tmp_path):
    from stepdistill.train.trainer import TrainingDiverged

    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="non-finite") as err:
        run(tiny_teacher_dir, tiny_data_npz, out, max_steps=10, checkpoint_every=2, max_nonfinite_in_a_row=2,
            **{"objective.nan_after": 2})  # NaN from the 3rd step on: the 4th stops the run
    assert "step-00000002" in str(err.value) and "2 updates in a row" in str(err.value)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    saved = load_file(out / "checkpoints" / "step-00000002" / "nets.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["skipped_total"] for x in lines] == [0, 0, 1]


def test_skipped_update_leaves_weights_and_ema_alone(tiny_teacher_dir, tiny_data_npz, tmp_path):
    a, _ = run(tiny_teacher_dir, tiny_data_npz, tmp_path / "a", max_steps=2)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    b, res = run(tiny_teacher_dir, tiny_data_npz, tmp_path / "b", max_steps=4, **{"objective.nan_after": 2})
    assert res["skipped"] == 2
    for (ka, va), (kb, vb) in zip(a.net_state().items(), b.net_state().items()):
        assert torch.equal(va, vb), ka
    for (ka, va), (kb, vb) in zip(a.ema.shadow().items(), b.ema.shadow().items()):
        assert torch.equal(va, vb), ka


@pytest.mark.parametrize("bad, match", [
    ({"max_stepz": 3}, "did you mean 'max_steps'"),
    ({"objective.name": "toy-regres"}, "did you mean 'toy-regress'"),
    ({"objective.teacher_stepz": 2}, "teacher_steps"),
    ({"student.steps": 0}, "student.steps must be >= 1"),
    ({"optim.critic.lr": 1e-3}, "trains no network 'critic'"),
    ({"mixed_precision": "fp8"}, "mixed_precision"),
    ({"ema.halflife_ratio": 0.05, "ema.warmup": True}, "two ramp-ups"),
    ({"ema.halflife_ratio": -1}, "halflife_ratio must be > 0"),
    ({"optim.student.lr_decay": "cosin"}, "lr_decay 'cosin' is not a decay; use one of cosine, linear"),
    ({"optim.student.lr_decay": "cosine", "optim.student.lr_schedule": "cosine"}, "decays too"),
    ({"optim.student.lr_decay": "linear", "optim.student.lr_decay_floor": 2}, "lr_decay_floor must be in"),
    ({"optim.student.lr_decay_floor": 0.1}, "lr_decay is null, so nothing decays"),
])
def test_bad_config_is_one_clear_error(tiny_teacher_dir, tiny_data_npz, tmp_path, bad, match):
    from stepdistill.train import resolve

    with pytest.raises(UserError, match=match):
        resolve(None, overrides(tiny_teacher_dir, tiny_data_npz, tmp_path / "r", **bad))
    assert not (tmp_path / "r").exists()


def test_bad_paths_stop_before_compute(tiny_teacher_dir, tiny_data_npz, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="does not exist"):
        run(tmp_path / "nope", tiny_data_npz, tmp_path / "r1")
    with pytest.raises(UserError, match="image"):
        run(tiny_teacher_dir, tmp_path / "empty", tmp_path / "r2")
    assert not list((tmp_path / "r1").glob("checkpoints/*")) and not list((tmp_path / "r2").glob("checkpoints/*"))


def test_resume_refuses_incompatible_config_and_ignores_partial_checkpoint(tiny_teacher_dir, tiny_data_npz, tmp_path):
    from accelerate.state import AcceleratorState

    from stepdistill.train import checkpoint as ckpt

    out = tmp_path / "run"
    run(tiny_teacher_dir, tiny_data_npz, out, max_steps=2)
    for change, key in [({"objective.name": "toy-critic"}, "objective.name"), ({"student.steps": 2}, "student.steps")]:
        AcceleratorState._reset_state(True)
        with pytest.raises(UserError, match=key):
            run(tiny_teacher_dir, tiny_data_npz, out, max_steps=3, **change)
    # a write killed before its rename: invisible to resume, removed on the next start
    partial = ckpt.temp_folder(out, 4)
    partial.mkdir()
    (partial / "nets.safetensors").write_bytes(b"garbage")
    assert ckpt.latest(out).name == "step-00000002"
    AcceleratorState._reset_state(True)
    trainer, res = run(tiny_teacher_dir, tiny_data_npz, out, max_steps=3)
    assert trainer.resumed_from.name == "step-00000002" and res["step"] == 3 and not partial.exists()


def test_lora_run_saves_only_adapters_and_resumes(tiny_teacher_dir, tiny_data_npz, tmp_path):
    from accelerate.state import AcceleratorState

    out = tmp_path / "run"
    trainer, _ = run(tiny_teacher_dir, tiny_data_npz, out, max_steps=2, **{"student.lora_rank": 2,
                                                                         "optim.student.lr": 1e-2})
    saved = load_file(out / "checkpoints" / "step-00000002" / "nets.safetensors")
    assert saved and all("lora_" in k for k in saved)
    base = {n: p for n, p in trainer.student.named_parameters() if "lora_" not in n}
    ref = dict(tiny_teacher().named_parameters())
    for n, p in base.items():
        assert torch.equal(p, ref[n.replace("denoiser.", "", 1).replace(".base_layer", "")]), n
    AcceleratorState._reset_state(True)
    trainer2, res = run(tiny_teacher_dir, tiny_data_npz, out, max_steps=3, **{"student.lora_rank": 2,
                                                                            "optim.student.lr": 1e-2})
    assert trainer2.resumed_from.name == "step-00000002" and res["step"] == 3


def test_bf16_and_gradient_checkpointing_run(tiny_teacher_dir, tiny_data_npz, tmp_path):
    trainer, res = run(tiny_teacher_dir, tiny_data_npz, tmp_path / "r", max_steps=2, mixed_precision="bf16",
                       gradient_checkpointing="true")
    assert res["skipped"] == 0
    assert trainer.student.denoiser.backbone.is_gradient_checkpointing
    assert all(torch.isfinite(v).all() for v in trainer.net_state().values())


def test_load_run_gives_the_ema_student(tiny_teacher_dir, tiny_data_npz, tmp_path):
    from stepdistill.train import load_run

    out = tmp_path / "run"
    trainer, _ = run(tiny_teacher_dir, tiny_data_npz, out, max_steps=2, preview_every=2)
    student, meta = load_run(out)
    assert meta["step"] == 2 and meta["steps"] == 1 and meta["ema"]
    for name, v in trainer.ema.shadow().items():
        assert torch.equal(dict(student.named_parameters())[name], v), name
    noise, cond = trainer.monitors.fixed_inputs(4)
    with torch.no_grad():
        x = student(noise, cond)
    torch.testing.assert_close(x, trainer.monitors.sample_student(noise, cond), rtol=0, atol=0)
    with pytest.raises(UserError, match="not a run folder"):
        load_run(tmp_path)


def test_dry_run_prints_config_and_parameter_counts(tiny_teacher_dir, tiny_data_npz, tmp_path, capsys):
    import argparse

    from stepdistill.commands import train as cmd

    args = argparse.Namespace(config=None, overrides=overrides(tiny_teacher_dir, tiny_data_npz, tmp_path / "r"),
                              dry_run=True)
    assert cmd.run(args) == 0
    text = capsys.readouterr().out
    n = sum(p.numel() for p in tiny_teacher().parameters())
    assert "toy-regress" in text and f"{n:,}" in text and not (tmp_path / "r").exists()


def test_eval_hook_logs_scores_and_leaves_training_untouched(tiny_teacher_dir, tiny_data_npz, tmp_path, monkeypatch):
    import stepdistill.eval.harness as harness
    from accelerate.state import AcceleratorState

    calls = []

    def fake_evaluate(generate_fn, num, detector, ref, seed=0, *, sample_shape, num_classes=0, device="cpu", **kw):
        x = generate_fn(torch.randn(num, *sample_shape), torch.arange(num) % num_classes)
        torch.rand(5)  # an evaluator is free to use the global generator
        calls.append((num, detector, ref, num_classes))
        return {"fid": float(x.float().pow(2).mean()), "protocol": {"detector": detector}}

    monkeypatch.setattr(harness, "evaluate_generator", fake_evaluate)
    a, _ = run(tiny_teacher_dir, tiny_data_npz, tmp_path / "a", max_steps=2, eval_every=1, eval_samples=6)
    AcceleratorState._reset_state(True)
    b, _ = run(tiny_teacher_dir, tiny_data_npz, tmp_path / "b", max_steps=2)
    assert calls == [(6, "digits", "digits", 2)] * 2
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "eval" in x] == [1, 2] and all("fid" in x["eval"] for x in lines if "eval" in x)
    for (k, va), vb in zip(a.net_state().items(), b.net_state().values()):
        assert torch.equal(va, vb), k


def test_max_minutes_stops_with_a_checkpoint_and_counts_time_over_resumes(tiny_teacher_dir, tiny_data_npz, tmp_path):
    out = tmp_path / "run"
    # a budget of 6 us: the objective's setup (counted, as a cache it builds would be) already spends it,
    # so the run stops before its first step, and still leaves a checkpoint to resume from
    trainer, res = run(tiny_teacher_dir, tiny_data_npz, out, max_steps=1000, max_minutes=1e-7, checkpoint_every=500)
    assert res["step"] == 0
    state = json.loads((out / "checkpoints" / f"step-{res['step']:08d}" / "trainer.json").read_text())
    assert state["step"] == res["step"] and state["train_seconds"] >= 6e-6
    # re-running the same command resumes with the budget already spent: no further step
    trainer2, res2 = run(tiny_teacher_dir, tiny_data_npz, out, max_steps=1000, max_minutes=1e-7, checkpoint_every=500)
    assert res2["step"] == res["step"] and trainer2.seconds >= state["train_seconds"]
    # a larger budget on resume continues where the run stopped
    _, res3 = run(tiny_teacher_dir, tiny_data_npz, out, max_steps=res["step"] + 2, max_minutes=10, checkpoint_every=500)
    assert res3["step"] == res["step"] + 2


def test_lora_fake_score_trains_its_adapters_only_and_resumes(tiny_teacher_dir, tiny_data_npz, tmp_path):
    """DMD2 with the fake score as LoRA adapters on the teacher's own backbone: the adapters train and
    are checkpointed with the fake score; the teacher's weights neither change nor get saved."""
    out = tmp_path / "run"
    kw = {"objective.name": "dmd2", "objective.fake_lora_rank": 2, "objective.gan_weight": 0.0, "max_steps": 2,
          "student.steps": 1, "preview_every": 2}
    trainer, res = run(tiny_teacher_dir, tiny_data_npz, out, **kw)
    from PIL import Image

    rows = Image.open(out / "previews" / "step-00000002-scores.png")  # student | teacher x0 | fake x0
    assert rows.height > rows.width / trainer.cfg.preview_n * 2
    base = {k: v for k, v in trainer.teacher.backbone.state_dict().items() if "lora_" not in k}
    fresh = tiny_teacher().backbone.state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in base.items() if k in fresh)
    saved = load_file(out / "checkpoints" / "step-00000002" / "nets.safetensors")
    fake = [k for k in saved if k.startswith("fake_score.")]
    assert fake and all("lora_" in k for k in fake)  # only the adapters, not a second teacher
    lora_b = {k: v for k, v in saved.items() if "lora_B" in k}
    assert any(v.abs().sum() > 0 for v in lora_b.values())  # B starts at zero: it moved, so it trained
    _, res2 = run(tiny_teacher_dir, tiny_data_npz, out, **{**kw, "max_steps": 3})
    assert res2["step"] == 3


def test_objective_lr_factor_anneals_progressive_rounds_and_budget_is_checked(tiny_teacher_dir, tiny_data_npz,
                                                                              tmp_path):
    """Progressive distillation's per-round linear annealing (Objective.lr_factor) reaches the
    optimizer: the logged lr falls over each round and restarts with the next; a max_steps past the
    last round's share (where the annealed lr is 0) is refused before any compute."""
    from stepdistill.train import resolve

    pd = {"objective.name": "progressive", "objective.start_steps": 4, "objective.final_steps": 1,
          "objective.iterations_per_round": 4, "optim.student.lr": 1e-3, "optim.student.warmup_steps": 0,
          "optim.student.lr_schedule": "constant", "max_steps": 8, "checkpoint_every": 8}
    _, res = run(tiny_teacher_dir, tiny_data_npz, tmp_path / "pd", **pd)
    assert res["step"] == 8
    lines = [json.loads(x) for x in (tmp_path / "pd" / "metrics.jsonl").read_text().splitlines()]
    lr = [x["lr"]["student"] for x in lines]
    assert lr == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4] * 2)  # update i of a round: 1 - i / 4
    with pytest.raises(UserError, match="max_steps=9 runs past"):
        resolve(None, overrides(tiny_teacher_dir, tiny_data_npz, tmp_path / "r", **{**pd, "max_steps": 9}))
    assert not (tmp_path / "r").exists()
    cfg, _ = resolve(None, overrides(tiny_teacher_dir, tiny_data_npz, tmp_path / "r",
                                     **{**pd, "max_steps": 9, "objective.lr_anneal": "none"}))
    assert cfg.max_steps == 9


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_lr_decay_follows_the_runs_progress(tiny_teacher_dir, tiny_data_npz, tmp_path, kind):
    """optim.<net>.lr_decay: update k of a max_steps=N run takes lr * (floor + (1 - floor) * s(k / N)),
    s = (1 + cos(pi p)) / 2 (SGDR eq. 5) or 1 - p, after the schedule's warm-up; and where the time budget
    is further along than the steps (a run max_minutes ends), the decay follows the budget's share."""
    import math

    floor, n, lr, warm = 0.1, 6, 1e-3, 2
    kw = {"optim.student.lr": lr, "optim.student.warmup_steps": warm, "optim.student.lr_decay": kind,
          "optim.student.lr_decay_floor": floor, "max_steps": n, "checkpoint_every": n}
    trainer, res = run(tiny_teacher_dir, tiny_data_npz, tmp_path / "run", **kw)
    assert res["step"] == n
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    shape = (lambda p: 0.5 * (1 + math.cos(math.pi * p))) if kind == "cosine" else (lambda p: 1 - p)
    want = [lr * min(1.0, k / warm) * (floor + (1 - floor) * shape(k / n)) for k in range(n)]
    assert [x["lr"]["student"] for x in lines] == pytest.approx(want, rel=1e-9)
    trainer.step, trainer.time_progress = 1, 0.75  # a budget three quarters spent at step 1 of 6
    trainer._apply_lr_factor("student")
    assert trainer.last_lr["student"] == pytest.approx(lr * (floor + (1 - floor) * shape(0.75)), rel=1e-9)


def test_a_phase_waits_for_its_start(tiny_teacher_dir, tiny_data_npz, tmp_path):
    """DMD2 with a regression warm-up of 2 iterations: 3 steps give 1 x critic_repeats critic updates
    and 3 generator updates; the fake score is the teacher until the critic starts."""
    trainer, res = run(tiny_teacher_dir, tiny_data_npz, tmp_path / "run",
                       **{"objective.name": "dmd2", "objective.regression_warmup": 2, "objective.critic_repeats": 2,
                          "objective.gan_weight": 0.0, "objective.cache": str(tmp_path / "pairs"),
                          "objective.cache_num": 8, "objective.cache_steps": 2, "max_steps": 2})
    assert trainer.updates == {"fake_score": 0, "student": 2}
    for k, v in trainer.teacher.backbone.state_dict().items():
        assert torch.equal(trainer.nets.fake_score.denoiser.backbone.state_dict()[k], v), k
    trainer, res = run(tiny_teacher_dir, tiny_data_npz, tmp_path / "run",
                       **{"objective.name": "dmd2", "objective.regression_warmup": 2, "objective.critic_repeats": 2,
                          "objective.gan_weight": 0.0, "objective.cache": str(tmp_path / "pairs"),
                          "objective.cache_num": 8, "objective.cache_steps": 2, "max_steps": 3})
    assert res["step"] == 3 and trainer.updates == {"fake_score": 2, "student": 3}


def _one_update_moments(trainer, updates: int) -> None:
    """The student's Adam state holds ``updates`` updates; for one, its moments are those of a single
    gradient g: m = (1 - b1) g and v = (1 - b2) g^2 (torch.optim.AdamW's first step), so m^2 (1 - b2) =
    v (1 - b1)^2."""
    opt = trainer.opts["student"]
    b1, b2 = opt.param_groups[0]["betas"]
    states = [opt.state[p] for p in trainer.params["student"]]
    assert states and all(int(st["step"]) == updates for st in states)
    if updates == 1:
        for st in states:
            torch.testing.assert_close(st["exp_avg"] ** 2 * (1 - b2), st["exp_avg_sq"] * (1 - b1) ** 2,
                                       rtol=1e-4, atol=1e-12)


def test_the_generator_starts_with_fresh_moments_after_a_warm_up(tiny_teacher_dir, tiny_data_npz, tmp_path):
    """DMD2 after a regression warm-up: the student's first DMD2 update starts from fresh Adam moments, as
    the authors' DMD2 run loads the pretrained weights without optimizer state (tianweiy/DMD2
    --ckpt_only_path); a resume at the switch drops them where the uninterrupted run did; the same with
    the warm-up as a share of the run."""
    kw = {"objective.name": "dmd2", "objective.regression_warmup": 2, "objective.critic_repeats": 1,
          "objective.gan_weight": 0.0, "objective.cache": str(tmp_path / "pairs"), "objective.cache_num": 8,
          "objective.cache_steps": 2, "checkpoint_every": 1}
    straight, _ = run(tiny_teacher_dir, tiny_data_npz, tmp_path / "straight", **kw, max_steps=3)
    _one_update_moments(straight, 1)  # iterations 0, 1 warm-up; 2 the first DMD2 update
    assert straight.updates == {"fake_score": 1, "student": 3}
    run(tiny_teacher_dir, tiny_data_npz, tmp_path / "resumed", **kw, max_steps=2)
    resumed, _ = run(tiny_teacher_dir, tiny_data_npz, tmp_path / "resumed", **kw, max_steps=3)
    _one_update_moments(resumed, 1)
    for a, b in zip(straight.params["student"], resumed.params["student"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    frac = {**kw, "objective.regression_warmup": 0, "objective.regression_warmup_fraction": 0.5}
    trainer, _ = run(tiny_teacher_dir, tiny_data_npz, tmp_path / "fraction", **frac, max_steps=4)
    assert trainer.switches == {"0.5": 2}
    _one_update_moments(trainer, 2)  # iterations 2, 3 since the switch, not 4


def test_progress_off_a_terminal_is_a_plain_line_per_log_step(tiny_teacher_dir, tiny_data_npz, tmp_path, capsys):
    """Where stdout is not a terminal (nohup, SLURM, pytest's capture) training prints one line per log
    step: the step, the window's losses, it/s and the ETA."""
    import re

    run(tiny_teacher_dir, tiny_data_npz, tmp_path / "run", max_steps=4, log_every=2, progress="true")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    assert [ln.split()[1] for ln in lines] == ["2/4", "4/4"]
    assert all(re.search(r"generator/mse=\S+ .* \S+ it/s eta \d+:\d\d:\d\d$", ln) for ln in lines), lines
    assert lines[-1].endswith("eta 0:00:00")


def test_curves_are_drawn_from_the_runs_log(tiny_teacher_dir, tiny_data_npz, tmp_path):
    """``stepdistill plot RUN`` and the PNG the trainer refreshes at each checkpoint: a panel per phase
    with its losses, the gradient norm of each trained network per phase, skipped updates."""
    from stepdistill.cli import main
    from stepdistill.plots import curves, read_metrics

    run(tiny_teacher_dir, tiny_data_npz, tmp_path / "run", max_steps=3, **{"objective.name": "toy-critic"})
    png = (tmp_path / "run" / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    panels = curves(read_metrics(tmp_path / "run"))
    assert {"critic losses", "generator losses", "gradient norm", "skipped updates"} <= set(panels)
    assert {"critic (critic)", "student (generator)"} <= set(panels["gradient norm"])
    assert [s for s, _ in panels["skipped updates"]["total"]] == [1, 2, 3]
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "d.png")]) == 2  # not a run: one line, exit 2
    assert not (tmp_path / "d.png").exists()


def test_attention_switch_goes_through_diffusers_processors(monkeypatch):
    """attention=auto is SDPA without CUDA (diffusers' default processors, left as they are); xformers
    calls enable_xformers_memory_efficient_attention on every diffusers model of the run."""
    from diffusers import ModelMixin

    from stepdistill.attention import apply_attention, resolve_attention
    from stepdistill.objectives.base import Nets

    assert resolve_attention("auto", cpu=True) == "sdpa" and resolve_attention("sdpa") == "sdpa"
    teacher = tiny_teacher()
    nets = Nets(teacher=teacher, student=build_student(teacher))
    procs = [m.processor for m in nets.modules() if hasattr(m, "processor")]
    assert procs and {type(p).__name__ for p in procs} == {"AttnProcessor2_0"}  # diffusers' SDPA default
    assert apply_attention(nets, "sdpa") == 0
    assert [m.processor for m in nets.modules() if hasattr(m, "processor")] == procs
    called = []
    monkeypatch.setattr(ModelMixin, "enable_xformers_memory_efficient_attention", lambda self: called.append(self))
    assert apply_attention(nets, "xformers") == 2
    assert {id(m) for m in called} == {id(teacher.backbone), id(nets.student.denoiser.backbone)}


def test_the_budget_counts_the_objectives_setup(tiny_teacher_dir, tiny_data_npz, tmp_path, monkeypatch):
    """A teacher-output cache sampled in build() is paid from max_minutes (as one sampled inside the
    first step was) and logged as setup_seconds, outside every it/s window."""
    import json
    import time

    import stepdistill.train.trainer as trainer_mod

    real = trainer_mod.build_nets

    def slow_build(*a, **k):
        time.sleep(1.5)
        return real(*a, **k)

    monkeypatch.setattr(trainer_mod, "build_nets", slow_build)
    _, res = run(tiny_teacher_dir, tiny_data_npz, tmp_path / "run", max_steps=1000, max_minutes=0.02)
    assert res["step"] == 0  # 1.5 s of setup already spent the 1.2 s budget
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["setup_seconds"] >= 1.5


def test_it_s_leaves_out_previews_and_checkpoints(tiny_teacher_dir, tiny_data_npz, tmp_path, monkeypatch):
    """Time spent on previews (here a 0.5 s stand-in), evaluation and checkpoints is logged as
    aside_seconds and kept out of it/s, which measures training iterations alone."""
    import time

    from stepdistill.train.monitors import Monitors

    monkeypatch.setattr(Monitors, "preview", lambda self: time.sleep(0.5))
    run(tiny_teacher_dir, tiny_data_npz, tmp_path / "run", max_steps=4, log_every=2, preview_every=1)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [x for x in lines if "it_s" in x][-1]  # steps 3 and 4; previews after steps 2 and 3 fall in it
    assert last["aside_seconds"] >= 1.0
    assert 2 / last["it_s"] < 0.5  # two tiny training iterations take less than one preview


class _Fractions(trainer_toy.ToyCritic):
    """ToyCritic with its phases sized as shares of the run: the generator for the first half, the
    critic for the second (Phase.stop_fraction / start_fraction)."""

    name = "toy-fractions"

    def phases(self):
        from stepdistill.objectives import Phase

        return [Phase("critic", ("critic",), start_fraction=0.5), Phase("generator", ("student",), stop_fraction=0.5)]


def test_phase_fractions_switch_at_the_share_of_the_run_and_resume(tiny_teacher_dir, tiny_data_npz, tmp_path):
    from stepdistill.objectives import OBJECTIVES, register

    if _Fractions.name not in OBJECTIVES:
        register(_Fractions)
    out = tmp_path / "run"
    kw = {"objective.name": "toy-fractions", "objective.critic_repeats": 1, "optim.critic.lr": 1e-3}
    trainer, res = run(tiny_teacher_dir, tiny_data_npz, out, **kw, max_steps=4, checkpoint_every=4)
    assert trainer.updates == {"critic": 2, "student": 2}  # steps 0, 1: generator; 2, 3: critic
    state = json.loads((out / "checkpoints" / "step-00000004" / "trainer.json").read_text())
    assert state["phase_switches"] == {"0.5": 2}
    # resumed with a longer run, the recorded switch stands: the generator's half is over
    trainer, res = run(tiny_teacher_dir, tiny_data_npz, out, **kw, max_steps=6, checkpoint_every=6)
    assert res["step"] == 6 and trainer.updates == {"critic": 4, "student": 2}


def test_phase_fractions_count_the_time_left_after_setup(tiny_teacher_dir, tiny_data_npz, tmp_path):
    """A warm-up of a share of the run is that share of the training time: the setup (a teacher-output
    cache, a fixed cost of the machine) is charged to the budget but not to the phases' progress, so a
    slower machine or a shorter budget keeps the warm-up and the main phase in proportion. The setup
    time is checkpointed, so a resumed run keeps measuring progress the same way."""
    import time

    from stepdistill.objectives import OBJECTIVES, register
    from stepdistill.train import resolve
    from stepdistill.train.trainer import Trainer

    if _Fractions.name not in OBJECTIVES:
        register(_Fractions)
    out = tmp_path / "run"
    kw = {"objective.name": "toy-fractions", "objective.critic_repeats": 1, "optim.critic.lr": 1e-3,
          "max_minutes": 1.0, "max_steps": 1000}
    trainer = Trainer(*resolve(None, overrides(tiny_teacher_dir, tiny_data_npz, out, **kw)))

    class Quiet:
        received = None

    trainer.setup_total = 30.0  # half the 60-second budget went to setup
    assert not trainer._should_stop(time.perf_counter() - 45.0, Quiet())
    assert trainer.seconds == pytest.approx(45.0, abs=0.5)
    assert trainer.time_progress == pytest.approx((45.0 - 30.0) / (60.0 - 30.0), abs=0.02)  # not 45 / 60
    assert trainer._should_stop(time.perf_counter() - 60.0, Quiet())
    trainer.setup_total = 90.0  # setup alone outlasted the budget: every fraction is reached
    trainer._should_stop(time.perf_counter() - 90.0, Quiet())
    assert trainer.time_progress == 1.0
    trainer.release()

    trainer, _ = run(tiny_teacher_dir, tiny_data_npz, out, **{**kw, "max_steps": 2, "checkpoint_every": 2})
    state = json.loads((out / "checkpoints" / "step-00000002" / "trainer.json").read_text())
    assert state["setup_seconds"] == pytest.approx(trainer.setup_total) and state["setup_seconds"] > 0
    resumed = Trainer(*resolve(None, overrides(tiny_teacher_dir, tiny_data_npz, out, **{**kw, "max_steps": 3})))
    assert resumed.setup_before == pytest.approx(state["setup_seconds"])
    resumed.release()


def test_overrides_may_follow_an_option():
    """`stepdistill train PRESET --dry-run key=value`: the overrides after the option are kept, in order
    after those before it; a stray word is still refused by argparse's one line."""
    from stepdistill.cli import parse

    args = parse(["train", "digits/dmd2", "max_steps=3", "--dry-run", "seed=1", "max_steps=5"])
    assert args.config == "digits/dmd2" and args.dry_run
    assert args.overrides == ["max_steps=3", "seed=1", "max_steps=5"]
    with pytest.raises(SystemExit):
        parse(["train", "digits/dmd2", "--dry-run", "notanoverride"])
    assert parse(["eval", "runs/x"]).model == "runs/x"
    with pytest.raises(SystemExit):
        parse(["eval", "runs/x", "a=1"])  # a command without overrides takes none
