"""The study file: what a table is made of (base run options, methods with their option grids, orders, seeds, core
options as axes), how tuned options are chosen (on a dev split carved from train, never test) and the baseline of
the paired comparisons. Read from YAML (`read_study`) or built from a mapping (`Study.from_dict`), the same
structure either way:

    name: my-study
    base: {benchmark: standard, model: t5-large, data_dir: CL_Benchmark}   # options as `nlora run` takes them
    methods:
      n-lora: {lambda: [0.1, 0.4, 1.6]}      # a list is a grid; a scalar is fixed
      inc-lora: {}
    orders: [1, 2, 3]                        # orders of base's benchmark
    seeds: [42, 43, 44]
    axes: {lora_r: [8, 16]}                  # any core option; each value its own rows
    select: {metric: average_accuracy, seeds: [0], dev_samples: 200}
    baseline: inc-lora

This module reads and checks the file's shape; nlora.studies.cells expands it into runs and checks each run's
configuration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import config_fields, load_yaml_file
from ..errors import NloraError, did_you_mean

TOP_KEYS = ("name", "output_dir", "base", "methods", "orders", "seeds", "axes", "select", "baseline", "launch")
SELECT_KEYS = ("tune", "metric", "mode", "seeds", "dev_samples", "train_samples", "per_order", "search", "trials",
               "storage", "split")
SELECT_METRICS = ("average_accuracy", "bwt", "forgetting")
SEARCHES = ("grid", "optuna")
LAUNCH_KEYS = ("num_processes", "gpus_per_cell", "threads_per_cell")
# Core options a study sets itself, per cell.
CELL_KEYS = ("output_dir", "overwrite", "seed", "order", "method")


@dataclass
class Selection:
    """How tuned options are chosen: each grid point is trained on a view of the data whose test split is carved
    from train (dev_samples per task out of train_samples), with the `seeds` given; the best `metric` (mean over
    those seeds, ties to the higher BWT, then to the first grid point) is chosen, per order unless `per_order` is
    false. `search: optuna` tries `trials` points of the grid that Optuna picks instead of every one."""

    tune: list[str] | None = None  # None: every method option given a list of more than one value
    metric: str = "average_accuracy"
    mode: str = "max"
    seeds: list[int] = field(default_factory=lambda: [0])
    dev_samples: int | None = None  # per task; default: a fifth of train_samples
    train_samples: int | None = None  # pool drawn from train.json per task; default: base's max_train_samples
    per_order: bool = True
    search: str = "grid"  # or optuna: `trials` points of the grid chosen by Optuna (nlora.studies.search)
    trials: int | None = None
    storage: str | None = None  # Optuna's storage URL (default: sqlite in the study directory)


@dataclass
class Launch:
    """How each cell is started: processes per cell (accelerate), GPUs and CPU threads it is given."""

    num_processes: int = 1
    gpus_per_cell: int = 0
    threads_per_cell: int | None = None


@dataclass
class Study:
    name: str
    base: dict[str, Any]
    methods: dict[str, dict[str, list[Any]]]  # method -> option -> values (a scalar is a list of one)
    orders: list[int | None] = field(default_factory=lambda: [None])
    seeds: list[int] = field(default_factory=lambda: [42])
    axes: dict[str, list[Any]] = field(default_factory=dict)
    select: Selection = field(default_factory=Selection)
    baseline: str | None = None
    launch: Launch = field(default_factory=Launch)
    output_dir: str | None = None
    source: str = "study"  # where it was read from, for messages

    @classmethod
    def from_dict(cls, data: Any, source: str = "study") -> "Study":
        if not isinstance(data, dict):
            raise NloraError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
        _check_keys(data, TOP_KEYS, "", source)
        name = data.get("name") or (Path(source).stem if source != "study" else None)
        if not isinstance(name, str) or not name.strip():
            raise NloraError(f"{source}: key 'name' must be a non-empty string")
        base = _mapping(data.get("base", {}), f"{source}: key 'base'")
        for key, top in (("seed", "seeds"), ("order", "orders"), ("method", "methods")):
            if key in base:
                raise NloraError(f"{source}: base option {key!r} is set by the study for each cell: give the "
                                 f"top-level key {top!r} instead")
        for key in ("output_dir", "overwrite"):
            if key in base:
                raise NloraError(f"{source}: base option {key!r}: each cell is a run directory under the study's "
                                 "directory; set the study's own 'output_dir' instead")
        methods = _methods(data.get("methods"), source)
        orders = _int_list(data.get("orders"), f"{source}: key 'orders'", allow_none=True)
        if orders != [None] and "benchmark" not in base:
            raise NloraError(f"{source}: key 'orders' needs a benchmark preset in base (base: {{benchmark: "
                             "standard}})")
        seeds = _int_list(data.get("seeds", [42]), f"{source}: key 'seeds'")
        if any(s < 0 or s > 2 ** 32 - 1 for s in seeds):
            raise NloraError(f"{source}: key 'seeds': each seed must be from 0 to 2**32 - 1, got {seeds}")
        axes = _axes(data.get("axes", {}), source)
        select = _selection(data.get("select", {}), source)
        launch = _launch(data.get("launch", {}), source)
        baseline = data.get("baseline")
        if baseline is not None and baseline not in methods:
            raise NloraError(f"{source}: baseline {baseline!r} is not one of the study's methods "
                             f"({', '.join(methods)})")
        output_dir = data.get("output_dir")
        if output_dir is not None and not isinstance(output_dir, str):
            raise NloraError(f"{source}: key 'output_dir' must be a path")
        return cls(name=name.strip(), base=base, methods=methods, orders=orders, seeds=seeds, axes=axes,
                   select=select, baseline=baseline, launch=launch, output_dir=output_dir, source=source)

    def tuned_options(self, method: str) -> list[str]:
        """The options of `method` chosen on the dev split."""
        grid = self.methods[method]
        if self.select.tune is None:
            return [k for k, values in grid.items() if len(values) > 1]
        return [k for k in self.select.tune if k in grid]

    def to_dict(self) -> dict[str, Any]:
        """The study as a file holds it (the form `from_dict` reads back)."""
        select = {k: getattr(self.select, k) for k in SELECT_KEYS if k != "split"}
        return {"name": self.name, "output_dir": self.output_dir, "base": self.base, "methods": self.methods,
                "orders": None if self.orders == [None] else self.orders, "seeds": self.seeds, "axes": self.axes,
                "select": {k: v for k, v in select.items() if v is not None},
                "baseline": self.baseline, "launch": vars(self.launch).copy()}


def read_study(path: str | Path, changes: list[str] = ()) -> Study:
    """A study file, or the name of one shipped with nlora (`nlora study plan cpu-standard`), with `changes`
    ("KEY=VALUE", the value read as YAML) to its base run options."""
    path = resolve_study_path(path)
    data = load_yaml_file(path)
    if changes:
        data = {**data, "base": {**_mapping(data.get("base"), f"study file {path}: key 'base'"),
                                 **dict(_change(c) for c in changes)}}
    return Study.from_dict(data, source=f"study file {path}")


def _change(text: str) -> tuple[str, Any]:
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise NloraError(f"option --set: {text!r} is not KEY=VALUE")
    try:
        return key.strip().replace("-", "_"), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise NloraError(f"option --set {text}: the value is not valid YAML ({e})") from None


def with_absolute_paths(study: Study) -> Study:
    """The study with its base paths (data_dir, instructions) made absolute: its cells run in other processes,
    on other nodes, or from another folder."""
    base = dict(study.base)
    for key in ("data_dir", "instructions"):
        if isinstance(base.get(key), str):
            base[key] = str(Path(base[key]).expanduser().resolve())
    return dataclasses.replace(study, base=base)


def shipped_studies() -> dict[str, Path]:
    folder = Path(__file__).parent / "catalog"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def resolve_study_path(path: str | Path) -> Path:
    given = Path(path)
    if given.is_file():
        return given
    shipped = shipped_studies()
    if str(path) in shipped:
        return shipped[str(path)]
    raise NloraError(f"study file {path} does not exist (nlora's own studies: {', '.join(shipped)})")


def _check_keys(data: dict, keys: tuple[str, ...], prefix: str, source: str) -> None:
    unknown = [k for k in data if k not in keys]
    if unknown:
        raise NloraError(f"{source}: unknown key '{prefix}{unknown[0]}'{did_you_mean(unknown[0], keys)}; keys: "
                         f"{', '.join(keys)}")


def _check_whole(value: Any, least: int, where: str) -> None:
    """None, or a whole number of at least `least`."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
        raise NloraError(f"{where} must be a whole number >= {least}, got {value!r}")


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise NloraError(f"{where} must be a mapping, got {type(value).__name__}")
    return dict(value)


def _values(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def _methods(value: Any, source: str) -> dict[str, dict[str, list[Any]]]:
    if not isinstance(value, dict) or not value:
        raise NloraError(f"{source}: key 'methods' must map each method to its options ({{n-lora: {{lambda: "
                         "[0.1, 0.4]}, inc-lora: {}}})")
    out = {}
    for method, grid in value.items():
        grid = _mapping(grid, f"{source}: options of method {method!r}")
        for key, values in grid.items():
            values = _values(values)
            if not values:
                raise NloraError(f"{source}: option {key!r} of method {method!r} has no value")
            if len(values) != len({repr(v) for v in values}):
                raise NloraError(f"{source}: option {key!r} of method {method!r} repeats a value: {values}")
            grid[key] = values
        out[str(method)] = grid
    return out


def _int_list(value: Any, where: str, allow_none: bool = False) -> list:
    if value is None and allow_none:
        return [None]
    values = _values(value)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise NloraError(f"{where} must be a whole number or a list of them, got {value!r}")
    if len(set(values)) != len(values):
        raise NloraError(f"{where} repeats a value: {values}")
    return values


def _axes(value: Any, source: str) -> dict[str, list[Any]]:
    axes = _mapping(value, f"{source}: key 'axes'")
    core = {f.name for f in config_fields()}
    for key, values in axes.items():
        name = key.replace("-", "_")
        if name not in core or name in CELL_KEYS:
            raise NloraError(f"{source}: axis {key!r} is not a core run option{did_you_mean(name, sorted(core))} "
                             "(a method's own option goes under its method; seeds, orders and methods have their "
                             "own keys)")
        axes[key] = _values(values)
    return axes


def _selection(value: Any, source: str) -> Selection:
    data = _mapping(value, f"{source}: key 'select'")
    _check_keys(data, SELECT_KEYS, "select.", source)
    if data.pop("split", "dev") != "dev":
        raise NloraError(f"{source}: select.split must be dev (carved from train): choosing on test is not "
                         "offered")
    select = Selection(**data)
    if select.metric not in SELECT_METRICS:
        raise NloraError(f"{source}: select.metric must be one of {', '.join(SELECT_METRICS)}, got "
                         f"{select.metric!r}")
    if select.mode not in ("max", "min"):
        raise NloraError(f"{source}: select.mode must be max or min, got {select.mode!r}")
    if select.search not in SEARCHES:
        raise NloraError(f"{source}: select.search must be one of {', '.join(SEARCHES)}, got {select.search!r}")
    if (select.search == "optuna") != (select.trials is not None):
        raise NloraError(f"{source}: select.trials goes with select.search optuna (the points it tries)")
    select.seeds = _int_list(select.seeds, f"{source}: select.seeds")
    for key in ("trials", "dev_samples", "train_samples"):
        _check_whole(getattr(select, key), 1, f"{source}: select.{key}")
    if select.tune is not None:
        select.tune = [str(k) for k in _values(select.tune)]
    return select


def _launch(value: Any, source: str) -> Launch:
    data = _mapping(value, f"{source}: key 'launch'")
    _check_keys(data, LAUNCH_KEYS, "launch.", source)
    launch = Launch(**data)
    for key in LAUNCH_KEYS:
        _check_whole(getattr(launch, key), 0 if key == "gpus_per_cell" else 1, f"{source}: launch.{key}")
    return launch

