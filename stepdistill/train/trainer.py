"""The one trainer for every objective (on accelerate).

Each outer iteration ("step") runs every phase the objective declares, ``repeats`` updates each
(DMD2's two time-scale rule, Yin et al. 2024b, sec. 4.2), from the phase's ``start`` iteration on. An update draws ``grad_accum`` fresh
micro-batches, calls ``objective.losses(phase, nets, batch)``, sums the per-sample means of every
key not starting with "_", backpropagates, clips, and steps only the optimizers of
``phase.trains``. A non-finite loss or gradient skips the update. After the phases the student's
EMA is updated and ``objective.on_step_end`` runs.

Data parallelism is accelerate's DDP over one module that runs a phase (``PhaseStep``): objectives
call any method of any network, so the only forward DDP sees is the phase itself. Networks a phase
does not use are "unused parameters" for that forward (``find_unused_parameters=True``).
Per-sample randomness and data order are functions of (seed, step) split by rank (see
``randomness`` and ``batches``), which makes 1 and N processes agree and resume exact.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..config import save_resolved, to_dict
from ..cache import teacher_hash
from .. import resources
from ..errors import Interrupted, UserError
from ..runfolder import FolderClaim
from ..objectives import Objective
from ..objectives.base import BuildContext
from . import checkpoint as ckpt
from .batches import BatchStream
from .config import RESUME_FIXED, RESUME_FREE
from .ema import StudentEMA
from .logging import MetricsLog, Progress, Window
from .lr_decay import run_decay
from .monitors import Monitors
from .randomness import derive_seed
from .signals import StopSignals
from .setup import build_nets, load_teacher_and_data, optim_for, trained_nets, updates_per_iteration


class TrainingDiverged(UserError):
    """Too many non-finite updates in a row."""


@contextlib.contextmanager
def only_training(params: dict[str, list], trains):
    """Networks a phase does not train are frozen for its forward *and* backward passes: the
    generator phase backpropagates through the fake score without computing its weight gradients,
    and gradient checkpointing replays each block's forward during backward under the same
    requires_grad flags (toggling them between the two is an error). ``params``: trainable
    parameters by network name."""
    others = [p for n, ps in params.items() if n not in trains for p in ps]
    for p in others:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in others:
            p.requires_grad_(True)


class PhaseStep(nn.Module):
    """The forward DDP wraps: one phase's losses."""

    def __init__(self, nets: nn.Module, objective: Objective):
        super().__init__()
        self.nets = nets
        self.objective = objective

    def forward(self, phase: str, batch: dict) -> dict[str, torch.Tensor]:
        return self.objective.losses(phase, self.nets, batch)


def _leaves(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_changes(old: DictConfig, new: DictConfig) -> list[tuple[str, object, object]]:
    """(key, old value, new value) of every setting that differs, keys missing on one side aside
    (a field added to the schema since the run started)."""
    a = _leaves(OmegaConf.to_container(old, resolve=True))
    b = _leaves(OmegaConf.to_container(new, resolve=True))
    out = []
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        if key == "teacher" and x is not None and y is not None:  # the same folder, however named (digits16)
            x, y = (os.path.abspath(resources.teacher(str(v))) for v in (x, y))
        if key == "student.sampler":  # runs written before the option re-noised
            x, y = x or "renoise", y or "renoise"
        if key != "output_dir" and x != y:
            out.append((key, a[key], b[key]))
    return out


def check_resume(out: Path, cfg: DictConfig, allow_changes: bool = False) -> list[tuple[str, object, object]]:
    """Refuse to resume a run folder whose checkpoints belong to an incompatible config (RESUME_FIXED),
    or, unless ``allow_changes``, to other settings than its config.yaml shows (RESUME_FREE aside).
    Returns every difference (the caller keeps the old config.yaml beside the new one)."""
    old_file = out / "config.yaml"
    if ckpt.latest(out) is None or not old_file.is_file():
        return []
    changes = config_changes(OmegaConf.load(old_file), cfg)
    for key, a, b in changes:
        if key in RESUME_FIXED or key.startswith(tuple(k + "." for k in RESUME_FIXED)):
            raise UserError(f"{str(out)!r} holds checkpoints of a run with {key}={a!r}, but this config has "
                            f"{key}={b!r}; resuming would mix two runs. Use a new output_dir, or set {key}={a!r}")
    changed = [c for c in changes if c[0].split(".")[0] not in RESUME_FREE]
    if changed and not allow_changes:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed[:8]) + ("; ..." if len(changed) > 8 else "")
        raise UserError(f"{str(out)!r} holds a run trained with other settings ({shown}); resuming would continue it "
                        "under settings its config.yaml does not show. Use a new output_dir, or pass "
                        "--allow-changes to continue with the new values (the old config is kept beside it)")
    return changes


def _teacher_location(name: str) -> str:
    """Where the teacher was read from: an absolute folder (a shipped teacher's inside the package),
    or a hub name unchanged."""
    where = resources.teacher(name)
    return os.path.abspath(where) if os.path.exists(where) else where


def check_teacher(folder: Path, fingerprint: str | None, teacher: str) -> None:
    """A resume on other teacher weights than the checkpoint's (same path, replaced files) is refused."""
    was = ckpt.read_json(folder / "trainer.json").get("teacher_hash")
    if was is not None and fingerprint is not None and was != fingerprint:
        raise UserError(f"teacher {teacher!r} has changed since checkpoint {str(folder)!r} was written (weights "
                        f"{was} then, {fingerprint} now); resuming would distil another teacher. Restore the "
                        "teacher's files, or start a new output_dir")


def _seed_process(seed: int, rank: int) -> None:
    s = derive_seed(seed, "process", rank)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


class Trainer:
    def __init__(self, cfg: DictConfig, objective: Objective, *, allow_changes: bool = False):
        """``allow_changes``: resume a run whose settings differ from its config.yaml (the old one is
        kept beside it); without it such a resume is refused with the differences."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.cfg, self.objective = cfg, objective
        self.out = Path(cfg.output_dir)
        self.acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu, log_with=cfg.log_with,
                               project_dir=str(self.out),
                               kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.main = self.acc.is_main_process
        launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if launched != self.world:  # e.g. an FSDP launch config on a machine without an accelerator
            raise UserError(f"launched as {launched} processes, but accelerate set up {self.world} "
                            f"({self.acc.distributed_type.value}): each would train alone into the same output_dir. "
                            "accelerate's FSDP and DeepSpeed need GPUs; on CPU launch with --multi_gpu and cpu=true "
                            "(data parallel over gloo)")
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") and \
                self.acc.distributed_type.value != "FSDP":  # accelerate fell back (on CPU: to DDP) without saying
            raise UserError(f"the launch config asks for FSDP, but accelerate set up {self.acc.distributed_type.value}: "
                            "FSDP needs GPUs here; drop the FSDP config (plain --multi_gpu) or run on GPUs")
        if cfg.batch_size % self.world:
            raise UserError(f"batch_size={cfg.batch_size} does not split over {self.world} processes; "
                            f"use a multiple of {self.world}")
        self.changes: list = []
        self.claim = FolderClaim(self.out) if self.main else None  # refuses a folder another process writes
        try:
            self._build(cfg, objective, allow_changes)
        except BaseException:
            self.release(failed=True)  # a failed start leaves no empty output_dir behind
            raise

    def release(self, failed: bool = False) -> None:
        """Drop the claim on the run folder (the process's exit drops it too)."""
        if self.claim is not None:
            self.claim.release(failed=failed)

    def _build(self, cfg: DictConfig, objective: Objective, allow_changes: bool) -> None:
        if self.main:
            ckpt.clean_partial(self.out)
            self.changes = check_resume(self.out, cfg, allow_changes)
        self.acc.wait_for_everyone()
        teacher, data = load_teacher_and_data(cfg, objective, device=self.acc.device,
                                              main_first=self.acc.main_process_first,
                                              log=print if self.main else (lambda *a, **k: None))
        self.meta = dict(getattr(teacher, "meta", {}) or {})
        self.teacher_hash = teacher_hash(teacher) if self.main else None  # before any adapter is added
        self.text_to_image = self.meta.get("kind") == "text-to-image"
        if self.text_to_image:
            pass  # conditions come from the text cache
        elif getattr(teacher, "null_class", None) is None:
            data.labels = None  # an unconditional teacher takes no labels
        elif data.labels is None:  # a class-conditional teacher on unlabelled data: its null class
            data.labels = torch.full((len(data),), int(teacher.null_class), dtype=torch.long)
        self.data = data
        context = BuildContext.for_data(data, log=print if self.main else (lambda *a, **k: None))
        t0 = time.perf_counter()
        with self.acc.main_process_first():  # what build writes (a teacher-output cache) is made once
            built = build_nets(cfg, objective, teacher, context)
        self.setup_seconds = time.perf_counter() - t0  # counted in max_minutes, not in it/s
        self.nets, self.student, self.teacher = built.nets, built.student, built.teacher
        self.nets.to(self.acc.device)
        self.phases = objective.phases()
        self.trained = trained_nets(objective)
        for name in self.trained:
            self.nets.get(name).train()
        from ..attention import apply_attention, resolve_attention

        self.attention = resolve_attention(cfg.attention, cfg.cpu)
        apply_attention(self.nets, self.attention)
        if cfg.gradient_checkpointing:  # every backbone: frozen ones too are backpropagated through (SiD's
            for m in self.nets.modules():  # teacher and fake score in the generator phase, LADD's teacher)
                if hasattr(m, "enable_gradient_checkpointing") and getattr(m, "_supports_gradient_checkpointing", False):
                    m.enable_gradient_checkpointing()
        self.params = {n: [p for p in self.nets.get(n).parameters() if p.requires_grad] for n in self.trained}
        for n, ps in self.params.items():
            if not ps:
                raise UserError(f"network {n!r} has no trainable parameters")
        self.opts, self.scheds, self.clip, self.last_lr, self.decay = {}, {}, {}, {}, {}
        from diffusers.optimization import get_scheduler

        for n in self.trained:
            o = optim_for(cfg, n)
            self.opts[n] = torch.optim.AdamW(self.params[n], lr=o.lr, betas=(o.beta1, o.beta2),
                                             weight_decay=o.weight_decay, eps=o.eps)
            per_step = updates_per_iteration(self.phases, n)
            self.scheds[n] = get_scheduler(o.lr_schedule, self.opts[n], num_warmup_steps=o.warmup_steps,
                                           num_training_steps=max(1, cfg.max_steps * per_step))
            self.clip[n] = math.inf if o.max_grad_norm is None else float(o.max_grad_norm)
            self.decay[n] = (o.lr_decay, float(o.lr_decay_floor))  # optim.<net>.lr_decay (_apply_lr_factor)
            self.last_lr[n] = self.scheds[n].get_last_lr()[0]  # the lr of the coming update (see _apply_lr_factor)
        self.model = self.acc.prepare(PhaseStep(self.nets, objective))
        self.scaler = getattr(self.acc, "scaler", None)
        self.ema = StudentEMA(self.student, cfg.ema) if cfg.ema.decay is not None else None
        self.stream = BatchStream(data, cfg.batch_size, cfg.seed, self.rank, self.world, self.acc.device,
                                  workers=cfg.data_workers)
        self.step = self.draws = self.skipped_total = self.nonfinite_in_row = 0
        self.seconds_before = self.seconds = 0.0  # training wall time, summed over resumes (max_minutes)
        self.time_progress = 0.0  # share of the budget after setup spent, the same on every process (_should_stop)
        self.setup_before = self.setup_total = 0.0  # seconds earlier starts (and all starts) spent in setup:
                                                    # teacher-output caches, counted in train_seconds
        self.switches: dict[str, int] = {}  # phase fraction -> the iteration it was reached at (Phase.*_fraction)
        self.updates = {n: 0 for n in self.trained}
        last = ckpt.latest(self.out)
        if last is not None:
            if self.main:
                check_teacher(last, self.teacher_hash, cfg.teacher)
            self.load(last)
            if self.main:
                print(f"resuming from {last} (step {self.step})", flush=True)
        else:
            _seed_process(cfg.seed, self.rank)
        self.resumed_from = last
        if self.main:
            if self.changes:  # the settings the checkpoints so far were trained with stay readable
                os.replace(self.out / "config.yaml", self.out / f"config.before-{ckpt.folder_name(self.step)}.yaml")
            save_resolved(cfg, self.out)
        self.log = MetricsLog(self.out / "metrics.jsonl", self.step, self.main)
        if cfg.log_with:
            self.acc.init_trackers("stepdistill", config=_flat(to_dict(cfg)))
        self.monitors = Monitors(self)

    # -- one update ------------------------------------------------------------------------------
    def _only_training(self, phase):
        return only_training(self.params, phase.trains)

    def _forward_backward(self, phase, repeat: int, window: Window, bad_loss: torch.Tensor) -> torch.Tensor:
        A = self.cfg.grad_accum
        for micro in range(A):
            batch = self.stream.batch(self.draws, step=self.step, phase=phase.name, repeat=repeat, micro=micro)
            self.draws += 1
            sync = micro == A - 1 or self.world == 1
            with contextlib.nullcontext() if sync else self.acc.no_sync(self.model):
                losses = self.model(phase.name, batch)
                total = None
                for k, v in losses.items():
                    m = v.float().mean()
                    window.add(f"{phase.name}/{k}", m.detach())
                    if not k.startswith("_"):
                        total = m if total is None else total + m
                if total is None:
                    raise UserError(f"objective {self.objective.name!r}: phase {phase.name!r} returned no loss "
                                    "(every key starts with '_')")
                bad_loss = torch.maximum(bad_loss, (~torch.isfinite(total.detach())).float())
                self.acc.backward(total / A)
        return bad_loss

    def _apply_lr_factor(self, n: str) -> None:
        """The LR schedule's value times the objective's factor (``Objective.lr_factor``) and the decay
        over the run's progress (``optim.<net>.lr_decay``: ``progress()`` as the step began, so a run
        its time budget ends reaches the floor at its end, where a schedule over max_steps would not)."""
        f = self.objective.lr_factor(n) * run_decay(*self.decay[n], self.progress())
        for group, lr in zip(self.opts[n].param_groups, self.scheds[n].get_last_lr(), strict=True):
            group["lr"] = lr * f
        self.last_lr[n] = self.opts[n].param_groups[0]["lr"]  # what the log reports: the schedule's step resets it

    def _update(self, phase, repeat: int, window: Window) -> bool:
        bad_loss = torch.zeros((), device=self.acc.device)
        with self._only_training(phase):
            bad_loss = self._forward_backward(phase, repeat, window, bad_loss)
        if self.scaler is not None:
            for n in phase.trains:
                self.scaler.unscale_(self.opts[n])
        bad_grad = torch.zeros((), device=self.acc.device)
        for n in phase.trains:
            norm = torch.nn.utils.clip_grad_norm_(self.params[n], self.clip[n])
            bad_grad = torch.maximum(bad_grad, (~torch.isfinite(norm)).float())
            window.add(f"{phase.name}/_grad_norm/{n}", norm.detach())  # before clipping (logged only)
        flags = torch.stack([bad_loss, bad_grad])
        if self.world > 1:
            flags = self.acc.reduce(flags, reduction="sum")
        bad_loss_any, bad_grad_any = (bool(f > 0) for f in flags.tolist())
        ok = not (bad_loss_any or bad_grad_any)
        if self.scaler is not None:
            # fp16 loss scaling: an overflow is the scaler's business (it skips and lowers the scale)
            for n in phase.trains:
                self._apply_lr_factor(n)
                self.scaler.step(self.opts[n])
            self.scaler.update()
        elif ok:
            for n in phase.trains:
                self._apply_lr_factor(n)
                self.opts[n].step()
        if ok:
            for n in phase.trains:
                self.scheds[n].step()
                self.updates[n] += 1
            self.nonfinite_in_row = 0
        else:
            window.skipped += 1
            self.skipped_total += 1
            if bad_loss_any or self.scaler is None:
                self.nonfinite_in_row += 1
        self.model.zero_grad(set_to_none=True)
        if self.nonfinite_in_row >= self.cfg.max_nonfinite_in_a_row:
            good = ckpt.latest(self.out)  # checkpoints are written only after a good update (see checkpoint())
            raise TrainingDiverged(
                f"training stopped at step {self.step}: {self.nonfinite_in_row} updates in a row had a non-finite "
                f"loss or gradient (phase {phase.name!r}); the last good checkpoint is "
                f"{str(good) if good else 'none (no checkpoint written yet)'}, where re-running resumes; lower the "
                "learning rate (with --allow-changes), clip gradients (optim.<net>.max_grad_norm) or use "
                "mixed_precision=bf16 instead of fp16")
        return ok

    # -- the loop --------------------------------------------------------------------------------
    def train_step(self, window: Window) -> None:
        """One outer iteration: every phase's updates in their declared ratio, the EMA, the
        objective's end-of-step hook. No I/O: logging, previews and checkpoints are the loop's."""
        stepped_student = False
        self._resolve_fractions()
        self.objective.set_progress(self.progress())
        for ph in self.phases:
            if ph.fresh_moments_after and self._bounds(ph)[1] == self.step:
                self._drop_moments(ph)
        for ph in self.phases:
            start, stop = self._bounds(ph)
            if self.step < start or (stop is not None and self.step >= stop):
                continue
            for r in range(ph.repeats):
                if self._update(ph, r, window) and "student" in ph.trains:
                    stepped_student = True
        if stepped_student and self.ema is not None:
            self.ema.step()
        self.objective.on_step_end(self.nets, self.step + 1)
        self.step += 1
        window.steps += 1

    def train(self) -> dict:
        try:
            with StopSignals() as signals:
                return self._train(signals)
        finally:
            self.release()

    def _train(self, signals: StopSignals) -> dict:
        cfg = self.cfg
        window = Window()
        bar = Progress(cfg.max_steps, self.step, cfg.progress and self.main)
        last_saved = self.step if self.resumed_from is not None else None
        due = False  # a checkpoint is owed: written at the first step whose update was good
        # the budget counts this start's setup (the objective's teacher-output caches, sampled or
        # loaded in build) as it counted a cache sampled inside the first step: a preset pays for its cache
        start = time.perf_counter() - self.setup_seconds
        self.setup_total = self.setup_before + self.setup_seconds
        if self.main and self.setup_seconds >= 1.0:
            self.log.write({"step": self.step, "setup_seconds": round(self.setup_seconds, 3)})
        self.setup_seconds = 0.0
        try:
            while self.step < cfg.max_steps and not self._should_stop(start, signals):
                self.train_step(window)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    rec = self._log(window)
                    bar.update(self.step, " ".join(f"{k}={v:.4g}" for k, v in rec["losses"].items()) +
                               f" {rec['it_s']:.2f} it/s")
                    window.reset()
                else:
                    bar.update(self.step)
                aside = time.perf_counter()  # previews, eval, checks and checkpoints: not in it/s
                if cfg.preview_every and self.step % cfg.preview_every == 0:
                    self.monitors.preview()
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    self.monitors.evaluate()
                if cfg.collapse_every and self.step % cfg.collapse_every == 0:
                    self.monitors.watch_collapse()
                due = due or self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps
                if due and self.checkpoint():
                    due, last_saved = False, self.step
                window.aside += time.perf_counter() - aside
        finally:
            bar.close()
            self.stream.close()
        if last_saved != self.step:  # stopped early, max_steps reached by an earlier run, or max_steps=0
            self.checkpoint()
        self.acc.wait_for_everyone()
        if cfg.log_with:
            self.acc.end_training()
        release_process_group()
        latest = ckpt.latest(self.out)
        if signals.received is not None:
            raise Interrupted(f"stopped by {signals.received.name} at step {self.step}; the newest checkpoint is "
                              f"{str(latest) if latest else 'none'}: re-run the same command to resume",
                              128 + int(signals.received))
        return {"step": self.step, "skipped": self.skipped_total, "checkpoint": str(latest)}

    def _should_stop(self, start: float, signals: StopSignals) -> bool:
        """Whether the wall-clock budget (summed over resumes) is spent or a stop signal came; every
        process agrees, so none stops alone while the others wait in a collective. Also agrees on the
        share of the time budget spent (``time_progress``), which phase fractions switch on: the share of
        the time left after setup (teacher-output caches, a fixed cost of the machine), so a warm-up of a
        fifth of the run is a fifth of the training time on a fast machine, a slow one or a shorter budget."""
        self.seconds = self.seconds_before + time.perf_counter() - start
        budget = None if self.cfg.max_minutes is None else 60.0 * self.cfg.max_minutes
        out_of_time = budget is not None and self.seconds >= budget
        stop = float(out_of_time or signals.received is not None)
        setup = self.setup_total
        progress = 0.0 if not budget else 1.0 if budget <= setup else (self.seconds - setup) / (budget - setup)
        if self.world > 1:
            both = self.acc.reduce(torch.tensor([stop, progress], device=self.acc.device), reduction="max")
            stop, progress = float(both[0]), float(both[1])
        self.time_progress = progress
        return bool(stop)

    # -- phases sized as shares of the run (Phase.start_fraction / stop_fraction) -------------------
    def progress(self) -> float:
        """The share of the run done: the larger of step / max_steps and the share of the time budget
        left after setup that training has spent (``_should_stop``)."""
        return max(self.time_progress, self.step / max(self.cfg.max_steps, 1))

    def _resolve_fractions(self) -> None:
        """Record the iteration at which the run's progress first reaches each phase fraction."""
        progress = self.progress()
        for ph in self.phases:
            for f in (ph.start_fraction, ph.stop_fraction):
                if f is not None and repr(float(f)) not in self.switches and progress >= f:
                    self.switches[repr(float(f))] = self.step

    def _drop_moments(self, ph) -> None:
        """At the iteration a ``Phase.fresh_moments_after`` phase stops: the optimizer state (Adam's moments
        and step counts) of the nets it trains is dropped, as a new run loading only their weights would
        start; the learning-rate schedules run on. A checkpoint holds the state after this iteration, so a
        resume drops it exactly where the uninterrupted run did."""
        for n in ph.trains:
            self.opts[n].state.clear()
        if self.main:
            print(f"step {self.step}: phase {ph.name!r} has ended; {', '.join(ph.trains)} go on with fresh "
                  "optimizer moments", flush=True)

    def _bounds(self, ph) -> tuple[float, float | None]:
        """A phase's (start, stop) iterations, a fraction not yet reached counting as never."""
        return ph.span(self.switches)

    def healthy(self) -> bool:
        """Whether the newest update was applied and every trained weight (and the EMA) is finite:
        the only state a checkpoint may hold (a NaN streak never rotates the good ones out)."""
        if self.nonfinite_in_row > 0:
            return False
        tensors = [p for ps in self.params.values() for p in ps]
        tensors += list(self.ema.shadow().values()) if self.ema is not None else []
        return all(bool(torch.isfinite(t).all()) for t in tensors)

    def checkpoint(self) -> Path | bool:
        """Write a checkpoint if the state is healthy; False (and nothing written) otherwise."""
        if not self.healthy():
            if self.main:
                print(f"step {self.step}: no checkpoint while updates are skipped or weights are non-finite",
                      flush=True)
            return False
        saved = self.save() or True
        self.monitors.plot()
        return saved

    def _log(self, window: Window) -> dict:
        means = window.means()
        keys = sorted(means)
        if self.world > 1 and keys:
            vals = self.acc.reduce(torch.tensor([means[k] for k in keys], device=self.acc.device), "mean")
            means = dict(zip(keys, vals.tolist()))
        rec = {"step": self.step, "losses": means, "lr": dict(self.last_lr),
               "it_s": window.rate(), "skipped": window.skipped, "skipped_total": self.skipped_total,
               "train_seconds": round(self.seconds, 3), "aside_seconds": round(window.aside, 3)}
        self.log.write(rec)
        if self.cfg.log_with:
            flat = {f"loss/{k}": v for k, v in means.items()}
            flat.update({f"lr/{n}": v for n, v in rec["lr"].items()}, it_s=rec["it_s"], skipped=rec["skipped"])
            self.acc.log(flat, step=self.step)
        return rec

    # -- checkpoints -------------------------------------------------------------------------------
    def _teacher_tensors(self) -> set[int]:
        """The teacher's own (frozen) tensors, never checkpointed; adapters a LoRA fake score adds
        to the teacher's backbone are trainable and are saved with the fake score."""
        frozen = [p for p in self.teacher.parameters() if not p.requires_grad]
        return {t.data_ptr() for t in frozen + list(self.teacher.buffers())}

    def net_state(self) -> dict[str, torch.Tensor]:
        skip = self._teacher_tensors()
        lora = bool(self.cfg.student.lora_rank)
        out = {}
        for name, mod in self.nets.named_children():
            if name == "teacher":
                continue
            if name == "student" and lora:
                out.update({f"student.{k}": p for k, p in mod.named_parameters() if p.requires_grad})
                continue
            out.update({f"{name}.{k}": v for k, v in mod.state_dict().items() if v.data_ptr() not in skip})
        return out

    def save(self) -> Path | None:
        tmp = ckpt.temp_folder(self.out, self.step)
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        ckpt.save_rng(tmp, self.rank)
        self.acc.wait_for_everyone()
        final = None
        if self.main:
            ckpt.save_tensors(self.net_state(), tmp / "nets.safetensors")
            if self.ema is not None:
                ckpt.save_tensors(self.ema.shadow(), tmp / "ema.safetensors")
            ckpt.save_torch({"optim": {n: o.state_dict() for n, o in self.opts.items()},
                             "sched": {n: s.state_dict() for n, s in self.scheds.items()},
                             "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                             "objective": self.objective.state_dict()}, tmp / "optim.pt")
            ckpt.write_json({"step": self.step, "draws": self.draws, "updates": self.updates,
                             "skipped_total": self.skipped_total, "nonfinite_in_row": self.nonfinite_in_row,
                             "train_seconds": self.seconds, "setup_seconds": self.setup_total,
                             "phase_switches": self.switches,
                             "ema": self.ema.scalars() if self.ema is not None else None,
                             "teacher": _teacher_location(self.cfg.teacher), "teacher_hash": self.teacher_hash,
                             "objective": self.objective.name,
                             "student_steps": self.student.steps, "world_size": self.world,
                             "student_timesteps": self.student.timesteps.tolist(),
                             "student_custom_times": self.student.custom_times},
                            tmp / "trainer.json")
            final = ckpt.commit(tmp, self.cfg.keep_checkpoints)
        self.acc.wait_for_everyone()
        return final

    def _apply_settings(self, n: str) -> None:
        """The config's optimizer settings over the ones a checkpoint restored (the optimizer's and
        scheduler's state dicts carry the old lr, betas, eps and weight decay): a resume with a lower
        learning rate trains with it. Unchanged settings give back exactly the restored values."""
        o, sched = optim_for(self.cfg, n), self.scheds[n]
        sched.base_lrs = [float(o.lr)] * len(self.opts[n].param_groups)
        for group, lmbda in zip(self.opts[n].param_groups, sched.lr_lambdas, strict=True):
            group.update(initial_lr=float(o.lr), lr=float(o.lr) * lmbda(sched.last_epoch), betas=(o.beta1, o.beta2),
                         eps=o.eps, weight_decay=o.weight_decay)
        sched._last_lr = [g["lr"] for g in self.opts[n].param_groups]
        self.last_lr[n] = sched.get_last_lr()[0]

    def load(self, folder: Path) -> None:
        state = ckpt.read_json(folder / "trainer.json")
        trained = state.get("student_timesteps")  # earlier checkpoints: the scheduler's grid
        if (trained is not None and trained != self.student.timesteps.tolist()) or (
                trained is None and self.student.custom_times):
            raise UserError(f"checkpoint {str(folder)!r} trained the student at timesteps "
                            f"{trained if trained is not None else 'of its scheduler'}, but this config samples it at "
                            f"{self.student.timesteps.tolist()}; resume with the run's own times (set student.timesteps, "
                            "or for scm objective.intermediate_t=null on runs from before it) or use a new output_dir")
        tensors = ckpt.load_tensors(folder / "nets.safetensors")
        expected = self.net_state()
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise UserError(f"checkpoint {str(folder)!r} lacks {len(missing)} tensors (e.g. {missing[0]!r}); it was "
                            "written by a different configuration; use a new output_dir")
        with torch.no_grad():
            for k, v in expected.items():
                v.copy_(tensors[k].to(v.device, v.dtype))
        if self.ema is not None:
            self.ema.load(ckpt.load_tensors(folder / "ema.safetensors"), state["ema"])
        rest = ckpt.load_torch(folder / "optim.pt")
        for n in self.trained:
            self.opts[n].load_state_dict(rest["optim"][n])
            self.scheds[n].load_state_dict(rest["sched"][n])
            self._apply_settings(n)
        if self.scaler is not None and rest.get("scaler"):
            self.scaler.load_state_dict(rest["scaler"])
        self.objective.load_state_dict(rest["objective"])
        self.step, self.draws = int(state["step"]), int(state["draws"])
        self.updates = {n: int(state["updates"].get(n, 0)) for n in self.trained}
        self.skipped_total, self.nonfinite_in_row = int(state["skipped_total"]), int(state["nonfinite_in_row"])
        self.seconds_before = self.seconds = float(state.get("train_seconds", 0.0))
        self.setup_before = self.setup_total = float(state.get("setup_seconds", 0.0))
        self.switches = {str(k): int(v) for k, v in (state.get("phase_switches") or {}).items()}
        ckpt.load_rng(folder, self.rank)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


def release_process_group() -> None:
    """Tear the process group down once every process is done (torch asks for it before exit): left to
    interpreter shutdown, a gloo process group's threads were once found still running, and the
    process aborted (SIGABRT, "terminate called without an active exception") after its last step."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

