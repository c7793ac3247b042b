"""``stepdistill export RUN_DIR --out DIR [--lora | --fuse]``: the run's (EMA) student as a diffusers folder."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a trained student as a diffusers pipeline folder",
        description="Write the newest checkpoint's (EMA) student of a `stepdistill train` run as a diffusers "
                    "folder whose scheduler runs the student's own timesteps, with a model card (README.md). "
                    "Text-to-image students load as their teacher's own pipeline class (StableDiffusionPipeline, "
                    "StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline) with the teacher's text "
                    "encoders and VAE copied; UNet2DModel students as diffusers' ConsistencyModelPipeline, or, for "
                    "LoRA and flow students, with their sampling loop as pipeline.py (trust_remote_code=True).")
    p.add_argument("run_dir", help="output_dir of a `stepdistill train` run")
    p.add_argument("--out", required=True, help="folder to write (new, empty, or an earlier export)")
    p.add_argument("--lora", action="store_true",
                   help="LoRA students: write the adapters (pytorch_lora_weights.safetensors, diffusers' LoRA format) "
                        "on the teacher's weights; load with pipe.load_lora_weights(DIR)")
    p.add_argument("--fuse", action="store_true",
                   help="LoRA students: merge the adapters into the weights (the default for a LoRA student)")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder name (default: the newest), e.g. step-00000500")
    p.add_argument("--no-ema", dest="ema", action="store_false",
                   help="export the raw student weights instead of their EMA")
    p.add_argument("--eval-json", default=None,
                   help="results of `stepdistill eval ... --json FILE` to put in the model card (default: the run's "
                        "newest in-training evaluation, if any)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export import export_run

    out = export_run(args.run_dir, args.out, lora=args.lora, fuse=args.fuse, checkpoint=args.checkpoint,
                     eval_json=args.eval_json, ema=args.ema)
    print(f"wrote {out}")
    return 0
