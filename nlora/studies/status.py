"""`nlora study status DIR`: the study's cells by state (done, running, interrupted, failed, queued on SLURM,
pending, waiting for a dev choice) and the time left: the training steps of the cells not done times the measured
cost of a step (nlora.studies.plan), shared by the cells running at once."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .execute import saved_study
from .plan import duration, plan_study


def study_status(study_dir: Path) -> dict[str, Any]:
    study = saved_study(study_dir)
    plan = plan_study(study, study_dir)
    queued = slurm_states(study_dir)
    states: dict[str, list[str]] = {}
    for c in plan.cells:
        state = "waiting for dev" if c.cell.pending else c.state
        if state in ("pending", "interrupted") and c.cell.id in queued:
            state = f"slurm {queued[c.cell.id].lower()}"
        states.setdefault(state, []).append(c.cell.id)
    todo = [c for c in plan.cells if c.state != "done"]
    left = plan.seconds(todo)
    at_once = max(1, len(states.get("running", [])))
    return {"study": study.name, "dir": str(study_dir), "total": len(plan.cells), "states": states,
            "seconds_left": None if left is None else left / at_once, "at_once": at_once,
            "seconds_per_step": plan.seconds_per_step}


def slurm_states(study_dir: Path) -> dict[str, str]:
    """{cell id: SLURM state} of the study's jobs in the queue (none where SLURM is not installed)."""
    if shutil.which("squeue") is None:
        return {}
    try:
        from .slurm import queued_jobs
    except ImportError:  # submitit not installed: no job of this study can be queued
        return {}
    return queued_jobs(study_dir)


ORDER = ("done", "running", "slurm running", "slurm pending", "interrupted", "failed", "pending", "waiting for dev")


def format_status(status: dict[str, Any]) -> str:
    states = status["states"]
    done = len(states.get("done", []))
    lines = [f"study {status['study']}: {done} of {status['total']} cells done ({status['dir']})"]
    for state in sorted(states, key=lambda s: ORDER.index(s) if s in ORDER else len(ORDER)):
        lines.append(f"  {state}: {len(states[state])}")
        if state in ("running", "interrupted", "failed") or state.startswith("slurm"):
            lines += [f"    {cell_id}" for cell_id in states[state]]
    if done < status["total"]:
        if status["seconds_left"] is None:
            lines.append("time left: not known until a cell finishes")
        else:
            lines.append(f"time left: about {duration(status['seconds_left'])} at {status['at_once']} cell(s) at "
                         "once (measured seconds per step × steps left)")
    if states.get("interrupted"):
        lines.append("interrupted cells resume where they stopped on the next `nlora study run`")
    return "\n".join(lines)
