"""Teachers on disk: a diffusers-format folder, loaded as a frozen ``DiffusersDenoiser``.

Layout written by ``save_teacher`` (each part loads in plain diffusers)::

    teacher/
      unet/config.json, unet/diffusion_pytorch_model.safetensors   (or transformer/)
      scheduler/scheduler_config.json
      stepdistill.json      kind, num_classes, null_class, sample_size, in_channels, class_names,
                            training summary

``load_teacher`` also takes a plain diffusers pipeline folder (``model_index.json``) holding an
unconditional or class-conditional unet/transformer and a scheduler. Weights load from safetensors
only; pickled weights (.bin/.pt/.ckpt) are refused unless the caller passes ``trust_pickle=True``,
because unpickling can execute code.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from .denoisers import BACKBONE_CALLS, DiffusersDenoiser
from . import resources
from .errors import UserError
from .fsutil import atomic_folder
from .schedules import schedule_from_config

META_FILE = "stepdistill.json"
FORMAT_VERSION = 1
BACKBONE_FOLDERS = ("unet", "transformer")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
KINDS = ("class-conditional", "unconditional")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"could not read {str(path)!r} as JSON ({err}); restore the file from the original "
                        "teacher folder") from None


def _backbone_class(config: dict, where: Path):
    import diffusers

    name = config.get("_class_name")
    if name == "Transformer2DModel" and config.get("norm_type") == "ada_norm_zero":
        name = "DiTTransformer2DModel"  # DiT checkpoints saved before diffusers split the class
    if name not in BACKBONE_CALLS:
        raise UserError(f"teacher backbone {name!r} in {str(where)!r} is not supported; supported: "
                        f"{', '.join(BACKBONE_CALLS)}")
    return getattr(diffusers, name)


def _load_backbone(folder: Path, dtype, trust_pickle: bool):
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{str(folder)!r} has no config.json; a backbone folder holds config.json and "
                        "diffusion_pytorch_model.safetensors")
    cls = _backbone_class(_read_json(cfg_file), folder)
    files = [p.name for p in folder.iterdir() if p.is_file()]
    safe = [f for f in files if f.endswith(".safetensors")]
    pickled = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    kw: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kw["torch_dtype"] = dtype
    if safe:
        kw["use_safetensors"] = True
        plain = {"diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"}
        if not plain & set(files):  # only a variant such as diffusion_pytorch_model.fp16.safetensors
            variants = sorted({f.split(".")[-2] for f in safe if f.count(".") == 2})
            if variants:
                kw["variant"] = variants[0]
    elif pickled:
        if not trust_pickle:
            raise UserError(f"{str(folder)!r} holds only pickled weights ({', '.join(sorted(pickled))}), which "
                            f"can run code when loaded; if you trust their source, convert them once: {cls.__name__}"
                            f".from_pretrained(dir).save_pretrained(dir, safe_serialization=True) (`stepdistill "
                            "sample` also reads them with --trust-pickle; training reads safetensors only)")
        kw["use_safetensors"] = False
    else:
        raise UserError(f"{str(folder)!r} holds no weights; expected diffusion_pytorch_model.safetensors")
    try:
        return cls.from_pretrained(folder, **kw)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 -- diffusers raises several types for broken folders
        raise UserError(f"could not load the backbone in {str(folder)!r}: {err}") from None


def _infer_meta(backbone) -> dict:
    """Class conditioning as the backbone's config declares it."""
    cfg = dict(backbone.config)
    name = type(backbone).__name__
    num_classes = 0
    if name == "UNet2DModel" and cfg.get("num_class_embeds"):
        num_classes = int(cfg["num_class_embeds"]) - 1  # the last embedding is the null class
    elif name == "DiTTransformer2DModel" and cfg.get("num_embeds_ada_norm"):
        num_classes = int(cfg["num_embeds_ada_norm"])  # DiT's table has one extra row for "no class"
    return {
        "kind": "class-conditional" if num_classes else "unconditional",
        "num_classes": num_classes,
        "null_class": num_classes if num_classes else None,
        "sample_size": cfg.get("sample_size"),
        "in_channels": cfg.get("in_channels"),
        "class_names": None,
    }


def _finish(backbone, scheduler_cfg: dict, meta: dict, path: Path) -> DiffusersDenoiser:
    schedule = schedule_from_config(scheduler_cfg)
    null_class = meta.get("null_class") if meta.get("kind") == "class-conditional" else None
    den = DiffusersDenoiser(backbone, schedule, null_class=null_class)
    den.requires_grad_(False)
    den.eval()
    den.meta = dict(meta, path=str(path))
    return den


def _load_stepdistill(path: Path, dtype, trust_pickle: bool) -> DiffusersDenoiser:
    meta = _read_json(path / META_FILE)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{str(path / META_FILE)!r} has format_version {version!r}; this version of "
                        f"stepdistill reads {FORMAT_VERSION}; upgrade stepdistill or re-export the teacher")
    if meta.get("kind") not in KINDS:
        raise UserError(f"{str(path / META_FILE)!r}: kind {meta.get('kind')!r} is not supported; use one of {KINDS}")
    folder = path / meta.get("backbone_folder", "unet")
    if not folder.is_dir():
        raise UserError(f"teacher {str(path)!r} lacks its backbone folder {folder.name!r}/ (config.json + "
                        "diffusion_pytorch_model.safetensors)")
    sched_file = path / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise UserError(f"teacher {str(path)!r} lacks scheduler/scheduler_config.json")
    backbone = _load_backbone(folder, dtype, trust_pickle)
    return _finish(backbone, _read_json(sched_file), meta, path)


def _load_pipeline(path: Path, dtype, trust_pickle: bool) -> DiffusersDenoiser:
    index = _read_json(path / "model_index.json")
    part = next((k for k in BACKBONE_FOLDERS if k in index and (path / k).is_dir()), None)
    if part is None or "scheduler" not in index or not (path / "scheduler").is_dir():
        raise UserError(f"pipeline {str(path)!r} ({index.get('_class_name')}) needs a unet/ or transformer/ and a "
                        "scheduler/ folder; this one has: " + ", ".join(sorted(k for k in index if not k.startswith("_"))))
    if "vae" in index and index.get("vae") and index["vae"][0] is not None:
        raise UserError(f"{str(path)!r} is a latent pipeline (it has a vae); latent teachers are not supported "
                        "yet; use a pixel-space unconditional or class-conditional model")
    backbone = _load_backbone(path / part, dtype, trust_pickle)
    sched_file = path / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise UserError(f"pipeline {str(path)!r} lacks scheduler/scheduler_config.json")
    meta = {"format_version": FORMAT_VERSION, "backbone_folder": part, **_infer_meta(backbone),
            "source": index.get("_class_name")}
    return _finish(backbone, _read_json(sched_file), meta, path)


def load_teacher(path: str | os.PathLike, dtype: torch.dtype | None = None, *,
                 trust_pickle: bool = False, resolution: int | None = None) -> DiffusersDenoiser:
    """Load a teacher folder, an unconditional/class-conditional diffusers pipeline folder, or a
    text-to-image pipeline (a folder or a hub name; ``t2i.pipeline``) as a frozen denoiser in eval
    mode, with ``.meta`` (kind, num_classes, null_class, sample_size, in_channels, class_names, ...).
    ``resolution`` (pixels) applies to text-to-image teachers only."""
    from .t2i.pipeline import is_hub_name, is_text_to_image, load_t2i_teacher

    raw = resources.teacher(path)  # a shipped teacher by name (digits16) from any working directory
    path = Path(raw).expanduser()
    if not path.exists() and is_hub_name(raw):  # e.g. stable-diffusion-v1-5/stable-diffusion-v1-5
        return load_t2i_teacher(raw, dtype, resolution=resolution, trust_pickle=trust_pickle)
    if is_text_to_image(path):
        return load_t2i_teacher(path, dtype, resolution=resolution, trust_pickle=trust_pickle)
    if not path.exists():
        raise UserError(f"teacher {str(path)!r} does not exist; pass a teacher folder such as "
                        "digits16, the shipped one (or train one: stepdistill pretrain digits/teacher)")
    if not path.is_dir():
        raise UserError(f"teacher {str(path)!r} is a file; pass the teacher folder that holds unet/, scheduler/ "
                        f"and {META_FILE}")
    if (path / META_FILE).is_file():
        return _load_stepdistill(path, dtype, trust_pickle)
    if (path / "model_index.json").is_file():
        return _load_pipeline(path, dtype, trust_pickle)
    raise UserError(f"{str(path)!r} is not a teacher folder: expected {META_FILE}, unet/ (config.json + "
                    "diffusion_pytorch_model.safetensors) and scheduler/scheduler_config.json, or a diffusers "
                    "pipeline with model_index.json")


def teacher_meta(denoiser: DiffusersDenoiser, meta: dict | None = None) -> dict:
    """The full ``stepdistill.json`` record: what the backbone declares, updated by ``meta``."""
    out = {"format_version": FORMAT_VERSION, "backbone_folder": "unet", **_infer_meta(denoiser.backbone)}
    if "Transformer" in type(denoiser.backbone).__name__:
        out["backbone_folder"] = "transformer"
    out.update(meta or {})
    out["format_version"] = FORMAT_VERSION
    if out["kind"] not in KINDS:
        raise UserError(f"teacher kind {out['kind']!r} is not supported; use one of {KINDS}")
    return out


def save_teacher(denoiser: DiffusersDenoiser, path: str | os.PathLike, meta: dict | None = None, *,
                 extras: Callable[[Path], None] | None = None) -> Path:
    """Write ``denoiser`` as a teacher folder, atomically: everything goes into a temporary sibling
    folder that replaces ``path`` only once complete. ``extras(folder)`` may write more files (the
    resolved training config, a preview grid) into the folder before it is committed."""
    import diffusers

    path = Path(path)
    record = teacher_meta(denoiser, meta)
    sched_cfg = denoiser.schedule.to_diffusers_config()
    sched_cls = getattr(diffusers, sched_cfg["_class_name"])
    with atomic_folder(path) as tmp:
        denoiser.backbone.save_pretrained(tmp / record["backbone_folder"], safe_serialization=True)
        sched_cls.from_config({k: v for k, v in sched_cfg.items() if k != "_class_name"}).save_pretrained(
            tmp / "scheduler")
        (tmp / META_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if extras is not None:
            extras(tmp)
    return path


__all__ = ["load_teacher", "save_teacher", "teacher_meta", "META_FILE", "FORMAT_VERSION"]
