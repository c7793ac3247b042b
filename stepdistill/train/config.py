"""The training config: every field has a default and a comment; ``None`` disables a feature.

``batch_size`` is the *global* batch of one micro-step, split evenly over the processes, so the
same config gives the same run (to float tolerance) on 1 or N processes. The objective's own
hyperparameters live under ``objective:`` (``name`` plus the fields of its ``Config`` dataclass).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from ..generator import StudentConfig


@dataclass
class OptimConfig:
    lr: float = 5e-5                 # AdamW learning rate
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    eps: float = 1e-8
    lr_schedule: str = "constant_with_warmup"   # any diffusers.optimization.get_scheduler name
    warmup_steps: int = 0            # in updates of this network
    max_grad_norm: Optional[float] = 1.0        # gradient clipping; None = off
    lr_decay: Optional[str] = None   # "cosine" | "linear": the lr times a decay over the run's progress (the larger
                                     # of step / max_steps and the share of max_minutes spent after setup), so a
                                     # run its time budget ends decays to the floor at its end too, which a
                                     # schedule over max_steps cannot; None = off. Use with a constant schedule.
                                     # A resume with a longer max_steps or max_minutes moves the run's end, and
                                     # the decay follows: the lr rises to the new progress's value
    lr_decay_floor: float = 0.0      # the decay's end, a fraction of the schedule's lr


@dataclass
class EMAConfig:
    decay: Optional[float] = 0.999   # EMA of the student's trainable weights; None = no EMA
    update_after_step: int = 0       # plain copy before this many steps
    halflife_ratio: Optional[float] = None   # EDM's ramp-up: the half-life is at most this fraction of the
                                     # EMA updates so far (EDM and SiD: 0.05); None = diffusers' schedule
    warmup: bool = False             # diffusers' EMA warm-up (decay grows as 1 - (1 + step/gamma)^-power)


@dataclass
class TextConfig:
    """Text-to-image teachers only: how prompts become the cached conditions."""
    cache: Optional[str] = None          # text-embedding cache folder; None = <output_dir>/text_cache
    negative_prompt: str = ""            # the unconditional branch of CFG ("" = the pipelines' default)
    max_sequence_length: Optional[int] = None   # T5 tokens for SD3 / FLUX; None = the pipeline's default
    embedded_guidance: float = 3.5       # FLUX-dev's guidance embedding (its pipeline's default)
    dtype: str = "fp16"                  # storage of the cached embeddings: fp16 | bf16 | fp32
    encode_batch: int = 16               # prompts per text-encoder call while filling the cache


@dataclass
class TrainConfig:
    teacher: str = "digits16"   # teacher folder, hub name, or a shipped teacher (digits16); not copied into checkpoints
    data: str = "digits-train"       # any stepdistill.data.load_images spec; for text-to-image teachers a prompt
                                     # list (.txt/.csv/.jsonl) or image-text pairs (stepdistill.t2i.prompts)
    resolution: Optional[int] = None # text-to-image: training resolution in pixels; None = the teacher's default
    teacher_dtype: Optional[str] = None  # frozen teacher weights: fp32 | bf16 | fp16; None = bf16 under
                                     # mixed_precision=bf16 (fp16 under fp16), else fp32
    text: TextConfig = field(default_factory=TextConfig)
    latent_cache: Optional[str] = None   # text-to-image pairs: VAE latents cache; None = <output_dir>/latent_cache
    output_dir: str = "runs/train"   # run folder: config.yaml, checkpoints/, metrics.jsonl, previews/
    objective: Dict[str, Any] = field(default_factory=lambda: {"name": ""})  # name + its Config fields
    student: StudentConfig = field(default_factory=StudentConfig)
    optim: Dict[str, OptimConfig] = field(default_factory=lambda: {"student": OptimConfig()})  # per network
    seed: int = 0
    max_steps: int = 1000            # outer iterations (every phase of the objective once)
    max_minutes: Optional[float] = None  # wall-clock budget summed over resumes; stops (with a checkpoint)
                                     # at whichever of max_steps and max_minutes comes first; None = off
    batch_size: int = 64             # global batch per micro-step, split over processes
    grad_accum: int = 1              # micro-steps per update
    mixed_precision: str = "no"      # "no" | "bf16" | "fp16" (fp16 uses loss scaling)
    gradient_checkpointing: bool = False
    attention: str = "auto"          # "auto" (xformers where CUDA and xformers are present, else SDPA) | "sdpa" |
                                     # "xformers"
    cpu: bool = False                # force CPU even when an accelerator is present
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint_every: int = 500      # steps; a checkpoint is also written at the end
    keep_checkpoints: int = 3        # newest K kept
    log_every: int = 10              # steps per metrics.jsonl line
    preview_every: Optional[int] = 500   # steps per preview grid; None = off
    preview_n: int = 16              # samples in a preview grid (fixed noise and labels)
    eval_every: Optional[int] = None     # steps per FID evaluation; None = off
    eval_samples: int = 500
    eval_detector: str = "digits"   # stepdistill.eval detector name
    eval_ref: str = "digits"        # reference images (a data spec) or a stats .npz
    collapse_every: Optional[int] = None  # steps per mode-collapse check (diagnostics.collapse_check); None = off
    collapse_samples: int = 256      # student samples and real images compared (same conditions)
    collapse_min_ratio: float = 0.5  # warn when the samples' feature diversity falls below this fraction of real data's
    log_with: Optional[str] = None   # accelerate tracker: "tensorboard" | "wandb"; None = only metrics.jsonl
    max_nonfinite_in_a_row: int = 20 # stop after this many consecutive skipped (NaN/Inf) updates
    progress: bool = True            # rich progress bar (only on a TTY and the main process)
    data_workers: int = 0            # DataLoader worker processes reading batches ahead (0 = in the main process);
                                     # > 0 also reads an image folder from disk per batch instead of into memory


#: keys whose change makes a checkpoint meaningless for the new config: refused on resume
RESUME_FIXED = ("teacher", "resolution", "objective.name", "student.steps", "student.boundary", "student.first_timestep",
                "student.sampler",
                "student.lora_rank",
                "student.time_cond_proj_dim", "student.lora_target_modules")

#: top-level sections a resume may change without --allow-changes: how long, how often and where to
#: report, none of which changes what an update computes
RESUME_FREE = ("max_steps", "max_minutes", "checkpoint_every", "keep_checkpoints", "log_every", "preview_every",
               "preview_n", "eval_every", "eval_samples", "eval_detector", "eval_ref", "collapse_every",
               "collapse_samples", "collapse_min_ratio", "log_with", "max_nonfinite_in_a_row", "progress", "attention",
               "data_workers")
