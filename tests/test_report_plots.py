"""The report's plots as a reader sees them: every plot of a 2-task, a 15-task, a free-text and a 6-run report is
drawn, and nothing is cut at the figure's edge, no legend covers data or a title, a small matrix fills its figure,
a task logged once is a line, and the titles say what is drawn. The runs are written directly (tests/report_runs)."""

import functools

import pytest

from nlora.analysis.plots import drawn, plot_accuracy_over_sequence
from nlora.analysis.report import report_figures
from nlora.analysis.report_data import label_runs, load_run
from nlora.analysis.report_markdown import report_markdown

from report_runs import synthetic_run


CASES = {
    # the first task trains 3 steps, fewer than log_steps: logged once; norms over decades: a log scale
    "two": lambda root: [synthetic_run(root / "two", 2, steps=[3, 10], general=True, spread=1000.0)],
    "fifteen": lambda root: [synthetic_run(root / "fifteen", 15, steps=[10] * 14 + [3])],
    "free-text": lambda root: [synthetic_run(root / "free", 3, eval_future=True,
                                             metrics=["rougeL", "sari", "exact_match"])],
    "six": lambda root: [synthetic_run(root / f"six{k}", 3, method=f"method-{k}", seed=k, general=True)
                         for k in range(6)],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The loaded runs of a case, made once."""
    root = tmp_path_factory.mktemp("plots")

    @functools.cache
    def load(case: str) -> list:
        loaded = [load_run(p, False, None, None) for p in CASES[case](root)]
        label_runs(loaded)
        return loaded
    return load


@pytest.fixture(scope="module")
def figures(runs):
    """Each plot of a case's report, drawn as its PNG is, with its renderer; drawn once."""
    @functools.cache
    def draw(case: str) -> dict:
        return {name: (fig, drawn(fig).get_renderer()) for name, fig in report_figures(runs(case)).items()}
    return draw


def intersection_area(a, b) -> float:
    return max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))


def titles(fig) -> list:
    found = [fig._suptitle] if fig._suptitle is not None else []
    for ax in fig.axes:
        if ax.get_visible():
            found += [t for t in (ax.title, ax._left_title, ax._right_title) if t.get_text()]
    return found


@pytest.mark.parametrize("case", ["two", "fifteen", "free-text", "six"])
def test_nothing_is_clipped_or_covered(figures, case):
    for name, (fig, renderer) in figures(case).items():
        page = fig.bbox.padded(1.0)  # pixels; one pixel of antialiasing allowed
        for artist in fig.get_children()[1:]:  # the figure's background patch first
            box = artist.get_tightbbox(renderer)
            if box is None or not artist.get_visible():
                continue
            inside = page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1
            assert inside, f"{case}/{name}: {artist} reaches outside the figure ({box} vs {fig.bbox})"
        legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        for legend in legends:
            box = legend.get_window_extent(renderer)
            for ax in (ax for ax in fig.axes if ax.get_visible()):
                assert intersection_area(box, ax.get_window_extent(renderer)) < 1, \
                    f"{case}/{name}: the legend covers the data of {ax}"
            for title in titles(fig):
                assert intersection_area(box, title.get_window_extent(renderer)) < 1, \
                    f"{case}/{name}: the legend covers the title {title.get_text()!r}"


def test_a_small_matrix_fills_its_figure(figures):
    for name, (fig, renderer) in figures("two").items():
        if name not in ("accuracy_matrix.png", "collision_heatmap.png"):
            continue
        boxes = [ax.get_tightbbox(renderer) for ax in fig.axes]
        used = max(b.x1 for b in boxes) - min(b.x0 for b in boxes)
        assert used >= 0.8 * fig.bbox.width, f"{name}: {used:.0f} of {fig.bbox.width:.0f} pixels wide used"


def test_a_task_logged_once_is_a_line_over_its_steps(figures):
    fig, _ = figures("fifteen")["training_curves.png"]
    top, bottom = fig.axes[:2]
    for ax in (top, bottom):
        curves = [line for line in ax.get_lines() if line.get_marker() == "."]  # the dotted task starts have none
        assert len(curves) == 15
        for line in curves:
            assert len(set(line.get_xdata())) >= 2, f"{line.get_label()} is a single dot"
    last = next(line for line in top.get_lines() if line.get_label() == "task14")
    assert list(last.get_xdata()) == [140, 143]  # task 14 starts at step 140 and is logged at its last step, 143


def sequence_title(runs) -> str:
    fig = plot_accuracy_over_sequence(runs)
    return fig._suptitle.get_text() if fig._suptitle is not None else fig.axes[0].get_title()


def test_the_sequence_plot_says_what_it_draws(runs):
    plain = sequence_title(runs("two"))
    assert "accuracy" in plain and "dotted" not in plain  # no eval_future: no dotted line is drawn
    free = sequence_title(runs("free-text"))
    assert "score on each task" in free and "accuracy" not in free and "dotted: before the task is trained" in free
    assert sequence_title(runs("six")) == "Accuracy on each task along the sequence"


def test_the_bwt_sentence_reads(runs):
    text = report_markdown(runs("two"))
    assert ("BWT = mean over j < T of R[T][j] − R[j][j] (the same sum divided by T instead of T − 1 in a run noted "
            "below as dividing by T); ") in text
    assert "where the BWT denominator is t" not in text
