"""What the trainer watches besides the losses: preview grids (with the fake score's view where an
objective trains one), in-training FID, the mode-collapse watchdog, and the VAE decode that turns a
text-to-image student's latents into pixels for them. Main process only; none of it changes training
state (the random streams are forked), so a run resumes identically with or without them.
"""
from __future__ import annotations

import contextlib
import math
import random
import warnings

import numpy as np
import torch

from . import checkpoint as ckpt
from .randomness import derive_seed


class Monitors:
    def __init__(self, trainer):
        self.tr = trainer
        self._vae = None
        self._eval_warned = self._collapse_warned = False
        self._detector = None

    def fixed_inputs(self, n: int):
        g = torch.Generator().manual_seed(derive_seed(self.tr.cfg.seed, "preview"))
        noise = torch.randn((n, *self.tr.data.sample_shape), generator=g)
        cond = None
        if self.tr.text_to_image:  # the first prompts of the data, the same at every preview
            cond = self.tr.data.rows(torch.arange(n) % len(self.tr.data))[1]
        elif getattr(self.tr.teacher, "null_class", None) is not None:
            k = int(self.tr.meta.get("num_classes") or self.tr.teacher.null_class)
            cond = {"class_labels": torch.arange(n) % max(k, 1)}
        return noise, cond

    @torch.no_grad()
    def sample_student(self, noise, cond) -> torch.Tensor:
        dev = self.tr.acc.device
        cond = None if cond is None else {k: v.to(dev) for k, v in cond.items()}
        g = torch.Generator(device=dev).manual_seed(derive_seed(self.tr.cfg.seed, "preview-steps"))
        ctx = self.tr.ema.applied() if self.tr.ema is not None else contextlib.nullcontext()
        with ctx, self.tr.acc.autocast():
            was = self.tr.student.training
            self.tr.student.eval()
            x = self.tr.student(noise.to(dev), cond, generator=g)
            self.tr.student.train(was)
        return x.float().cpu()

    def preview(self) -> None:
        if not self.tr.main:
            return
        from ..images import save_grid

        noise, cond = self.fixed_inputs(self.tr.cfg.preview_n)
        x = self.to_pixels(self.sample_student(noise, cond))
        save_grid(x, self.tr.out / "previews" / f"{ckpt.folder_name(self.tr.step)}.png",
                  nrow=int(math.ceil(math.sqrt(len(x)))))
        if self.tr.nets.get("fake_score") is not None:  # rows: student | teacher x0 | fake-score x0
            from ..diagnostics import score_preview

            dev = self.tr.acc.device
            cond = None if cond is None else {k: v.to(dev) for k, v in cond.items()}
            score_preview(self.tr.nets, noise.to(dev), cond,
                          self.tr.out / "previews" / f"{ckpt.folder_name(self.tr.step)}-scores.png",
                          decode=self.to_pixels if self.tr.text_to_image else None,
                          generator=torch.Generator(device=dev).manual_seed(int(self.tr.cfg.seed)))

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Samples as images: latents of text-to-image teachers go through the VAE decoder (loaded
        on first use in the teacher's dtype, on the accelerator only while it decodes)."""
        if not self.tr.text_to_image:
            return x
        if self._vae is None:  # kept in host memory between previews: the accelerator holds only training state
            from ..t2i.pipeline import load_vae

            self._vae = load_vae(self.tr.teacher.info, device="cpu", dtype=self.tr.teacher.dtype)
        from ..t2i.pipeline import decode_latents

        try:
            return decode_latents(self._vae.to(self.tr.acc.device), x)
        finally:
            self._vae.to("cpu")

    def evaluate(self) -> None:
        if not self.tr.main:
            return
        if self.tr.text_to_image:
            if not self._eval_warned:
                warnings.warn("eval_every: in-training FID is for pixel-space teachers; score a text-to-image student "
                              "with `stepdistill eval` (CLIP score, FID against your reference images)")
                self._eval_warned = True
            return
        try:
            from ..eval.harness import evaluate_generator
        except ImportError as err:
            if not self._eval_warned:
                warnings.warn(f"eval_every is set but the eval harness is unavailable ({err}); skipping eval")
                self._eval_warned = True
            return
        dev = self.tr.acc.device

        def generate(noise, labels):
            cond = None if labels is None else {"class_labels": labels.to(dev)}
            return self.tr.student(noise.to(dev), cond, generator=torch.Generator(device=dev).manual_seed(0)).float()

        nc = int(self.tr.meta.get("num_classes") or 0) if getattr(self.tr.teacher, "null_class", None) is not None else 0
        with torch.random.fork_rng(devices=[]), contextlib.ExitStack() as stack:
            if self.tr.ema is not None:
                stack.enter_context(self.tr.ema.applied())
            stack.enter_context(torch.no_grad())
            stack.enter_context(self.tr.acc.autocast())
            np_state, py_state = np.random.get_state(), random.getstate()
            self.tr.student.eval()
            try:
                result = evaluate_generator(generate, self.tr.cfg.eval_samples, self.tr.cfg.eval_detector, self.tr.cfg.eval_ref,
                                            seed=self.tr.cfg.seed, sample_shape=tuple(self.tr.data.sample_shape),
                                            num_classes=nc, device=dev)
            finally:
                self.tr.student.train()
                np.random.set_state(np_state)
                random.setstate(py_state)
        rec = {"step": self.tr.step, "eval": {k: float(v) for k, v in result.items()
                                            if isinstance(v, (int, float)) and not isinstance(v, bool)}}
        self.tr.log.write(rec)
        if self.tr.cfg.log_with:
            self.tr.acc.log({f"eval/{k}": v for k, v in rec["eval"].items()}, step=self.tr.step)

    def watch_collapse(self) -> dict | None:
        """Mode-collapse watchdog (issue of DMD without its regression term, Yin et al., 2024, sec. 3.3):
        the student's samples and as many real images with the same conditions, compared by mean
        pairwise distance in the eval detector's features (latents for text-to-image teachers);
        logged as ``collapse`` in metrics.jsonl, with a warning below ``collapse_min_ratio``."""
        if not self.tr.main:
            return None
        from ..diagnostics import collapse_check

        n = min(int(self.tr.cfg.collapse_samples), len(self.tr.data))
        g = torch.Generator().manual_seed(derive_seed(self.tr.cfg.seed, "collapse"))
        real, cond = self.tr.data.rows(torch.randperm(len(self.tr.data), generator=g)[:n])
        if self.tr.text_to_image and not self.tr.data.has_images:
            if not self._collapse_warned:
                warnings.warn("collapse_every: a prompt list has no real latents to compare with; give image-text pairs")
                self._collapse_warned = True
            return None
        noise = torch.randn((n, *self.tr.data.sample_shape), generator=g)
        with torch.random.fork_rng(devices=[]):
            fake = self.sample_student(noise, cond)
        if self.tr.text_to_image:
            f_fake, f_real = fake.flatten(1), real.flatten(1)
        else:
            from ..eval.detectors import get_detector
            from ..images import to_uint8

            if self._detector is None:
                self._detector = get_detector(self.tr.cfg.eval_detector, device=str(self.tr.acc.device))
            f_fake = self._detector.features(to_uint8(fake))
            f_real = self._detector.features(to_uint8(real))
        res = collapse_check(f_fake, f_real, self.tr.cfg.collapse_min_ratio)
        self.tr.log.write({"step": self.tr.step, "collapse": {"diversity_ratio": float(res["diversity_ratio"]),
                                                       "collapsed": bool(res["collapsed"]), "samples": n}})
        return res

    def plot(self) -> None:
        """Refresh RUN/curves.png from metrics.jsonl (``stepdistill plot``); a failure only warns."""
        if not self.tr.main or not (self.tr.out / "metrics.jsonl").is_file():
            return
        from ..errors import UserError
        from ..plots import plot_run

        try:
            plot_run(self.tr.out)
        except (UserError, OSError, ValueError) as err:
            warnings.warn(f"curves.png not refreshed: {err}")
