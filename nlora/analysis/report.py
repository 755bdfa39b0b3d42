"""Reports of runs: PNG plots and report.md with the tables, for one run (written to RUN_DIR/report/) or a
comparison of several (one table and overlaid plots, written to a folder of the caller's choice).

Everything is read from the run directories: metrics.json for the accuracies and continual-learning metrics,
diagnostics.json (recomputed from the saved adapters when missing or stale) for the parameter diagnostics, and
general.json (`nlora eval-general`), where present, for the general-ability scores.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from ..errors import NloraError
from ..io import staged_dir, write_bytes_atomic, write_text_atomic
from ..paths import check_holds_no_run
from .plots import (plot_accuracy_matrices, plot_accuracy_over_sequence, plot_collision_heatmaps, plot_general,
                    plot_layer_bars, plot_nuclear_norms, plot_training_curves, png_bytes)
from .report_data import (CURVES, GENERAL_PLOT, PLOTS, RunData, general_mixing, general_runs, label_runs, load_run,
                          train_lines)
from .report_markdown import report_markdown

__all__ = ["write_report", "PLOTS", "CURVES", "GENERAL_PLOT"]


def write_report(run_dirs, output_dir=None, rediagnose: bool = False, rel_eps: float | None = None,
                 eps_scale: str | None = None, overwrite: bool = False) -> Path:
    """Write the report of one run (default folder RUN_DIR/report) or the comparison of several runs (into
    `output_dir`, required then); returns the report folder, which is replaced as a whole. A folder of the
    caller's that holds files is replaced only with `overwrite`. `rediagnose` recomputes diagnostics.json first."""
    paths = [Path(p) for p in ([run_dirs] if isinstance(run_dirs, (str, Path)) else run_dirs)]
    if not paths:
        raise NloraError("no run directory given")
    if output_dir is None:
        if len(paths) > 1:
            raise NloraError(f"{len(paths)} runs to compare: give the folder of the comparison report "
                             "(--output-dir DIR)")
        output_dir = paths[0] / "report"
    out = Path(output_dir)
    own = len(paths) == 1 and out.resolve() == (paths[0] / "report").resolve()  # the run's report/: nlora's
    check_holds_no_run(out, paths, "option --output-dir:")
    if not (own or overwrite) and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NloraError(f"output folder {out} already exists and is not empty; choose another or pass "
                         "--overwrite to replace it")
    runs = [load_run(p, rediagnose, rel_eps, eps_scale) for p in paths]
    label_runs(runs)
    figures = report_figures(runs)
    try:
        with staged_dir(out) as folder:  # the old report stays whole until the new one is
            for name, fig in figures.items():
                write_bytes_atomic(folder / name, png_bytes(fig))
            write_text_atomic(folder / "report.md", report_markdown(runs))
    except OSError as e:
        raise NloraError(f"cannot write the report into {out}: {e.strerror or e}") from None
    return out


def report_figures(runs: list[RunData]) -> dict[str, Figure]:
    """The report's plots by file name: the five of every report, the training curves of runs with a log.jsonl,
    and the general-ability plot of runs whose general.json can be drawn together."""
    figures = {
        "accuracy_matrix.png": plot_accuracy_matrices(runs),
        "accuracy_over_sequence.png": plot_accuracy_over_sequence(runs),
        "collision_heatmap.png": plot_collision_heatmaps(runs),
        "layer_sparsity_collision.png": plot_layer_bars(runs),
        "nuclear_norms.png": plot_nuclear_norms(runs),
    }
    if any(train_lines(r) for r in runs):
        figures[CURVES] = plot_training_curves(runs)
    if general_runs(runs) and not general_mixing(runs):
        figures[GENERAL_PLOT] = plot_general(runs)
    return figures
