"""What makes an export ready to share: the hub's YAML front matter (through huggingface_hub's
``ModelCardData``), no absolute local paths, and a sample image made by the exported student."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

#: the hub's task for each kind of student
PIPELINE_TAGS = {"text-to-image": "text-to-image", "image": "unconditional-image-generation"}


def portable(value):
    """``value`` (nested dicts/lists) with every absolute path replaced by its last part: a shared card
    names the teacher folder ``digits16``, not ``/home/me/.../digits16``."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return Path(value).name
    return value


def scrub_local_paths(folder: Path) -> None:
    """Replace the absolute ``_name_or_path`` that diffusers' and transformers' ``save_pretrained``
    write into each component's config JSON (where it was loaded from) by its last part."""
    import json

    for f in sorted(folder.rglob("*.json")):
        try:
            cfg = json.loads(f.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(cfg, dict) and isinstance(cfg.get("_name_or_path"), str) and os.path.isabs(cfg["_name_or_path"]):
            cfg["_name_or_path"] = Path(cfg["_name_or_path"]).name
            f.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def hub_name(record: dict) -> str | None:
    """The teacher's hub id (``owner/name``) when it was loaded by one, else None."""
    from ..t2i.pipeline import is_hub_name

    name = str(record.get("teacher_name") or "")
    return name if is_hub_name(name) and not Path(name).exists() else None


def teacher_card_data(folder: str | None) -> dict:
    """The teacher's own card's front matter (license, base_model, ...), when its folder has one."""
    if not folder or not (Path(folder) / "README.md").is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(Path(folder) / "README.md").data.to_dict()
    except Exception:  # a README without (valid) front matter states nothing
        return {}


def front_matter(record: dict, objective: str) -> tuple[str, dict]:
    """(the YAML block between ``---`` lines, what it holds). The license is the teacher card's, and
    only that: a distilled model inherits its teacher's terms, and none is made up where it states none."""
    from huggingface_hub import ModelCardData

    teacher = teacher_card_data(record.get("teacher"))
    base = hub_name(record) or teacher.get("base_model")
    kind = "text-to-image" if record.get("kind") == "text-to-image" else "image"
    tags = ["stepdistill", "distillation", "few-step", f"{record['steps']}-step", objective]
    tags += ["lora"] if record.get("mode") == "lora" else []
    data = {"license": teacher.get("license"), "license_name": teacher.get("license_name"),
            "license_link": teacher.get("license_link"), "base_model": base,
            "base_model_relation": "finetune" if base else None, "pipeline_tag": PIPELINE_TAGS[kind],
            "library_name": "diffusers", "tags": tags}
    data = {k: v for k, v in data.items() if v is not None}
    return ModelCardData(**data).to_yaml(), data


def trained_w_range(meta: dict) -> tuple[float, float]:
    """(w_min, w_max): the CFG scales a student with a w input was trained on, the objective's
    defaults filling in what the run's config leaves out; (1, 1) for an objective without a w range."""
    from ..objectives import get_objective

    obj = dict((meta.get("config") or {}).get("objective") or {})
    try:
        defaults = get_objective(obj.get("name", "guidance_distill")).Config()
    except Exception:  # an objective this version does not know: only the run's own values
        defaults = None
    return tuple(float(obj.get(k, getattr(defaults, k, 1.0))) for k in ("w_min", "w_max"))


def write_samples(student, meta: dict, record: dict, folder: Path) -> str | None:
    """``samples.png`` in ``folder``: the exported student's own samples (seed 0; every class in turn
    for a class-conditional one; a guidance-distilled one at its exported default scale). A text-to-image student has no prompts here, so its run's newest
    preview is copied when there is one. The file name, or None when no image could be made."""
    if record.get("kind") == "text-to-image":
        return _copy_preview(meta, folder)
    from ..images import save_grid
    from ..loaders import StudentModel
    from ..pretrain import class_cycle

    model = StudentModel(student, meta)
    classes = list(range(min(model.num_classes, 10))) or None
    n = 2 * len(classes) if classes else 16
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((n, *model.shape), generator=g)
    labels = class_cycle(n, classes) if classes else None
    w = float(record.get("guidance_scale", 1.0)) if record.get("guidance_embedding") else 1.0  # the pipeline's default
    x = model.to_pixels(model.generate(noise, model.make_cond(labels), guidance=w, generator=g))
    save_grid(x, folder / "samples.png", nrow=len(classes) if classes else 8)
    return "samples.png"


def _copy_preview(meta: dict, folder: Path) -> str | None:
    ckpt, step = meta.get("checkpoint"), int(meta.get("step") or 0)
    if not ckpt:
        return None
    previews = sorted(p for p in (Path(ckpt).parent.parent / "previews").glob("step-*.png")
                      if p.stem[5:].isdigit() and int(p.stem[5:]) <= step)  # not -scores; none after this checkpoint
    if not previews:
        return None
    shutil.copyfile(previews[-1], folder / "samples.png")
    return "samples.png"


__all__ = ["portable", "scrub_local_paths", "hub_name", "teacher_card_data", "front_matter", "write_samples"]
