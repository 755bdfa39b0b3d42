"""The runs a report reads: each run directory's metrics.json, diagnostics.json (recomputed from the saved adapters
when missing or stale), general.json where present, and log.jsonl; and the names of the report's files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import NloraError
from ..eval.general import mixing_reasons, read_general
from ..rundir import LOG_FILE, read_log
from .diagnostics import diagnose_run, load_or_diagnose

PLOTS = {
    "accuracy_matrix.png": "Accuracy matrix",
    "accuracy_over_sequence.png": "Accuracy on each task along the sequence",
    "collision_heatmap.png": "Pairwise collision rate",
    "layer_sparsity_collision.png": "Sparsity and collision per layer",
    "nuclear_norms.png": "Nuclear norms of the task updates",
}
CURVES = "training_curves.png"  # written when a run has a log.jsonl (older runs have none)
GENERAL_PLOT = "general_ability.png"  # written when a run has a general.json whose scores can be drawn together
NO_VALUE = "–"


@dataclass
class RunData:
    path: Path
    label: str
    metrics: dict
    diagnostics: dict
    general: dict | None = None  # general.json, from `nlora eval-general`

    @property
    def tasks(self) -> list[str]:
        return self.metrics["tasks"]

    @property
    def columns(self) -> list[str]:
        """The metric of each task (exact_match for a run written before metrics per column)."""
        recorded = self.metrics.get("metrics") or {}
        return [recorded.get(t, "exact_match") for t in self.tasks]

    @property
    def exact_match_only(self) -> bool:
        return all(m == "exact_match" for m in self.columns)


def load_run(path: Path, rediagnose: bool, rel_eps: float | None, eps_scale: str | None) -> RunData:
    metrics_path = path / "metrics.json"
    try:
        metrics = json.loads(metrics_path.read_text())
    except FileNotFoundError:
        raise NloraError(f"{path} is not a run directory (no metrics.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NloraError(f"{metrics_path} is corrupt ({e})") from None
    if rediagnose:
        kwargs = {k: v for k, v in (("rel_eps", rel_eps), ("eps_scale", eps_scale)) if v is not None}
        diagnostics = diagnose_run(path, **kwargs)
    else:
        diagnostics = load_or_diagnose(path, rel_eps, eps_scale)
    return RunData(path, str(metrics.get("method", path.name)), metrics, diagnostics, read_general(path))


def label_runs(runs: list[RunData]) -> None:
    """Name each run by its method, and by its folder where two runs share a method."""
    for make in (lambda r: r.label, lambda r: f"{r.metrics.get('method')} ({r.path.name})",
                 lambda r: f"{r.metrics.get('method')} ({r.path.parent.name}/{r.path.name})", lambda r: str(r.path)):
        labels = [make(r) for r in runs]
        if len(set(labels)) == len(labels):
            break
    for r, label in zip(runs, labels):
        r.label = label


def run_log(r: RunData) -> list[dict]:
    return read_log(r.path / LOG_FILE)


def train_lines(r: RunData) -> list[dict]:
    return [line for line in run_log(r) if line.get("event") == "train" and "global_step" in line]


def general_runs(runs: list[RunData]) -> list[RunData]:
    return [r for r in runs if r.general is not None]


def general_mixing(runs: list[RunData]) -> list[str]:
    """Why the runs' general.json cannot be compared (empty: they can, or there is at most one)."""
    found = general_runs(runs)
    return mixing_reasons({r.label: r.general for r in found}) if len(found) > 1 else []
