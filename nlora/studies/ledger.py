"""The study's ledger (STUDY_DIR/ledger.json): each cell's configuration digest and state, written by the cell's
own process under a file lock, atomically, so a study killed mid-write keeps the previous ledger whole. The run
directories stay the truth of what was trained; the ledger says what each cell means and how it last ended.

    {"cells": {"test/n-lora/order1/seed42": {"digest": "...", "state": "done", "seconds": 812.4, "steps": 1200,
               "started": "...", "ended": "...", "host": "...", "pid": 123, "job": "456_0", "error": null}}}

States: running (a process has it; it may have died since, which `live_state` tells), done, failed.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path
from typing import Any

from filelock import FileLock

from ..errors import NloraError
from ..faults import fault_point
from ..io import write_json_atomic

LEDGER_FILE = "ledger.json"
STATES = ("running", "done", "failed")


class Ledger:
    def __init__(self, study_dir: str | Path):
        self.path = Path(study_dir) / LEDGER_FILE
        self._lock = FileLock(str(self.path) + ".lock")

    def read(self) -> dict[str, dict[str, Any]]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise NloraError(f"{self.path}: not a study ledger ({e}); it is written atomically, so it was changed "
                             "by hand") from None
        return data.get("cells", {})

    def update(self, cell_id: str, **values: Any) -> dict[str, Any]:
        """Merge `values` into the cell's entry; returns it."""
        with self._lock:
            cells = self.read()
            entry = {**cells.get(cell_id, {}), **values}
            cells[cell_id] = entry
            fault_point("ledger_update")
            write_json_atomic(self.path, {"cells": dict(sorted(cells.items()))})
        return entry

    def start(self, cell_id: str, digest: str, job: str | None = None) -> None:
        self.update(cell_id, digest=digest, state="running", started=now(), ended=None, host=socket.gethostname(),
                    pid=os.getpid(), job=job, error=None)

    def finish(self, cell_id: str, **values: Any) -> None:
        self.update(cell_id, state="done", ended=now(), error=None, **values)

    def fail(self, cell_id: str, error: str) -> None:
        self.update(cell_id, state="failed", ended=now(), error=error)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def live_state(entry: dict[str, Any] | None) -> str:
    """pending, running, interrupted (a running entry whose process on this host is gone), done or failed. A
    running entry of another host (a cluster node) is taken at its word."""
    if not entry:
        return "pending"
    state = entry.get("state")
    if state == "running" and entry.get("host") == socket.gethostname() and not _alive(entry.get("pid")):
        return "interrupted"
    return state if state in STATES else "pending"


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
