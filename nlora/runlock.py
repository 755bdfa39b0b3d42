"""One writer per run directory. A run holds an exclusive lock on RUN_DIR/.nlora.lock (flock, through filelock)
from its first change to the directory until it ends; a second `nlora run` or `nlora resume` on the same directory
is refused, naming the holder (pid, host, start time, recorded beside the lock). The operating system drops the
lock when its process dies, however it dies, so a crashed run never blocks its own resumption (the files it
leaves are taken over); a run that ends removes them."""

from __future__ import annotations

import json
import os
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import NloraError

LOCK_FILE = ".nlora.lock"
HOLDER_FILE = ".nlora.lock.json"  # who holds the lock: read by the process that is refused


class RunLock:
    """`with RunLock() as lock: ... lock.acquire(root) ...`: taken where the run is about to change `root` (so a
    run refused for any reason has written nothing), released when the block ends, however it ends."""

    def __init__(self):
        self._lock: FileLock | None = None
        self._root: Path | None = None

    def acquire(self, root: str | Path) -> None:
        root = Path(root)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise NloraError(f"output dir {root} cannot be created: {e.strerror or e}") from None
        lock = FileLock(str(root / LOCK_FILE), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise NloraError(f"run directory {root} is in use by another nlora process ({_holder(root)}); wait "
                             "for it to end or stop it, then run again") from None
        self._lock, self._root = lock, root
        # a plain write: read only to name the holder, and a half-written one reads as not recorded yet
        (root / HOLDER_FILE).write_text(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": [Path(sys.argv[0]).name, *sys.argv[1:]]}))

    def release(self) -> None:
        if self._lock is None:
            return
        # Removed while still held: a process that takes the lock after this, on a new lock file, finds a run
        # that is done writing; one that opened the old file is refused until the release just below.
        (self._root / HOLDER_FILE).unlink(missing_ok=True)
        (self._root / LOCK_FILE).unlink(missing_ok=True)
        self._lock.release()
        self._lock = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(root: Path) -> str:
    try:
        holder = json.loads((root / HOLDER_FILE).read_text())
        return f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):  # it is between taking the lock and writing its record
        return "its pid is not recorded yet"
