"""Measured seconds per training iteration and peak GPU memory of distillation objectives at Stable
Diffusion 1.5 and SDXL sizes (random weights), with PyTorch SDPA and with xformers attention.

    python tools/gpu_bench.py [--objectives dmd2,sid,consistency] [--batch 4] [--iters 5]
                              [--out assets/benchmarks/gpu.md] [--tiny --device cpu]
                              [--models sd15,sdxl] [--steps 1] [--lora-rank 0] [--guidance 1.75]
                              [--gradient-checkpointing]

What runs. Each UNet2DConditionModel is built from its published config (tools/memory_table.py) with
random weights: the frozen teacher in bf16 behind a ``DiffusersDenoiser`` on the SD scheduler's VP
schedule. Student and extra networks come from ``stepdistill.train.setup.build_nets``, the trainer's
own code. One outer iteration is what the trainer calls a step: every phase of the objective, each
``repeats`` times (DMD2: 5 fake-score updates, then one generator update), each update summing the
per-sample means of the losses not starting with "_", backpropagating, clipping and stepping AdamW
(the trainer's defaults) on the networks the phase trains, forwards under bf16 autocast as
``mixed_precision: bf16`` runs them. No checkpoints, logging, EMA of the student or LR schedule.
Batches: random latents and random text embeddings; text encoders and the VAE are not part of what
is measured. One iteration warms up; the next ``--iters`` are timed between ``torch.cuda.synchronize``
calls; the peak is ``torch.cuda.max_memory_allocated`` over them (reset before), so it excludes the
CUDA context and the allocator's cache (the reserved column includes the latter).

Rows: SD1.5 (512 px, 4x64x64 latents, 77 tokens of 768) for every objective at ``--batch``, and SDXL
(1024 px, 4x128x128, 77 tokens of 2048, added conditions) with DMD2 as the sdxl/dmd2_4step_lora preset
but with a LoRA fake score, both LoRAs rank 64, batch 1, gradient checkpointing on every UNet; its
peak is printed next to the prediction of tools/memory_table.py.

``--tiny --device cpu`` runs the same code with a UNet of about 15k parameters (16x16 latents, 8 text
tokens of width 32) in float32 without autocast, so CI can smoke-test the script.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import math
import re
import shlex
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from memory_table import SD15, SDXL  # noqa: E402  (the published UNet configs)
from stepdistill.resources import PRESETS  # noqa: E402

GIB = 2**30
ATTENTION = ("sdpa", "xformers")
# stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json (the values
# ``schedules.schedule_from_config`` keeps); the VP path is the same for both, their grids differ
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type="epsilon", set_alpha_to_one=False, steps_offset=1, clip_sample=False)
SDXL_SCHEDULER = dict(SD_SCHEDULER, timestep_spacing="leading")
SDXL_RECIPE = PRESETS / "sdxl" / "dmd2_4step_lora.yaml"

_TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(4, 8),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=2,
                  norm_num_groups=4)
_TINY_XL = dict(_TINY_UNET, addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=8 + 6 * 8)


@dataclass(frozen=True)
class Model:
    label: str
    unet: dict            # UNet2DConditionModel config
    scheduler: dict
    latent: int           # latent side
    tokens: int           # text tokens
    width: int            # text token width (cross_attention_dim)
    pooled: int = 0       # SDXL's text_embeds width; 0 = no added conditions


MODELS = {"sd15": Model("SD1.5 UNet, 512 px", SD15, SD_SCHEDULER, 64, 77, 768),
          "sdxl": Model("SDXL UNet, 1024 px", SDXL, SDXL_SCHEDULER, 128, 77, 2048, 1280)}
TINY = {"sd15": Model("tiny UNet, 16x16", _TINY_UNET, SD_SCHEDULER, 16, 8, 32),
        "sdxl": Model("tiny SDXL-type UNet, 16x16", _TINY_XL, SDXL_SCHEDULER, 16, 8, 32, 8)}


@dataclass
class Run:
    model: Model
    objective: str
    overrides: dict       # objective Config fields
    student: dict         # StudentConfig fields
    batch: int
    checkpointing: bool
    attention: str


# -- building ---------------------------------------------------------------------------------------
def conditions(m: Model, b: int, device) -> dict:
    """Random text conditions of batch b (what a text cache would hold), on the device, float32."""
    g = torch.Generator().manual_seed(1)
    cond = {"encoder_hidden_states": torch.randn(b, m.tokens, m.width, generator=g)}
    if m.pooled:  # SDXL: pooled text embedding and (original size, crop, target size)
        side = 8 * m.latent
        cond["text_embeds"] = torch.randn(b, m.pooled, generator=g)
        cond["time_ids"] = torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32).expand(b, 6)
    return {k: v.to(device) for k, v in cond.items()}


def build_teacher(m: Model, dtype: torch.dtype, device):
    from diffusers import UNet2DConditionModel

    from stepdistill.denoisers import DiffusersDenoiser
    from stepdistill.schedules import VPSchedule

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(m.unet)
    unet.to(dtype)
    # the empty prompt's condition; zeros as SDXL's force_zeros_for_empty_prompt gives (SD1.5's is not
    # zero, but its value changes neither time nor memory)
    null = {k: v if k == "time_ids" else torch.zeros_like(v) for k, v in conditions(m, 1, device).items()}
    teacher = DiffusersDenoiser(unet, VPSchedule(m.scheduler), null_text=null)
    return teacher.requires_grad_(False).eval()


def unets(nets) -> list:
    from diffusers import UNet2DConditionModel

    return [m for m in nets.modules() if isinstance(m, UNet2DConditionModel)]


def set_attention(nets, attention: str) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    for unet in unets(nets):
        if attention == "xformers":
            unet.enable_xformers_memory_efficient_attention()
        else:
            unet.set_attn_processor(AttnProcessor2_0())


def xformers_missing(device) -> str | None:
    """Why xformers cannot run here, or None."""
    if torch.device(device).type != "cuda":
        return "needs CUDA"
    try:
        import xformers.ops  # noqa: F401
    except ImportError as err:
        return f"not importable ({err})"
    return None


def build(run: Run, device, dtype):
    from omegaconf import OmegaConf

    from stepdistill.generator import StudentConfig
    from stepdistill.train.setup import build_nets, make_objective, trained_nets

    objective = make_objective({"name": run.objective, **run.overrides})
    teacher = build_teacher(run.model, dtype, device)
    cfg = OmegaConf.create({"seed": 0, "student": OmegaConf.structured(StudentConfig(**run.student))})
    nets = build_nets(cfg, objective, teacher).nets.to(device)
    for name in trained_nets(objective):
        nets.get(name).train()
    set_attention(nets, run.attention)
    if run.checkpointing:
        for unet in unets(nets):
            unet.enable_gradient_checkpointing()
    return objective, nets


# -- one outer iteration, as Trainer.train runs it ------------------------------------------------------
class Loop:
    def __init__(self, objective, nets, run: Run, device):
        from stepdistill.train.config import OptimConfig

        o = OptimConfig()  # the trainer's defaults for a network without an optim entry
        self.objective, self.nets, self.device, self.clip = objective, nets, torch.device(device), o.max_grad_norm
        self.phases = objective.phases()
        names = {n for ph in self.phases for n in ph.trains}
        self.params = {n: [p for p in nets.get(n).parameters() if p.requires_grad] for n in names}
        self.opts = {n: torch.optim.AdamW(ps, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay,
                                          eps=o.eps) for n, ps in self.params.items()}
        b, side = run.batch, run.model.latent
        self.fixed = {"x0": torch.randn(b, 4, side, side, generator=torch.Generator().manual_seed(2)).to(device),
                      "cond": conditions(run.model, b, device), "rows": torch.arange(b)}
        self.b = b

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def batch(self, step: int, phase: str, repeat: int) -> dict:
        from stepdistill.train.randomness import BatchRandom, derive_seed

        # as BatchStream.batch for one process, micro-step 0
        rng = BatchRandom(derive_seed(0, step, phase, repeat, 0), self.b, slice(0, self.b), self.device)
        return {**self.fixed, "rng": rng}

    def step(self, step: int) -> None:
        from stepdistill.train.trainer import only_training

        for ph in self.phases:
            for r in range(ph.repeats):
                with only_training(self.params, ph.trains):  # as the trainer: frozen through the backward too
                    with self.autocast():
                        losses = self.objective.losses(ph.name, self.nets, self.batch(step, ph.name, r))
                    total = sum(v.float().mean() for k, v in losses.items() if not k.startswith("_"))
                    total.backward()
                for n in ph.trains:
                    torch.nn.utils.clip_grad_norm_(self.params[n], math.inf if self.clip is None else self.clip)
                    self.opts[n].step()
                self.nets.zero_grad(set_to_none=True)
        self.objective.on_step_end(self.nets, step + 1)


def measure(run: Run, iters: int, device, dtype) -> dict:
    objective, nets = build(run, device, dtype)
    loop = Loop(objective, nets, run, device)
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    loop.step(0)  # warm-up: kernels chosen, optimizer states allocated
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(iters):
        loop.step(1 + i)
    sync()
    out = {"s_it": (time.perf_counter() - t0) / iters, "fake": describe_fake(objective, nets)}
    if cuda:
        out.update(peak=torch.cuda.max_memory_allocated() / GIB, reserved=torch.cuda.max_memory_reserved() / GIB)
    return out


def describe_student(s: dict) -> str:
    steps = s.get("steps") or 1
    return f"{steps}-step, " + (f"LoRA r{s['lora_rank']}" if s.get("lora_rank") else "full")


def describe_fake(objective, nets) -> str:
    if nets.get("fake_score") is None:
        return "target EMA copy" if nets.get("target") is not None else "—"
    r = getattr(objective.cfg, "fake_lora_rank", 0)
    return f"LoRA r{r}" if r else "full"


# -- the runs --------------------------------------------------------------------------------------------
def runs(args, models: dict) -> list[Run]:
    from omegaconf import OmegaConf

    out = []
    student = {"steps": args.steps, "lora_rank": args.lora_rank}
    for name in args.objectives:
        for att in ATTENTION:
            out.append(Run(models["sd15"], name, {"guidance": args.guidance}, student, args.batch,
                           args.gradient_checkpointing, att))
    recipe = OmegaConf.to_container(OmegaConf.load(SDXL_RECIPE))
    xl_student = {**recipe["student"], "lora_rank": 64}
    obj = {k: v for k, v in recipe["objective"].items() if k != "name"}
    # a LoRA fake score on the student's target layers (tools/memory_table.py counts both on those)
    obj.update(fake_lora_rank=64, fake_target_modules=list(xl_student["lora_target_modules"]))
    for att in ATTENTION:
        out.append(Run(models["sdxl"], recipe["objective"]["name"], obj, xl_student, 1, True, att))
    return out


def predicted_sdxl() -> dict:
    """tools/memory_table.py's figure for SDXL dmd2, LoRA student and fake score, batch 1: the value in
    assets/benchmarks/memory_table.md (student EMA on) and the model recomputed without EMA (this loop has none)."""
    import memory_table as mt

    out = {}
    md = ROOT / "assets" / "benchmarks" / "memory_table.md"
    if md.is_file():
        section = md.read_text().split("## SDXL UNet", 1)[-1].split("\n## ", 1)[0]
        row = re.search(r"^\| dmd2 \| LoRA \| LoRA \|(.*)$", section, re.M)
        if row:
            out["table"] = float(row.group(1).split("|")[4])  # total GiB
    s, _ = mt.sizes("sdxl", 64)
    out["no_ema"] = mt.recipe("dmd2", s, True, True, batch=1, cfg_passes=mt.BACKBONES["sdxl"].cfg_passes,
                              ema=False)["total"] / GIB
    return out


# -- report ---------------------------------------------------------------------------------------------
def _f(x, digits: int) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def table(rows: list[dict]) -> list[str]:
    lines = ["| model | objective | student | fake score | attention | batch | grad ckpt | step time s/it | "
             "peak memory GiB | peak reserved GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['objective']} | {r.get('student', '')} | {r.get('fake', '')} | "
                     f"{r['attention']} | {r['batch']} | {'on' if r['ckpt'] else 'off'} | {_f(r['s_it'], 3)} | "
                     f"{_f(r['peak'], 2)} | {_f(r['reserved'], 2)} |")
    return lines


def report(args, argv, rows, settings, prediction, env) -> str:
    lines = ["# Measured step time and peak GPU memory", "",
             f"Command: `python tools/gpu_bench.py {shlex.join(argv)}`  ",
             f"Device: {env['device']}; torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers "
             f"{env['diffusers']}, peft {env['peft']}, xformers {env['xformers']}; {env['date']}.", ""]
    lines += table(rows)
    lines += ["", f"Step time: one outer iteration (every phase of the objective, each as often as it repeats; "
              f"listed below), mean of {args.iters} after one warm-up. Peak memory: `torch.cuda.max_memory_allocated` "
              "over the timed iterations (weights, optimizer states, gradients, activations; not the CUDA context); "
              "reserved: `max_memory_reserved`, what the caching allocator held. Weights are random (time and "
              f"memory do not depend on them); {env['precision']}. Conditions are random text embeddings: text "
              "encoders and the VAE are not part of what is measured.", "",
              "Objectives: phases (updates per iteration) and the settings that differ from the Config defaults:", ""]
    lines += [f"* {k}: {v}" for k, v in settings.items()]
    if prediction:
        lines += ["", "## SDXL DMD2, LoRA student and fake score: measured against tools/memory_table.py", ""]
        lines += [f"* {line}" for line in prediction]
    return "\n".join(lines) + "\n"


def settings_of(name: str, overrides: dict) -> str:
    """An objective's phases with their repeats, and its Config fields that differ from the defaults."""
    from stepdistill.train.setup import make_objective

    made = make_objective({"name": name, **overrides})
    default = dataclasses.asdict(make_objective({"name": name}).cfg)
    changed = {k: v for k, v in dataclasses.asdict(made.cfg).items() if v != default[k]}
    phases = " + ".join(f"{ph.name} x{ph.repeats}" for ph in made.phases())
    return f"{phases}; " + (", ".join(f"{k}={v}" for k, v in changed.items()) or "defaults")


def environment(device: torch.device, tiny_cpu: bool) -> dict:
    import diffusers
    import peft

    try:
        import xformers
        xf = xformers.__version__
    except ImportError:
        xf = "not installed"
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test)",
            "diffusers": diffusers.__version__, "peft": peft.__version__, "xformers": xf,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "precision": "everything in float32 without autocast" if tiny_cpu else
            "teacher in bf16, trained networks in float32 under bf16 autocast (the trainer's mixed_precision: bf16)"}


def measure_row(r: Run, iters: int, device: torch.device, dtype) -> dict:
    """One table row: measured, or why not."""
    na = "—" if device.type == "cuda" else "n/a on CPU"
    row = {"model": r.model.label, "objective": r.objective, "attention": r.attention, "batch": r.batch,
           "ckpt": r.checkpointing, "student": describe_student(r.student), "s_it": "—", "peak": na, "reserved": na}
    missing = xformers_missing(device) if r.attention == "xformers" else None
    if missing:
        row["s_it"] = f"xformers unavailable ({missing})"
        return row
    print(f"{r.model.label}, {r.objective}, {r.attention}, batch {r.batch} ...", flush=True)
    try:
        row.update(measure(r, iters, device, dtype))
    except torch.cuda.OutOfMemoryError:
        row["s_it"] = row["peak"] = "out of memory"
    except Exception as err:  # keep the other rows of a GPU session; the traceback says what failed
        traceback.print_exc()
        row["s_it"] = f"error: {type(err).__name__}"
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print("   ", {k: row[k] for k in ("s_it", "peak", "reserved")}, flush=True)
    return row


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--objectives", default="dmd2,sid,consistency", help="SD1.5 rows: comma-separated objectives")
    p.add_argument("--models", default="sd15,sdxl", help="sd15 (every objective), sdxl (the DMD2 LoRA row)")
    p.add_argument("--batch", type=int, default=4, help="SD1.5 batch (SDXL runs at 1)")
    p.add_argument("--iters", type=int, default=5, help="timed outer iterations after one warm-up")
    p.add_argument("--steps", type=int, default=1, help="SD1.5 student steps")
    p.add_argument("--lora-rank", type=int, default=0, help="SD1.5 student LoRA rank; 0 = full weights")
    p.add_argument("--guidance", type=float, default=1.75, help="SD1.5 teacher CFG scale (DMD2's SD1.5 recipe); "
                   "1 = no CFG")
    p.add_argument("--gradient-checkpointing", action="store_true", help="SD1.5 rows: checkpoint every UNet "
                   "(the SDXL row always does)")
    p.add_argument("--tiny", action="store_true", help="tiny UNets (smoke test); float32 without autocast on CPU")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="assets/benchmarks/gpu.md")
    args = p.parse_args(argv)
    args.objectives = [s.strip() for s in args.objectives.split(",") if s.strip()]
    args.models = [s.strip() for s in args.models.split(",") if s.strip()]
    device = torch.device(args.device)
    if not args.tiny and (device.type != "cuda" or not torch.cuda.is_available()):
        raise SystemExit("gpu_bench: full-size runs need a CUDA GPU and none is available here "
                         f"(--device {args.device}, torch.cuda.is_available()={torch.cuda.is_available()}); "
                         "run it on a GPU machine, or add --tiny --device cpu for the CPU smoke test")
    unknown = set(args.models) - set(MODELS)
    if unknown:
        raise SystemExit(f"gpu_bench: unknown --models {sorted(unknown)}; use sd15, sdxl or both")
    from stepdistill.objectives import get_objective

    for name in args.objectives:
        get_objective(name)  # an unknown name fails here, before anything is built
    tiny_cpu = args.tiny and device.type == "cpu"
    dtype = torch.float32 if tiny_cpu else torch.bfloat16
    models = TINY if args.tiny else MODELS
    out = Path(args.out) if Path(args.out).is_absolute() else ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    env = environment(device, tiny_cpu)
    todo = [r for r in runs(args, models) if any(r.model is models[m] for m in args.models)]
    settings = {}
    for r in todo:
        settings.setdefault(f"{r.model.label}, {r.objective}", settings_of(r.objective, r.overrides))
    rows, prediction = [], []
    for r in todo:
        rows.append(measure_row(r, args.iters, device, dtype))
        out.write_text(report(args, argv, rows, settings, prediction, env))  # after every row: a crash keeps the rest
    xl = [r["peak"] for r in rows if r["model"] == models["sdxl"].label and isinstance(r["peak"], float)]
    if xl and not args.tiny:
        pred = predicted_sdxl()
        prediction += [f"measured peak (max_memory_allocated, batch 1, lower of the attention rows): {min(xl):.2f} GiB",
                       f"predicted in assets/benchmarks/memory_table.md, row dmd2 / LoRA / LoRA (with student EMA): "
                       f"{pred.get('table', 'not found')} GiB",
                       f"predicted by the same model without student EMA, as this loop runs: {pred['no_ema']:.2f} GiB"]
        out.write_text(report(args, argv, rows, settings, prediction, env))
    print(out.read_text())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
