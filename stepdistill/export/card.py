"""The model card (README.md) of an exported student: what it was distilled from, how, and how to
run it, with evaluation results only where the run has them, each with its protocol."""
from __future__ import annotations

import json


def usage_lines(record: dict, custom: bool, folder: str = "path/to/export") -> list[str]:
    """The lines a user needs to load and run the exported student."""
    if record.get("kind") == "text-to-image":
        return _t2i_usage(record, folder)
    k = record["steps"]
    labels = list(range(min(4, int(record["num_classes"] or 0))))
    if not custom:
        call = (f"pipe(batch_size={len(labels)}, class_labels={labels}, num_inference_steps={k})" if labels
                else f"pipe(batch_size=4, num_inference_steps={k})")
        return ["from diffusers import DiffusionPipeline",
                f'pipe = DiffusionPipeline.from_pretrained("{folder}")', f"images = {call}.images"]
    w = f", guidance_scale={record['guidance_scale']}" if record.get("guidance_embedding") else ""
    call = f"pipe(class_labels={labels}{w}).images" if labels else "pipe(batch_size=4).images"
    lines = ["from diffusers import DiffusionPipeline",
             f'pipe = DiffusionPipeline.from_pretrained("{folder}", trust_remote_code=True)']
    if record["mode"] == "lora":
        lines.append(f'pipe.load_lora_weights("{folder}")')
    return lines + [f"images = {call}"]


def _t2i_usage(record: dict, folder: str) -> list[str]:
    r, text = record["resolution"], record.get("text") or {}
    call = ['"a photo of a cat"', f"num_inference_steps={record['steps']}",
            f"guidance_scale={record['guidance_scale']}", f"height={r}", f"width={r}"]
    if record["pipeline_kind"] in ("sd3", "flux") and text.get("max_sequence_length"):
        call.append(f"max_sequence_length={text['max_sequence_length']}")  # the T5 length it was trained with
    lines = ["from diffusers import DiffusionPipeline", f'pipe = DiffusionPipeline.from_pretrained("{folder}")']
    if record["mode"] == "lora":
        lines.append(f'pipe.load_lora_weights("{folder}")')
    return lines + [f"image = pipe({', '.join(call)}).images[0]"]


SAMPLER_WORDS = {"renoise": "x0 estimate re-noised with fresh noise (multi-step consistency sampling)",
                 "ddim": "deterministic DDIM step from the x0 estimate (multistep consistency sampling)",
                 "tcd": "TCD's strategic stochastic step (TCDScheduler; pass eta = the trained gamma)"}


def _t2i_notes(record: dict, scheduler_cfg: dict) -> list[str]:
    k, sched = record["steps"], scheduler_cfg["_class_name"]
    lines = [f"This is diffusers' own `{record['pipeline']}` (no custom code) with the student's "
             f"{'adapters on the teacher' if record['mode'] == 'lora' else 'weights'} and the student's scheduler. "
             f"**The scheduler is already set**: `scheduler/` holds the `{sched}` whose `set_timesteps({k})`, as the "
             f"pipeline calls it, gives exactly the timesteps the student was trained at; do not replace it. Pass "
             f"`num_inference_steps={k}` (the pipeline's default is a many-step count) and "
             f"`guidance_scale={record['guidance_scale']}`: {record['guidance_note']}.", ""]
    if record["pipeline_kind"] in ("sd3", "flux") and (record.get("sampler") or "renoise") == "renoise":
        lines += [f"`{record['pipeline']}` passes no `generator` to the scheduler's step, so with more than one step "
                  "the re-noising between steps draws from torch's global generator: call `torch.manual_seed(...)` "
                  "as well as passing `generator` for reproducible samples.", ""]
    if record["pipeline_kind"] == "flux":
        lines += [f"The scheduler's shift is fixed at {record['flux_shift']:.6g} (FLUX's resolution-dependent "
                  f"exp(mu) at the training resolution {record['resolution']} px); other resolutions keep it.", ""]
    if record["mode"] == "lora":
        lines += ["The weights under the adapters are the teacher's, unchanged, so the adapters also load onto the "
                  f"teacher's own pipeline folder (`{record.get('teacher_name')}`): `pipe.load_lora_weights(folder)`, "
                  f"then `pipe.scheduler = {sched}.from_pretrained(folder, subfolder=\"scheduler\")`.", ""]
    if record.get("left_out"):
        lines += [f"Left out because the teacher folder has no files for them: {', '.join(record['left_out'])}.", ""]
    return lines


def _objective_summary(meta: dict) -> tuple[str, dict]:
    cfg = (meta.get("config") or {}).get("objective") or {}
    name = cfg.get("name") or meta.get("objective") or "unknown"
    return name, {k: v for k, v in cfg.items() if k != "name"}


def _training_lines(meta: dict, record: dict) -> list[str]:
    """The settings a reader needs to reproduce the run: learning rates, batch, seed, steps, budget."""
    cfg = meta.get("config") or {}
    rows = []
    for net, o in (cfg.get("optim") or {}).items():
        if isinstance(o, dict) and o.get("lr") is not None:
            rows.append((f"learning rate ({net})", f"{o['lr']:g}, {o.get('lr_schedule')}, {o.get('warmup_steps')} "
                         f"warm-up updates, AdamW betas ({o.get('beta1')}, {o.get('beta2')}), weight decay "
                         f"{o.get('weight_decay')}, gradient clip {o.get('max_grad_norm')}"
                         + (f", {o['lr_decay']} decay over the run to {o.get('lr_decay_floor', 0.0):g} of it"
                            if o.get("lr_decay") else "")))
    world = meta.get("world_size") or 1
    rows += [("batch", f"{cfg.get('batch_size')} per micro-step over {world} process{'es' if world > 1 else ''}, "
                       f"{cfg.get('grad_accum')} micro-step{'s' if cfg.get('grad_accum') != 1 else ''} per update"),
             ("seed", cfg.get("seed")),
             ("steps", f"{record.get('training_step')} trained (max_steps {cfg.get('max_steps')})")]
    minutes, seconds = cfg.get("max_minutes"), meta.get("train_seconds")
    rows.append(("budget", (f"{minutes:g} wall-clock minutes" if minutes is not None else "none (max_steps only)")
                 + (f"; {seconds / 60:.1f} minutes used" if seconds is not None else "")))
    ema = cfg.get("ema") or {}
    rows += [("precision", cfg.get("mixed_precision")),
             ("EMA", f"decay {ema.get('decay')}" + (f", half-life ratio {ema['halflife_ratio']}"
                                                   if ema.get("halflife_ratio") else "") if ema.get("decay") else "none")]
    out = ["## Training", "", "| setting | value |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows], "",
           "<details><summary>Full training config (objective, student, optimizers, schedule)</summary>", "",
           "```json", json.dumps(cfg, indent=2, sort_keys=True, default=str), "```", "", "</details>", ""]
    return out


def model_card(record: dict, meta: dict, scheduler_cfg: dict, eval_report: dict | None, *, custom: bool,
               header: str | None = None, image: str | None = None) -> str:
    """The README.md of an export. ``header``: the YAML front matter (``share.front_matter``; without it
    a minimal one); ``image``: the sample image's file name in the folder. ``record``, ``meta`` and
    ``eval_report`` are expected to hold no absolute local paths (``share.portable``)."""
    name, hyper = _objective_summary(meta)
    k = record["steps"]
    guidance = hyper.get("guidance", hyper.get("guidance_scale"))
    t2i = record.get("kind") == "text-to-image"
    kind = f"class-conditional ({record['num_classes']} classes)" if record["num_classes"] else "unconditional"
    kind = "text-to-image" if t2i else f"{kind} image"
    weights = {"full": "full weights", "fused": "LoRA adapters merged into the weights",
               "lora": "LoRA adapters (pytorch_lora_weights.safetensors) on the teacher's weights"}[record["mode"]]
    if t2i and record["mode"] != "lora":
        weights += f", float32, in `{record['backbone_folder']}/`"
    teacher = f"`{record.get('teacher')}`"
    if t2i and record.get("teacher_name") != record.get("teacher"):
        teacher = f"`{record.get('teacher_name')}` (`{record.get('teacher')}`)"
    header = header or "library_name: diffusers\ntags:\n- stepdistill\n- distillation\n- few-step\n"
    lines = [
        "---", header.rstrip("\n"), "---", "",
        f"# {k}-step student distilled with stepdistill", "",
        f"A {kind} generator distilled from a many-step teacher into **{k} sampling step"
        f"{'s' if k != 1 else ''}**.", "",
        *([f"![samples from this student]({image})", "",
           ("A preview the run drew at its last preview step (text-to-image samples need prompts)." if t2i else
            f"{k}-step samples of this exported student (seed 0" + (", one class per column)." if
                                                                    record["num_classes"] else ").")), ""]
          if image else []),
        *(["The teacher's card states no license, so none is set above: add the teacher's terms (`license:`) "
           "before sharing this model.", ""] if "license:" not in header else []),
        "| | |", "| --- | --- |",
        f"| teacher | {teacher} |",
        *([f"| pipeline | `{record['pipeline']}` |", f"| resolution | {record['resolution']} px |",
           f"| guidance_scale | {record['guidance_scale']} |"] if t2i else []),
        f"| objective | `{name}` |",
        f"| sampling steps | {k} (timesteps {[int(t) if float(t).is_integer() else t for t in record['timesteps']]}) |",
        (f"| guidance | an input: `guidance_scale` at call time, trained on [{hyper.get('w_min')}, {hyper.get('w_max')}], "
         f"default {record.get('guidance_scale')} |" if record.get("guidance_embedding") else
         f"| {'teacher guidance in training' if t2i else 'guidance'} | "
         f"{guidance if guidance is not None else 'none (1.0)'}"
         f"{' (distilled in; sample without CFG)' if guidance not in (None, 1, 1.0) else ''} |"),
        f"| training steps | {record.get('training_step')} |",
        f"| weights | {weights}{' (EMA)' if record.get('ema') else ''} |",
        f"| boundary condition | {record.get('boundary') or 'none'} |",
        f"| between steps | {SAMPLER_WORDS[record.get('sampler') or 'renoise']} |",
        f"| scheduler | `{scheduler_cfg['_class_name']}` |",
        *([f"| experts | {len(record['experts'])} networks taking {record['experts']} of the steps, noisiest first "
           "(`unet`, `unet_2`, ...: the pipeline picks one by timestep) |"] if record.get("experts") else []), "",
        "## Use", "", "```python", *usage_lines(record, custom), "```", "",
    ]
    if t2i:
        lines += _t2i_notes(record, scheduler_cfg)
    elif custom:
        lines += [
            "`trust_remote_code=True` is required: the sampling loop ships as `pipeline.py` in this folder "
            "(diffusers' custom-pipeline mechanism), because diffusers has no pipeline for this model; "
            "diffusers refuses to run code from a folder without that argument. Read `pipeline.py` before "
            f"you pass it. `num_inference_steps` defaults to the trained {k}.", ""]
        if record.get("guidance_embedding"):
            lines += [
                "The student takes the CFG scale as an input (guidance distillation, Meng et al., 2023): "
                f"`guidance_scale` (default {record['guidance_scale']}, the middle of the trained range; 1 = the "
                "conditional model) selects it in one pass per step, no CFG. The input is the custom component "
                "`guidance_embedding/guidance_embedding.py`, which `trust_remote_code=True` also runs.", ""]
    else:
        lines += [f"This is diffusers' own `ConsistencyModelPipeline` with the student's scheduler: no custom code. "
                  f"Pass `num_inference_steps={k}` (the pipeline's default is 1)"
                  + (", `class_labels` (ints in 0.." + str(record["num_classes"] - 1) + ") and `batch_size` equal to "
                     "their number; without labels it draws random ones, including the no-class label "
                     + str(record["num_classes"]) if record["num_classes"] else "") + ". No guidance is applied: "
                  "any guidance was distilled in.", ""]
    own = (f"At {k} steps the pipeline passes the student's own timesteps {record.get('timesteps')} (its "
           "`trained_timesteps`) to the scheduler; other step counts run the scheduler's `set_timesteps` grid. "
           if record.get("custom_timesteps") else
           f"The scheduler's `set_timesteps({k})` gives exactly the timesteps the student was trained at (the student's "
           "timesteps are computed from this scheduler config). ")
    lines += [] if t2i else [
        own + "Each step predicts x0 and re-noises it with fresh noise from `generator` to the next timestep "
        "(multi-step consistency sampling).", ""]
    if eval_report:
        lines += ["## Evaluation", "", *_results_table(eval_report["results"]), "", "Protocol:", "", "```json",
                  json.dumps(eval_report["protocol"], indent=2, sort_keys=True, default=str), "```", ""]
    elif t2i:
        lines += ["## Evaluation", "", "This run has no evaluation results. Sample the folder with "
                  "`stepdistill sample <folder> --prompt \"...\"`.", ""]
    else:
        lines += ["## Evaluation", "", "This run has no evaluation results. Score the folder with "
                  "`stepdistill eval <folder> --steps " + str(k) + " --ref <dataset> --detector <detector>`.", ""]
    lines += _training_lines(meta, record)
    return "\n".join(lines)


def _results_table(rows: list[dict]) -> list[str]:
    from ..eval.report import fmt_value  # the eval report's number format (eval imports torchmetrics)

    cols = [c for c in ("steps", "nfe", "fid", "kid", "kid_std", "precision", "recall", "class_accuracy")
            if any(r.get(c) is not None for r in rows)]
    out = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(fmt_value(r.get(c)) for c in cols) + " |")
    return out
