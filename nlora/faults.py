"""Fault-injection points for the crash/resume tests: with NLORA_FAULT="EVENT:N" in the environment, the process
kills itself (SIGKILL, no clean-up) at the N-th occurrence of EVENT. Events: train_step, task_trained,
eval_batch, file_write, adapter_save and checkpoint_save (the folder written, not yet moved into place), dir_swap
(between the two renames of replacing a folder), model_saved (a whole model in place, the earlier ones not yet
removed: nlora.full_model), ledger_update (a study's ledger about to be rewritten: nlora.studies.ledger).
Without the variable this is a no-op."""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def fault_point(event: str) -> None:
    plan = os.environ.get("NLORA_FAULT")
    if not plan:
        return
    name, _, nth = plan.partition(":")
    if name != event:
        return
    _counts[event] = _counts.get(event, 0) + 1
    if _counts[event] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
