"""Data parallelism through accelerate: 2 CPU processes (gloo) give the same run as 1 process, only the main
process writes, and the engines that would shard the LoRA factors are refused. The gradient of one step (1 and 2
processes, accumulation k x b) is checked against plain autograd in test_training_step.py. The multi-process test
is marked `distributed` (deselect with -m "not distributed")."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from nlora import cli
from nlora.cli import main
from nlora.config import RunConfig
from nlora.errors import NloraError
from nlora.train.engine import _check_engine, check_launch, make_accelerator
from nlora.train.loop import shard
from launch_support import EXAMPLES, ROOT, RUN, fake_accelerator
from same_run import ADAPTER_ATOL, assert_same_run

# Installed as sitecustomize in the launched processes: logs every file-system change under the run directory
# (an audit hook sees opens for writing, renames, removals and new folders, whoever makes them).
WATCH = '''
import atexit, json, os, sys
_root = os.path.realpath(os.environ["NLORA_TEST_WATCH"])
_seen = []
def _hook(event, args):
    if event not in ("open", "os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree"):
        return
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \\
            (mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if not writing or isinstance(path, int):
            return
    else:
        path = args[0]
    if isinstance(path, (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(path))
        if path.startswith(_root + os.sep):
            _seen.append([event, path])
sys.addaudithook(_hook)
def _dump():
    name = f"writes-{os.environ.get('RANK', 'launcher')}-{os.getpid()}.json"
    with open(os.path.join(os.environ["NLORA_TEST_LOG"], name), "w") as f:
        json.dump(_seen, f)
atexit.register(_dump)
'''


def _same_log(a: Path, b: Path) -> None:
    """log.jsonl: the same steps with the same losses, and the tokens per step summed over the processes."""
    from nlora.tracking import read_log

    left, right = ([line for line in read_log(run / "log.jsonl") if line["event"] == "train"] for run in (a, b))
    assert [(x["phase"], x["step"], x["global_step"]) for x in left] == \
        [(x["phase"], x["step"], x["global_step"]) for x in right] and left
    for x, y in zip(left, right):
        for key in ("loss", "regularizer", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-3, abs=1e-7), key
        assert y["tokens_per_s"] * y["s_per_step"] == pytest.approx(x["tokens_per_s"] * x["s_per_step"], rel=1e-4)


def _same_run(single: Path, other: Path) -> None:
    """The same run within float tolerance (tests/same_run.py), complete predictions, adapters that trained."""
    assert_same_run(single, other, exact=False)
    for path in sorted((single / "predictions").rglob("*.jsonl")):
        assert len(path.read_text().splitlines()) == 7
    moved = [v for p in sorted(other.rglob("adapter_model.safetensors")) for k, v in load_file(str(p)).items()
             if "lora_B" in k]
    assert max(v.abs().max().item() for v in moved) > 100 * ADAPTER_ATOL, "the adapters barely trained"


@pytest.mark.distributed
def test_two_processes_give_the_single_process_run(tmp_path, synthetic_dir, single_run):
    single, multi, logs, site = single_run, tmp_path / "multi", tmp_path / "logs", tmp_path / "site"
    logs.mkdir()
    site.mkdir()
    (site / "sitecustomize.py").write_text(WATCH)
    env = dict(os.environ, NLORA_TEST_WATCH=str(multi), NLORA_TEST_LOG=str(logs),
               PYTHONPATH=os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("WORLD_SIZE", None)
    launched = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(EXAMPLES / "ddp.yaml"),
         "--num_processes", "2", "-m", "nlora", *RUN, "--data-dir", str(synthetic_dir), "--output-dir", str(multi)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = launched.communicate(timeout=600)
    assert launched.returncode == 0, err[-3000:]
    assert out.count("run directory:") == 1, "only the main process prints the summary"

    _same_run(single, multi)
    _same_log(single, multi)

    writers = {}
    for log in logs.glob("writes-*.json"):
        who = log.name.split("-")[1]
        writers[who] = writers.get(who, []) + json.loads(log.read_text())
    assert {"0", "1", "launcher"} <= writers.keys()
    assert writers["0"], "the main process wrote the run directory"
    assert writers["1"] == [] and writers["launcher"] == [], "only the main process changes the run directory"


def _launched_env(*launch: str) -> dict[str, str]:
    """The environment `accelerate launch LAUNCH -m nlora run` gives the process(es) it starts."""
    from accelerate.utils.launch import prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    args = _validate_launch_command(launch_command_parser().parse_args([*launch, "-m", "nlora", "run"]))[0]
    if args.multi_gpu:  # torchrun's own variables (WORLD_SIZE, ...) come on top of these
        return {**prepare_multi_gpu_env(args), "WORLD_SIZE": str(args.num_processes)}
    return prepare_simple_launcher_cmd_env(args)[1]


@pytest.mark.parametrize("launch,refused", [(("--num_processes", "2", "--cpu"), True),
                                            (("--num_processes", "2"), True),  # no GPU: the same launcher
                                            (("--num_processes", "1", "--cpu"), False),
                                            (("--config_file", str(EXAMPLES / "ddp.yaml")), False)])
def test_a_launch_that_starts_fewer_processes_than_asked_is_refused(monkeypatch, launch, refused):
    monkeypatch.setattr(os, "environ", _launched_env(*launch))
    if refused:
        with pytest.raises(NloraError, match="started one process although more were asked for"):
            make_accelerator(RunConfig(tasks=["x"], device="cpu"))
    else:
        check_launch()


def test_bf16_and_accumulation_reach_the_accelerator(tmp_path, synthetic_dir):
    accelerator = make_accelerator(RunConfig(tasks=["x"], device="cpu", mixed_precision="bf16",
                                             gradient_accumulation_steps=2))
    assert accelerator.mixed_precision == "bf16" and accelerator.gradient_accumulation_steps == 2
    assert main(["run", "--model", "tiny-t5", "--tasks", "harbor", "--data-dir", str(synthetic_dir),
                 "--max-train-samples", "4", "--max-eval-samples", "2", "--batch-size", "2",
                 "--gradient-accumulation-steps", "2", "--mixed-precision", "bf16", "--device", "cpu", "--quiet",
                 "--output-dir", str(tmp_path / "bf16")]) == 0
    assert yaml.safe_load((tmp_path / "bf16" / "config.yaml").read_text())["mixed_precision"] == "bf16"
    accelerator = make_accelerator(RunConfig(tasks=["x"], device="cpu"))  # a later run in the same process
    assert accelerator.mixed_precision == "no" and accelerator.gradient_accumulation_steps == 1


@pytest.mark.parametrize("variable,value,option", [("ACCELERATE_MIXED_PRECISION", "bf16", "--mixed-precision bf16"),
                                                   ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4",
                                                    "--gradient-accumulation-steps 4")])
def test_launcher_settings_must_agree_with_the_run_options(monkeypatch, variable, value, option):
    monkeypatch.setenv(variable, value)
    with pytest.raises(NloraError, match=option):
        make_accelerator(RunConfig(tasks=["x"], device="cpu"))


def test_engines_that_shard_the_lora_factors_are_refused():
    config = RunConfig(tasks=["x"], batch_size=8, gradient_accumulation_steps=2, max_grad_norm=0.5)
    with pytest.raises(NloraError, match="--sharding fsdp2"):
        _check_engine(fake_accelerator(DistributedType.FSDP), config)
    with pytest.raises(NloraError, match="ZeRO stage 3"):
        _check_engine(fake_accelerator(DistributedType.DEEPSPEED, zero_stage=3), config)
    with pytest.raises(NloraError, match="gradient_accumulation_steps 4"):
        _check_engine(fake_accelerator(DistributedType.DEEPSPEED, gradient_accumulation_steps=4), config)
    accelerator = fake_accelerator(DistributedType.DEEPSPEED, gradient_accumulation_steps="auto",
                                    train_micro_batch_size_per_gpu="auto")
    _check_engine(accelerator, config)  # ZeRO-2: the batch settings come from the run's options
    assert accelerator.state.deepspeed_plugin.deepspeed_config == {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5}
    _check_engine(fake_accelerator(DistributedType.MULTI_GPU), config)


def test_shards_cover_a_batch_in_order():
    for n in range(0, 10):
        batch = list(range(n))
        parts = [shard(batch, rank, 3) for rank in range(3)]
        assert sum(parts, []) == batch and max(map(len, parts)) - min(map(len, parts)) <= 1


def test_example_configs_load_as_accelerate_configs():
    ddp = load_config_from_file(str(EXAMPLES / "ddp.yaml"))
    assert ddp.distributed_type == DistributedType.MULTI_GPU and ddp.mixed_precision == "no"
    ds = load_config_from_file(str(EXAMPLES / "deepspeed_zero2.yaml"))
    assert ds.distributed_type == DistributedType.DEEPSPEED and ds.deepspeed_config["zero_stage"] == 2
    # the settings nlora fills from its own options are left to it
    assert not {"gradient_accumulation_steps", "gradient_clipping"} & ds.deepspeed_config.keys()
    assert load_config_from_file(str(EXAMPLES / "fsdp2.yaml")).distributed_type == DistributedType.MULTI_GPU
    for name, deepspeed in (("ddp.yaml", False), ("fsdp2.yaml", False), ("deepspeed_zero2.yaml", True)):
        args = launch_command_parser().parse_args(["--config_file", str(EXAMPLES / name), "-m", "nlora", "run"])
        args = _validate_launch_command(args)[0]
        assert args.use_deepspeed == deepspeed and args.num_processes == 2
        assert args.gradient_accumulation_steps is None and args.mixed_precision == "no"


def test_num_processes_relaunches_through_accelerate(monkeypatch):
    seen = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr("accelerate.commands.launch.launch_command", seen.append)
    assert main(["run", "--tasks", "a", "--num-processes", "2", "--batch-size", "4", "--num-processes=2"]) == 0
    args = seen[0]
    assert args.multi_gpu and args.num_processes == 2 and args.module and args.training_script == "nlora"
    assert args.training_script_args == ["run", "--tasks", "a", "--batch-size", "4"]
    monkeypatch.setenv("WORLD_SIZE", "3")  # inside a launched process the count must match the launch
    assert cli._launch(["run"], 3) is None
    with pytest.raises(NloraError, match="one of 3"):
        cli._launch(["run"], 2)


DESELECTING = ("-m", "-k", "--deselect", "--ignore", "--ignore-glob", "--lf", "--last-failed", "--sw", "--stepwise")


def test_ci_never_deselects_the_distributed_tests():
    # the task loss normalised per process and FSDP2's replicated gradients are caught by the `distributed` tests
    # alone: .ci/run must run the whole suite, whatever the environment or the pytest configuration says
    script = (ROOT / ".ci" / "run").read_text()
    assert "unset PYTEST_ADDOPTS" in script
    commands = [shlex.split(line) for line in script.splitlines() if "pytest" in line.split("#")[0]]
    pytest_args = [argv[argv.index("pytest") + 1:] for argv in commands]  # after `python -m pytest`
    assert pytest_args and all(args[-1] == "tests" for args in pytest_args)
    options = [a for args in pytest_args for a in args]
    ini = (ROOT / "pyproject.toml").read_text().split("[tool.pytest.ini_options]")[1].split("\n[")[0]
    options += [line.split("=", 1)[1] for line in ini.splitlines() if line.strip().startswith("addopts")]
    assert not [a for a in options if a.split("=")[0] in DESELECTING or any(a.startswith(d) for d in ("-m", "-k"))]
