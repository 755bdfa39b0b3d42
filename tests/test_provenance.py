"""run.json: versions, devices, git commit, the sha256 of every data file read and each task's instruction."""

import hashlib
import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path

from nlora import __version__
from nlora.config import load_config
from nlora.provenance import git_state
from nlora.runner import run
from nlora.tasks.data import DEFAULT_INSTRUCTIONS

ROOT = Path(__file__).resolve().parents[1]


def test_run_json_records_versions_devices_and_data_hashes(synthetic_dir, tmp_path, capsys):
    config = load_config(overrides={
        "model": "tiny-bert", "method": "inc-lora", "tasks": "harbor", "data_dir": str(synthetic_dir),
        "output_dir": str(tmp_path / "run"), "epochs": 1, "batch_size": 8, "max_train_samples": 8,
        "max_eval_samples": 4, "device": "cpu"})
    run(config, progress=False)
    record = json.loads((tmp_path / "run" / "run.json").read_text())["sessions"][0]
    versions = record["versions"]
    assert versions["python"] == platform.python_version() and versions["nlora"]
    for name in ("torch", "transformers", "peft", "accelerate"):
        assert versions[name] == importlib.metadata.version(name)
    assert record["devices"]["device"] == "cpu" and record["devices"]["num_processes"] == 1
    folder = synthetic_dir / "synthetic" / "harbor"
    expected = {str((folder / f).resolve()): hashlib.sha256((folder / f).read_bytes()).hexdigest()
                for f in ("labels.json", "train.json", "test.json")}
    assert record["data_files"] == expected
    assert record["tasks"] == {"harbor": {"family": "synthetic", "instruction": DEFAULT_INSTRUCTIONS["synthetic"]}}
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert record["git"]["commit"] == head.strip()
    # a resumption adds its own record, and says nothing about versions when they are the same
    capsys.readouterr()
    run(config, progress=False, resume=True)
    assert len(json.loads((tmp_path / "run" / "run.json").read_text())["sessions"]) == 2
    assert "other versions" not in capsys.readouterr().err


def test_resume_under_another_release_says_so(synthetic_dir, tmp_path, capsys):
    config = load_config(overrides={
        "model": "tiny-bert", "method": "inc-lora", "tasks": "harbor", "data_dir": str(synthetic_dir),
        "output_dir": str(tmp_path / "run"), "epochs": 1, "batch_size": 8, "max_train_samples": 8,
        "max_eval_samples": 4, "device": "cpu"})
    run(config, progress=False)
    path = tmp_path / "run" / "run.json"
    record = json.loads(path.read_text())
    record["sessions"][-1]["versions"].update(nlora="0.0.1", torch="1.0")
    path.write_text(json.dumps(record))
    capsys.readouterr()
    run(config, progress=False, resume=True)
    err = capsys.readouterr().err
    assert err.count("nlora: warning:") == 1
    assert (f"nlora: warning: {tmp_path / 'run'} was last run with other versions (nlora 0.0.1 -> {__version__}, "
            f"torch 1.0 -> {importlib.metadata.version('torch')}): the remaining tasks follow") in err


def test_no_git_checkout_no_commit(tmp_path):
    assert git_state(tmp_path) is None
