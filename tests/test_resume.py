"""Crash and resume: a tiny run is killed (SIGKILL) at several points in a process of its own (tests/fresh_process.py),
resumed in this process, and must end with the same metrics, adapters and predictions as an uninterrupted run (built
in this process too). Configurations: N-LoRA on T5 (every kind of kill point), a snapshot layout (seq-lora),
mtl with a learning-rate warm-up and a logging window that the checkpoint splits, O-LoRA (whose penalty reads the
earlier adapters reloaded from disk), and a decoder with gradient accumulation and eval_future. Every run's log.jsonl
must also match (every step logged once, in order), and `nlora status` is checked on each killed run and on the
resumed one."""

import functools
import json
import os
import signal
from pathlib import Path

import pytest

import fresh_process
from nlora.cli import main
from same_run import outcome

fresh_process.start()

ARGS = ["--model", "tiny-t5", "--tasks", "harbor,orchard",
        "--max-train-samples", "12", "--max-eval-samples", "6", "--batch-size", "4", "--eval-batch-size", "4",
        "--epochs", "2", "--checkpoint-steps", "2", "--max-target-length", "4", "--device", "cpu", "--quiet",
        "--log-steps", "1"]
# 3 optimizer steps per epoch, 6 per task, a checkpoint every 2 steps
CONFIGS = {
    "n-lora": ["--method", "n-lora", "--lambda", "0.001"],
    "seq-lora": ["--method", "seq-lora"],
    # a learning rate still warming up at the checkpoint (the scheduler's state must come back with the
    # optimizer's), and a log line every 3 steps, so the checkpoint of step 2 falls inside a logging window
    "mtl": ["--method", "mtl", "--warmup-steps", "5", "--log-steps", "3"],
    "o-lora": ["--method", "o-lora", "--orth-lambda", "0.1", "--l2-lambda", "0.01"],
    "decoder-accum-future": ["--method", "n-lora", "--lambda", "0.001", "--model", "tiny-llama", "--batch-size", "2", "--gradient-accumulation-steps", "2",
                             "--eval-future"],
}
# where `nlora status` must place each killed run of 2 tasks of 6 steps (n-lora, seq-lora, o-lora)
STOPPED_AT = {"train_step:3": "task 1 of 2 (harbor): training, step 3 of 6",
              "train_step:9": "task 2 of 2 (orchard): training, step 3 of 6",
              "task_trained:1": "task 1 of 2 (harbor): trained (6 steps), evaluated 0 of 1 tasks",
              "eval_batch:2": "task 1 of 2 (harbor): trained (6 steps), evaluated 0 of 1 tasks"}


def _argv(config: str, data: Path, out: Path) -> list[str]:
    return ["run", "--data-dir", str(data), "--output-dir", str(out), *ARGS, *CONFIGS[config]]


def _killed(argv: list[str], fault: str, log: Path):
    return fresh_process.run(fresh_process.nlora_main, argv, log=log, env=dict(os.environ, NLORA_FAULT=fault))


def _outcome(run_dir: Path) -> dict:
    return outcome(run_dir, log=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic_dir):
    @functools.cache
    def build(config: str) -> dict:
        out = tmp_path_factory.mktemp("ref") / config
        assert main(_argv(config, synthetic_dir, out)) == 0
        outcome = _outcome(out)
        if config == "n-lora":
            steps = [(x["phase"], x["step"], x["global_step"]) for x in outcome["log"] if x["event"] == "train"]
            assert steps == [(k, s, 6 * k + s) for k in (0, 1) for s in range(1, 7)]
        return outcome
    return build


def _status(run_dir, capsys) -> str:
    capsys.readouterr()
    assert main(["status", str(run_dir)]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("config,fault", [
    ("n-lora", "train_step:3"),       # mid-task, one step after a checkpoint
    ("n-lora", "task_trained:1"),     # adapter saved, evaluation not started
    ("n-lora", "eval_batch:2"),       # during evaluation
    ("n-lora", "file_write:4"),       # between writing a temporary file and renaming it into place
    ("n-lora", "adapter_save:2"),     # the second task's adapter written, not yet moved into place
    ("n-lora", "checkpoint_save:2"),  # a checkpoint written, not yet moved into place
    ("n-lora", "dir_swap:1"),         # the old checkpoint renamed aside, the new one not yet in place
    ("seq-lora", "train_step:9"),     # the shared adapter, mid-way through the second task
    ("mtl", "train_step:3"),          # resumed from step 2: steps 1-3 make the line of step 3
    ("o-lora", "train_step:9"),       # second task, resumed with the first task's adapter read from disk
    ("decoder-accum-future", "train_step:4"),
])
def test_killed_run_resumes_to_the_same_result(tmp_path, synthetic_dir, reference, capsys, config, fault):
    out = tmp_path / "run"
    killed = _killed(_argv(config, synthetic_dir, out), fault, tmp_path / "killed.log")
    assert killed.returncode == -signal.SIGKILL, killed.output
    if (out / "metrics.json").exists():  # whatever is on disk is complete and valid
        json.loads((out / "metrics.json").read_text())
    status = _status(out, capsys)
    assert "state: in progress or stopped" in status
    if config in ("n-lora", "seq-lora", "o-lora"):
        assert STOPPED_AT.get(fault, "task ") in status
    if fault.startswith("train_step"):
        assert "estimated remaining: " in status and "last logged steps:" in status
    if fault == "train_step:9":  # a line cut by the crash: dropped before appending
        with open(out / "log.jsonl", "a") as f:
            f.write('{"event": "train", "phase": 1, "st')
    if fault == "dir_swap:1":  # the kill hit the window between the renames
        assert (out / ".checkpoint.old").is_dir() and not (out / "checkpoint").exists()
    assert main(["resume", str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert _outcome(out) == reference(config)
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".old"))], "leftovers of the crash"
    assert not (out / "checkpoint").exists()
    status = _status(out, capsys)
    assert "state: complete" in status
    assert f"AP {reference(config)['metrics']['average_accuracy']:.2f}" in status


def test_run_resume_flag_refuses_a_changed_configuration(tmp_path, synthetic_dir, capsys):
    out = tmp_path / "run"
    killed = _killed(_argv("n-lora", synthetic_dir, out), "task_trained:1", tmp_path / "killed.log")
    assert killed.returncode == -signal.SIGKILL, killed.output
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main([*_argv("n-lora", synthetic_dir, out), "--resume", "--lr", "0.01", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "configuration changed" in err and "lr: 0.001 in the run, 0.01 now" in err
    assert "seed: 42 in the run, 3 now" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main([*_argv("n-lora", synthetic_dir, out), "--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())["complete"] is True


def test_a_key_the_saved_configuration_lacks_is_named_as_missing(tmp_path):
    from nlora.errors import NloraError
    from nlora.rundir import check_same_config

    saved = {"lr": 0.001, "output_dir": "a"}  # written before fold_adapters existed
    current = {"lr": 0.001, "output_dir": "b", "fold_adapters": True}
    with pytest.raises(NloraError) as e:
        check_same_config(saved, current, tmp_path / "config.yaml")
    assert str(e.value) == (f"cannot resume {tmp_path}: the configuration changed (fold_adapters: not in the "
                            f"run's config.yaml (an older nlora), True now). To continue it, add those keys to "
                            f"{tmp_path / 'config.yaml'} with the values to continue with, or pass --overwrite to "
                            "start over")
    check_same_config(saved, {"lr": 0.001, "output_dir": "b"}, tmp_path / "config.yaml")  # output_dir: free


def test_resume_puts_back_or_removes_folders_renamed_aside(tmp_path):
    from nlora.io import recover_replaced_dirs

    (tmp_path / ".checkpoint.old").mkdir()  # killed between the renames: the old folder is the only copy
    (tmp_path / ".checkpoint.old" / "progress.json").write_text("{}")
    (tmp_path / "adapters" / "0-a").mkdir(parents=True)  # killed after the new folder arrived
    (tmp_path / "adapters" / ".0-a.old").mkdir()
    recover_replaced_dirs(tmp_path)
    assert (tmp_path / "checkpoint" / "progress.json").read_text() == "{}"
    assert (tmp_path / "adapters" / "0-a").is_dir()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".old")]
