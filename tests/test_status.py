"""`nlora status` on hand-made run directories: the position and the estimate of the remaining time against a
count by hand, a run from before log files, and a missing run. (Killed and complete real runs: test_resume.py.)"""

import json

import pytest
import yaml

from nlora.analysis.status import format_status, run_status
from nlora.cli import main


def _line(event, **kw):
    return {"event": event, **kw}


def _write_run(root, log=True):
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump({
        "method": "inc-lora", "model": "tiny-t5", "tasks": ["a", "b", "c"], "epochs": 2, "batch_size": 4,
        "gradient_accumulation_steps": 1, "eval_future": False}))
    (root / "metrics.json").write_text(json.dumps({
        "method": "inc-lora", "model": "tiny-t5", "tasks": ["a", "b", "c"], "phases": [0, 1, 2],
        "phases_completed": [0], "complete": False, "n_train": [12, 12, 8],
        "accuracy_matrix": [[50.0, None, None], [None] * 3, [None] * 3]}))
    if log:
        lines = [_line("start", elapsed=0.0, time=1000.0),
                 _line("train", task="a", phase=0, step=3, steps=6, loss=2.0, regularizer=0.0, lr=0.1,
                       grad_norm=1.0, s_per_step=2.0, elapsed=6.0, time=1006.0),
                 _line("train", task="a", phase=0, step=6, steps=6, loss=1.5, regularizer=0.0, lr=0.1,
                       grad_norm=1.0, s_per_step=2.0, elapsed=12.0, time=1012.0),
                 _line("train_end", task="a", phase=0, steps=6, elapsed=12.0, time=1012.0),
                 _line("eval", phase=0, task="a", accuracy=50.0, examples=4, seconds=3.0, elapsed=15.0, time=1015.0),
                 _line("train", task="b", phase=1, step=2, steps=6, loss=3.25, regularizer=0.0, lr=0.1,
                       grad_norm=0.5, s_per_step=4.0, elapsed=23.0, time=1023.0)]
        (root / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def test_status_of_a_run_in_progress(tmp_path):
    status = run_status(_write_run(tmp_path / "run"))
    expected = {"phase": 1, "task": "b", "index": 2, "of": 3, "stage": "training", "step": 2, "steps": 6}
    assert {k: status["position"][k] for k in expected} == expected
    remaining = status["remaining"]
    # steps left: 4 of task b, and task c's 2 epochs x 2 batches; at the mean of the logged s/step (2, 2, 4)
    assert remaining["steps_left"] == 4 + 4
    assert remaining["train_seconds"] == pytest.approx(8 * 8 / 3)
    # matrix entries left: row b (2 tasks) and row c (3 tasks), 3 s each as the one evaluated
    assert remaining["entries_left"] == 5 and remaining["eval_seconds"] == pytest.approx(15.0)
    text = format_status(status, now=1083.0)
    assert "state: in progress or stopped (last log line 0:01:00 ago)" in text
    assert "task 2 of 3 (b): training, step 2 of 6" in text
    assert "elapsed: 0:00:23" in text
    assert "estimated remaining: 0:00:36 (0:00:21 training, 0:00:15 evaluation)" in text
    assert "b                    2/6      3.25" in text  # the last logged step


def test_status_of_a_run_from_before_log_files(tmp_path, capsys):
    run = _write_run(tmp_path / "old", log=False)
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "elapsed: unknown (no log.jsonl" in out and "task 2 of 3 (b): training, step 0 of 6" in out
    assert "estimated remaining: unknown (no step timed yet)" in out
    assert "a          50.0" in out


def test_status_of_a_missing_run(tmp_path, capsys):
    assert main(["status", str(tmp_path / "nothing")]) == 2
    assert f"run directory {tmp_path / 'nothing'} does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["status", str(tmp_path / "empty")]) == 2
    assert "is not a run directory (no config.yaml)" in capsys.readouterr().err


def test_status_before_the_first_logging_step(tmp_path):
    # a fresh run with --log-steps 50: the phase has begun (its step total logged), a checkpoint at step 4 is
    # written, no training line yet and no metrics.json
    root = tmp_path / "run"
    root.mkdir()
    (root / "config.yaml").write_text(yaml.safe_dump({"method": "inc-lora", "model": "tiny-t5", "tasks": ["a", "b"],
                                                      "epochs": 2, "batch_size": 4}))
    lines = [_line("start", elapsed=0.0, time=1000.0),
             _line("train_begin", task="a", phase=0, steps=60, global_step=0, elapsed=5.0, time=1005.0)]
    (root / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (root / "checkpoint").mkdir()
    (root / "checkpoint" / "progress.json").write_text(json.dumps({"phase": 0, "epoch": 0, "batch": 4, "step": 4,
                                                                   "loss_sum": 1.0, "reg_sum": 0.0}))
    text = format_status(run_status(root), now=1125.0)
    assert "task 1 of 2 (a): training, step 4 of 60" in text
    assert "elapsed: 0:02:05 if it is still running (0:00:05 at its last log line)" in text
    lines.append(_line("train", task="a", phase=0, step=50, steps=60, loss=1.0, s_per_step=2.0, elapsed=105.0,
                       time=1105.0))
    (root / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    text = format_status(run_status(root), now=1125.0)
    assert "task 1 of 2 (a): training, step 50 of 60" in text and "elapsed: 0:01:45\n" in text
