"""Evaluate a model at several step counts and print the table with its protocol."""
from __future__ import annotations

from ..errors import UserError
from .harness import generate_images, protocol_block, protocol_line, resolve_ref, score_images
from .sources import load_source


def evaluate_model(model: str, *, steps: list[int] | None, num: int, detector, ref: str, seed: int = 0,
                   batch: int = 100, sampler: str = "ddim", guidance: float = 1.0, device="cpu",
                   console=None, prompts: list[str] | None = None, clip=None, resolution: int | None = None,
                   ema: bool = True) -> dict:
    """{"model", "protocol", "results": [one dict of metrics per step count]}. A set of images is
    scored once (``steps`` is then ignored); ``num`` then caps how many are used. ``steps=None``:
    a student's trained step count, or 1, 2, 4 and 50 for a teacher. Text-to-image models sample
    ``prompts`` (cycled over ``num``); ``clip`` (a CLIP detector) adds the CLIP score of each image
    against its prompt. ``ema=False`` scores a run's raw student weights instead of their EMA."""
    import time

    source = load_source(model, sampler=sampler, guidance=guidance, prompts=prompts, resolution=resolution, ema=ema)
    ref_stats = resolve_ref(ref, detector, batch)
    rows = []
    if source.kind == "images":
        images, labels = source.images[:num], None if source.labels is None else source.labels[:num]
        row = {"steps": None, "nfe": None, **score_images(images, labels, detector, ref_stats, seed=seed, batch=batch)}
        rows.append(row)
        num = len(images)
    else:
        for s in steps or source.default_steps:
            gen = source.sampler_for(s)
            t0 = time.perf_counter()
            images, labels = generate_images(gen, num, source.sample_shape, seed=seed, batch=batch,
                                             num_classes=source.num_classes, device=device,
                                             progress=console is not None, description=f"{s} steps")
            gen_s = time.perf_counter() - t0
            texts = None if source.prompts is None else [source.prompts[int(i)] for i in labels]
            if texts is not None:
                labels = None  # prompt indices, not classes: no class accuracy
            row = {"steps": s, "nfe": getattr(gen, "nfe", s),
                   **score_images(images, labels, detector, ref_stats, seed=seed, batch=batch),
                   "seconds_generate": round(gen_s, 3)}
            if clip is not None:
                if texts is None:
                    raise UserError("--clip scores images against their prompts; this model takes no prompts")
                row["clip_score"] = clip.clip_score(images, texts)
            rows.append(row)
            if console is not None:
                console.print(f"  {s:>4} steps: FID {row['fid']:.3f}", highlight=False)
    extra = {"model": model, "model_kind": source.kind, **source.info}
    if clip is not None:
        extra["clip"] = {"model": clip.name, "weights_sha256": clip.weights_sha256}
    return {"model": model, "protocol": protocol_block(detector, ref_stats, num=num, seed=seed, extra=extra),
            "results": rows}


def print_results(report: dict, console) -> None:
    from rich.table import Table

    cols = ["steps", "nfe", "fid", "kid", "kid_std", "precision", "recall", "class_accuracy", "clip_score"]
    cols = [c for c in cols if any(r.get(c) is not None for r in report["results"])]
    table = Table(title=f"{report['model']}")
    for c in cols:
        table.add_column(c, justify="right")
    for r in report["results"]:
        table.add_row(*[fmt_value(r.get(c)) for c in cols])
    console.print(table)
    console.print(protocol_line(report["protocol"]), highlight=False, soft_wrap=True)


def fmt_value(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.5f}" if abs(v) < 0.1 else f"{v:.3f}"
    return str(v)
