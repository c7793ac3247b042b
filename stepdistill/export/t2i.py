"""Text-to-image students as the teacher's own diffusers pipeline (StableDiffusionPipeline,
StableDiffusionXLPipeline, StableDiffusion3Pipeline or FluxPipeline): the teacher's folder with the
student's unet/transformer and the student's scheduler, so that

    pipe = DiffusionPipeline.from_pretrained(folder)
    image = pipe(prompt, num_inference_steps=K, guidance_scale=G).images[0]

runs the student. Text encoders, tokenizers, VAE (and SD's safety checker) are the teacher's files,
copied unchanged. The student's backbone is written in float32 (full-weight students train in
float32; a LoRA student's merged weights are cast to it); ``--lora`` copies the teacher's backbone
files unchanged and adds the adapters (float32) in diffusers' LoRA format.

Sampling equals ``Student.forward`` for the same noise because every pipeline here calls
``scheduler.step(model_output, t, latents)`` once per timestep of ``scheduler.set_timesteps`` and,
at guidance_scale 1, runs the backbone once on the conditional batch (SD/SDXL/SD3 apply CFG only
when guidance_scale > 1; FLUX embeds guidance_scale as a network input). The re-noising draws:
SD and SDXL pass ``generator`` to ``LCMScheduler.step``; SD3 and FLUX pass none, so
``FlowMatchEulerDiscreteScheduler.step`` draws from torch's global generator, and FLUX draws it in
its packed [B, HW/4, 4C] layout, which ``Student.fresh_noise`` draws too (then unpacks).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..t2i.pipeline import PIPELINES
from .scheduler import make_scheduler
from .share import trained_w_range

#: the pipeline class written to model_index.json: the one whose call is described above
PIPELINE_CLASS = {kind: name for name, kind in PIPELINES.items()}
BACKBONES = {"sd": "UNet2DConditionModel", "sdxl": "UNet2DConditionModel", "sd3": "SD3Transformer2DModel",
             "flux": "FluxTransformer2DModel"}
#: weights of other frameworks are never needed by a torch pipeline
SKIP_FILES = shutil.ignore_patterns("*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.ckpt")


def pipeline_timesteps(cfg: dict, kind: str, steps: int, latent_size: int) -> torch.Tensor:
    """The timesteps (float64) that the scheduler ``cfg`` runs when the ``kind`` pipeline's
    ``__call__(num_inference_steps=steps)`` sets them, through diffusers' own helpers."""
    from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

    from ..t2i.pipeline import flux_mu

    sched = make_scheduler(cfg)
    if kind == "flux":
        # FluxPipeline.__call__: sigmas = linspace(1, 1/K, K) and mu from the packed sequence length
        # (a scheduler without use_dynamic_shifting ignores mu and applies its fixed shift)
        mu = flux_mu(cfg, (latent_size // 2) ** 2)
        retrieve_timesteps(sched, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    else:
        # SD/SDXL call set_timesteps(K); SD3 too while use_dynamic_shifting is off (the student's
        # schedule fixes any dynamic shift at the training resolution: t2i.pipeline.teacher_schedule)
        retrieve_timesteps(sched, steps, "cpu")
    return sched.timesteps.to(torch.float64)


def check_backbone(student, info) -> None:
    name = type(student.denoiser.backbone).__name__
    if BACKBONES.get(info.kind) != name:
        raise UserError(f"a {info.kind} teacher's student should have a {BACKBONES.get(info.kind)} backbone, this one "
                        f"has {name}; export supports students of {', '.join(PIPELINE_CLASS.values())} teachers")


def recommended_guidance(student, meta: dict) -> tuple[float, str]:
    """(guidance_scale for the pipeline call, why)."""
    obj = (meta.get("config") or {}).get("objective") or {}
    info = meta["t2i"]
    if obj.get("name") == "guidance_distill":
        lo, hi = trained_w_range(meta)
        return (lo + hi) / 2, (f"the student takes the CFG scale as an input (guidance distillation, trained on [{lo}, "
                               f"{hi}]): the pipeline feeds it guidance_scale - 1 and runs one pass, no CFG")
    if obj.get("w_embedding") and student.denoiser.backbone.config.get("time_cond_proj_dim"):
        lo, hi = trained_w_range(meta)
        return (lo + hi) / 2, (f"the student embeds the CFG scale (LCM's w-embedding, trained on [{lo}, {hi}]): with "
                               "a time_cond_proj_dim the pipeline feeds it guidance_scale - 1 and runs no CFG")
    if info.kind == "flux" and info.backbone_config.get("guidance_embeds"):
        g = float((meta.get("text") or {}).get("embedded_guidance", 3.5))
        return g, "FLUX's embedded guidance, as the student was trained with (FluxPipeline runs no CFG)"
    return 1.0, "guidance was distilled in; at 1.0 the pipeline runs no classifier-free guidance"


def check_lora_base(student, info) -> None:
    """--lora puts the adapters on the teacher's backbone files: the student's base must be that network."""
    have = student.denoiser.backbone.config.get("time_cond_proj_dim")
    if have != info.backbone_config.get("time_cond_proj_dim"):
        raise UserError(f"--lora: the student's {info.backbone_folder} has a w input (time_cond_proj_dim={have}) that "
                        "the teacher's lacks, so the adapters cannot go on the teacher's weights; export with --fuse")


def _components(info, index: dict) -> tuple[dict, list[str], list[str]]:
    """(the exported model_index.json, the component folders to copy from the teacher, the optional
    components left out because the teacher folder lacks their files)."""
    import diffusers

    cls = getattr(diffusers, PIPELINE_CLASS[info.kind])
    out = {"_class_name": cls.__name__, **{k: v for k, v in index.items() if k != "_class_name"}}
    folders, dropped = [], []
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None or name == "scheduler":
            continue
        if (info.path / name).is_dir() and any((info.path / name).iterdir()):
            folders.append(name)
        elif name in cls._optional_components:
            out[name], dropped = [None, None], dropped + [name]  # e.g. a hub download without them
        else:
            raise UserError(f"the teacher folder {str(info.path)!r} lists {name} in model_index.json but has no "
                            f"{name}/ files; export copies the teacher's components: restore that folder")
    if out.get("feature_extractor") == [None, None] and out.get("safety_checker", [None])[0] is not None:
        # StableDiffusionPipeline refuses a safety checker without its feature extractor
        out["safety_checker"], dropped = [None, None], dropped + ["safety_checker"]
        folders.remove("safety_checker")
    return out, folders, dropped


def write_t2i(tmp: Path, student, meta: dict, cfg: dict, mode: str) -> list[str]:
    """The teacher's pipeline folder with the student's backbone (or adapters) and scheduler;
    returns the optional components left out."""
    import diffusers

    from ..t2i.pipeline import read_index
    from .lora import lora_config, merged_copy

    info, backbone = meta["t2i"], student.denoiser.backbone
    if mode == "lora":
        check_lora_base(student, info)
    index, folders, dropped = _components(info, read_index(info.path))
    for name in folders:
        if name != info.backbone_folder or mode == "lora":  # --lora: the teacher's backbone files
            shutil.copytree(info.path / name, tmp / name, ignore=SKIP_FILES)
    if mode != "lora":  # float32: build_student trains full weights in it; merged adapters are cast to it
        net = merged_copy(backbone).float() if mode == "fused" else backbone
        net.save_pretrained(tmp / info.backbone_folder, safe_serialization=True)
    else:
        from peft import get_peft_model_state_dict

        layers = get_peft_model_state_dict(backbone)
        # diffusers' LoRA file: keys prefixed unet./transformer., the LoraConfig in the header
        getattr(diffusers, index["_class_name"]).save_lora_weights(
            tmp, **{f"{info.backbone_folder}_lora_layers": {k: v.detach().cpu() for k, v in layers.items()},
                    f"{info.backbone_folder}_lora_adapter_metadata": lora_config(backbone)},
            safe_serialization=True)
    scheduler = make_scheduler(cfg)
    scheduler.save_pretrained(tmp / "scheduler")
    index["scheduler"] = ["diffusers", type(scheduler).__name__]  # what from_pretrained instantiates
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return dropped


def t2i_record(student, meta: dict) -> dict:
    """The text-to-image fields of stepdistill_student.json."""
    info = meta["t2i"]
    guidance, why = recommended_guidance(student, meta)
    text = dict(meta.get("text") or {})
    record = {"kind": "text-to-image", "pipeline": PIPELINE_CLASS[info.kind], "pipeline_kind": info.kind,
              "teacher_name": info.name, "resolution": int(info.resolution), "guidance_scale": guidance,
              "guidance_note": why, "backbone_folder": info.backbone_folder,
              "text": {k: text.get(k) for k in ("negative_prompt", "max_sequence_length", "embedded_guidance")}}
    if info.kind == "flux":  # exp(mu) at the training resolution (t2i.pipeline.teacher_schedule)
        record["flux_shift"] = float(student.schedule.shift)
    return record
