"""A run directory and the files around it in the hands of a user: names that would lead outside it, two
writers at once, a configuration edited between a stop and a resume, file permissions, files the user already
has, a full disk, signals, interrupted export and report, and models of unfinished runs."""

import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import SafetensorError

import nlora.adapters
import nlora.analysis.report
import nlora.train.checkpoint
from nlora import runner
from nlora.cli import main
from nlora.io import staged_dir, staging_dir, write_text_atomic
from nlora.runlock import HOLDER_FILE, LOCK_FILE, RunLock

TINY = ["--model", "tiny-t5", "--max-train-samples", "8", "--max-eval-samples", "4", "--batch-size", "4",
        "--eval-batch-size", "4", "--epochs", "1", "--max-target-length", "4", "--device", "cpu", "--quiet"]


def _run_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--tasks", "harbor,orchard", "--data-dir", str(data), "--output-dir", str(out), *TINY, *extra]


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def _snapshot(root: Path) -> dict[str, bytes | str]:
    return {str(p): p.read_bytes() if p.is_file() else "dir" for p in sorted(Path(root).rglob("*"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, synthetic_dir) -> Path:
    out = tmp_path_factory.mktemp("safety") / "run"
    assert main(_run_argv(synthetic_dir, out)) == 0
    return out


@pytest.fixture
def run_copy(tmp_path, finished) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def stopped(run_copy) -> Path:
    """The finished run as it was after its first task: the second task still to train."""
    metrics = json.loads((run_copy / "metrics.json").read_text())
    metrics["phases_completed"], metrics["accuracy_matrix"][1], metrics["complete"] = [0], [None, None], False
    (run_copy / "metrics.json").write_text(json.dumps(metrics))
    shutil.rmtree(run_copy / "adapters" / "1-orchard")
    return run_copy


# ------------------------------------------------------------------------------------- names that become paths

def test_task_names_from_a_run_directory_must_be_plain(run_copy, synthetic_dir, capsys, tmp_path):
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    config["tasks"][0] = "../../evil"
    (run_copy / "config.yaml").write_text(yaml.safe_dump(config))
    for argv in (["export", str(run_copy), str(tmp_path / "out")], ["export", str(run_copy), str(tmp_path / "out"),
                                                                     "--upto", "1"]):
        code, err = _cli(argv, capsys)
        assert code == 2 and f"{run_copy / 'config.yaml'}: task name '../../evil' is not a plain dataset name" in err
    code, err = _cli(["resume", str(run_copy), "--quiet"], capsys)  # the edit is named first
    assert code == 2 and "was changed after the run started" in err
    _drop_digests(run_copy / "run.json")  # a run with no recorded digest: the name itself is refused
    code, err = _cli(["resume", str(run_copy), "--quiet"], capsys)
    assert code == 2 and "option 'tasks': task name '../../evil' is not a plain dataset name" in err

    metrics = json.loads((run_copy / "metrics.json").read_text())
    metrics["tasks"][1] = "/tmp/evil"
    (run_copy / "metrics.json").write_text(json.dumps(metrics))
    (run_copy / "diagnostics.json").unlink()
    code, err = _cli(["diagnose", str(run_copy)], capsys)
    assert code == 2 and f"{run_copy / 'metrics.json'}: task name '/tmp/evil'" in err
    assert not (tmp_path / "out").exists()


def test_predict_refuses_a_task_name_with_a_path(finished, capsys, tmp_path):
    code, err = _cli(["predict", str(finished), "--tasks", "../synthetic/harbor", "--quiet"], capsys)
    assert code == 2 and "task name '../synthetic/harbor' is not a plain dataset name" in err


# ------------------------------------------------------------------------------------------------ one writer

def test_a_running_run_refuses_a_second_writer_naming_it(stopped, synthetic_dir, capsys):
    with RunLock() as holder:  # this process plays the run that is still running
        holder.acquire(stopped)
        before = _snapshot(stopped)
        for argv in (["resume", str(stopped), "--quiet"], _run_argv(synthetic_dir, stopped, "--overwrite")):
            code, err = _cli(argv, capsys)
            assert code == 2, err
            assert (f"run directory {stopped} is in use by another nlora process (pid {os.getpid()} on host "
                    f"{socket.gethostname()}, started ") in err
            assert "Traceback" not in err and _snapshot(stopped) == before
    assert not (stopped / LOCK_FILE).exists() and not (stopped / HOLDER_FILE).exists()


def test_a_lock_left_by_a_dead_process_does_not_block_a_resume(stopped, capsys):
    """Also: the run was recorded by an nlora before configuration digests; it resumes, and is recorded with one."""
    holder = ("import filelock, json, os, sys; lock = filelock.FileLock(os.path.join(sys.argv[1], sys.argv[2])); "
              "lock.acquire(); open(os.path.join(sys.argv[1], sys.argv[3]), 'w').write(json.dumps("
              "{'pid': os.getpid(), 'host': 'h', 'started': 's'})); os._exit(9)")
    assert subprocess.run([sys.executable, "-c", holder, str(stopped), LOCK_FILE, HOLDER_FILE]).returncode == 9
    assert (stopped / LOCK_FILE).exists()
    _drop_digests(stopped / "run.json")
    code, err = _cli(["resume", str(stopped), "--quiet"], capsys)
    assert code == 0, err
    assert json.loads((stopped / "metrics.json").read_text())["complete"]
    assert not (stopped / LOCK_FILE).exists() and not (stopped / HOLDER_FILE).exists()
    assert "config_digest" in json.loads((stopped / "run.json").read_text())["sessions"][-1]


# ------------------------------------------------------------------------------- a resume keeps the configuration

def test_a_resume_refuses_a_config_yaml_edited_since_the_run_started(stopped, capsys):
    text = (stopped / "config.yaml").read_text()
    (stopped / "config.yaml").write_text(text.replace("method: n-lora", "method: inc-lora").replace(
        "lora_dropout: 0.1", "lora_dropout: 0.0"))
    before = _snapshot(stopped)
    code, err = _cli(["resume", str(stopped), "--quiet"], capsys)
    assert code == 2
    assert f"cannot resume {stopped}: {stopped / 'config.yaml'} was changed after the run started" in err
    assert "(lora_dropout, method differ" in err
    assert _snapshot(stopped) == before


def test_a_resume_without_run_json_is_refused_naming_it(stopped, capsys):
    text = (stopped / "config.yaml").read_text()
    (stopped / "config.yaml").write_text(text.replace("method: n-lora", "method: inc-lora"))
    (stopped / "run.json").unlink()  # the recorded digest gone with it
    before = _snapshot(stopped)
    code, err = _cli(["resume", str(stopped), "--quiet"], capsys)
    assert code == 2
    assert f"cannot resume {stopped}: {stopped / 'run.json'} is missing or unreadable" in err
    assert _snapshot(stopped) == before


def _drop_digests(run_json: Path) -> None:
    """run.json as a release that recorded no configuration digest wrote it."""
    record = json.loads(run_json.read_text())
    for session in record["sessions"]:
        session.pop("config_digest", None)
    run_json.write_text(json.dumps(record))


# ----------------------------------------------------------------------------------------------- permissions

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_writes_give_the_permissions_of_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        written = write_text_atomic(tmp_path / "f.txt", "x")
        folder = staging_dir(tmp_path / "d")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask


def test_a_run_directory_is_readable_as_the_umask_allows(finished):
    umask = os.umask(0)
    os.umask(umask)
    for path in [finished, *finished.rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


# ---------------------------------------------------------------------------------------- files the user has

def test_report_and_predict_keep_the_users_files_unless_told(finished, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my notes")
    code, err = _cli(["report", str(finished), "--output-dir", str(mine)], capsys)
    assert code == 2 and f"output folder {mine} already exists and is not empty" in err and "--overwrite" in err
    assert (mine / "report.md").read_text() == "my notes"
    assert _cli(["report", str(finished), "--output-dir", str(mine), "--overwrite"], capsys)[0] == 0
    assert (mine / "report.md").read_text() != "my notes"

    for argv in (["report", str(finished), "--output-dir", str(finished.parent), "--overwrite"],
                 ["export", str(finished), str(finished), "--overwrite"]):  # replacing them would delete the run
        code, err = _cli(argv, capsys)
        assert code == 2 and f"holds the run directory {finished}, which replacing it would delete" in err
    assert (finished / "metrics.json").is_file()

    preds = tmp_path / "preds.jsonl"
    preds.write_text("mine\n")
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"sentence": "a b c", "options": ["x", "y"]}) + "\n")
    code, err = _cli(["predict", str(finished), "--input", str(inputs), "--output", str(preds), "--quiet"], capsys)
    assert code == 2 and f"option --output: {preds} already exists" in err and preds.read_text() == "mine\n"
    code, err = _cli(["predict", str(finished), "--input", str(inputs), "--output", str(preds), "--quiet",
                      "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads(preds.read_text())["prediction"] is not None


# ------------------------------------------------------------------------------------------------ a full disk

def test_a_full_disk_is_one_error_line_and_the_run_resumes(finished, synthetic_dir, tmp_path, capsys, monkeypatch):
    real_fsync = os.fsync

    def fsync(fd):  # the disk fills up as metrics.json is written, after the first task is trained
        if ".metrics.json." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "run"
    code, err = _cli(_run_argv(synthetic_dir, out), capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        f"nlora: error: no space left on device: {out / 'metrics.json'} could not be written; everything written "
        f"before is complete: free some space, then `nlora resume {out}` continues the run"]
    monkeypatch.setattr(os, "fsync", real_fsync)
    code, err = _cli(["resume", str(out), "--quiet"], capsys)
    assert code == 0, err
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["accuracy_matrix"] == json.loads((finished / "metrics.json").read_text())["accuracy_matrix"]


def test_a_full_disk_in_safetensors_is_one_error_line(synthetic_dir, tmp_path, capsys, monkeypatch):
    def save_file(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(nlora.adapters, "save_file", save_file)
    out = tmp_path / "run"
    code, err = _cli(_run_argv(synthetic_dir, out), capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        f"nlora: error: no space left on device: {out / 'adapters' / '0-harbor' / 'adapter_model.safetensors'} "
        f"could not be written; everything written before is complete: free some space, then `nlora resume {out}` "
        "continues the run"]


def test_a_full_disk_during_a_checkpoint_names_the_file(synthetic_dir, tmp_path, capsys, monkeypatch):
    def save_file(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(nlora.train.checkpoint, "save_file", save_file)
    out = tmp_path / "run"
    code, err = _cli(_run_argv(synthetic_dir, out, "--checkpoint-steps", "1"), capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        f"nlora: error: no space left on device: {out / 'checkpoint' / 'adapter.safetensors'} could not be "
        f"written; everything written before is complete: free some space, then `nlora resume {out}` continues "
        "the run"]


# ---------------------------------------------------------------------------------------------------- signals

@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_a_stopped_run_says_how_to_resume(synthetic_dir, tmp_path, capsys, monkeypatch, how):
    def stop(*args, **kwargs):
        if how == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt  # what Ctrl-C raises (SIGTERM has raised before reaching this line)
    monkeypatch.setattr(runner, "train_task", stop)

    def outer(signum, frame):  # the handler in place before nlora's: must not be reached (nor kill pytest)
        raise AssertionError("SIGTERM was not handled by nlora")
    previous = signal.signal(signal.SIGTERM, outer)
    try:
        out = tmp_path / "run"
        code, err = _cli(_run_argv(synthetic_dir, out), capsys)
        assert signal.getsignal(signal.SIGTERM) is outer  # put back
    finally:
        signal.signal(signal.SIGTERM, previous)
    what = "terminated (SIGTERM)" if how == "SIGTERM" else "interrupted"
    assert code == (143 if how == "SIGTERM" else 130)
    assert err.strip().splitlines() == [f"nlora: {what}; everything written so far is complete on disk; "
                                        f"`nlora resume {out}` continues the run"]
    assert not (out / LOCK_FILE).exists()  # let go of


# ------------------------------------------------------------------------------- interrupted export and report

def test_export_and_report_clear_what_a_killed_call_left(finished, tmp_path, capsys, monkeypatch):
    exported = tmp_path / "exported"
    left = tmp_path / ".exported.k1ll3d.tmp"  # a staging folder of an export killed before its rename
    left.mkdir()
    (left / "adapter_model.safetensors").write_bytes(b"partial")
    assert _cli(["export", str(finished), str(exported)], capsys)[0] == 0
    assert not left.exists() and (exported / "adapter_model.safetensors").is_file()

    out = tmp_path / "cmp"
    assert _cli(["report", str(finished), "--output-dir", str(out)], capsys)[0] == 0
    (out / "notes.txt").write_text("from before")
    old = _snapshot(out)
    left = tmp_path / ".cmp.k1ll3d.tmp"
    left.mkdir()

    def fail(runs):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(nlora.analysis.report, "report_markdown", fail)  # dies after the plots are written
    code, err = _cli(["report", str(finished), "--output-dir", str(out), "--overwrite"], capsys)
    assert code == 2 and "cannot write the report" in err
    assert _snapshot(out) == old, "a report that failed half way changed the old one"
    assert not left.exists() and not list(tmp_path.glob(".cmp.*"))
    monkeypatch.undo()
    assert _cli(["report", str(finished), "--output-dir", str(out), "--overwrite"], capsys)[0] == 0
    assert not (out / "notes.txt").exists() and (out / "report.md").is_file()  # replaced as a whole


def test_staged_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_dir(final) as folder:
            (folder / "new").write_text("new")
            raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (final / "old").is_file()
    with staged_dir(final) as folder:
        (folder / "new").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new"] and [p.name for p in tmp_path.iterdir()] == ["out"]


# --------------------------------------------------------------------------------------- unfinished runs

def test_export_and_predict_of_an_unfinished_run_say_the_model_is_partial(stopped, tmp_path, capsys):
    warning = (f"nlora: warning: {stopped} is not finished: this is the partial model after task 1 of 2 (harbor), "
               "not the run's final model")
    code, err = _cli(["export", str(stopped), str(tmp_path / "out")], capsys)
    assert code == 0 and warning in err
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"sentence": "a b c", "options": ["x", "y"]}) + "\n")
    code, err = _cli(["predict", str(stopped), "--input", str(inputs), "--quiet"], capsys)
    assert code == 0 and warning in err
    code, err = _cli(["predict", str(stopped), "--input", str(inputs), "--quiet", "--upto", "1"], capsys)
    assert code == 0 and "warning" not in err  # asked for the model after task 1: that is what it is
