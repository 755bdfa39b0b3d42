"""Evaluation plans: which rows of the accuracy matrix are evaluated, and which metrics they allow."""

import json

import pytest

from nlora.config import load_config
from nlora.errors import NloraError
from nlora.eval.continual import summarize
from nlora.eval.plan import planned_rows
from nlora.runner import run


def test_planned_rows():
    phases = list(range(15))
    assert planned_rows("full", 5, phases) == set(phases)
    assert planned_rows("final", 5, phases) == {14}
    assert planned_rows("every", 5, phases) == {4, 9, 14}
    assert planned_rows("every", 4, phases) == {3, 7, 11, 14}  # the last row always
    assert planned_rows("every", 1, phases) == set(phases)
    assert planned_rows("final", 1, [3]) == {3}  # the multi-task bound has one phase


def test_partial_plans_give_null_where_the_diagonal_is_missing():
    R = [[90.0, None, None], [None, None, None], [60.0, 85.0, 95.0]]
    assert summarize(R, complete_only=True) == {"average_accuracy": pytest.approx(80.0), "bwt": None,
                                                "fwt": None, "forgetting": None}
    full = [[90.0, None, None], [70.0, 80.0, None], [60.0, 85.0, 95.0]]
    assert summarize(full, complete_only=True) == summarize(full)  # every K = 1: all there


@pytest.mark.parametrize("plan,every,rows", [("final", 5, [2]), ("every", 2, [1, 2])])
def test_a_run_evaluates_only_the_planned_rows(synthetic_dir, tmp_path, plan, every, rows):
    config = load_config(overrides={
        "model": "tiny-bert", "method": "inc-lora", "tasks": "harbor,orchard,library",
        "data_dir": str(synthetic_dir), "output_dir": str(tmp_path / "run"), "epochs": 1, "batch_size": 8,
        "max_train_samples": 8, "max_eval_samples": 4, "device": "cpu", "eval_plan": plan, "eval_every": every})
    metrics = run(config, progress=False)
    R = metrics["accuracy_matrix"]
    assert [k for k in range(3) if R[k][0] is not None] == rows
    assert all(x is None for k in range(3) if k not in rows for x in R[k])
    assert metrics["average_accuracy"] == pytest.approx(sum(R[2]) / 3)
    assert metrics["bwt"] is None and metrics["forgetting"] is None and metrics["complete"]
    assert metrics["eval_plan"] == (plan if plan == "final" else f"every {every}")
    assert sorted(p.name for p in (tmp_path / "run" / "predictions").iterdir()) == \
        [f"{k}-{t}" for k, t in enumerate(["harbor", "orchard", "library"]) if k in rows]
    assert set(metrics["eval_seconds"]) == {["harbor", "orchard", "library"][k] for k in rows}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["accuracy_matrix"] == R


def test_bad_eval_plan_is_named():
    with pytest.raises(NloraError, match="option 'eval_plan': 'some' is not one of full, final, every"):
        load_config(overrides={"tasks": "a", "eval_plan": "some"}).validate()
    with pytest.raises(NloraError, match="option 'eval_every': must be >= 1"):
        load_config(overrides={"tasks": "a", "eval_plan": "every", "eval_every": 0}).validate()
