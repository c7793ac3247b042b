"""Run logs: ``metrics.jsonl`` (one JSON line per log step), accelerate trackers and progress (a rich
bar on a terminal, plain lines elsewhere; only on the main process)."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path


class MetricsLog:
    """Append-only JSON lines. On resume, lines past the resumed step (written by a run that was
    killed before its next checkpoint) are dropped, so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = Path(path), enabled
        if enabled and self.path.is_file():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        keep.append(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(k + "\n" for k in keep))
            os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: _finite_or_str(v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean, sort_keys=True) + "\n")


def _finite_or_str(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _finite_or_str(x) for k, x in v.items()}
    return v


class Progress:
    """Training progress on the main process: a rich bar with losses and it/s on a terminal; where
    stdout is not a terminal (nohup, SLURM, a pipe) a plain line per log step instead (step, losses,
    it/s, ETA), flushed as it is written; nothing when disabled."""

    def __init__(self, total: int, start: int, enabled: bool, stream=None):
        self.stream = stream or sys.stdout
        self.enabled = bool(enabled)
        self.total, self.start, self.t0 = int(total), int(start), time.perf_counter()
        self._bar = None
        if self.enabled and self.stream.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeRemainingColumn

            self._bar = RichProgress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, info: str = "") -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif self.enabled and info:  # a log step, off a terminal
            done, dt = step - self.start, time.perf_counter() - self.t0
            eta = (self.total - step) * dt / done if done > 0 else float("nan")
            when = (f"{int(eta) // 3600}:{int(eta) % 3600 // 60:02d}:{int(eta) % 60:02d}" if math.isfinite(eta)
                    else "-:--:--")
            self.stream.write(f"step {step}/{self.total} {info} eta {when}\n")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


class Window:
    """Loss sums and timing between two log lines; ``aside`` holds the seconds spent on previews,
    evaluation, collapse checks and checkpoints, which the training rate leaves out."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums: dict = {}  # tensors stay on the device until a log line (no per-step sync)
        self.counts: dict[str, int] = {}
        self.steps = 0
        self.skipped = 0
        self.aside = 0.0
        self.t0 = time.perf_counter()

    def add(self, key: str, value) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value
        self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: float(self.sums[k]) / self.counts[k] for k in self.sums}

    def rate(self) -> float:
        """Training iterations per second, the time set aside excluded."""
        dt = time.perf_counter() - self.t0 - self.aside
        return self.steps / dt if dt > 0 else float("nan")
