"""Text-to-image teachers end to end on tiny random pipelines (SD1.5-, SDXL-, SD3- and FLUX-like,
built in code): every objective trains one step, the run resumes from its checkpoint, and the
student samples from prompts through `stepdistill sample`."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from stepdistill.loaders import load_run
from stepdistill.train.setup import resolve
from stepdistill.train.trainer import Trainer
from tiny_pipelines import build_tiny_pipeline

KINDS = ("sd", "sdxl", "sd3", "flux")
PROMPTS = ["a red cat", "a blue dog", "a green tree", "a small house"]

OBJECTIVES = {
    "progressive": {"name": "progressive", "start_steps": 4, "final_steps": 2, "iterations_per_round": 2},
    "consistency": {"name": "consistency", "teacher_steps": 8},
    "dmd": {"name": "dmd", "guidance": 2.0, "cache_num": 4, "cache_steps": 2},
    "dmd2": {"name": "dmd2", "guidance": 2.0, "critic_repeats": 2, "gan_weight": 1e-3, "fake_lora_rank": 4},
    "sid": {"name": "sid", "guidance": 2.0},
    "adversarial": {"name": "adversarial"},
}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {k: build_tiny_pipeline(k, root / k) for k in KINDS}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Image-text pairs: a folder of 16x16 images with same-name captions."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    for i, p in enumerate(PROMPTS):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / f"im{i}.png")
        (root / f"im{i}.txt").write_text(p)
    return root


def _overrides(tmp_path, teacher, data, objective, **kw):
    o = {"teacher": str(teacher), "data": str(data), "output_dir": str(tmp_path / "run"), "cpu": True,
         "batch_size": 2, "max_steps": 1, "checkpoint_every": 1, "preview_every": 1, "preview_n": 2,
         "progress": False, "log_every": 1, "ema.decay": 0.9, "text.max_sequence_length": 8,
         "text.cache": str(tmp_path / "text_cache"), "resolution": 16}
    o.update(kw)
    out = [f"{k}={v}" for k, v in o.items()]
    out += [f"objective.{k}={v}" for k, v in objective.items()]
    return out


#: in the default run each objective on two pipelines and each pipeline with three objectives; the rest of
#: the grid under -m slow
DEFAULT_RUN = {("progressive", "sd"), ("progressive", "sd3"), ("consistency", "sdxl"), ("consistency", "flux"),
               ("dmd", "sd"), ("dmd", "flux"), ("dmd2", "sdxl"), ("dmd2", "sd3"), ("sid", "sd"), ("sid", "flux"),
               ("adversarial", "sdxl"), ("adversarial", "sd3")}


@pytest.mark.parametrize("name,kind", [(n, k) if (n, k) in DEFAULT_RUN else pytest.param(n, k, marks=pytest.mark.slow)
                                       for n in OBJECTIVES for k in KINDS])
def test_every_objective_trains_resumes_and_samples(name, kind, pipelines, pairs, tmp_path):
    obj = dict(OBJECTIVES[name])
    if name == "dmd":
        obj["cache"] = str(tmp_path / "pairs_cache")
    ov = _overrides(tmp_path, pipelines[kind], pairs, obj)
    cfg, objective = resolve(None, ov)
    Trainer(cfg, objective).train()
    run = tmp_path / "run"
    assert json.loads((run / "checkpoints" / "step-00000001" / "trainer.json").read_text())["step"] == 1
    assert (run / "previews" / "step-00000001.png").is_file()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert lines and all("nan" not in ln.lower() for ln in lines)

    # resume: the same command with max_steps 2 continues from step 1 (the text cache is reused)
    mtime = (tmp_path / "text_cache" / "manifest.json").stat().st_mtime
    cfg2, objective2 = resolve(None, _overrides(tmp_path, pipelines[kind], pairs, obj, max_steps=2))
    t2 = Trainer(cfg2, objective2)
    assert t2.step == 1
    t2.train()
    assert (run / "checkpoints" / "step-00000002").is_dir()
    assert (tmp_path / "text_cache" / "manifest.json").stat().st_mtime == mtime

    student, meta = load_run(run)
    cond = t2.data.rows(torch.arange(2))[1]
    noise = torch.randn(2, *t2.data.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = student(noise, cond, generator=torch.Generator().manual_seed(1))
    assert x.shape == noise.shape and torch.isfinite(x).all()
    assert meta["kind"] == "text-to-image" and meta["steps"] == student.steps


@pytest.mark.parametrize("kind", KINDS)
def test_text_cache_matches_the_pipelines_own_encoding(kind, pipelines, tmp_path):
    """The cached condition of a prompt equals what the diffusers pipeline's encode_prompt gives."""
    from diffusers import DiffusionPipeline

    from stepdistill.t2i.caches import ensure_text_cache
    from stepdistill.t2i.pipeline import inspect_pipeline
    from stepdistill.t2i.prompts import PromptSet

    info = inspect_pipeline(pipelines[kind], 16)
    cache = ensure_text_cache(info, PromptSet(PROMPTS, None, "x"), tmp_path / "c", dtype="fp32",
                              max_sequence_length=8, log=lambda *a: None)
    got = cache.rows(torch.tensor([1, 3]))
    pipe = DiffusionPipeline.from_pretrained(pipelines[kind])
    text = [PROMPTS[1], PROMPTS[3]]
    if kind == "sd":
        want = {"encoder_hidden_states": pipe.encode_prompt(text, "cpu", 1, False)[0]}
    elif kind == "sdxl":
        pe, _, pooled, _ = pipe.encode_prompt(text, device="cpu", do_classifier_free_guidance=False)
        want = {"encoder_hidden_states": pe, "text_embeds": pooled}
    elif kind == "sd3":
        pe, _, pooled, _ = pipe.encode_prompt(text, None, None, device="cpu", do_classifier_free_guidance=False,
                                              max_sequence_length=8)
        want = {"encoder_hidden_states": pe, "pooled_projections": pooled}
    else:
        pe, pooled, _ = pipe.encode_prompt(text, None, device="cpu", max_sequence_length=8)
        want = {"encoder_hidden_states": pe, "pooled_projections": pooled}
    for k, v in want.items():
        torch.testing.assert_close(got[k], v.float(), rtol=0, atol=1e-5)  # float32 batch-order noise
    # the null condition is the pipeline's negative branch for "" (SDXL: zeros, force_zeros_for_empty_prompt)
    if kind == "sdxl":
        assert cache.null["encoder_hidden_states"].abs().max() == 0
    assert set(cache.null) >= set(want)


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_denoiser_matches_the_pipeline(kind, pipelines, tmp_path):
    """Sampling the teacher through our denoiser + sampler reproduces the diffusers pipeline's own
    latents for the same noise (DDIM for SD, Euler for SDXL and the flow teachers)."""
    import shutil

    from diffusers import DiffusionPipeline

    from stepdistill.loaders import load_for_sampling

    folder = tmp_path / kind
    shutil.copytree(pipelines[kind], folder)
    pipe = DiffusionPipeline.from_pretrained(folder)
    if kind == "sd":  # SD's DDIM ends at alpha_bar[0] (a trace of noise); ours ends clean: compare clean ends
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, set_alpha_to_one=True)
        pipe.scheduler.save_pretrained(folder / "scheduler")
    model = load_for_sampling(folder, resolution=16)
    cond = model.text_cond(["a red cat"], max_sequence_length=8)
    noise = torch.randn(1, *model.shape, generator=torch.Generator().manual_seed(0))
    steps = 4  # divides 1000: diffusers' DDIM steps to t - 1000 // n, which leaves its own grid otherwise
    kw = dict(num_inference_steps=steps, height=16, width=16, output_type="latent", guidance_scale=1.0)
    if kind in ("sd3", "flux"):
        kw["max_sequence_length"] = 8
    if kind == "flux":
        kw["guidance_scale"] = 3.5  # FLUX-dev's embedded guidance (the cached condition carries 3.5)
        packed = pipe._pack_latents(noise, 1, noise.shape[1], 8, 8)
        theirs = pipe._unpack_latents(pipe("a red cat", latents=packed, **kw).images, 16, 16, pipe.vae_scale_factor)
        ours = model.generate(noise, cond, steps, sampler="euler")
    elif kind == "sdxl":
        theirs = pipe("a red cat", latents=noise, **kw).images
        # SDXL's Euler with trailing spacing starts at sigma_max * noise (init_noise_sigma), i.e.
        # sqrt(1 - alpha_bar_T) * noise on the VP path; our prior is the unit-variance noise itself
        start = pipe.scheduler.init_noise_sigma / (pipe.scheduler.sigmas.max() ** 2 + 1) ** 0.5
        ours = model.generate(noise * start, cond, steps, sampler="euler")
    else:
        theirs = pipe("a red cat", latents=noise, **kw).images
        ours = model.generate(noise, cond, steps, sampler="ddim" if kind == "sd" else "euler")
    scale = float(theirs.abs().max())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5 * max(scale, 1.0))


def test_lcm_student_with_w_embedding_starts_as_the_teacher(pipelines, pairs, tmp_path):
    """student.time_cond_proj_dim adds LCM's w input (zero-initialised) to an SD student: at
    initialisation it predicts exactly what the teacher does, for any w; consistency trains it."""
    from stepdistill.objectives.consistency import guidance_embedding

    obj = {"name": "consistency", "teacher_steps": 8, "w_embedding": True, "w_min": 2.0, "w_max": 6.0}
    ov = _overrides(tmp_path, pipelines["sd"], pairs, obj)  # consistency noises real latents (LCM)
    cfg, objective = resolve(None, ov + ["student.time_cond_proj_dim=16"])
    tr = Trainer(cfg, objective)
    x0, cond = tr.data.rows(torch.arange(2))
    x = torch.randn(2, *tr.data.sample_shape)
    t = torch.tensor([500.0, 800.0])
    with torch.no_grad():
        want = tr.teacher(x, t, cond)
        got = tr.student.denoise(x, t, {**cond, "timestep_cond": guidance_embedding(torch.tensor([3.0, 5.0]), 16)})
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    tr.train()
    student, _ = load_run(tmp_path / "run")
    assert student.denoiser.backbone.config.time_cond_proj_dim == 16


def test_lora_targets_with_dotted_names_get_adapters(pipelines):
    """Targets such as ff.net.0.proj (three dots) match by suffix, as peft matches them."""
    from stepdistill.generator import StudentConfig, build_student
    from stepdistill.teachers import load_teacher

    teacher = load_teacher(pipelines["sd"], resolution=16)
    student = build_student(teacher, StudentConfig(steps=1, lora_rank=2, lora_target_modules=["to_q", "ff.net.0.proj"]))
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    assert any("ff.net.0.proj.lora_A" in n for n in names) and any("to_q.lora_A" in n for n in names)


@pytest.mark.parametrize("name,obj", [
    ("dmd2", {"name": "dmd2", "guidance": 2.0, "critic_repeats": 1, "gan_weight": 1e-3}),
    ("sid", {"name": "sid", "guidance": 2.0, "fake_lora_rank": 4}),
])
def test_gradient_checkpointing_gives_the_same_step(name, obj, pipelines, pairs, tmp_path):
    """Checkpointing replays forwards during backward; the generator phase backpropagates through
    the frozen fake score (and, for SiD with a LoRA fake score, the teacher with adapters off). One
    step with checkpointing equals one step without it."""
    from safetensors.torch import load_file

    out = {}
    for ckpt in ("false", "true"):
        d = tmp_path / ckpt
        ov = _overrides(d, pipelines["sd"], pairs, obj, preview_every="null", **{"ema.decay": "null"})
        cfg, objective = resolve(None, ov + [f"gradient_checkpointing={ckpt}"])
        Trainer(cfg, objective).train()
        out[ckpt] = load_file(d / "run" / "checkpoints" / "step-00000001" / "nets.safetensors")
    assert out["true"].keys() == out["false"].keys()
    moved = 0
    for k, v in out["false"].items():
        torch.testing.assert_close(out["true"][k], v, rtol=1e-4, atol=1e-6)
        moved += k.startswith("student.")
    assert moved


@pytest.mark.parametrize("kind,blocks", [("sd3", "transformer_blocks.0,transformer_blocks.1"),
                                         ("flux", "transformer_blocks.0,single_transformer_blocks.0")])
def test_sana_sprint_ladd_on_several_transformer_blocks(kind, blocks, pipelines, pairs, tmp_path):
    """SANA-Sprint's LADD on an MMDiT teacher: heads on several blocks' image tokens, a logit per token,
    the discriminator's log-normal times and the proposal/pure-noise student input, as sd3/sana_sprint
    sets them; one step trains both the heads and the student."""
    obj = {"name": "adversarial", "distill": "none", "feature_module": blocks, "per_location": True,
           "student_input": "proposal", "disc_proposal": "[-0.6,1.0]"}
    cfg, objective = resolve(None, _overrides(tmp_path, pipelines[kind], pairs, obj))
    Trainer(cfg, objective).train()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = {k: v for x in lines for k, v in x.get("losses", {}).items()}
    assert any(k.endswith("gan_d") for k in losses) and all(math.isfinite(v) for v in losses.values())
