"""A study's cells: each an ordinary run directory under STUDY_DIR/cells/, named from what sets it apart.

Dev cells train every grid point of a method's tuned options on the dev view of the data (nlora.studies.devsplit)
with the selection seeds; test cells train every method, order, seed and axis value on the real protocol, a tuned
method with the values chosen on dev (nlora.studies.select). A test cell whose values are not chosen yet is
`pending`: it is planned, counted and validated with each candidate, but has no run directory yet.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import RunConfig, load_config
from ..errors import NloraError
from ..rundir import RESUME_FREE_KEYS
from .spec import Study

CELLS_DIR = "cells"
DEV_DATA_DIR = "dev-data"


@dataclass(frozen=True)
class Cell:
    phase: str  # "dev" or "test"
    method: str
    options: tuple[tuple[str, Any], ...]  # the method's options of this cell (a tuned one: its chosen value)
    order: int | None
    seed: int
    axes: tuple[tuple[str, Any], ...] = ()
    named: tuple[str, ...] = ()  # the options that vary in the study: they name the cell
    pending: tuple[str, ...] = field(default=(), compare=False)  # tuned options whose value is not chosen yet
    tuned: tuple[str, ...] = ()  # the options chosen on dev

    @property
    def id(self) -> str:
        """Its path under STUDY_DIR/cells: phase/method[_option value...]/[axis value.../]order K/seed S."""
        method = self.method + "".join(f"_{k}{_text(v)}" for k, v in self.options if k in self.named)
        if self.pending:
            method += "".join(f"_{k}?" for k in self.pending)
        parts = [self.phase, method]
        if self.axes:
            parts.append("_".join(f"{k}{_text(v)}" for k, v in self.axes))
        if self.order is not None:
            parts.append(f"order{self.order}")
        parts.append(f"seed{self.seed}")
        return "/".join(parts)

    @property
    def row(self) -> str:
        """The label of its row in the report: the method with its untuned grid values and its axis values."""
        shown = [f"{k}={_text(v)}" for k, v in self.options if k in self.named and k not in self.tuned]
        shown += [f"{k}={_text(v)}" for k, v in self.axes]
        return self.method + (f" ({', '.join(shown)})" if shown else "")

    def overrides(self) -> dict[str, Any]:
        values = {**dict(self.axes), "method": self.method, **dict(self.options), "seed": self.seed}
        if self.order is not None:
            values["order"] = self.order
        return values


def _text(value: Any) -> str:
    """A value as it reads in a folder name."""
    text = format(value, "g") if isinstance(value, float) else str(value).lower() if isinstance(value, bool) \
        else json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)
    safe = re.sub(r"[^A-Za-z0-9.+-]", "-", text)
    return safe if safe == text and len(safe) <= 40 else safe[:24] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]


def _grid(options: dict[str, list[Any]]) -> list[tuple[tuple[str, Any], ...]]:
    keys = list(options)
    return [tuple(zip(keys, values)) for values in itertools.product(*(options[k] for k in keys))]


def varying(study: Study, method: str) -> tuple[str, ...]:
    return tuple(k for k, values in study.methods[method].items() if len(values) > 1)


def dev_orders(study: Study) -> list[int | None]:
    return study.orders if study.select.per_order else study.orders[:1]


def choice_key(study: Study, method: str, order: int | None) -> tuple[str, int | None]:
    """What one choice of tuned values covers: a method on one order, or on every order (order None)."""
    return method, order if study.select.per_order else None


def choice_groups(study: Study) -> list[tuple[str, int | None]]:
    return [choice_key(study, m, o) for m in study.methods if study.tuned_options(m) for o in dev_orders(study)]


def dev_cells(study: Study, searched: dict[tuple[str, int | None], list[dict[str, Any]]] | None = None
              ) -> list[Cell]:
    """Each grid point of each method with tuned options (with select.search optuna, the points `searched` so
    far), on each dev order, with each selection seed."""
    cells = []
    for method, grid in study.methods.items():
        tuned = tuple(study.tuned_options(method))
        if not tuned:
            continue
        fixed = {k: v[0] for k, v in grid.items() if k not in tuned and len(v) == 1}
        # untuned options with several values are axes of the report: dev runs use their first value
        fixed.update({k: v[0] for k, v in grid.items() if k not in tuned and len(v) > 1})
        for order in dev_orders(study):
            points = [tuple(sorted(p.items())) for p in (searched or {}).get(choice_key(study, method, order), [])] \
                if study.select.search == "optuna" else _grid({k: grid[k] for k in tuned})
            for point in dict.fromkeys(points):  # a point the search asks again is the same cells
                options = tuple(sorted({**fixed, **dict(point)}.items()))
                for seed in study.select.seeds:
                    cells.append(Cell("dev", method, options, order, seed, named=tuned, tuned=tuned))
    return cells


def table_cells(study: Study, chosen: dict[tuple[str, int | None], dict[str, Any]] | None = None) -> list[Cell]:
    """Every method, untuned grid value, axis value, order and seed. `chosen[(method, order)]` holds the tuned
    values (order None when chosen once for every order); without them the cell is pending."""
    chosen = chosen or {}
    cells = []
    axis_points = _grid(study.axes) if study.axes else [()]
    for method, grid in study.methods.items():
        tuned = tuple(study.tuned_options(method))
        named = varying(study, method)
        for point in _grid({k: v for k, v in grid.items() if k not in tuned}):
            for axes in axis_points:
                for order in study.orders:
                    values = chosen.get((method, order if study.select.per_order else None)) if tuned else {}
                    options = tuple(sorted({**dict(point), **(values or {})}.items()))
                    pending = tuple(k for k in tuned if values is None)
                    for seed in study.seeds:
                        cells.append(Cell("test", method, options, order, seed, axes, named, pending, tuned))
    return cells


def cell_dir(study_dir: Path, cell: Cell) -> Path:
    return Path(study_dir) / CELLS_DIR / cell.id


def dev_data_dir(study_dir: Path, order: int | None) -> Path:
    return Path(study_dir) / DEV_DATA_DIR / ("all" if order is None else f"order{order}")


def cell_config(study: Study, cell: Cell, study_dir: Path, candidate: dict[str, Any] | None = None) -> RunConfig:
    """The run configuration of `cell` (a pending one with `candidate` values for its tuned options)."""
    values = {**study.base, **cell.overrides(), **(candidate or {}), "output_dir": str(cell_dir(study_dir, cell))}
    if cell.phase == "dev":
        # the dev view is already the training pool minus the dev examples; scoring the base model is not needed
        values.update(data_dir=str(dev_data_dir(study_dir, cell.order if study.select.per_order else None)),
                      max_train_samples=None, max_eval_samples=None, eval_future=False)
    try:
        return load_config(None, values)
    except NloraError as e:
        raise NloraError(f"{study.source}: cell {cell.id}: {e}") from None


def validate_cell(study: Study, cell: Cell, study_dir: Path) -> list[RunConfig]:
    """Each configuration the cell may run, validated; every error names the cell."""
    candidates = [None]
    if cell.pending:
        grid = study.methods[cell.method]
        candidates = [dict(p) for p in _grid({k: grid[k] for k in cell.pending})]
    configs = []
    for candidate in candidates:
        config = cell_config(study, cell, study_dir, candidate)
        if cell.phase == "dev":  # its data folder is made before it runs: check the real one now
            config = config.replace(data_dir=study.base.get("data_dir"))
        try:
            configs.append(config.validate())
        except NloraError as e:
            raise NloraError(f"{study.source}: cell {cell.id}: {e}") from None
    return configs


def cell_digest(study: Study, cell: Cell, study_dir: Path) -> str:
    """What makes two runs of the cell the same run: its resolved options, less where they are written, with a
    path inside the study directory (a dev view) taken relative to it, so that a moved study keeps its digests."""
    values = {k: v for k, v in cell_config(study, cell, study_dir).to_dict().items() if k not in RESUME_FREE_KEYS}
    inside = str(Path(study_dir)) + "/"
    if isinstance(values.get("data_dir"), str) and values["data_dir"].startswith(inside):
        values["data_dir"] = "STUDY_DIR/" + values["data_dir"][len(inside):]
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]
