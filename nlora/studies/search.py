"""`select.search: optuna`: where a method's grid is too large to try whole, Optuna's TPE sampler picks
`select.trials` of its points, one after another, each point's dev cells telling it their score. The searches
live in Optuna's storage (`select.storage`, default sqlite in the study directory; a database URL lets workers on
several nodes share them), one Optuna study per method and dev order, so a killed study picks its searches up
where they stopped: a trial asked but not told is the point whose cells run next. The sampler is seeded, so the
same dev scores give the same points."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .spec import Study

SAMPLER_SEED = 0
GroupKey = tuple[str, "int | None"]


def storage_url(study: Study, study_dir: Path) -> str:
    return study.select.storage or f"sqlite:///{Path(study_dir).resolve() / 'optuna.db'}"


def _started(study: Study, study_dir: Path) -> bool:
    """Whether the searches may hold trials (reading creates nothing: a study not run yet has asked nothing)."""
    return study.select.storage is not None or (Path(study_dir) / "optuna.db").is_file()


def _optuna():
    from ..errors import NloraError

    try:
        import optuna
    except ImportError:
        raise NloraError("select.search optuna needs Optuna: pip install 'nlora[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _load(study: Study, study_dir: Path, key: GroupKey):
    optuna = _optuna()
    method, order = key
    return optuna.create_study(study_name=f"{study.name}/{method}/{'all' if order is None else f'order{order}'}",
                               storage=storage_url(study, study_dir), load_if_exists=True,
                               direction="maximize" if study.select.mode == "max" else "minimize",
                               sampler=optuna.samplers.TPESampler(seed=SAMPLER_SEED))


def searched_points(study: Study, study_dir: Path, groups: list[GroupKey]) -> dict[GroupKey, list[dict[str, Any]]]:
    """The points asked so far in each searched group, in the order they were asked."""
    if study.select.search != "optuna" or not _started(study, study_dir):
        return {}
    out = {}
    for key in groups:
        trials = sorted(_load(study, study_dir, key).get_trials(deepcopy=False), key=lambda t: t.number)
        out[key] = [dict(t.params) for t in trials]
    return out


def advance(study: Study, study_dir: Path, groups: list[GroupKey], score_of) -> bool:
    """Tell each group's open trial its score once its cells have ended (`score_of(key, point)`: the point's
    mean dev metric, None while a cell runs, NaN where every cell failed), then ask the next while fewer than
    `select.trials` were asked. Returns whether any trial was told or asked."""
    optuna = _optuna()
    changed = False
    for key in groups:
        search = _load(study, study_dir, key)
        grid = {k: study.methods[key[0]][k] for k in study.tuned_options(key[0])}
        open_trials = [t for t in search.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
        for trial in open_trials:
            score = score_of(key, dict(trial.params))
            if score is None:
                break
            if score != score:  # NaN: no cell of the point finished
                search.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            else:
                search.tell(trial.number, score)
            changed = True
        else:
            if len(search.trials) < study.select.trials:
                trial = search.ask()
                for name, values in grid.items():
                    trial.suggest_categorical(name, values)
                changed = True
    return changed


def search_done(study: Study, study_dir: Path, key: GroupKey) -> bool:
    if not _started(study, study_dir):
        return False
    optuna = _optuna()
    trials = _load(study, study_dir, key).get_trials(deepcopy=False)
    return len(trials) >= study.select.trials and all(t.state != optuna.trial.TrialState.RUNNING for t in trials)
