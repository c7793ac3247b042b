"""Progress of a counted job outside the training loop (teacher-output caches, text and latent
caches, sampling, feature extraction): count, rate and ETA, so no long phase runs silent.

On a terminal a rich bar (removed when done); off a terminal (nohup, SLURM, a pipe) a plain line when
the job starts, at most every ``every`` seconds while it runs, and when it ends, each flushed as written.
"""
from __future__ import annotations

import math
import sys
import time


def clock(seconds: float) -> str:
    """``h:mm:ss``, or ``-:--:--`` where unknown."""
    if not math.isfinite(seconds):
        return "-:--:--"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Counter:
    """``with Counter("teacher-output cache", 1000, "pairs") as c: ... c.advance(n)``."""

    def __init__(self, label: str, total: int, unit: str = "", *, enabled: bool = True, stream=None,
                 every: float = 30.0):
        self.label, self.total, self.unit = label, int(total), unit
        self.enabled, self.stream, self.every = bool(enabled), stream or sys.stdout, float(every)
        self.done, self._bar = 0, None

    def __enter__(self) -> "Counter":
        self.t0 = self._last = time.perf_counter()
        if not self.enabled:
            return self
        if self.stream.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(), TextColumn(self.unit),
                                 TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), transient=True)
            self._task = self._bar.add_task(self.label, total=self.total, rate="")
            self._bar.start()
        else:
            self._line(f"{self.total} {self.unit}".rstrip() + " to do")
        return self

    def advance(self, n: int) -> None:
        self.done += int(n)
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=f"{self.rate():.3g}/s")
        elif now - self._last >= self.every and self.done < self.total:
            self._last = now
            self._line(self.status())

    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.done / dt if dt > 0 else float("nan")

    def status(self) -> str:
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        return f"{self.done}/{self.total} {self.unit}".rstrip() + f", {rate:.3g}/s, eta {clock(eta)}"

    def __exit__(self, kind, err, tb) -> None:
        if self._bar is not None:
            self._bar.stop()
        if self.enabled and kind is None:
            took = time.perf_counter() - self.t0
            line = f"{self.done} {self.unit}".rstrip() + f" in {clock(took)} ({self.rate():.3g}/s)"
            if self._bar is not None:
                self.stream.write(f"{self.label}: {line}\n")
                self.stream.flush()
            else:
                self._line(line)

    def _line(self, text: str) -> None:
        self.stream.write(f"{self.label}: {text}\n")
        self.stream.flush()


__all__ = ["Counter", "clock"]
