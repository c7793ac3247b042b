"""SIGINT and SIGTERM as a request to stop: the trainer finishes the update in flight, writes its
final checkpoint (atomically) and exits with 128 + the signal's number. A second signal stops at
once (``KeyboardInterrupt``); a checkpoint it cuts short is a temporary folder the next start
removes, so the newest complete checkpoint stays the newest."""
from __future__ import annotations

import signal
import threading


class StopSignals:
    """Within the block, ``received`` is the first stop signal that came (or None)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: signal.Signals | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # the second one: stop now
            raise KeyboardInterrupt
        self.received = signal.Signals(signum)
        print(f"\n{self.received.name}: stopping after this update with a checkpoint (again to stop at once)",
              flush=True)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
