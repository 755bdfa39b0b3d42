"""`nlora report` and the demo's report: the files exist, the PNGs are real images, and every number in report.md
is the one in metrics.json / diagnostics.json."""

import json
import shutil
from pathlib import Path

import pytest
from matplotlib.image import imread

import nlora.demo
from nlora.analysis.report import PLOTS, write_report
from nlora.cli import main
from nlora.demo import run_demo

from test_diagnostics import LAYERS, rows_factor, write_run

NONE = "–"


@pytest.fixture(scope="session")
def demo(tmp_path_factory, synthetic_dir):
    """The default job on a tiny model: N-LoRA and IncLoRA runs, and their comparison report."""
    root = tmp_path_factory.mktemp("demo")
    run_demo(None, _demo_options(root, synthetic_dir), progress=False, num_seeds=1)
    return root


def _demo_options(root, synthetic_dir) -> dict:
    return {"model": "tiny-bert", "output_dir": str(root), "data_dir": str(synthetic_dir),
            "tasks": "harbor,orchard,library", "max_train_samples": 4, "max_eval_samples": 3,
            "batch_size": 4, "eval_batch_size": 8, "epochs": 1, "lr": 5e-3, "eval_future": True,
            "max_source_length": 160}  # byte-level tokenizer: room for the whole instruction


def test_a_second_demo_replaces_its_own_report(demo, synthetic_dir, monkeypatch):
    """The demo replaces its own earlier results, its comparison report included (runs: read back, not retrained)."""
    monkeypatch.setattr(nlora.demo, "run", lambda config, progress: json.loads(
        (Path(config.output_dir) / "metrics.json").read_text()))
    (demo / "report" / "stale.png").write_bytes(b"")
    run_demo(None, _demo_options(demo, synthetic_dir), progress=False, num_seeds=1)
    assert (demo / "report" / "report.md").is_file() and not (demo / "report" / "stale.png").exists()


def tables(markdown: str) -> list[list[list[str]]]:
    """The markdown tables of a document, each as rows of cells (header first, the --- line dropped)."""
    found, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                current.append([c.strip() for c in line.strip()[1:-1].split(" | ")])
        elif current:
            found.append(current)
            current = []
    return found


def table_with(markdown: str, header: list[str]) -> list[list[str]]:
    return next(t for t in tables(markdown) if t[0][: len(header)] == header)


def number(cell: str):
    return None if cell == NONE else float(cell)


def check_accuracy(cell: str, value) -> None:
    assert (number(cell) is None) == (value is None), (cell, value)
    if value is not None:
        assert number(cell) == pytest.approx(value, abs=0.005)


def check_diagnostic(cell: str, value) -> None:
    assert (number(cell) is None) == (value is None), (cell, value)
    if value is not None:
        assert number(cell) == pytest.approx(value, rel=5e-4, abs=1e-12)


def check_report_numbers(markdown: str, label: str, run_dir) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    diagnostics = json.loads((run_dir / "diagnostics.json").read_text())
    row = next(r for r in table_with(markdown, ["run", "AP", "BWT", "FWT", "forgetting"]) if r[0] == label)
    for cell, key in zip(row[1:], ["average_accuracy", "bwt", "fwt", "forgetting"]):
        check_accuracy(cell, metrics.get(key))
    matrices = [t for t in tables(markdown) if t[0][0] == "after \\ on"]
    matrix = matrices[[t[0] for t in table_with(markdown, ["run", "method"])[1:]].index(label)]
    assert matrix[0][1:] == metrics["tasks"]
    for cells, values in zip(matrix[1:], metrics["accuracy_matrix"]):
        for cell, value in zip(cells[1:], values):
            check_accuracy(cell, value)
    header = table_with(markdown, ["run", "collision rate"])
    row = next(r for r in header if r[0] == label)
    keys = ["mean_collision_rate", "mean_collision_jaccard", "mean_delta_cosine", "mean_olora_overlap",
            "mean_subspace_overlap", "mean_sparsity", "mean_nuclear_norm", "mean_l1_norm"]
    for cell, key in zip(row[1:], keys):
        check_diagnostic(cell, diagnostics["summary"][key])
    section = markdown.split("## Parameter diagnostics")[1].split(f"### {label}\n")[1].split("###")[0]
    task_rows = {r[0]: r[1:] for r in table_with(section, ["task", "sparsity"])[1:]} if diagnostics["per_task"] else {}
    for t in diagnostics["per_task"]:
        for cell, key in zip(task_rows[t["task"]], ["sparsity", "l1_norm", "nuclear_norm", "frobenius_norm"]):
            check_diagnostic(cell, t[key])
    pair_tables = [t for t in tables(section) if t[0][0] == "pair"]
    pairs = {tuple(r[0].split(" – ")): r[1:] for t in pair_tables for r in t[1:]}
    assert len(pairs) == len(diagnostics["pairs"])
    for p in diagnostics["pairs"]:
        cells = pairs[tuple(p["tasks"])]
        for cell, key in zip(cells, ["collision_rate", "collision_jaccard", "delta_cosine", "olora_overlap",
                                     "olora_l1", "subspace_overlap"]):
            check_diagnostic(cell, p[key])


def check_pngs(folder) -> None:
    for name in PLOTS:
        path = folder / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        image = imread(str(path))
        assert image.shape[0] > 200 and image.shape[1] > 300, name
        assert image[..., :3].std() > 0.01, f"{name} is blank"


def test_demo_ends_with_a_comparison_report(demo, capsys):
    report = demo / "report"
    check_pngs(report)
    markdown = (report / "report.md").read_text()
    assert markdown.startswith("# Report: n-lora vs inc-lora")
    for label in ("n-lora", "inc-lora"):
        check_report_numbers(markdown, label, demo / "seed-42" / label)
    for name in PLOTS:
        assert f"]({name})" in markdown


def test_report_of_one_run_goes_into_the_run(demo, capsys):
    run = demo / "seed-42" / "n-lora"
    assert main(["report", str(run)]) == 0
    assert str((run / "report" / "report.md").resolve()) in capsys.readouterr().out
    check_pngs(run / "report")
    markdown = (run / "report" / "report.md").read_text()
    check_report_numbers(markdown, "n-lora", run)
    assert "|x| > 0.01 · max|ΔW_t|" in markdown
    assert not list(run.rglob("*.tmp"))


def test_rediagnose_with_another_threshold(demo, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(demo / "seed-42" / "inc-lora", run)
    before = json.loads((run / "diagnostics.json").read_text())
    assert main(["report", str(run), "--rediagnose", "--rel-eps", "0.3", "--output-dir", str(tmp_path / "r")]) == 0
    after = json.loads((run / "diagnostics.json").read_text())
    assert after["epsilon"]["value"] == 0.3 and after["summary"]["mean_sparsity"] > before["summary"]["mean_sparsity"]
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "|x| > 0.3 · max|ΔW_t|" in markdown
    check_report_numbers(markdown, "inc-lora", run)


def test_runs_of_one_method_are_told_apart(demo, tmp_path):
    for name in ("a", "b"):
        shutil.copytree(demo / "seed-42" / "n-lora", tmp_path / name / "n-lora")
    out = write_report([tmp_path / "a" / "n-lora", tmp_path / "b" / "n-lora"], tmp_path / "cmp")
    markdown = (out / "report.md").read_text()
    check_report_numbers(markdown, "n-lora (a/n-lora)", tmp_path / "a" / "n-lora")
    check_report_numbers(markdown, "n-lora (b/n-lora)", tmp_path / "b" / "n-lora")


def test_several_runs_need_an_output_dir(demo, capsys):
    assert main(["report", str(demo / "seed-42" / "n-lora"), str(demo / "seed-42" / "inc-lora")]) == 2
    assert "--output-dir" in capsys.readouterr().err
    assert main(["report", str(demo / "missing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_report_without_pairs_or_accuracies(tmp_path):
    """A single-adapter run (like the multi-task bound) whose accuracy matrix is still empty."""
    run = write_run(tmp_path / "mtl", [{LAYERS[0]: rows_factor(range(3)), LAYERS[1]: rows_factor(range(6))}],
                    layout="snapshot")
    out = write_report(run)
    assert out == run / "report"
    check_pngs(out)
    markdown = (out / "report.md").read_text()
    assert "Fewer than two task updates" in markdown and "snapshot layout" in markdown
    check_report_numbers(markdown, "test", run)


def test_report_of_a_run_without_adapters_yet(tmp_path):
    run = write_run(tmp_path / "early", [], tasks=["a", "b"])
    out = write_report(run)
    check_pngs(out)
    markdown = (out / "report.md").read_text()
    assert "No adapter saved yet." in markdown
    check_report_numbers(markdown, "test", run)


def test_report_has_the_training_curves_of_runs_with_a_log(demo, tmp_path):
    from nlora.analysis.report import CURVES
    from nlora.tracking import read_log

    out = write_report([demo / "seed-42" / "n-lora", demo / "seed-42" / "inc-lora"], tmp_path / "cmp")
    image = imread(str(out / CURVES))
    assert image.shape[0] > 200 and image[..., :3].std() > 0.01
    markdown = (out / "report.md").read_text()
    assert f"]({CURVES})" in markdown
    ends = [x for x in read_log(demo / "seed-42" / "n-lora" / "log.jsonl") if x["event"] == "train_end"]
    rows = [r for r in tables(markdown) if r[0] == ["task", "steps", "mean task loss", "mean regulariser", "seconds"]]
    assert len(rows) == 2 and [[r[0], int(r[1])] for r in rows[0][1:]] == [[x["task"], x["steps"]] for x in ends]
    for row, x in zip(rows[0][1:], ends):
        check_diagnostic(row[2], x["mean_loss"])


def test_report_of_a_run_without_log_has_no_curves(tmp_path):
    from nlora.analysis.report import CURVES

    run = write_run(tmp_path / "old", [], tasks=["a", "b"])
    out = write_report(run)
    assert not (out / CURVES).exists()
    assert "No training logged (no log.jsonl" in (out / "report.md").read_text()
