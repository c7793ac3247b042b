"""The model card (README.md) of an exported student: what it was distilled from, how, and how to
run it, with evaluation results only where the run has them, each with its protocol."""
from __future__ import annotations

import json

from ..eval.report import fmt_value


def usage_lines(record: dict, custom: bool, folder: str = "path/to/export") -> list[str]:
    """The lines a user needs to load and run the exported student."""
    k = record["steps"]
    labels = list(range(min(4, int(record["num_classes"] or 0))))
    if not custom:
        call = (f"pipe(batch_size={len(labels)}, class_labels={labels}, num_inference_steps={k})" if labels
                else f"pipe(batch_size=4, num_inference_steps={k})")
        return ["from diffusers import DiffusionPipeline",
                f'pipe = DiffusionPipeline.from_pretrained("{folder}")', f"images = {call}.images"]
    call = f"pipe(class_labels={labels}).images" if labels else "pipe(batch_size=4).images"
    lines = ["from diffusers import DiffusionPipeline",
             f'pipe = DiffusionPipeline.from_pretrained("{folder}", trust_remote_code=True)']
    if record["mode"] == "lora":
        lines.append(f'pipe.load_lora_weights("{folder}")')
    return lines + [f"images = {call}"]


def _objective_summary(meta: dict) -> tuple[str, dict]:
    cfg = (meta.get("config") or {}).get("objective") or {}
    name = cfg.get("name") or meta.get("objective") or "unknown"
    return name, {k: v for k, v in cfg.items() if k != "name"}


def model_card(record: dict, meta: dict, scheduler_cfg: dict, eval_report: dict | None, *, custom: bool) -> str:
    name, hyper = _objective_summary(meta)
    k = record["steps"]
    guidance = hyper.get("guidance", hyper.get("guidance_scale"))
    kind = f"class-conditional ({record['num_classes']} classes)" if record["num_classes"] else "unconditional"
    weights = {"full": "full weights", "fused": "LoRA adapters merged into the weights",
               "lora": "LoRA adapters (pytorch_lora_weights.safetensors) on the teacher's weights"}[record["mode"]]
    lines = [
        "---", "library_name: diffusers", "tags: [stepdistill, distillation, few-step]", "---", "",
        f"# {k}-step student distilled with stepdistill", "",
        f"A {kind} image generator distilled from a many-step teacher into **{k} sampling step"
        f"{'s' if k != 1 else ''}**.", "",
        "| | |", "| --- | --- |",
        f"| teacher | `{record.get('teacher')}` |",
        f"| objective | `{name}` |",
        f"| sampling steps | {k} (timesteps {[int(t) if float(t).is_integer() else t for t in record['timesteps']]}) |",
        f"| guidance | {guidance if guidance is not None else 'none (1.0)'}"
        f"{' (distilled in; sample without CFG)' if guidance not in (None, 1, 1.0) else ''} |",
        f"| training steps | {record.get('training_step')} |",
        f"| weights | {weights}{' (EMA)' if record.get('ema') else ''} |",
        f"| boundary condition | {record.get('boundary') or 'none'} |",
        f"| scheduler | `{scheduler_cfg['_class_name']}` |", "",
        "## Use", "", "```python", *usage_lines(record, custom), "```", "",
    ]
    if custom:
        lines += [
            "`trust_remote_code=True` is required: the sampling loop ships as `pipeline.py` in this folder "
            "(diffusers' custom-pipeline mechanism), because diffusers has no pipeline for this model; "
            "diffusers refuses to run code from a folder without that argument. Read `pipeline.py` before "
            f"you pass it. `num_inference_steps` defaults to the trained {k}.", ""]
    else:
        lines += [f"This is diffusers' own `ConsistencyModelPipeline` with the student's scheduler: no custom code. "
                  f"Pass `num_inference_steps={k}` (the pipeline's default is 1)"
                  + (", `class_labels` (ints in 0.." + str(record["num_classes"] - 1) + ") and `batch_size` equal to "
                     "their number; without labels it draws random ones, including the no-class label "
                     + str(record["num_classes"]) if record["num_classes"] else "") + ". No guidance is applied: "
                  "any guidance was distilled in.", ""]
    lines += [
        f"The scheduler's `set_timesteps({k})` gives exactly the timesteps the student was trained at (the student's "
        "timesteps are computed from this scheduler config). Each step predicts x0 and re-noises it with fresh noise "
        "from `generator` to the next timestep (multi-step consistency sampling).", ""]
    if eval_report:
        lines += ["## Evaluation", "", *_results_table(eval_report["results"]), "", "Protocol:", "", "```json",
                  json.dumps(eval_report["protocol"], indent=2, sort_keys=True, default=str), "```", ""]
    else:
        lines += ["## Evaluation", "", "This run has no evaluation results. Score the folder with "
                  "`stepdistill eval <folder> --steps " + str(k) + " --ref <dataset> --detector <detector>`.", ""]
    lines += ["## Training configuration", "", "```json",
              json.dumps({"objective": {"name": name, **hyper}, "student": (meta.get("config") or {}).get("student")},
                         indent=2, sort_keys=True, default=str), "```", ""]
    return "\n".join(lines)


def _results_table(rows: list[dict]) -> list[str]:
    cols = [c for c in ("steps", "nfe", "fid", "kid", "kid_std", "precision", "recall", "class_accuracy")
            if any(r.get(c) is not None for r in rows)]
    out = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(fmt_value(r.get(c)) for c in cols) + " |")
    return out
