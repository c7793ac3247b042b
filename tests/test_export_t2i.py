"""``stepdistill export`` of text-to-image students: tiny SD-, SDXL-, SD3- and FLUX-like runs exported as
the teacher's own diffusers pipeline class, loaded and run by a Python process that never imports
stepdistill, against the student's own samples for the same noise and the same random draws."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stepdistill.errors import UserError
from stepdistill.export import export_run
from tiny_pipelines import build_tiny_pipeline

PROMPTS = ["a red cat", "a blue dog"]
SEED = 3           # the pipelines' (and the student's) re-noising draws
NOISE_SEED = 1     # the initial latents, passed to the pipeline as `latents`
RES = 16
#: kind -> (objective, student overrides); every student samples 2 steps. The SDXL student has LCM's
#: boundary condition and w-embedding, which the pipeline feeds from guidance_scale
RUNS = {
    "sd": ({"name": "sid", "guidance": 2.0}, {"student.lora_rank": 2, "optim.student.lr": 0.05}),
    "sdxl": ({"name": "consistency", "teacher_steps": 8, "w_embedding": True, "w_min": 2.0, "w_max": 4.0},
             {"student.boundary": "lcm", "student.time_cond_proj_dim": 16, "optim.student.lr": 0.01}),
    "sd3": ({"name": "sid", "guidance": 2.0}, {}),
    "flux": ({"name": "sid", "guidance": 2.0}, {}),
}
#: the guidance_scale the model cards recommend: no CFG (SD, SD3), the w-embedding's midpoint (SDXL
#: here), FLUX-dev's embedded guidance as the text cache gave the student (text.embedded_guidance)
GUIDANCE = {"sd": 1.0, "sdxl": 3.0, "sd3": 1.0, "flux": 3.5}


def _train(kind, teacher, pairs, root):
    from accelerate.state import AcceleratorState

    from stepdistill.train.setup import resolve
    from stepdistill.train.trainer import Trainer

    objective, student = RUNS[kind]
    o = {"teacher": teacher, "data": pairs, "output_dir": root / f"run_{kind}", "cpu": True, "batch_size": 2,
         "max_steps": 1, "checkpoint_every": 1, "preview_every": "null", "progress": False, "log_every": 1,
         "ema.decay": 0.5, "text.max_sequence_length": 8, "text.cache": root / f"text_{kind}", "resolution": RES,
         "student.steps": 2, **student}
    cfg, obj = resolve(None, [f"{k}={v}" for k, v in o.items()] + [f"objective.{k}={v}" for k, v in objective.items()])
    Trainer(cfg, obj).train()
    AcceleratorState._reset_state(True)
    return root / f"run_{kind}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Per kind: teacher folder, run folder and exports (full, or --lora and --fuse for the SD LoRA run)."""
    root = tmp_path_factory.mktemp("t2i_export")
    pairs = root / "pairs"
    pairs.mkdir()
    rng = np.random.default_rng(0)
    for i, p in enumerate(PROMPTS):
        Image.fromarray(rng.integers(0, 255, (RES, RES, 3), dtype=np.uint8)).save(pairs / f"im{i}.png")
        (pairs / f"im{i}.txt").write_text(p)
    out = {}
    for kind in RUNS:
        teacher = build_tiny_pipeline(kind, root / f"teacher_{kind}")
        run = _train(kind, teacher, pairs, root)
        if kind == "sd":
            dirs = {"lora": export_run(run, root / "sd_lora", lora=True),
                    "fused": export_run(run, root / "sd_fused", fuse=True)}
        else:
            dirs = {"full": export_run(run, root / f"{kind}_full")}
        out[kind] = {"teacher": teacher, "run": run, **dirs}
    return out


CHILD = textwrap.dedent("""
    import json, sys
    import diffusers, torch
    from safetensors.torch import load_file, save_file

    jobs, noise, out = json.loads(sys.argv[1]), load_file(sys.argv[2]), {}
    for name, job in jobs.items():
        pipe = diffusers.DiffusionPipeline.from_pretrained(job["dir"])
        if job.get("lora"):
            pipe.load_lora_weights(job["lora"])
        if job.get("scheduler"):  # the teacher's own folder with the exported student scheduler
            cls = json.load(open(job["scheduler"] + "/scheduler/scheduler_config.json"))["_class_name"]
            pipe.scheduler = getattr(diffusers, cls).from_pretrained(job["scheduler"], subfolder="scheduler")
        pipe.set_progress_bar_config(disable=True)
        latents = noise[job["kind"]]
        flux = type(pipe).__name__ == "FluxPipeline"
        if flux:  # FluxPipeline takes packed latents
            latents = pipe._pack_latents(latents, *latents.shape)
        torch.manual_seed(job["seed"])  # SD3 and FLUX re-noise from the global generator
        # SD and SDXL pass `generator` to LCMScheduler.step (the latents are given: no other draw)
        x = pipe(job["prompts"], latents=latents, generator=torch.Generator().manual_seed(job["seed"]),
                 output_type="latent", **job["call"]).images
        out[name] = pipe._unpack_latents(x, job["res"], job["res"], pipe.vae_scale_factor) if flux else x
        print(name, type(pipe).__name__, type(pipe.scheduler).__name__)
    assert "stepdistill" not in sys.modules, "the pipeline imported stepdistill"
    save_file(out, sys.argv[3])
""")


def _call(kind, steps=2):
    kw = {"num_inference_steps": steps, "guidance_scale": GUIDANCE[kind], "height": RES, "width": RES}
    return {**kw, "max_sequence_length": 8} if kind in ("sd3", "flux") else kw


@pytest.fixture(scope="module")
def noise():
    g = torch.Generator().manual_seed(NOISE_SEED)
    return {kind: torch.randn(len(PROMPTS), 16 if kind in ("sd3", "flux") else 4, 8, 8, generator=g) for kind in RUNS}


@pytest.fixture(scope="module")
def child(exported, noise, tmp_path_factory):
    """Every pipeline run once, by a process without stepdistill; returns (outputs, stdout)."""
    tmp = tmp_path_factory.mktemp("child")
    sd = exported["sd"]
    base = {"prompts": PROMPTS, "seed": SEED, "res": RES}
    jobs = {"sd/lora": {"dir": sd["lora"], "lora": sd["lora"], "kind": "sd", "call": _call("sd")},
            "sd/fused": {"dir": sd["fused"], "kind": "sd", "call": _call("sd")},
            "sd/teacher+lora": {"dir": sd["teacher"], "lora": sd["lora"], "scheduler": sd["lora"], "kind": "sd",
                                "call": _call("sd")},
            "sd/no-adapters": {"dir": sd["lora"], "kind": "sd", "call": _call("sd")},
            "sdxl": {"dir": exported["sdxl"]["full"], "kind": "sdxl", "call": _call("sdxl")},
            "sd3": {"dir": exported["sd3"]["full"], "kind": "sd3", "call": _call("sd3")},
            "flux/1": {"dir": exported["flux"]["full"], "kind": "flux", "call": _call("flux", 1)},
            "flux/2": {"dir": exported["flux"]["full"], "kind": "flux", "call": _call("flux")}}
    jobs = {k: {**base, **{a: str(b) if a in ("dir", "lora", "scheduler") else b for a, b in v.items()}}
            for k, v in jobs.items()}
    save_file(noise, tmp / "noise.safetensors")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-I", "-c", CHILD, json.dumps(jobs), str(tmp / "noise.safetensors"),
                          str(tmp / "out.safetensors")], env=env, capture_output=True, text=True, timeout=300, cwd=tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    return load_file(tmp / "out.safetensors"), res.stdout


def _student(run, w: float | None = None):
    """(student, its prompts' condition) as stepdistill samples it; ``w``: the CFG scale for a
    w-embedding student (its timestep_cond)."""
    from stepdistill.objectives.consistency import guidance_embedding
    from stepdistill.loaders import StudentModel, load_run

    student, meta = load_run(run)
    cond = StudentModel(student, meta).text_cond(PROMPTS)
    if w is not None:
        dim = student.denoiser.backbone.config.time_cond_proj_dim
        cond["timestep_cond"] = guidance_embedding(torch.full((len(PROMPTS),), w), dim)
    return student, cond


def _close(got, want, name):
    """max |got - want| <= 1e-4 relative to the latents' magnitude (>= 1): float32 through two steps."""
    diff, scale = float((got - want).abs().max()), float(want.abs().max())
    print(f"{name}: max abs diff {diff:.3g} (latents up to {scale:.3g})")
    assert diff <= 1e-4 * max(scale, 1.0), (name, diff, scale)


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3", "flux"])
def test_pipeline_reproduces_the_student(kind, exported, noise, child):
    """The teacher's pipeline class at the recommended guidance_scale, loaded from the export, gives
    the student's own sample for the same latents and generator draws (FLUX's scheduler draws its
    re-noising in the packed layout; the student draws the same numbers in that layout)."""
    got, stdout = child
    student, cond = _student(exported[kind]["run"], GUIDANCE[kind] if kind == "sdxl" else None)
    with torch.no_grad():
        want = student(noise[kind], cond, generator=torch.Generator().manual_seed(SEED))
    job = {"sd": "sd/fused", "flux": "flux/2"}.get(kind, kind)
    _close(got[job], want, job)
    cls = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
           "flux": "FluxPipeline"}[kind]
    sched = "LCMScheduler" if kind in ("sd", "sdxl") else "FlowMatchEulerDiscreteScheduler"
    assert f"{job} {cls} {sched}" in stdout
    if kind == "sdxl":  # the w input matters: at w = 1 the student gives another sample
        _, cond1 = _student(exported[kind]["run"], 1.0)
        with torch.no_grad():
            other = student(noise[kind], cond1, generator=torch.Generator().manual_seed(SEED))
        assert float((other - want).abs().max()) > 1e-3 * float(want.abs().max())


def test_flux_one_step_matches(exported, noise, child):
    got, _ = child
    student, cond = _student(exported["flux"]["run"])
    with torch.no_grad():
        want = student(noise["flux"], cond, steps=1, generator=torch.Generator().manual_seed(SEED))
    _close(got["flux/1"], want, "flux/1")


def test_lora_adapters_load_in_diffusers(exported, noise, child):
    """--lora: pipe.load_lora_weights(export) on the export, or on the teacher's own folder with the
    exported scheduler, equals --fuse and the student; without the adapters it is the teacher."""
    got, _ = child
    student, cond = _student(exported["sd"]["run"])
    with torch.no_grad():
        want = student(noise["sd"], cond, generator=torch.Generator().manual_seed(SEED))
    for job in ("sd/lora", "sd/teacher+lora"):
        _close(got[job], want, job)
    _close(got["sd/lora"], got["sd/fused"], "sd/lora vs sd/fused")
    assert float((got["sd/no-adapters"] - want).abs().max()) > 1e-2 * float(want.abs().max())


def test_export_folder_is_the_teachers_pipeline(exported):
    """Components other than the backbone are the teacher's files, byte for byte; the index names the
    teacher's pipeline class and the student's scheduler; weights are float32 safetensors; the
    LoRA file is diffusers' (keys prefixed by the component, LoraConfig in the header)."""
    for kind, folder in (("sdxl", "unet"), ("sd3", "transformer"), ("flux", "transformer")):
        teacher, out = exported[kind]["teacher"], exported[kind]["full"]
        index, tindex = (json.loads((p / "model_index.json").read_text()) for p in (out, teacher))
        sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
        assert index.pop("scheduler") == ["diffusers", sched["_class_name"]]
        tindex.pop("scheduler")
        assert index == tindex  # the teacher's class and components, e.g. StableDiffusionXLPipeline
        for comp in ("vae", "text_encoder", "tokenizer"):
            for f in (teacher / comp).iterdir():
                assert (out / comp / f.name).read_bytes() == f.read_bytes(), (kind, comp, f.name)
        weights = load_file(out / folder / "diffusion_pytorch_model.safetensors")
        assert {v.dtype for v in weights.values()} == {torch.float32}
    assert json.loads((exported["sdxl"]["full"] / "scheduler" / "scheduler_config.json").read_text())[
        "timestep_scaling"] == 10.0  # LCM's boundary condition, as the student was trained with
    flux = json.loads((exported["flux"]["full"] / "scheduler" / "scheduler_config.json").read_text())
    assert flux["stochastic_sampling"] is True and flux["use_dynamic_shifting"] is False
    lora = exported["sd"]["lora"]
    w = "unet/diffusion_pytorch_model.safetensors"
    assert (lora / w).read_bytes() == (exported["sd"]["teacher"] / w).read_bytes()
    with safe_open(str(lora / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert all(k.startswith("unet.") and ".lora_" in k for k in f.keys())
        assert json.loads(f.metadata()["lora_adapter_metadata"])["unet.r"] == 2
    assert not (exported["sd"]["fused"] / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.parametrize("kind,mode", [("sd", "lora"), ("flux", "full")])
def test_stepdistill_loads_t2i_exports(kind, mode, exported, noise):
    """``load_for_sampling`` (``stepdistill sample|eval``) rebuilds the student from the export:
    same condition from the copied text encoders, same timesteps, same sample."""
    from stepdistill.loaders import load_for_sampling

    model = load_for_sampling(exported[kind][mode])
    student, cond = _student(exported[kind]["run"])
    got_cond = model.text_cond(PROMPTS)
    assert got_cond.keys() == cond.keys() and all(torch.equal(got_cond[k], cond[k]) for k in cond)
    assert model.is_text_to_image and model.shape == tuple(noise[kind].shape[1:]) and model.default_steps == 2
    assert torch.equal(model.student.timesteps, student.timesteps)
    with torch.no_grad():
        got = model.generate(noise[kind], cond, generator=torch.Generator().manual_seed(SEED))
        want = student(noise[kind], cond, generator=torch.Generator().manual_seed(SEED))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * max(1.0, float(want.abs().max())))


def test_model_card_says_how_to_run_it(exported):
    cards = {k: (exported[k][m] / "README.md").read_text() for k, m in (("sd", "lora"), ("sd3", "full"),
                                                                       ("flux", "full"), ("sdxl", "full"))}
    sd3 = cards["sd3"]
    for text in ("`StableDiffusion3Pipeline`", "| resolution | 16 px |", "| guidance_scale | 1.0 |", "`sid`",
                 "2 (timesteps [1000, 750", "The scheduler is already set", "torch.manual_seed",
                 'pipe = DiffusionPipeline.from_pretrained("path/to/export")',
                 'image = pipe("a photo of a cat", num_inference_steps=2, guidance_scale=1.0, height=16, width=16, '
                 'max_sequence_length=8).images[0]', f'`{exported["sd3"]["teacher"].name}`',
                 "pipeline_tag: text-to-image"):
        assert text in sd3, text
    assert "trust_remote_code" not in sd3
    for kind, card in cards.items():  # shared as it is: no absolute local path (the teacher by its name)
        assert str(exported[kind]["teacher"]) not in card and str(exported[kind]["teacher"].parent) not in card, kind
    assert "guidance_scale=3.5" in cards["flux"] and "shift is fixed" in cards["flux"]
    assert 'pipe.load_lora_weights("path/to/export")' in cards["sd"] and "LCMScheduler.from_pretrained" in cards["sd"]
    assert "| boundary condition | lcm |" in cards["sdxl"] and "max_sequence_length=" not in cards["sdxl"]
    assert "guidance_scale=3.0" in cards["sdxl"] and "w-embedding" in cards["sdxl"]


def test_bad_input_stops_with_a_clear_message(exported, tmp_path):
    from stepdistill.export import export_student
    from stepdistill.export.t2i import check_lora_base
    from stepdistill.loaders import load_run

    with pytest.raises(UserError, match="full weights, so it has no LoRA"):
        export_run(exported["sd3"]["run"], tmp_path / "x", lora=True)
    student, meta = load_run(exported["sd3"]["run"])
    student.timesteps = student.timesteps + 1  # a grid the exported scheduler does not run
    with pytest.raises(UserError, match="retrain with this version"):
        export_student(student, meta, tmp_path / "x")
    student, meta = load_run(exported["sdxl"]["run"])
    with pytest.raises(UserError, match="should have a SD3Transformer2DModel"):
        export_student(student, {**meta, "t2i": exported_info(exported["sd3"]["teacher"])}, tmp_path / "x")
    with pytest.raises(UserError, match="w input .* export with --fuse"):  # the teacher's unet has no w input
        check_lora_base(student, meta["t2i"])
    assert not (tmp_path / "x").exists()


def exported_info(folder):
    from stepdistill.t2i.pipeline import inspect_pipeline

    return inspect_pipeline(folder, RES)
