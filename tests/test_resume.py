"""Crash and resume: a tiny run is killed (SIGKILL) at several points in a subprocess, resumed, and must end with
the same metrics, adapters and predictions as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ARGS = ["--model", "tiny-t5", "--method", "n-lora", "--lambda", "0.001", "--tasks", "harbor,orchard",
        "--max-train-samples", "12", "--max-eval-samples", "6", "--batch-size", "4", "--eval-batch-size", "4",
        "--epochs", "2", "--checkpoint-steps", "2", "--max-target-length", "4", "--device", "cpu", "--quiet"]
TIMING = ("seconds", "eval_seconds")


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
             if p.is_file() and p.suffix in (".safetensors", ".jsonl")}
    return {"metrics": metrics, "files": files}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic_dir):
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = _nlora("run", "--data-dir", str(synthetic_dir), "--output-dir", str(out), *ARGS)
    assert proc.returncode == 0, proc.stderr
    return _outcome(out)


@pytest.mark.parametrize("fault", [
    "train_step:3",    # mid-task, one step after a checkpoint
    "train_step:9",    # mid-task in the second task
    "task_trained:1",  # adapter saved, evaluation not started
    "eval_batch:2",    # during evaluation
    "file_write:4",    # between writing a temporary file and renaming it into place
])
def test_killed_run_resumes_to_the_same_result(tmp_path, synthetic_dir, reference, fault):
    out = tmp_path / "run"
    killed = _nlora("run", "--data-dir", str(synthetic_dir), "--output-dir", str(out), *ARGS, fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if (out / "metrics.json").exists():  # whatever is on disk is complete and valid
        json.loads((out / "metrics.json").read_text())
    resumed = _nlora("resume", str(out), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert _outcome(out) == reference
    assert not list(out.rglob("*.tmp")) and not (out / "checkpoint").exists()


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
