"""Claiming an output folder for one writer (``stepdistill train`` and ``pretrain``).

``FolderClaim(folder)`` takes an exclusive ``flock`` on ``folder/.lock`` and writes the holder's PID and
host into it. A second process on the same folder is refused with that PID. The kernel drops the
lock when its holder exits, however it exits (SIGKILL included), so a killed run never blocks its
own resume; the file is left in place (unlinking it would let two processes lock two different
files of the same name). ``flock`` is advisory and local: it holds between processes of one
machine and on file systems that support it (most network file systems do through fcntl locks).

A folder that the claim creates is removed again by ``release(failed=True)`` while it holds nothing
but empty folders and the lock file, so a start that fails leaves nothing behind; a folder that
existed before is never removed, and no file in it is touched.

A forked child (a DataLoader worker, a ``fork`` multiprocessing process) would share the lock's open
file description and so hold the lock until it exits, after its parent was killed too; every claim's
descriptor is therefore closed in the child right after ``fork`` (``os.register_at_fork``), so the
lock lives exactly as long as the process that took it.
"""
from __future__ import annotations

import os
import socket
import weakref
from pathlib import Path

from .errors import UserError

LOCK_FILE = ".lock"
_HELD: "weakref.WeakSet[FolderClaim]" = weakref.WeakSet()


def _drop_claims_in_child() -> None:
    """After ``fork``: the child closes its copies of the parent's lock descriptors (module docstring)."""
    for claim in list(_HELD):
        if claim._close.detach() is not None:
            os.close(claim._fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_claims_in_child)


class FolderClaim:
    """An exclusive, process-lifetime claim on ``folder`` (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, what: str = "output_dir"):
        import fcntl

        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"{what} {str(self.folder)!r} is a file, not a folder; pass a folder path")
        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "a process that has not written its PID yet"
            os.close(fd)
            raise UserError(f"{what} {str(self.folder)!r} is in use by another stepdistill process ({holder}); wait "
                            "for it to finish or stop it, or pass another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        self._close = weakref.finalize(self, os.close, fd)  # a claim dropped without release() still unlocks
        _HELD.add(self)

    def release(self, failed: bool = False) -> None:
        """Drop the lock; after a failed start, remove the folder if this claim created it and it is
        still empty but for the lock file and empty folders."""
        if not self._close.alive:
            return
        os.ftruncate(self._fd, 0)  # no stale PID for the next reader
        self._close()
        if failed and self.created:
            remove_if_empty(self.folder)


def remove_if_empty(folder: Path) -> bool:
    """Remove ``folder`` when it holds only empty folders and a lock file; True if it is gone."""
    walk = list(os.walk(folder))
    if any(files and (Path(root) != folder or files != [LOCK_FILE]) for root, _, files in walk):
        return False
    (folder / LOCK_FILE).unlink(missing_ok=True)
    for root, _, _ in sorted(walk, key=lambda w: -len(Path(w[0]).parts)):  # deepest first
        os.rmdir(root)
    return True


__all__ = ["FolderClaim", "remove_if_empty", "LOCK_FILE"]
