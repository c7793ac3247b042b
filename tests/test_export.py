"""``stepdistill export``: the student's scheduler against diffusers' own schedulers, and round trips
of trained students through folders that a Python process without stepdistill loads and runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import trainer_toy  # noqa: F401  (registers the toy objectives)
from conftest import tiny_teacher, tiny_unet2d
from stepdistill.errors import UserError
from stepdistill.export import export_run, export_student, student_scheduler_config, student_timesteps
from stepdistill.export.scheduler import make_scheduler
from stepdistill.generator import StudentConfig, build_student
from stepdistill.schedules import EDMSchedule, FlowSchedule

LABELS = [0, 1, 1]
SEED = 5


# -- the scheduler --------------------------------------------------------------------------------
def _vp():
    return tiny_teacher().schedule


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_lcm_grid_is_the_ddim_trailing_grid(k):
    from diffusers import DDIMScheduler, LCMScheduler

    vp = _vp()
    ddim = DDIMScheduler.from_config({**vp.config, "timestep_spacing": "trailing"})
    ddim.set_timesteps(k)
    lcm = LCMScheduler.from_config({**vp.config, "original_inference_steps": 1000})
    lcm.set_timesteps(k)
    ts = student_timesteps(vp, k)
    assert ts.tolist() == ddim.timesteps.double().tolist() == lcm.timesteps.double().tolist()
    assert build_student(tiny_teacher(), StudentConfig(steps=k)).timesteps.tolist() == ts.tolist()


def test_default_lcm_grid_is_not_the_trailing_grid():
    """LCMScheduler's default 50-step skeleton is the mismatch peers ask users to fix by hand."""
    from diffusers import LCMScheduler

    vp = _vp()
    default = LCMScheduler.from_config(vp.config)
    default.set_timesteps(4)
    assert default.timesteps.tolist() == [999, 759, 499, 259]
    assert student_timesteps(vp, 4).tolist() == [999, 749, 499, 249]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_first_timestep_starts_an_index_uniform_grid_there(k):
    """student.first_timestep = t: K timesteps index-uniform on {0..t} from t down (the trailing
    rule on t + 1 indices), through the scheduler config alone."""
    vp, t = _vp(), 625
    want = [t - (i * (t + 1)) // k for i in range(k)]
    assert student_timesteps(vp, k, first_timestep=t).tolist() == want
    student = build_student(tiny_teacher(), StudentConfig(steps=k, first_timestep=t))
    assert student.timesteps.tolist() == want and student.timesteps_for(1).tolist() == [t]


def test_first_timestep_out_of_range_is_refused():
    vp = _vp()
    for bad in (400, 1000, 62.5):
        with pytest.raises(UserError, match=r"first_timestep must be an integer in \[500, 999\]"):
            student_timesteps(vp, 1, first_timestep=bad)
    with pytest.raises(UserError, match=r"sigma on EDM teachers and must lie in \(0.002, 80.0\]"):
        student_timesteps(EDMSchedule(), 1, first_timestep=600)
    with pytest.raises(UserError, match=r"time in \(0, 1000\]"):
        student_timesteps(FlowSchedule(), 1, first_timestep=1200)


@pytest.mark.parametrize("boundary", [None, "lcm"])
def test_scheduler_boundary_matches_the_student(boundary):
    """diffusers' own c_skip/c_out at every timestep of 1..8-step grids: LCM's for boundary='lcm',
    (0, 1) to 1e-7 for a student without a boundary condition."""
    vp = _vp()
    sched = make_scheduler(student_scheduler_config(vp, boundary))
    student = build_student(tiny_teacher(), StudentConfig(steps=1, boundary=boundary))
    for k in range(1, 9):
        sched.set_timesteps(k)
        for t in sched.timesteps:
            c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
            if boundary == "lcm":
                s_skip, s_out = student.boundary_scalings(t)
                assert abs(float(c_skip) - float(s_skip)) < 1e-7 and abs(float(c_out) - float(s_out)) < 1e-7
            else:
                assert float(c_skip) <= 1e-7 and abs(1 - float(c_out)) <= 1e-7


def test_flow_student_runs_as_the_stochastic_flow_scheduler(tmp_path):
    """A flow student exported and run by the shipped pipeline (in process) with the same noise."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from stepdistill.denoisers import DiffusersDenoiser
    from stepdistill.export.pipeline import StepDistillPipeline

    flow = FlowSchedule({"shift": 3.0})
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=3.0 / (3 + 3.0 - 1))  # ends at shifted 1/3
    ref.set_timesteps(3)
    assert student_timesteps(flow, 3).tolist() == ref.timesteps.double().tolist()
    assert abs(ref.timesteps[-1].item() - 600.0) < 1e-3  # shift 3 of sigma 1/3 = 0.6
    teacher = DiffusersDenoiser(tiny_unet2d(num_class_embeds=3), flow, null_class=2)
    student = build_student(teacher, StudentConfig(steps=3)).eval()
    out = export_student(student, {"num_classes": 2, "null_class": 2}, tmp_path / "flow")
    from diffusers import UNet2DModel

    pipe = StepDistillPipeline(unet=UNet2DModel.from_pretrained(out / "unet"),
                               scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(out / "scheduler"),
                               trained_steps=json.loads((out / "model_index.json").read_text())["trained_steps"])
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["stochastic_sampling"] is True
    got = pipe(class_labels=LABELS, generator=torch.Generator().manual_seed(SEED), output_type="latent").images
    torch.testing.assert_close(got, _student_sample(student, LABELS), rtol=0, atol=1e-4)


def test_deterministic_students_export_ddim_schedulers(tmp_path):
    """sampler "ddim": VP grids are the re-noising students' own (DDIMScheduler, trailing); a flow
    student runs as the deterministic Euler flow scheduler in the shipped pipeline; exports load back
    as "ddim" students."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

    from stepdistill.denoisers import DiffusersDenoiser
    from stepdistill.export.pipeline import StepDistillPipeline
    from stepdistill.loaders import load_for_sampling

    vp = _vp()
    for k in (1, 2, 4, 8):
        assert student_timesteps(vp, k, sampler="ddim").tolist() == student_timesteps(vp, k).tolist()
    with pytest.raises(UserError, match="boundary"):
        student_scheduler_config(vp, "lcm", 4, sampler="ddim")
    with pytest.raises(UserError, match="sampler"):
        student_scheduler_config(vp, None, 4, sampler="heun")
    with pytest.raises(UserError, match="divides"):  # DDIMScheduler would step 333 -> 0, not to clean data
        student_timesteps(vp, 3, sampler="ddim")
    flow = FlowSchedule({"shift": 3.0})
    teacher = DiffusersDenoiser(tiny_unet2d(num_class_embeds=3), flow, null_class=2)
    student = build_student(teacher, StudentConfig(steps=3, sampler="ddim")).eval()
    out = export_student(student, {"num_classes": 2, "null_class": 2}, tmp_path / "flow")
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["stochastic_sampling"] is False
    pipe = StepDistillPipeline(unet=UNet2DModel.from_pretrained(out / "unet"),
                               scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(out / "scheduler"),
                               trained_steps=3)
    got = pipe(class_labels=LABELS, generator=torch.Generator().manual_seed(SEED), output_type="latent").images
    torch.testing.assert_close(got, _student_sample(student, LABELS), rtol=0, atol=1e-4)
    model = load_for_sampling(out)
    assert model.student.sampler == "ddim"
    torch.testing.assert_close(_student_sample(model.student, LABELS), got, rtol=0, atol=1e-4)
    assert "deterministic DDIM step" in (out / "README.md").read_text()


@pytest.mark.parametrize("sampler, first", [("renoise", None), ("ddim", None), ("renoise", 2.5)])
def test_edm_students_run_in_the_shipped_pipeline_with_edm_euler_sigmas(sampler, first, tmp_path):
    """An EDM student (re-noising, deterministic, or from SiD's sigma_init 2.5) exported and run by the
    shipped pipeline (in process) with the same noise: EDMEulerScheduler's sigmas are the student's
    Karras grid, its preconditioning the teacher's; it loads back as the same student. The K-step
    grid is the first K points of the (K + 1)-point Karras grid (a last step at sigma_min would return
    its input): the exported config's sigma_min is the student's last sigma, so a plain
    set_timesteps(K) gives the student's sigmas."""
    from diffusers import EDMEulerScheduler, UNet2DModel

    from stepdistill.denoisers import DiffusersDenoiser
    from stepdistill.export.pipeline import StepDistillPipeline
    from stepdistill.loaders import load_for_sampling

    with pytest.raises(UserError, match="boundary"):
        student_scheduler_config(EDMSchedule(), "lcm", 2)
    teacher = DiffusersDenoiser(tiny_unet2d(num_class_embeds=3), EDMSchedule(), null_class=2)
    student = build_student(teacher, StudentConfig(steps=3, sampler=sampler, first_timestep=first)).eval()
    ref = EDMEulerScheduler(sigma_max=first or 80.0)
    ref.set_timesteps(4)
    torch.testing.assert_close(student.timesteps, ref.sigmas[:3].double(), rtol=1e-6, atol=0)
    out = export_student(student, {"num_classes": 2, "null_class": 2}, tmp_path / "edm")
    exported = EDMEulerScheduler.from_pretrained(out / "scheduler")
    exported.set_timesteps(3)
    assert exported.sigmas[:-1].double().tolist() == student.timesteps.tolist() and float(exported.sigmas[-1]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "EDMEulerScheduler"] and index["renoise"] == (sampler == "renoise")
    pipe = StepDistillPipeline(unet=UNet2DModel.from_pretrained(out / "unet"),
                               scheduler=EDMEulerScheduler.from_pretrained(out / "scheduler"),
                               trained_steps=index["trained_steps"], renoise=index["renoise"])
    got = pipe(class_labels=LABELS, generator=torch.Generator().manual_seed(SEED), output_type="latent").images
    torch.testing.assert_close(got, _student_sample(student, LABELS), rtol=0, atol=1e-4)
    model = load_for_sampling(out)
    assert model.student.sampler == sampler and model.student.timesteps.tolist() == student.timesteps.tolist()
    torch.testing.assert_close(_student_sample(model.student, LABELS), got, rtol=0, atol=1e-4)


def test_an_edm_export_from_before_the_grid_stopped_above_sigma_min_loads_with_its_own_grid(tmp_path):
    """EDM students exported when the K-step grid ran down to sigma_min (scheduler sigma_min 0.002, no
    teacher_sigma_min in the record) load with the sigmas their scheduler gives, not today's grid."""
    from stepdistill.denoisers import DiffusersDenoiser
    from stepdistill.loaders import EXPORT_META, load_for_sampling

    teacher = DiffusersDenoiser(tiny_unet2d(num_class_embeds=3), EDMSchedule(), null_class=2)
    out = export_student(build_student(teacher, StudentConfig(steps=3)).eval(), {"num_classes": 2, "null_class": 2},
                         tmp_path / "edm")
    old = EDMSchedule().timesteps(3)[:-1]  # [80, 9.72, 0.002]
    record = json.loads((out / EXPORT_META).read_text())
    record.pop("teacher_sigma_min")
    record["timesteps"] = old.tolist()
    (out / EXPORT_META).write_text(json.dumps(record))
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps({**sched, "sigma_min": 0.002}))
    assert load_for_sampling(out).student.timesteps.tolist() == old.tolist()


# -- round trips ------------------------------------------------------------------------------------
def _student_sample(student, labels, n=None):
    """The student's own K-step sample, drawing its initial and step noise as the pipelines do:
    one generator, initial noise first, then one draw per re-noising."""
    g = torch.Generator().manual_seed(SEED)
    b = len(labels) if labels is not None else n
    noise = torch.randn((b, *student_shape(student)), generator=g)
    cond = None if labels is None else {"class_labels": torch.tensor(labels)}
    with torch.no_grad():
        return student(noise, cond, generator=g)


def student_shape(student):
    cfg = student.denoiser.backbone.config
    return (cfg.in_channels, cfg.sample_size, cfg.sample_size)


def _train(teacher_dir, data, out, **kw):
    from accelerate.state import AcceleratorState

    from stepdistill.train import resolve
    from stepdistill.train.trainer import Trainer

    base = dict(teacher=str(teacher_dir), data=str(data), output_dir=str(out), cpu="true", batch_size=4,
                max_steps=2, checkpoint_every=2, log_every=1, preview_every="null", progress="false",
                **{"objective.name": "toy-regress", "optim.student.lr": 1e-2})
    base.update(kw)
    cfg, obj = resolve(None, [f"{k}={v}" for k, v in base.items()])
    Trainer(cfg, obj).train()
    AcceleratorState._reset_state(True)
    return out


@pytest.fixture(scope="module")
def runs(tiny_teacher_dir, tiny_data_npz, tmp_path_factory):
    """Two trained runs of the tiny class-conditional teacher: a full-weight 2-step student without a
    boundary condition, and a LoRA 4-step student with LCM's boundary condition."""
    root = tmp_path_factory.mktemp("runs")
    full = _train(tiny_teacher_dir, tiny_data_npz, root / "full", **{"student.steps": 2})
    lora = _train(tiny_teacher_dir, tiny_data_npz, root / "lora", **{"student.steps": 4, "student.boundary": "lcm",
                                                                      "student.lora_rank": 2})
    return {"full": full, "lora": lora}


SNIPPET = textwrap.dedent("""
    import json, sys
    import torch
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    jobs, out = json.loads(sys.argv[1]), {}
    for name, job in jobs.items():
        pipe = DiffusionPipeline.from_pretrained(job["dir"], **job["load"])
        if job.get("lora"):
            pipe.load_lora_weights(job["dir"])
        pipe.set_progress_bar_config(disable=True)
        res = pipe(generator=torch.Generator().manual_seed(job["seed"]), **job["call"])
        out[name] = torch.as_tensor(res.images)
        out[name + "/class"] = torch.tensor([len(type(pipe).__name__)])
        print(name, type(pipe).__name__)
    assert "stepdistill" not in sys.modules, "the pipeline imported stepdistill"
    save_file(out, sys.argv[2])
""")


def _run_without_stepdistill(jobs: dict, tmp_path) -> dict:
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-I", "-c", SNIPPET, json.dumps(jobs), str(tmp_path / "out.safetensors")],
                         env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    return load_file(tmp_path / "out.safetensors"), res.stdout


def test_exported_students_load_and_match_in_plain_diffusers(runs, tmp_path, tiny_teacher_dir):
    """Class-conditional full, LoRA fused and unconditional students in diffusers' own
    ConsistencyModelPipeline (no custom code), and LoRA adapters through the shipped pipeline's
    load_lora_weights: each reproduces the student's own sample for the same noise."""
    from stepdistill.loaders import load_run

    full_dir = export_run(runs["full"], tmp_path / "full")
    lora_dir = export_run(runs["lora"], tmp_path / "lora", lora=True)
    fused_dir = export_run(runs["lora"], tmp_path / "fused", fuse=True)
    uncond_teacher = tiny_teacher()
    uncond_teacher.backbone = tiny_unet2d(num_class_embeds=None)
    uncond_teacher.null_class = None
    uncond = build_student(uncond_teacher, StudentConfig(steps=2, first_timestep=700)).eval()  # SiD-style start
    assert uncond.timesteps.tolist() == [700, 350]
    uncond_dir = export_student(uncond, {"teacher": "tiny-unconditional"}, tmp_path / "uncond")
    # a deterministic (multistep consistency) student: diffusers' DDIMScheduler in the same pipeline
    ddim = build_student(tiny_teacher(), StudentConfig(steps=4, sampler="ddim")).eval()
    ddim_dir = export_student(ddim, {"num_classes": 2, "null_class": 2}, tmp_path / "ddim")
    assert json.loads((ddim_dir / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "DDIMScheduler"

    trust = {"trust_remote_code": True}
    k2 = {"class_labels": LABELS, "batch_size": 3, "num_inference_steps": 2, "output_type": "pt"}
    jobs = {"full": {"dir": str(full_dir), "load": {}, "call": k2},
            "lora": {"dir": str(lora_dir), "load": trust, "lora": True,
                     "call": {"class_labels": LABELS, "output_type": "latent"}},
            "fused": {"dir": str(fused_dir), "load": {}, "call": {**k2, "num_inference_steps": 4}},
            "uncond": {"dir": str(uncond_dir), "load": {},
                       "call": {"batch_size": 3, "num_inference_steps": 2, "output_type": "np"}},
            "ddim": {"dir": str(ddim_dir), "load": {}, "call": {**k2, "num_inference_steps": 4}}}
    for job in jobs.values():
        job["seed"] = SEED
    got, stdout = _run_without_stepdistill(jobs, tmp_path)
    assert "full ConsistencyModelPipeline" in stdout and "uncond ConsistencyModelPipeline" in stdout
    assert "ddim ConsistencyModelPipeline" in stdout
    assert "lora StepDistillPipeline" in stdout

    full, meta = load_run(runs["full"])
    lora, _ = load_run(runs["lora"])
    assert full.steps == 2 and lora.steps == 4 and meta["ema"]
    def image(x):  # diffusers' "pt" output: [-1, 1] data to [0, 1], clamped
        return (x / 2 + 0.5).clamp(0, 1)

    torch.testing.assert_close(got["full"], image(_student_sample(full, LABELS)), rtol=0, atol=1e-4)
    torch.testing.assert_close(got["lora"], _student_sample(lora, LABELS), rtol=0, atol=1e-4)
    torch.testing.assert_close(got["fused"], image(_student_sample(lora, LABELS)), rtol=0, atol=1e-4)
    want = image(_student_sample(uncond, None, n=3)).permute(0, 2, 3, 1)
    torch.testing.assert_close(got["uncond"], want, rtol=0, atol=1e-4)
    torch.testing.assert_close(got["ddim"], image(_student_sample(ddim, LABELS)), rtol=0, atol=1e-4)
    # the LoRA export carries the teacher's weights; only the adapters make it the student
    weights = "unet/diffusion_pytorch_model.safetensors"
    teacher_w, base_w = load_file(tiny_teacher_dir / weights), load_file(lora_dir / weights)
    assert teacher_w.keys() == base_w.keys() and all(torch.equal(teacher_w[k], base_w[k]) for k in teacher_w)
    assert not (fused_dir / "pytorch_lora_weights.safetensors").exists()


def test_stepdistill_loads_exports_for_sample_and_eval(runs, tmp_path):
    """``load_for_sampling`` (used by ``stepdistill eval`` and ``sample``) rebuilds the student from an
    exported folder, LoRA included, without importing its pipeline.py."""
    from stepdistill.loaders import load_for_sampling
    from stepdistill.loaders import load_run

    for name, kw in (("full", {}), ("lora", {"lora": True})):
        out = export_run(runs[name], tmp_path / name, **kw)
        model = load_for_sampling(out)
        student, _ = load_run(runs[name])
        assert model.num_classes == 2 and model.shape == (1, 8, 8)
        torch.testing.assert_close(_student_sample(model.student, LABELS), _student_sample(student, LABELS),
                                   rtol=0, atol=1e-6)
    assert not any(m.startswith("diffusers_modules") for m in sys.modules)


def test_sample_defaults_to_the_trained_step_count(runs, tmp_path):
    """`stepdistill sample RUN_DIR` with no --steps samples the student with its trained K steps."""
    from stepdistill.cli import main
    from stepdistill.loaders import load_for_sampling

    model = load_for_sampling(runs["full"])
    assert model.default_steps == model.student.steps
    assert main(["sample", str(runs["full"]), "--num", "2", "--out", str(tmp_path / "g.png")]) == 0
    assert yaml_steps(tmp_path / "g.yaml") == model.student.steps


def yaml_steps(path) -> int:
    from omegaconf import OmegaConf

    return int(OmegaConf.load(path)["steps"])


def test_eval_cli_scores_an_exported_folder(runs, tmp_path, tiny_data_npz):
    from stepdistill.cli import main

    out = export_run(runs["full"], tmp_path / "full")
    rc = main(["eval", str(out), "--steps", "2", "--num", "20", "--detector", "digits", "--ref", str(tiny_data_npz),
               "--json", str(tmp_path / "r.json")])
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["results"][0]["steps"] == 2 and report["protocol"]["model_type"] == "StudentModel"


def test_model_card_states_training_and_eval_with_protocol(runs, tmp_path, tiny_teacher_dir):
    run = runs["full"]
    report = {"results": [{"steps": 2, "nfe": 2, "fid": 12.5}], "protocol": {"detector": "digits", "num_samples": 20}}
    (tmp_path / "eval.json").write_text(json.dumps(report))
    out = export_run(run, tmp_path / "card", eval_json=str(tmp_path / "eval.json"))
    card = (out / "README.md").read_text()
    for text in ("toy-regress", "2 (timesteps [999, 499])", "| training steps | 2 |", "12.500", '"num_samples": 20',
                 "pipe(batch_size=2, class_labels=[0, 1], num_inference_steps=2).images",
                 f"| teacher | `{tiny_teacher_dir.name}` |", "| learning rate (student) | 0.01, constant_with_warmup",
                 "| batch | 4 per micro-step over 1 process, 1 micro-step per update |", "| seed | 0 |",
                 "| steps | 2 trained (max_steps 2) |", "| budget | none (max_steps only); ", "![samples", "no license"):
        assert text in card, text
    assert "trust_remote_code" not in card
    # the hub's front matter, parsed as the hub parses it
    from huggingface_hub import ModelCard

    data = ModelCard.load(out / "README.md").data.to_dict()
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "unconditional-image-generation"
    assert {"stepdistill", "2-step", "toy-regress"} <= set(data["tags"]) and "license" not in data
    # shareable as it is: no absolute local path in any text file
    for f in out.rglob("*"):
        if f.suffix in (".md", ".json"):
            text = f.read_text()
            assert str(tmp_path) not in text and str(run) not in text and str(tiny_teacher_dir) not in text, f
    # the sample image: the exported student's own 2-step samples, one class per column
    from PIL import Image

    assert Image.open(out / "samples.png").size[0] > 64
    plain = (export_run(run, tmp_path / "nocard") / "README.md").read_text()
    assert "This run has no evaluation results" in plain
    lora_card = (export_run(runs["lora"], tmp_path / "loracard", lora=True) / "README.md").read_text()
    assert "trust_remote_code=True" in lora_card and 'pipe.load_lora_weights("path/to/export")' in lora_card


def test_front_matter_takes_the_license_from_the_teachers_card(tmp_path):
    """The license (and base model) come from the teacher's own card; a hub teacher is the base model."""
    from huggingface_hub import ModelCard

    from stepdistill.export.share import front_matter, portable

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "README.md").write_text("---\nlicense: openrail++\nbase_model: org/base\n---\n# a teacher\n")
    record = {"teacher": str(teacher), "steps": 4, "mode": "lora", "kind": "image"}
    yaml, data = front_matter(record, "dmd2")
    assert data["license"] == "openrail++" and data["base_model"] == "org/base" and "lora" in data["tags"]
    card = tmp_path / "card.md"
    card.write_text(f"---\n{yaml}\n---\n")
    assert ModelCard.load(card).data.to_dict()["license"] == "openrail++"
    hub = {"teacher": str(tmp_path / "cache" / "snapshot"), "teacher_name": "stabilityai/sdxl-turbo-like", "steps": 1,
           "mode": "full", "kind": "text-to-image"}
    _, data = front_matter(hub, "dmd2")
    assert data["base_model"] == "stabilityai/sdxl-turbo-like" and data["pipeline_tag"] == "text-to-image"
    assert "license" not in data  # the teacher folder has no card: nothing is made up
    assert portable({"a": [str(teacher)], "b": "rel/path", "c": 3}) == {"a": ["teacher"], "b": "rel/path", "c": 3}


def test_bad_input_stops_with_a_clear_message(runs, tmp_path):
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    (tmp_path / "empty" / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(UserError, match="no complete checkpoint"):
        export_run(tmp_path / "empty", tmp_path / "x")
    with pytest.raises(UserError, match="not a run folder"):
        export_run(tmp_path, tmp_path / "x")
    with pytest.raises(UserError, match="full weights, so it has no LoRA"):
        export_run(runs["full"], tmp_path / "x", lora=True)
    with pytest.raises(UserError, match="drop --fuse"):
        export_run(runs["full"], tmp_path / "x", fuse=True)
    with pytest.raises(UserError, match="pass one of them"):
        export_run(runs["lora"], tmp_path / "x", lora=True, fuse=True)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not an earlier export"):
        export_run(runs["full"], tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine" and not (tmp_path / "x").exists()


def test_no_ema_takes_the_raw_student_weights(runs, tmp_path):
    """`--no-ema` (sample, eval, export): the checkpoint's raw student weights, not their EMA; the
    exported UNet holds them and the card does not call them EMA."""
    from stepdistill.loaders import load_for_sampling
    from stepdistill.train import checkpoint as ckpt
    from stepdistill.loaders import load_run

    raw, meta_raw = load_run(runs["full"], ema=False)
    ema, meta_ema = load_run(runs["full"])
    assert meta_ema["ema"] and not meta_raw["ema"]
    stored = load_file(ckpt.latest(runs["full"]) / "nets.safetensors")
    for k, v in raw.named_parameters():
        assert torch.equal(v, stored[f"student.{k}"]), k
    assert any(not torch.equal(a, b) for a, b in zip(raw.parameters(), ema.parameters()))
    model = load_for_sampling(runs["full"], ema=False)
    assert all(torch.equal(a, b) for a, b in zip(model.student.parameters(), raw.parameters()))
    out = export_run(runs["full"], tmp_path / "raw", ema=False)
    exported = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    for k, v in raw.denoiser.backbone.state_dict().items():
        torch.testing.assert_close(exported[k], v, rtol=0, atol=0)
    assert "(EMA)" not in (out / "README.md").read_text()


def test_students_sampled_at_their_own_times_export_and_run_them_in_plain_diffusers(tmp_path):
    """A student with its own sampling times (sCM's 2-step sampler: student.timesteps) on VP, EDM and flow
    (shift 3) teachers: the shipped pipeline, loaded by a process without stepdistill, passes the times to
    the scheduler at the trained step count and reproduces the student's samples; other step counts run the
    scheduler's own grid (the student's timesteps_for); the folder loads back with the same times; refused:
    times the exported scheduler cannot take."""
    from stepdistill.denoisers import DiffusersDenoiser
    from stepdistill.loaders import OWN_TIMES_VERSION, load_for_sampling

    kinds = {"vp": (_vp(), [999.0, 349.0]), "edm": (EDMSchedule(), [80.0, 0.98]),
             "flow": (FlowSchedule({"shift": 3.0}), [1000.0, 495.5])}
    students, jobs = {}, {}
    for name, (sched, times) in kinds.items():
        teacher = DiffusersDenoiser(tiny_unet2d(num_class_embeds=3), sched, null_class=2)
        student = build_student(teacher, StudentConfig(steps=2, timesteps=times)).eval()
        times = torch.tensor(times).tolist()  # held as the pipeline holds them, in float32
        assert student.timesteps.tolist() == times and student.custom_times
        # other step counts: the exported scheduler's grid (flow's without shift_terminal, which would move the
        # last of the student's own times)
        assert student.timesteps_for(3).tolist() == student_timesteps(sched, 3, custom_times=True).tolist()
        out = export_student(student, {"num_classes": 2, "null_class": 2}, tmp_path / name)
        record = json.loads((out / "stepdistill_student.json").read_text())
        assert record["format_version"] == OWN_TIMES_VERSION and record["custom_timesteps"] is True
        assert json.loads((out / "model_index.json").read_text())["trained_timesteps"] == times
        students[name] = student
        jobs[name] = {"dir": str(out), "load": {"trust_remote_code": True}, "seed": SEED,
                      "call": {"class_labels": LABELS, "output_type": "latent"}}
        jobs[name + "_3"] = {**jobs[name], "call": {**jobs[name]["call"], "num_inference_steps": 3}}
    got, stdout = _run_without_stepdistill(jobs, tmp_path)
    for name, student in students.items():
        assert f"{name} StepDistillPipeline" in stdout
        torch.testing.assert_close(got[name], _student_sample(student, LABELS), rtol=0, atol=1e-4)
        g = torch.Generator().manual_seed(SEED)  # three steps: the scheduler's grid, as the student samples it
        noise = torch.randn((len(LABELS), *student_shape(student)), generator=g)
        with torch.no_grad():
            want = student(noise, {"class_labels": torch.tensor(LABELS)}, steps=3, generator=g)
        torch.testing.assert_close(got[name + "_3"], want, rtol=0, atol=1e-4)
        back = load_for_sampling(tmp_path / name).student
        assert back.custom_times and back.timesteps.tolist() == student.timesteps.tolist()
    meta = tmp_path / "vp" / "stepdistill_student.json"  # a record whose times LCMScheduler cannot take
    record = json.loads(meta.read_text())
    meta.write_text(json.dumps({**record, "timesteps": [999.0, 349.5]}))
    with pytest.raises(UserError, match="integer training timesteps"):
        load_for_sampling(tmp_path / "vp")
    vp = tiny_teacher()
    for bad, match in [({"timesteps": [999.0, 349.5]}, "integer"), ({"timesteps": [349.0, 999.0]}, "decreasing"),
                       ({"timesteps": [999.0]}, "2 strictly"), ({"timesteps": [999.0, 349.0], "sampler": "ddim"},
                                                                "re-noising"),
                       ({"timesteps": [999.0, 349.0], "first_timestep": 700}, "first_timestep")]:
        with pytest.raises(UserError, match=match):
            build_student(vp, StudentConfig(steps=2, **bad))
