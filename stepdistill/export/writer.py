"""``export_run``: a run folder's (EMA) student as a diffusers folder that loads with no
knowledge of stepdistill and samples on the student's own timesteps by default.

Layout (each part plain diffusers)::

    out/
      model_index.json        ConsistencyModelPipeline (full or fused weights), or
                              ["pipeline", "StepDistillPipeline"] (LoRA adapters; flow schedulers);
                              text-to-image students: the teacher's pipeline class (``export.t2i``)
      pipeline.py             the custom pipeline (those exports only)
      unet/ (transformer/)    the student's weights (fused LoRA included), or the teacher's for --lora
      scheduler/              the student's scheduler (``export.scheduler.student_scheduler_config``)
      text_encoder*/ ...      text-to-image: the teacher's other components, copied unchanged (an absolute
                              _name_or_path in a config reduced to its last part)
      pytorch_lora_weights.safetensors   (--lora) the adapters: peft keys prefixed unet./transformer.,
                                         the LoraConfig in the header (diffusers' LoRA format)
      stepdistill_student.json           what stepdistill needs to rebuild the student (no code)
      README.md               the model card, with the hub's YAML front matter (``export.share``)
      samples.png             the exported student's samples (text-to-image: the run's newest preview)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import UserError
from ..fsutil import atomic_folder
from ..loaders import EXPORT_META, FORMAT_VERSION, GUIDED_VERSION, OWN_TIMES_VERSION
from .card import model_card
from .share import front_matter, portable, scrub_local_paths, trained_w_range, write_samples
from .lora import base_copy, has_lora, merged_copy, save_lora
from .pipeline import set_student_timesteps
from .scheduler import boundary_scalings, check_timesteps, make_scheduler, student_scheduler_config
from .t2i import check_backbone, pipeline_timesteps, t2i_record, write_t2i

PIPELINE_FILE = Path(__file__).with_name("pipeline.py")
GUIDANCE_FILE = Path(__file__).with_name("guidance_embedding.py")  # the w input's custom component
PIPELINE_CLASS = "StepDistillPipeline"
#: with no boundary condition the scheduler's c_skip must vanish (and c_out be 1) to this tolerance
BOUNDARY_TOL = 1e-7


def _mode(student, lora: bool, fuse: bool) -> str:
    """"full", "fused" or "lora", or a clear refusal."""
    is_lora = has_lora(student.denoiser.backbone)
    if lora and fuse:
        raise UserError("--lora writes the adapters and --fuse merges them into the weights; pass one of them")
    if lora and student.steps_per_expert:
        raise UserError(f"--lora: this student is a mixture of {len(student.experts)} experts, exported as full (fused) "
                        "weights, one unet per expert; drop --lora")
    if lora and not is_lora:
        raise UserError("--lora: this run's student trains full weights, so it has no LoRA adapters to export; "
                        "drop --lora (or train with student.lora_rank > 0)")
    if fuse and not is_lora:
        raise UserError("--fuse merges LoRA adapters, but this run's student trains full weights; drop --fuse")
    if lora:
        return "lora"
    return "fused" if is_lora else "full"


def check_exportable(student, meta: dict | None = None) -> dict:
    """The scheduler config for ``student``, after checking that the exported scheduler runs exactly
    the student's sampling rule: same timesteps (as the exported pipeline sets them), same boundary
    condition. ``meta`` (from ``loaders.load_run``) marks text-to-image students."""
    info = (meta or {}).get("t2i") if (meta or {}).get("kind") == "text-to-image" else None
    backbone = student.denoiser.backbone
    if info is not None and student.steps_per_expert:
        raise UserError("export of a mixture-of-experts student supports UNet2DModel students; sample this one with "
                        "`stepdistill sample RUN_DIR` instead")
    if info is not None:
        check_backbone(student, info)
    elif type(backbone).__name__ == "GuidedUNet2DModel" and student.steps_per_expert:
        raise UserError("export of a mixture of experts with a w input is not supported; sample it with "
                        "`stepdistill sample RUN_DIR --guidance W` instead")
    elif type(backbone).__name__ not in ("UNet2DModel", "GuidedUNet2DModel"):
        raise UserError(f"export supports UNet2DModel students (unconditional or class-conditional) and students of "
                        f"text-to-image pipelines; this one is {type(backbone).__name__}; sample it with "
                        "`stepdistill sample RUN_DIR` instead")
    own = student.custom_times
    if own and info is not None:
        raise UserError("export of a text-to-image student with its own sampling times (student.timesteps) is not "
                        "supported yet; sample it with `stepdistill sample RUN_DIR`, or train with "
                        "student.timesteps unset (scm: objective.intermediate_t=null)")
    cfg = student_scheduler_config(student.schedule, student.boundary, student.steps,
                                   student.first_timestep, student.sampler, own)
    if info is not None:
        ts = pipeline_timesteps(cfg, info.kind, student.steps, info.latent_size)
    elif own and cfg["_class_name"] == "EDMEulerScheduler":  # pipeline.py steps through the student's own sigmas,
        # which must lie in the range of the scheduler whose preconditioning it applies (student.timesteps' rule)
        ts = check_timesteps(student.schedule, student.timesteps.tolist(), student.steps, student.sampler)
    else:
        sched = make_scheduler(cfg)
        # as ConsistencyModelPipeline and pipeline.py call it (the student's own times passed in)
        set_student_timesteps(sched, student.steps, student.timesteps.tolist() if own else None)
        # EDM's timesteps are c_noise values; its pipeline steps through the sigmas
        ts = (sched.sigmas[:-1] if cfg["_class_name"] == "EDMEulerScheduler" else sched.timesteps).to(torch.float64)
    # a flow student's own times reach the scheduler as float32 sigmas through its shift: equal to rounding
    rounded = own and cfg["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    if not (torch.allclose(ts, student.timesteps.cpu(), rtol=1e-5, atol=0) if rounded
            else torch.equal(ts, student.timesteps.cpu())):
        raise UserError(f"the student was trained at timesteps {student.timesteps.tolist()} but its exported scheduler "
                        f"runs {ts.tolist()} for {student.steps} steps; retrain with this version of stepdistill")
    if cfg["_class_name"] == "LCMScheduler":
        c_skip, c_out = boundary_scalings(cfg, ts)
        if student.boundary == "lcm":
            s_skip, s_out = student.boundary_scalings(ts)
            ok = torch.allclose(c_skip, s_skip, rtol=0, atol=1e-12) and torch.allclose(c_out, s_out, rtol=0, atol=1e-12)
        else:
            ok = bool(c_skip.max() <= BOUNDARY_TOL and (1 - c_out).abs().max() <= BOUNDARY_TOL)
        if not ok:
            raise UserError(f"the exported scheduler's boundary condition does not match the student's at timesteps "
                            f"{ts.tolist()} (a timestep 0 without a boundary condition?); train fewer steps")
    return cfg


def _write_pipeline(tmp: Path, unet, cfg: dict, steps: int, custom: bool, sampler: str = "renoise",
                    gamma: float = 0.3, experts=(), expert_bounds=None, guidance_scale: float = 1.0,
                    timesteps=None) -> None:
    """``experts``: the later experts of a mixture-of-experts student (unet_2, unet_3, ...), which the
    custom pipeline runs at times t <= their ``expert_bounds`` (``experts.py``). A guidance-distilled
    student (``guided_unet``) writes its unet and its ``guidance_embedding`` component, with the
    component's code, run at ``guidance_scale`` by default. ``timesteps``: a student's own sampling
    times (``trained_timesteps``, passed to the scheduler at the trained step count)."""
    import diffusers

    scheduler = make_scheduler(cfg)
    guided = type(unet).__name__ == "GuidedUNet2DModel"
    if guided:
        unet, embedding = unet.unet, unet.embedding
        embedding.save_pretrained(tmp / "guidance_embedding", safe_serialization=True)
        shutil.copyfile(GUIDANCE_FILE, tmp / "guidance_embedding" / GUIDANCE_FILE.name)
    if custom:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        shutil.copyfile(PIPELINE_FILE, tmp / "pipeline.py")
        index = {"_class_name": ["pipeline", PIPELINE_CLASS], "_diffusers_version": diffusers.__version__,
                 "trained_steps": int(steps), "renoise": sampler == "renoise", "gamma": float(gamma),
                 "scheduler": ["diffusers", type(scheduler).__name__],
                 "unet": ["diffusers", type(unet).__name__]}
        if guided:
            index["guidance_embedding"] = [GUIDANCE_FILE.stem, "GuidanceEmbedding"]
            index["guidance_scale"] = float(guidance_scale)
        for i, expert in enumerate(experts, start=2):
            expert.save_pretrained(tmp / f"unet_{i}", safe_serialization=True)
            index[f"unet_{i}"] = ["diffusers", type(expert).__name__]
        if experts:
            index["expert_bounds"] = [float(b) for b in expert_bounds]
        if timesteps is not None:
            index["trained_timesteps"] = [float(v) for v in timesteps]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    else:
        # diffusers' own ConsistencyModelPipeline runs a (class-conditional) UNet2DModel through any
        # scheduler's step: unet(x, t, class_labels), then scheduler.step(..., generator), no guidance
        diffusers.ConsistencyModelPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)


def export_student(student, meta: dict, out, *, lora: bool = False, fuse: bool = False,
                   eval_report: dict | None = None) -> Path:
    """Write ``student`` (with ``meta`` from ``loaders.load_run``) to the folder ``out``, atomically."""
    mode = _mode(student, lora, fuse)
    cfg = check_exportable(student, meta)
    out = Path(out)
    check_replaceable(out)
    t2i = meta.get("kind") == "text-to-image"
    backbone = student.denoiser.backbone
    conditional = not t2i and (student.denoiser.null_class is not None or bool(backbone.config.get("num_class_embeds")))
    # ConsistencyModelPipeline needs scale_model_input and init_noise_sigma, which flow schedulers
    # lack; and no unconditional/class-conditional pipeline of diffusers loads LoRA adapters
    guided = type(backbone).__name__ == "GuidedUNet2DModel"
    own = student.custom_times  # its own times: passed to the scheduler by pipeline.py
    custom = not t2i and (mode == "lora" or bool(student.steps_per_expert) or guided or own
                          or cfg["_class_name"] not in ("LCMScheduler", "DDIMScheduler"))
    # version 1 readers would load only the first expert of a mixture: those exports are version 2; earlier
    # readers would sample a student with its own times on the scheduler's grid: version 4
    version = (OWN_TIMES_VERSION if own else GUIDED_VERSION if guided else FORMAT_VERSION if student.steps_per_expert
               else 1)
    record = {"format_version": version, "steps": int(student.steps), "boundary": student.boundary,
              "sampler": student.sampler, "gamma": getattr(student, "gamma", 0.3), "first_timestep": student.first_timestep,
              "timesteps": student.timesteps.tolist(), "mode": mode, "experts": student.steps_per_expert, "pipeline": PIPELINE_CLASS if custom else "ConsistencyModelPipeline",
              "num_classes": int(meta.get("num_classes") or 0) if conditional else 0,
              "null_class": meta.get("null_class") if conditional else None,
              "class_names": meta.get("class_names"), "teacher": meta.get("teacher"),
              "objective": meta.get("objective"), "training_step": meta.get("step"), "ema": meta.get("ema"),
              "checkpoint": meta.get("checkpoint"), "guidance_embedding": guided, "custom_timesteps": own,
              "teacher_sigma_min": cfg.get("_teacher_sigma_min")}  # EDM: the scheduler's sigma_min ends the student's grid
    if guided:
        record["guidance_scale"] = sum(trained_w_range(meta)) / 2  # the middle, as t2i.recommended_guidance
    if t2i:
        record.update(t2i_record(student, meta))
    header, _ = front_matter(record, str(meta.get("objective") or "unknown"))  # reads the teacher folder's card
    record = portable(record)  # shared as it is: no absolute local paths
    with atomic_folder(out) as tmp:
        if t2i:
            record["left_out"] = write_t2i(tmp, student, meta, cfg, mode)
        else:
            convert = {"full": lambda b: b, "fused": merged_copy, "lora": base_copy}[mode]
            more = [convert(e.backbone) for e in student.experts[1:]]
            _write_pipeline(tmp, convert(backbone), cfg, student.steps, custom, student.sampler or "renoise",
                            getattr(student, "gamma", 0.3), more, student.expert_bounds.tolist(),
                            record.get("guidance_scale", 1.0), student.timesteps.tolist() if own else None)
            if mode == "lora":
                save_lora(backbone, tmp)
        scrub_local_paths(tmp)  # diffusers and transformers record where a component was loaded from
        image = write_samples(student, meta, record, tmp)
        (tmp / "README.md").write_text(model_card(record, portable(meta), cfg, portable(eval_report), custom=custom,
                                                  header=header, image=image))
        record["files"] = _file_stats(tmp)  # what a later export may replace (check_replaceable)
        (tmp / EXPORT_META).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out


def _file_stats(folder: Path) -> dict[str, list[int]]:
    """Every file under ``folder`` (its relative path) with its size and modification time."""
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != EXPORT_META:
            st = f.stat()
            out[f.relative_to(folder).as_posix()] = [st.st_size, st.st_mtime_ns]
    return out


def check_replaceable(out: Path) -> None:
    """An export goes into a new or empty folder, or replaces an earlier export whose files are all
    as that export wrote them: a file added or edited there since is never deleted."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; pass a new or empty folder")
    if not any(out.iterdir()):
        return
    if not (out / EXPORT_META).is_file():
        raise UserError(f"--out {str(out)!r} exists and is not an earlier export; pass a new or empty folder")
    written = json.loads((out / EXPORT_META).read_text()).get("files")
    if written is None:
        raise UserError(f"--out {str(out)!r} is an export that did not record its files, so files added there cannot "
                        "be told apart; pass a new folder (or remove that one yourself)")
    found = _file_stats(out)
    added = sorted(set(found) - set(written))
    edited = sorted(k for k in set(found) & set(written) if found[k] != written[k])
    if added or edited:
        names = ", ".join((added + edited)[:5]) + (", ..." if len(added) + len(edited) > 5 else "")
        raise UserError(f"--out {str(out)!r} is an earlier export holding files it did not write or that changed since "
                        f"({names}); re-exporting replaces the folder and would delete them: move them out, or pass "
                        "a new folder")


def export_run(run_dir, out, *, lora: bool = False, fuse: bool = False, checkpoint: str | None = None,
               eval_json: str | None = None, ema: bool = True) -> Path:
    """Export the newest (or the named) checkpoint's EMA student (``ema=False``: its raw weights) of a
    ``stepdistill train`` run."""
    from ..train import checkpoint as ckpt
    from ..loaders import is_run_dir, load_run

    run = Path(run_dir)
    if not is_run_dir(run):
        raise UserError(f"{str(run)!r} is not a run folder (config.yaml + checkpoints/); pass the output_dir of a "
                        "`stepdistill train` run")
    if checkpoint is None and ckpt.latest(run) is None:
        raise UserError(f"run {str(run)!r} has no complete checkpoint to export; train it first (a checkpoint is "
                        "written every checkpoint_every steps and at the end)")
    # the in-training evaluations score the EMA student: not the raw weights' numbers
    report = _read_eval(eval_json) if eval_json else (_run_eval(run) if ema else None)
    student, meta = load_run(run, checkpoint=checkpoint, ema=ema)
    return export_student(student, meta, out, lora=lora, fuse=fuse, eval_report=report)


def _read_eval(path: str) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"--eval-json {path!r} could not be read ({err}); pass the file that "
                        "`stepdistill eval ... --json FILE` wrote") from None
    if "results" not in report or "protocol" not in report:
        raise UserError(f"--eval-json {path!r} has no results/protocol; pass the file `stepdistill eval --json` wrote")
    return report


def _run_eval(run: Path) -> dict | None:
    """The newest in-training evaluation of the run (metrics.jsonl), with the protocol its config fixed."""
    log = run / "metrics.jsonl"
    if not log.is_file():
        return None
    last = None
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "eval" in rec:
            last = rec
    if last is None:
        return None
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run / "config.yaml")
    protocol = {"source": "in-training evaluation (metrics.jsonl)", "training_step": last.get("step"),
                "detector": cfg.get("eval_detector"), "reference": cfg.get("eval_ref"),
                "num_samples": cfg.get("eval_samples"), "seed": cfg.get("seed"),
                "student_noise": "fresh noise between steps from torch.Generator().manual_seed(0)"}
    return {"results": [{"steps": None, **last["eval"]}], "protocol": protocol}
