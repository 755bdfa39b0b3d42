"""Validation before training and the safety guarantees, through the CLI.

Every bad input must stop the run before training with exit code 2 and one message naming the file or option
and the problem, and must leave everything already on disk byte-identical. The run directory given as output is
a finished run with --overwrite, so even a run that is allowed to replace it must not touch it until everything
has been checked."""

import ast
import hashlib
import dataclasses
import itertools
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nlora
from nlora import rundir, runner
from nlora.cli import main
from nlora.config import RunConfig
from nlora.errors import NloraError
from nlora.train.checkpoint import load_checkpoint

TINY = ["--max-train-samples", "8", "--max-eval-samples", "4", "--batch-size", "4", "--eval-batch-size", "4",
        "--epochs", "1", "--max-target-length", "4", "--device", "cpu", "--quiet"]
ROWS = [{"label": "a", "sentence": "first"}, {"label": "b", "sentence": "second"},
        {"label": "a", "sentence": "third"}]


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors (an unknown option)
        code = e.code
    return code, capsys.readouterr().err


def _snapshot(*roots: Path) -> dict[str, str]:
    """Every file (content hash) and folder under `roots`."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, synthetic_dir) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", "--model", "tiny-t5", "--tasks", "harbor", "--data-dir", str(synthetic_dir),
                 "--output-dir", str(out), *TINY]) == 0
    return out


class Ctx:
    """What a case builds its command line from: a finished run to point --output-dir at, the synthetic tasks,
    and a scratch folder for broken data and config files."""

    def __init__(self, tmp_path: Path, synthetic_dir: Path, finished_run: Path, make_task, monkeypatch=None):
        self.monkeypatch = monkeypatch
        self.tmp = tmp_path
        self.syn = synthetic_dir
        self.run = tmp_path / "run"
        shutil.copytree(finished_run, self.run)
        self.make_task = make_task

    def base(self, *extra: str, data_dir: bool = True, overwrite: bool = True, out: Path | None = None):
        argv = ["run", "--model", "tiny-t5", "--tasks", "harbor", "--output-dir", str(out or self.run), *TINY]
        argv += ["--data-dir", str(self.syn)] if data_dir else []
        argv += ["--overwrite"] if overwrite else []
        return argv + list(extra)

    def broken_task(self, breakage, *extra: str):
        """A valid task 't' (labels a, b) with `breakage(folder)` applied; returns (argv, folder)."""
        folder = self.make_task(self.tmp / "data", "G", "t", ["a", "b"], ROWS)
        breakage(folder)
        return self.base("--data-dir", str(self.tmp / "data"), "--tasks", "t", *extra), folder

    def launched_as(self, processes: int) -> "Ctx":
        """The run behaves as one of `processes` data-parallel processes (the accelerator reports that count)."""
        real = runner.make_accelerator

        class Launched:
            def __init__(self, accelerator):
                self._accelerator = accelerator
                self.num_processes = processes

            def __getattr__(self, name):
                return getattr(self._accelerator, name)
        self.monkeypatch.setattr(runner, "make_accelerator", lambda config: Launched(real(config)))
        return self

    def yaml(self, text: str) -> Path:
        path = self.tmp / "run.yaml"
        path.write_text(text)
        return path


def _data(breakage, file: str, *fragments: str):
    """A case that breaks the task's data: the message must name the file's full path."""
    def case(ctx: Ctx):
        argv, folder = ctx.broken_task(breakage)
        return argv, [str(folder / file) + ":", *fragments]
    return case


def _option(extra: list[str], *fragments: str):
    return lambda ctx: (ctx.base(*extra), list(fragments))


def _write(name: str, text: str):
    return lambda folder: (folder / name).write_text(text)


# 9 levels of 9 (534 bytes): 9**9 strings once expanded
_ALIAS_BOMB = "a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n" + "".join(
    f"{b}: &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefg", "bcdefgh")) + \
    "tasks: [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n"


def _symlink_loop(path: Path) -> Path:
    os.symlink(path.name, path)
    return path


def _adapters_linked_outside(ctx) -> Path:
    """The run with its adapters/ moved out to a folder `elsewhere` and linked back."""
    shutil.move(ctx.run / "adapters", ctx.tmp / "elsewhere")
    os.symlink(ctx.tmp / "elsewhere", ctx.run / "adapters")
    return ctx.run


CASES = {
    # data folder and tasks
    "data_dir missing from the config": lambda ctx: (
        ctx.base(data_dir=False), ["option 'data_dir': no data folder given"]),
    "data_dir does not exist": lambda ctx: (
        ctx.base("--data-dir", str(ctx.tmp / "nowhere")),
        [f"option 'data_dir': folder {ctx.tmp / 'nowhere'} does not exist"]),
    "data_dir is a file": lambda ctx: (
        ctx.base("--data-dir", str(ctx.yaml("x: 1\n"))), [f"option 'data_dir': {ctx.tmp / 'run.yaml'} is a file, "
                                                         "not a folder"]),
    "unknown task names the folder searched": lambda ctx: (
        ctx.base("--tasks", "harbor,nope"),
        [f"task 'nope' not found in data folder {ctx.syn}", "available: harbor, kitchen, library, orchard"]),
    "task appears twice": _option(["--tasks", "harbor,harbor"], "option 'tasks': a task appears twice"),
    "task name that climbs out": _option(["--tasks", "../../../../x"], "option 'tasks': task name '../../../../x' "
                                         "is not a plain dataset name (it holds a path separator)"),
    "task name that is an absolute path": _option(["--tasks", "/tmp/x"], "option 'tasks': task name '/tmp/x' is "
                                                  "not a plain dataset name"),
    "task name '..'": _option(["--tasks", ".."], "option 'tasks': task name '..' is not a plain dataset name (it "
                              "starts with '.')"),
    "data_dir is a symbolic link loop": lambda ctx: (
        ctx.base("--data-dir", str(_symlink_loop(ctx.tmp / "loop"))),
        [f"option 'data_dir': {ctx.tmp / 'loop'} is a symbolic link loop"]),
    "missing train split": _data(lambda f: (f / "train.json").unlink(), "train.json", "file not found"),
    "missing test split": _data(lambda f: (f / "test.json").unlink(), "test.json", "file not found"),
    "missing labels.json": _data(lambda f: (f / "labels.json").unlink(), "labels.json", "file not found"),
    "malformed JSON gives line and column": _data(
        _write("train.json", '[{"label": "a", "sentence": "x"},\n  {"label": }]'), "train.json",
        "malformed JSON at line 2, column 13"),
    "malformed labels.json": _data(_write("labels.json", '["a", "b"'), "labels.json", "malformed JSON at line 1"),
    "split not a list": _data(_write("train.json", '{"label": "a", "sentence": "x"}'), "train.json",
                              "expected a JSON array"),
    "empty split": _data(_write("test.json", "[]"), "test.json", "the split is empty"),
    "example not an object": _data(_write("train.json", '[{"label": "a", "sentence": "x"}, "oops"]'), "train.json",
                                   "example 1 is not an object"),
    "example without label": _data(_write("train.json", '[{"label": "a", "sentence": "x"}, {"sentence": "y"}]'),
                                   "train.json", "example 1 has no string field 'label'"),
    "example without sentence": _data(_write("test.json", '[{"label": "a"}]'), "test.json",
                                      "example 0 has no string field 'sentence'"),
    "non-string sentence": _data(_write("train.json", '[{"label": "a", "sentence": 5}]'), "train.json",
                                 "example 0 has no string field 'sentence' (its 'sentence' is int 5"),
    "label not in labels.json": _data(_write("train.json", '[{"label": "zzz", "sentence": "x"}]'), "train.json",
                                      "example 0 has label 'zzz', which is not in labels.json (a, b)"),
    "labels.json not a list of strings": _data(_write("labels.json", '{"a": 1}'), "labels.json",
                                               "expected a non-empty JSON list of label strings"),
    "blank label in labels.json": _data(_write("labels.json", '["a", "", "b"]'), "labels.json",
                                        "label 1 is blank ('')"),
    "labels that differ only in case": _data(_write("labels.json", '["Good", "Bad", "good"]'), "labels.json",
                                             "labels 'Good' and 'good' are one answer to exact match"),
    "instructions file missing": lambda ctx: (
        ctx.base("--instructions", str(ctx.tmp / "prompts.json")),
        [f"option 'instructions': file {ctx.tmp / 'prompts.json'} does not exist"]),
    # method and numeric ranges
    "unknown method": _option(["--method", "ewd"], "option 'method': unknown method 'ewd' (did you mean 'ewc'?); "
                              "available:", "n-lora", "--method-module"),
    "method option not a number": _option(["--lambda", "abc"], "nlora: error: options: key 'lambda' must be a "
                                          "number, got 'abc'"),
    "lr zero": _option(["--lr", "0"], "option 'lr': must be a positive number, got 0.0"),
    "lr negative": _option(["--lr", "-0.001"], "option 'lr': must be a positive number, got -0.001"),
    "lr infinite": _option(["--lr", "inf"], "option 'lr': must be a positive number, got inf"),
    "lora_r zero": _option(["--lora-r", "0"], "option 'lora_r': must be >= 1, got 0"),
    "lora_r negative": _option(["--lora-r", "-4"], "option 'lora_r': must be >= 1, got -4"),
    "lambda negative": _option(["--lambda", "-0.1"], "option 'lambda': must be >= 0", "got -0.1"),
    "lambda infinite": _option(["--lambda", "inf"], "option 'lambda': must be finite, got inf"),
    "lambda_per_task negative": _option(["--tasks", "harbor,orchard", "--lambda-per-task", "0.5,-1"],
                                        "option 'lambda_per_task': values must be >= 0", "[0.5, -1.0]"),
    "lambda_per_task wrong length": _option(["--lambda-per-task", "0.1,0.2,0.3"],
                                            "option 'lambda_per_task': has 3 values for 1 tasks"),
    "seed negative": _option(["--seed", "-1"], "option 'seed': must be >= 0, got -1"),
    "epochs zero": _option(["--epochs", "0"], "option 'epochs': must be >= 1, got 0"),
    "batch_size zero": _option(["--batch-size", "0"], "option 'batch_size': must be >= 1, got 0"),
    "batch_size negative": _option(["--batch-size", "-8"], "option 'batch_size': must be >= 1, got -8"),
    "penalty_chunk_size zero": _option(["--penalty-chunk-size", "0"],
                                       "option 'penalty_chunk_size': must be >= 1 when set, got 0"),
    "max_train_samples zero": _option(["--max-train-samples", "0"],
                                      "option 'max_train_samples': must be >= 1 when set, got 0"),
    "lora_dropout one": _option(["--lora-dropout", "1"], "option 'lora_dropout': must be in [0, 1), got 1.0"),
    "bad penalty_form": _option(["--penalty-form", "l2"],
                                "option 'penalty_form': 'l2' is not one of delta, reference, factors"),
    "bad device": _option(["--device", "gpu"], "option 'device': 'gpu' is not one of cpu, cuda, cuda:N, mps"),
    # value types and config files
    "lr not a number": _option(["--lr", "abc"], "key 'lr' must be a number, got 'abc'"),
    "epochs not an integer": _option(["--epochs", "1.5"], "key 'epochs' must be an integer, got '1.5'"),
    "unknown option on the command line": _option(["--learning-rate", "0.1"],
                                                  "unrecognized arguments: --learning-rate 0.1"),
    "unknown key in the YAML file": lambda ctx: (
        ctx.base("--config", str(ctx.yaml("learning_rate: 0.1\n"))),
        [f"config file {ctx.tmp / 'run.yaml'}: unknown key(s) 'learning_rate'; valid keys:", " lr,"]),
    "bad value type in the YAML file": lambda ctx: (
        ctx.base("--config", str(ctx.yaml("epochs: two\n"))),
        [f"config file {ctx.tmp / 'run.yaml'}: key 'epochs' must be an integer, got 'two'"]),
    "bad YAML file": lambda ctx: (
        ctx.base("--config", str(ctx.yaml("lr: 0.1\ntasks: [harbor\n"))),
        [f"config file {ctx.tmp / 'run.yaml'}: not valid YAML", "line 3"]),
    "alias bomb in the YAML file": lambda ctx: (
        ctx.base("--config", str(ctx.yaml(_ALIAS_BOMB))),
        [f"config file {ctx.tmp / 'run.yaml'}: line 2: aliases (*a) are not accepted"]),
    "key given twice in the YAML file": lambda ctx: (
        ctx.base("--config", str(ctx.yaml("epochs: 1\nlr: 0.01\nepochs: 3\n"))),
        [f"config file {ctx.tmp / 'run.yaml'}: line 3: key 'epochs' is given twice"]),
    "epochs beyond any sane count": lambda ctx: (
        ctx.base("--config", str(ctx.yaml("epochs: 1.0e+10\n"))),
        [f"config file {ctx.tmp / 'run.yaml'}: key 'epochs' is out of range: 10000000000"]),
    "YAML file not a mapping": lambda ctx: (
        ctx.base("--config", str(ctx.yaml("- lr\n- 0.1\n"))),
        [f"config file {ctx.tmp / 'run.yaml'}: expected a mapping of keys to values, got list"]),
    "config file missing": lambda ctx: (
        ctx.base("--config", str(ctx.tmp / "none.yaml")), [f"config file {ctx.tmp / 'none.yaml'} does not exist"]),
    # the model
    "target module not in the model": _option(
        ["--target-modules", "q_proj,v"],
        "option 'target_modules': ['q_proj'] not found in model 'tiny-t5'; its linear layers are named",
        "lm_head, o, q, v, wi, wo"),
    "penalty_form reference on a rectangular layer": _option(
        ["--method", "n-lora", "--penalty-form", "reference", "--target-modules", "q,wi"],
        "option 'penalty_form': 'reference'", "needs square layers",
        "layer encoder.block.0.layer.1.DenseReluDense.wi is 128 x 64 (d_out x d_in) (and 3 more)",
        "use penalty_form delta", "or factors"),
    "batch_size not split across the processes": lambda ctx: (
        ctx.launched_as(2).base("--batch-size", "3"),
        ["option 'batch_size': 3 does not split evenly across 2 processes"]),
    "model that cannot be loaded": _option(["--model", "/nonexistent/model"],
                                           "option 'model': cannot load '/nonexistent/model'"),
    # the output directory
    "output dir holds a run": lambda ctx: (
        ctx.base(overwrite=False),
        [f"output dir {ctx.run} already holds a run", "--resume", "--overwrite"]),
    "resume with no run": lambda ctx: (
        ctx.base("--resume", overwrite=False, out=ctx.tmp / "empty"),
        [f"cannot resume: {ctx.tmp / 'empty'} holds no run"]),
    "resume and overwrite together": lambda ctx: (
        ctx.base("--resume"), ["options 'resume' and 'overwrite' exclude each other"]),
    "resume command with no run": lambda ctx: (
        ["resume", str(ctx.tmp / "empty"), "--quiet"], [f"{ctx.tmp / 'empty' / 'config.yaml'} does not exist"]),
    "resume with a changed config": lambda ctx: (
        ctx.base("--resume", "--lr", "0.5", overwrite=False),
        [f"cannot resume {ctx.run}: the configuration changed (lr: 0.001 in the run, 0.5 now)"]),
    "overwrite where adapters/ is a link to a folder outside the run": lambda ctx: (
        ctx.base(out=_adapters_linked_outside(ctx)),
        [f"output dir {ctx.run}: adapters is a symbolic link to {ctx.tmp / 'elsewhere'}", "--overwrite"]),
    "output dir under a regular file": lambda ctx: (
        ctx.base(overwrite=False, out=ctx.yaml("x: 1\n") / "run"),
        [f"output dir {ctx.tmp / 'run.yaml' / 'run'} cannot be created: {ctx.tmp / 'run.yaml'} is a file, "
         "not a folder"]),
    "output dir is a regular file": lambda ctx: (
        ctx.base(overwrite=False, out=ctx.yaml("x: 1\n")),
        [f"output dir {ctx.tmp / 'run.yaml'} cannot be created: {ctx.tmp / 'run.yaml'} is a file"]),
}


@pytest.fixture
def ctx(tmp_path, synthetic_dir, finished_run, make_task, monkeypatch) -> Ctx:
    return Ctx(tmp_path, synthetic_dir, finished_run, make_task, monkeypatch)


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started although the input is invalid")
    monkeypatch.setattr(runner, "train_task", refuse)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_fails_fast_with_one_clear_message(ctx, capsys, no_training, synthetic_dir, case):
    argv, fragments = case(ctx)
    before = _snapshot(ctx.tmp, synthetic_dir)
    code, err = _cli(argv, capsys)
    assert code == 2, err
    for fragment in fragments:
        assert fragment in err
    assert "Traceback" not in err and err.count("error:") == 1
    assert _snapshot(ctx.tmp, synthetic_dir) == before, "an existing file or folder was changed"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="permissions do not bind root")
def test_unwritable_output_dir(ctx, capsys, no_training):
    locked = ctx.tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, err = _cli(ctx.base(overwrite=False, out=locked / "run"), capsys)
    finally:
        locked.chmod(0o700)
    assert code == 2 and f"output dir {locked / 'run'} is not writable ({locked}: Permission denied)" in err
    assert list(locked.iterdir()) == []


def test_unwritable_disk_is_named(ctx, capsys, no_training, monkeypatch):
    """A read-only file system (as root, permissions cannot simulate one)."""
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(rundir.tempfile, "TemporaryFile", read_only)
    before = _snapshot(ctx.tmp)
    code, err = _cli(ctx.base(), capsys)
    assert code == 2 and f"output dir {ctx.run} is not writable ({ctx.run}: Read-only file system)" in err
    assert _snapshot(ctx.tmp) == before


def test_a_valid_run_leaves_no_probe_behind_and_overwrites_only_when_valid(ctx, capsys):
    before = _snapshot(ctx.run)
    assert main(ctx.base("--seed", "7")) == 0
    assert _snapshot(ctx.run) != before
    assert not [p for p in ctx.run.rglob("*") if p.name.startswith(".")]
    assert json.loads((ctx.run / "metrics.json").read_text())["seed"] == 7


def test_a_run_started_with_overwrite_resumes_with_the_resume_command(ctx, capsys):
    assert main(ctx.base("--tasks", "harbor,orchard", "--checkpoint-steps", "1")) == 0
    metrics = json.loads((ctx.run / "metrics.json").read_text())
    # back to the state after the first task, as if the run had stopped there
    metrics["phases_completed"] = [0]
    metrics["accuracy_matrix"][1] = [None, None]
    (ctx.run / "metrics.json").write_text(json.dumps(metrics))
    shutil.rmtree(ctx.run / "adapters" / "1-orchard")
    code, err = _cli(["resume", str(ctx.run), "--quiet"], capsys)
    assert code == 0, err
    assert json.loads((ctx.run / "metrics.json").read_text())["complete"] is True


# ---------------------------------------------------------------------------------------------------- NaN guard

def _poison_loss(monkeypatch, at_call: int) -> None:
    """Make the task loss NaN at its `at_call`-th computation (1-based, counted over the whole run)."""
    real = runner.make_objective

    def make(*args, **kwargs):
        objective = real(*args, **kwargs)
        forward, calls = objective.forward, itertools.count(1)

        def poisoned(model, batch):
            out = forward(model, batch)
            return dataclasses.replace(out, loss=out.loss * float("nan")) if next(calls) == at_call else out
        objective.forward = poisoned
        return objective
    monkeypatch.setattr(runner, "make_objective", make)


def test_nan_loss_stops_the_task_and_keeps_the_last_good_checkpoint(tmp_path, synthetic_dir, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["run", "--model", "tiny-t5", "--tasks", "harbor,orchard", "--data-dir", str(synthetic_dir),
            "--output-dir", str(out), *TINY, "--max-train-samples", "12", "--epochs", "2",
            "--checkpoint-steps", "2"]
    # 3 batches per epoch, 6 per task: the 10th loss is the 4th batch of the second task, after its checkpoint
    # at step 2 and before the one at step 4
    _poison_loss(monkeypatch, at_call=10)
    code, err = _cli(argv, capsys)
    assert code == 2
    assert "task 1 ([2/2] train orchard): non-finite loss at step 3 (task loss nan" in err
    assert "lower option 'lr' or 'lambda'. The last checkpoint is kept." in err and "Traceback" not in err
    assert (out / "adapters" / "0-harbor").is_dir() and not (out / "adapters" / "1-orchard").exists()
    assert json.loads((out / "metrics.json").read_text())["phases_completed"] == [0]
    progress, params, state = load_checkpoint(out)
    assert (progress.phase, progress.step) == (1, 2)
    assert params and all(torch.isfinite(t).all() for t in params.values())
    assert "optimizer" in state and "scheduler" in state
    # the kept checkpoint is where a resumed run continues from
    monkeypatch.undo()
    code, err = _cli(argv[:-1] + ["2", "--resume"], capsys)
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["complete"] is True
    assert not (out / "checkpoint").exists()


@pytest.mark.parametrize("lr,message", [
    ("1e35", "non-finite loss at step 1 (task loss"),    # the update overflows the N-LoRA penalty (λ 0.4) to inf
    ("1e38", "the optimizer step overflowed at step 0"),  # Adam's step size overflows float32 itself
])
def test_enormous_lr_is_stopped_by_the_numeric_guard(tmp_path, synthetic_dir, capsys, lr, message):
    out = tmp_path / "run"
    code, err = _cli(["run", "--model", "tiny-t5", "--tasks", "harbor", "--data-dir", str(synthetic_dir),
                      "--output-dir", str(out), *TINY, "--lr", lr, "--lambda", "0.4"], capsys)
    assert code == 2 and f"task 0 ([1/1] train harbor): {message}" in err and "lower option 'lr'" in err
    assert "Traceback" not in err
    assert not (out / "adapters").exists()  # metrics.json holds the run's plan from its start, no finished phase
    assert json.loads((out / "metrics.json").read_text())["phases_completed"] == []


def test_weights_that_overflow_are_never_checkpointed(tmp_path, synthetic_dir, capsys, monkeypatch):
    """A finite loss can come with an update that makes the weights inf; the guard stops before saving them."""
    real_step = torch.optim.AdamW.step
    calls = itertools.count(1)

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        if next(calls) == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "run"
    code, err = _cli(["run", "--model", "tiny-t5", "--tasks", "harbor", "--data-dir", str(synthetic_dir),
                      "--output-dir", str(out), *TINY, "--max-train-samples", "16", "--checkpoint-steps", "1",
                      "--epochs", "2"], capsys)
    assert code == 2 and "non-finite adapter weights after step 3" in err
    progress, params, _ = load_checkpoint(out)
    assert progress.step == 2 and all(torch.isfinite(t).all() for t in params.values())
    assert not (out / "adapters").exists()


# ---------------------------------------------------------------------------------------------------- safety

def _package_sources() -> dict[Path, str]:
    root = Path(nlora.__file__).parent
    return {p: p.read_text() for p in sorted(root.rglob("*.py"))}


def test_torch_load_only_with_weights_only_and_no_pickle():
    loads = []
    for path, text in _package_sources().items():
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for n in names), path
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                    f"{path}:{node.lineno}: torch.load without weights_only=True"
                loads.append(path.name)
    assert loads == ["checkpoint.py"]  # the optimizer state of mid-task checkpoints, the only one


def test_run_directory_holds_weights_only_as_safetensors(finished_run):
    files = [p for p in finished_run.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".json", ".jsonl", ".yaml", ".safetensors"}
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert weights and all(load_file(str(p)) for p in weights)


def test_checkpoint_holds_safetensors_and_refuses_pickled_code(tmp_path, synthetic_dir, monkeypatch):
    from nlora.train import loop as training

    real = training.save_checkpoint
    saved = []

    def listing(run_dir, *args, **kwargs):
        folder = real(run_dir, *args, **kwargs)
        saved.append(sorted(p.name for p in folder.iterdir()))
        return folder
    monkeypatch.setattr(training, "save_checkpoint", listing)
    assert main(["run", "--model", "tiny-t5", "--tasks", "harbor", "--data-dir", str(synthetic_dir),
                 "--output-dir", str(tmp_path / "run"), *TINY, "--epochs", "2", "--checkpoint-steps", "1"]) == 0
    assert saved and saved[0] == ["adapter.safetensors", "progress.json", "trainer_state.pt"]

    # a trainer state that would run code when unpickled is refused, and the code never runs
    folder = tmp_path / "evil" / "checkpoint"
    folder.mkdir(parents=True)
    (folder / "progress.json").write_text(json.dumps({"phase": 0, "epoch": 0, "batch": 1, "step": 1,
                                                      "loss_sum": 1.0, "reg_sum": 0.0}))
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(folder / "adapter.safetensors"))
    marker = tmp_path / "pwned"
    torch.save({"optimizer": _Payload(str(marker))}, folder / "trainer_state.pt")
    with pytest.raises(NloraError, match="checkpoint .* is unreadable"):
        load_checkpoint(tmp_path / "evil")
    assert not marker.exists()


class _Payload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):  # unpickling it would create a file
        return (open, (self.path, "w"))


def test_trust_remote_code_is_off_unless_passed(tmp_path, synthetic_dir, capsys, monkeypatch):
    from nlora import models

    assert RunConfig().trust_remote_code is False
    seen = []

    class Recorder:
        @staticmethod
        def from_pretrained(path, **kwargs):
            seen.append(kwargs.get("trust_remote_code", "not passed"))
            raise OSError("stop here")
    monkeypatch.setattr(models, "AutoConfig", Recorder)
    argv = ["run", "--model", "some-org/some-model", "--tasks", "harbor", "--data-dir", str(synthetic_dir),
            "--output-dir", str(tmp_path / "run"), *TINY]
    assert _cli(argv, capsys)[0] == 2
    assert _cli(argv + ["--trust-remote-code"], capsys)[0] == 2
    assert seen == [False, True]


@pytest.mark.parametrize("trust", [False, True])
def test_every_loader_gets_the_trust_remote_code_setting(monkeypatch, trust):
    from types import SimpleNamespace

    from nlora import models

    tiny = models.load_backbone("tiny-t5")
    seen = {}

    def recorder(name, result):
        class Loader:
            @staticmethod
            def from_pretrained(path, **kwargs):
                seen[name] = kwargs.get("trust_remote_code", "not passed")
                return result
        return Loader
    config = SimpleNamespace(is_encoder_decoder=True, architectures=[], model_type="t5")
    monkeypatch.setattr(models, "AutoConfig", recorder("config", config))
    monkeypatch.setattr(models, "AutoModelForSeq2SeqLM", recorder("model", tiny.model))
    monkeypatch.setattr(models, "AutoTokenizer", recorder("tokenizer", tiny.tokenizer))
    args = ("some-org/some-model",) + (("auto", True) if trust else ())
    assert models.load_backbone(*args).kind == "seq2seq"
    assert seen == {"config": trust, "model": trust, "tokenizer": trust}
