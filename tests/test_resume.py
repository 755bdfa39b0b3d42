"""Crash and resume: a tiny run is killed (SIGKILL) at several points in a subprocess, resumed, and must end with
the same metrics, adapters, predictions and log.jsonl (every step logged once, in order) as an uninterrupted run.
`nlora status` is checked on each killed run and on the resumed one."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nlora.cli import main
from nlora.tracking import read_log

ARGS = ["--model", "tiny-t5", "--method", "n-lora", "--lambda", "0.001", "--tasks", "harbor,orchard",
        "--max-train-samples", "12", "--max-eval-samples", "6", "--batch-size", "4", "--eval-batch-size", "4",
        "--epochs", "2", "--checkpoint-steps", "2", "--max-target-length", "4", "--device", "cpu", "--quiet",
        "--log-steps", "1"]
TIMING = ("seconds", "eval_seconds")
LOG_TIMING = ("elapsed", "time", "seconds", "tokens_per_s", "examples_per_s", "s_per_step")
# where `nlora status` must place each killed run (2 tasks of 6 steps, a checkpoint every 2, every step logged)
STOPPED_AT = {"train_step:3": "task 1 of 2 (harbor): training, step 3 of 6",
              "train_step:9": "task 2 of 2 (orchard): training, step 3 of 6",
              "task_trained:1": "task 1 of 2 (harbor): trained (6 steps), evaluated 0 of 1 tasks",
              "eval_batch:2": "task 1 of 2 (harbor): trained (6 steps), evaluated 0 of 1 tasks"}


def _nlora(*args, fault=None, timeout=300):
    env = dict(os.environ, NLORA_FAULT=fault or "")
    return subprocess.run([sys.executable, "-m", "nlora", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _outcome(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop("eval_seconds")
    for stats in metrics["train"].values():
        stats.pop("seconds")
    files = {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
             if p.is_file() and p.suffix in (".safetensors", ".jsonl") and p.name != "log.jsonl"}
    log = [{k: v for k, v in line.items() if k not in LOG_TIMING} for line in read_log(run_dir / "log.jsonl")
           if line["event"] != "start"]
    return {"metrics": metrics, "files": files, "log": log}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic_dir):
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = _nlora("run", "--data-dir", str(synthetic_dir), "--output-dir", str(out), *ARGS)
    assert proc.returncode == 0, proc.stderr
    outcome = _outcome(out)
    steps = [(x["phase"], x["step"], x["global_step"]) for x in outcome["log"] if x["event"] == "train"]
    assert steps == [(k, s, 6 * k + s) for k in (0, 1) for s in range(1, 7)]
    return outcome


def _status(run_dir, capsys) -> str:
    capsys.readouterr()
    assert main(["status", str(run_dir)]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("fault", [
    "train_step:3",    # mid-task, one step after a checkpoint
    "train_step:9",    # mid-task in the second task
    "task_trained:1",  # adapter saved, evaluation not started
    "eval_batch:2",    # during evaluation
    "file_write:4",    # between writing a temporary file and renaming it into place
])
def test_killed_run_resumes_to_the_same_result(tmp_path, synthetic_dir, reference, fault, capsys):
    out = tmp_path / "run"
    killed = _nlora("run", "--data-dir", str(synthetic_dir), "--output-dir", str(out), *ARGS, fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if (out / "metrics.json").exists():  # whatever is on disk is complete and valid
        json.loads((out / "metrics.json").read_text())
    status = _status(out, capsys)
    assert "state: in progress or stopped" in status and STOPPED_AT.get(fault, "task ") in status
    if fault.startswith("train_step"):
        assert "estimated remaining: " in status and "last logged steps:" in status
    if fault == "train_step:9":  # a line cut by the crash: dropped before appending
        with open(out / "log.jsonl", "a") as f:
            f.write('{"event": "train", "phase": 1, "st')
    resumed = _nlora("resume", str(out), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    outcome = _outcome(out)
    assert outcome["log"] == reference["log"]  # each step once, in order, with the uninterrupted run's values
    assert outcome == reference
    assert not list(out.rglob("*.tmp")) and not (out / "checkpoint").exists()
    status = _status(out, capsys)
    assert "state: complete" in status and f"AP {reference['metrics']['average_accuracy']:.2f}" in status


def test_run_resume_flag_refuses_a_changed_configuration(tmp_path, synthetic_dir):
    out = tmp_path / "run"
    killed = _nlora("run", "--data-dir", str(synthetic_dir), "--output-dir", str(out), *ARGS,
                    fault="task_trained:1")
    assert killed.returncode == -signal.SIGKILL
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    changed = _nlora("run", "--data-dir", str(synthetic_dir), "--output-dir", str(out), *ARGS, "--resume",
                     "--lr", "0.01", "--seed", "3")
    assert changed.returncode == 2
    assert "configuration changed" in changed.stderr and "lr: 0.001 in the run, 0.01 now" in changed.stderr
    assert "seed: 42 in the run, 3 now" in changed.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    same = _nlora("run", "--data-dir", str(synthetic_dir), "--output-dir", str(out), *ARGS, "--resume")
    assert same.returncode == 0, same.stderr
    assert json.loads((out / "metrics.json").read_text())["complete"] is True
