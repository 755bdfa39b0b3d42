"""The method conformance kit: each method of a given list runs the same tiny sequence (tiny-llama, whose base has
no dropout; 3 tasks of 3 optimizer steps: a classification task, a free-text one, another classification task; a
checkpoint every 2 steps, LoRA dropout 0) with its `smoke_options`, and must show, each time against an independent
reference:

- a run killed during its second task, 2 steps into it (SIGKILL, in a process of its own; it resumes from the
  checkpoint after that task's second step) and resumed ends exactly as the uninterrupted run: adapters, method
  state, metrics, predictions and log (nlora.testing.same_run). A third task trains after the resume, so state
  that only a later task reads (a counter, a running sum) is checked too;
- its saved method state loads back and saves to the same bytes;
- what it evaluated is what its saved adapters compute, rebuilt without nlora or PEFT (nlora.testing.lora_reference):
  the sum of adapters 0..k (stacked, folded or not), the one adapter of phase k (snapshot), or task j's own
  adapter (task id); for a method that trains the base (Method.trains "base"), the whole model saved after phase k,
  loaded with plain transformers;
- `nlora predict` and `nlora export` reproduce its last row of predictions;
- an option of another method, or a bad value of its own, is refused before anything is written;
- 2 processes give the 1-process run (one accelerate launch runs every method in turn; marked distributed).

`conformance_tests` returns these as pytest tests and fixtures, to be put in a test module's globals.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from transformers import AutoTokenizer

from ..cli import main
from ..config import load_config
from ..eval.evaluate import evaluate, generation_of, scoring_of
from ..method_state import load_state, save_state
from ..methods import METHODS, get_method  # the package's methods registered
from ..models import load_backbone
from ..objectives import make_objective
from ..options import base_type, option_fields, public_name
from ..runner import load_tasks
from ..tasks.synthetic import write_synthetic_benchmark, write_synthetic_trace
from . import fresh_process
from .lora_reference import add_adapters, load_saved_model
from .same_run import assert_same_run

# a classification task, a free-text one (TRACE's layout, scored by edit similarity), a classification one: every
# check covers both kinds of answer; the run is killed while it trains on free text and resumes into the third
TASKS = ["harbor", "reverse", "orchard"]
SAMPLES, BATCH = 6, 2  # 3 optimizer steps per task
# the kill: the 3rd step of the 2nd task (steps 4-6 of the process; mtl's one phase: its 6th step), after the
# step's hooks and before its checkpoint, so the resumed run starts from the checkpoint 2 steps into the task
FAULT = "train_step:6"
# tiny-llama: a base without dropout of its own (tiny-t5's 0.1 draws other masks when the batch is split across
# processes, so 1 and 2 processes could not compute the same run)
BASE = ["--model", "tiny-llama", "--tasks", ",".join(TASKS), "--task-metrics", "reverse=edit_similarity",
        "--max-train-samples", str(SAMPLES), "--max-eval-samples", "4",
        "--batch-size", str(BATCH), "--eval-batch-size", "4", "--epochs", "1", "--checkpoint-steps", "2",
        "--max-target-length", "4", "--lora-dropout", "0", "--device", "cpu", "--quiet", "--log-steps", "1"]
# a tiny T5 saved without dropout, beside the tasks: the seq2seq runs of a launch (1 and 2 processes compute the
# same run)
SEQ2SEQ_MODEL = "tiny-t5-without-dropout"


def builtin_methods() -> list[str]:
    """The methods nlora itself ships (not those an installed package or a method module registered)."""
    return sorted(name for name, cls in METHODS.items() if cls.__module__.startswith("nlora.methods."))


def write_kit_data(root: Path) -> Path:
    """The kit's tasks in one data folder (harbor and orchard in the CL_Benchmark layout, reverse in TRACE's) and
    SEQ2SEQ_MODEL beside them."""
    write_synthetic_benchmark(root, n_train=SAMPLES, n_test=4, tasks=("harbor", "orchard"))
    write_synthetic_trace(root, n_train=SAMPLES, n_eval=4, n_test=4, tasks=("reverse",))
    t5 = load_backbone("tiny-t5")
    t5.model.config.dropout_rate = 0.0
    t5.model.save_pretrained(root / SEQ2SEQ_MODEL)
    t5.tokenizer.save_pretrained(root / SEQ2SEQ_MODEL)
    return root


def _flags(options: dict) -> list[str]:
    out = []
    for key, value in options.items():
        out += [f"--{key.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return out


class Kit:
    """The runs of the kit for `methods` (a name may be a variant: a method with extra options, `variants`)."""

    def __init__(self, methods: list[str], method_module: list[str], variants: dict[str, tuple[str, list[str]]]):
        self.modules = list(method_module)
        for name in methods:
            get_method(variants.get(name, (name, []))[0], self.modules)  # an unknown method fails at collection
        self.methods, self.variants = list(methods), dict(variants)

    def base(self, name: str) -> str:
        return self.variants.get(name, (name, []))[0]

    def method(self, name: str, config=None):
        cls = get_method(self.base(name), self.modules)
        return cls(config) if config is not None else cls

    def argv(self, name: str, data: Path, out: Path) -> list[str]:
        module = ["--method-module", ",".join(self.modules)] if self.modules else []
        base = list(BASE)
        if "seq2seq" in name:
            base[base.index("--model") + 1] = str(data / SEQ2SEQ_MODEL)
        return ["run", "--method", self.base(name), *module, *_flags(self.method(name).smoke_options),
                *self.variants.get(name, (name, []))[1], *base, "--data-dir", str(data), "--output-dir", str(out)]


class _Runs(dict):
    """The uninterrupted run of each method, made on first use (a `-k` selection runs only its methods)."""

    def __init__(self, kit: Kit, root: Path, data: Path):
        super().__init__()
        self.kit, self.root, self.data = kit, root, data

    def __missing__(self, name: str) -> Path:
        out = self.root / name
        assert main(self.kit.argv(name, self.data, out)) == 0, name
        self[name] = out
        return out


# ------------------------------------------------------------------------------------------------ the checks

def check_killed_and_resumed(kit: Kit, name: str, data: Path, reference: Path, tmp: Path) -> None:
    out = tmp / "run"
    killed = fresh_process.run(fresh_process.nlora_main, kit.argv(name, data, out), log=tmp / "killed.log",
                               env=dict(os.environ, NLORA_FAULT=FAULT))
    assert killed.returncode == -9, killed.output
    assert (out / "checkpoint").is_dir(), "killed after a mid-task checkpoint"
    assert main(["resume", str(out), "--quiet"]) == 0
    assert_same_run(reference, out, log=True)


def _config(run_dir: Path):
    return load_config(run_dir / "config.yaml", saved_run=True)


def check_state_round_trips(kit: Kit, name: str, run: Path, tmp: Path) -> None:
    config = _config(run)
    for folder in sorted((run / "adapters").iterdir()):
        state = load_state(folder)
        if state is None:
            continue
        fresh = kit.method(name, config)
        fresh.load_state_dict(state)
        (tmp / folder.name).mkdir()
        save_state(fresh.state_dict(), tmp / folder.name)
        for file in ("method_state.json", "method_state.safetensors"):
            if (folder / file).exists():
                assert (tmp / folder.name / file).read_bytes() == (folder / file).read_bytes(), file


def _rows(run: Path) -> list[Path]:
    """predictions/<k>-<task>/ in phase order (predictions/base/ is the base model's)."""
    rows = [p for p in (run / "predictions").iterdir() if p.name.split("-")[0].isdigit()]
    return sorted(rows, key=lambda p: int(p.name.split("-")[0]))


def _reference_folders(method, k: int, j: int, folders: list[Path]) -> tuple[list[Path], list]:
    """The adapter folders whose sum is the model that evaluated task j after phase k, and each one's weight in
    it (what the method declares from its state saved after phase k: Method.update_scales; 1 by default)."""
    if method.needs_task_id:
        return ([folders[j]] if j < len(folders) else []), []
    state = load_state(folders[-1])  # phase k's
    if state is not None:
        method.load_state_dict(state)
    declared = method.update_scales(k)
    if method.adapter_layout == "snapshot":
        return [folders[-1]], [declared.get(method.adapter_name(k))]
    return folders[: k + 1], [declared.get(method.adapter_name(p)) for p in range(k + 1)]


def check_evaluated_is_what_adapters_compute(kit: Kit, name: str, run: Path) -> None:
    config = _config(run)
    m = kit.method(name, config)
    tasks = load_tasks(config)
    checked = 0
    for row in _rows(run)[-1:]:  # the last row: every adapter of the run takes part (summed, folded, or its own)
        k = int(row.name.split("-")[0])
        folders = sorted((run / "adapters").iterdir(), key=lambda p: int(p.name.split("-")[0]))
        folders = [f for f in folders if int(f.name.split("-")[0]) <= k]
        if m.trains == "base" and not (run / "adapters" / row.name).is_dir():
            continue  # this phase's whole model was not kept (only the latest is, by default)
        for path in sorted(row.glob("*.jsonl")):
            j = config.tasks.index(path.stem)
            backbone = load_backbone(config.model, config.model_kind)
            if m.trains == "base":
                model = load_saved_model(run / "adapters" / row.name, backbone.kind)
            else:
                model = add_adapters(backbone.model, *_reference_folders(m, k, j, folders)).eval()
            objective = make_objective(backbone.kind, backbone.tokenizer, config.max_source_length,
                                       config.max_target_length, config.eval_mode)
            _, rows = evaluate(objective, model, tasks[j].test, config.eval_batch_size, progress=False,
                               scoring=scoring_of(config, tasks[j]), generation=generation_of(config, tasks[j], j, k))
            assert rows == [json.loads(line) for line in path.open()], path
            checked += 1
    assert checked


def check_predict_and_export(kit: Kit, name: str, run: Path, tmp: Path) -> None:
    config = _config(run)
    last = _rows(run)[-1]
    assert main(["predict", str(run), "--tasks", ",".join(TASKS), "--output", str(tmp / "p.jsonl"),
                 "--quiet"]) == 0
    predicted = [json.loads(line) for line in (tmp / "p.jsonl").open()]
    evaluated = [json.loads(line) for task in TASKS for line in (last / f"{task}.jsonl").open()]
    assert [r["prediction"] for r in predicted] == [r["prediction"] for r in evaluated]
    method = kit.method(name, config)
    if method.needs_task_id:
        assert main(["export", str(run), str(tmp / "export")]) == 2  # no single model to export
        return
    assert main(["export", str(run), str(tmp / "export")]) == 0
    backbone = load_backbone(config.model, config.model_kind)
    tokenizer = backbone.tokenizer
    if method.trains == "base":  # the export is the whole model, with its tokenizer
        model = load_saved_model(tmp / "export", backbone.kind)
        tokenizer = AutoTokenizer.from_pretrained(str(tmp / "export"))
    else:
        model = add_adapters(backbone.model, [tmp / "export"]).eval()
    objective = make_objective(backbone.kind, tokenizer, config.max_source_length,
                               config.max_target_length, config.eval_mode)
    k = int(last.name.split("-")[0])
    rows = [r for j, t in enumerate(load_tasks(config))
            for r in evaluate(objective, model, t.test, 4, progress=False,
                              generation=generation_of(config, t, j, k))[1]]
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in evaluated]


def _other_methods_option(name: str) -> str:
    mine = set(METHODS[name].Options.keys())
    return next(k for m in sorted(METHODS) if m != name for k in METHODS[m].Options.keys() if k not in mine)


def check_bad_options_refused(kit: Kit, name: str, data: Path, out: Path, capsys) -> None:
    foreign = _other_methods_option(name)
    module = ["--method-module", ",".join(kit.modules)] if kit.modules else []
    assert main(["run", "--method", name, *module, f"--{foreign.replace('_', '-')}", "1", *BASE, "--data-dir",
                 str(data), "--output-dir", str(out)]) == 2
    assert f"option '{foreign}' belongs to method" in capsys.readouterr().err
    options = METHODS[name].Options
    for f in option_fields(options):  # a value of the wrong type or out of the choices, for each own option
        if base_type(options, f) is str and not f.metadata.get("choices"):
            continue  # any text is a valid value
        key = public_name(f.name)
        bad = [f"--{key.replace('_', '-')}", "not-a-value"]
        if base_type(options, f) is bool:  # a flag takes no value: the bad value comes from a config file
            (out.parent / "bad.yaml").write_text(f"{key}: not-a-value\n")
            bad = ["--config", str(out.parent / "bad.yaml")]
        assert main(["run", "--method", name, *module, *bad, *BASE, "--data-dir", str(data),
                     "--output-dir", str(out)]) == 2, key
        assert f"'{key}'" in capsys.readouterr().err
    assert not out.exists()


# every method's run in the same processes: the process group stays up between them (main() would end it)
RUN_MANY = '''
import json, sys
import nlora.train.engine
from nlora.cli import main
shutdown, nlora.train.engine.shutdown = nlora.train.engine.shutdown, lambda: None  # one process group for all the runs
for argv in json.load(open(sys.argv[1])):
    code = main(argv)
    if code:
        sys.exit(code)
shutdown()
'''


# accelerate's DDP configuration (examples/accelerate/ddp.yaml); the runs' --device cpu makes them gloo processes
DDP_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
num_processes: 2
machine_rank: 0
gpu_ids: all
mixed_precision: 'no'
dynamo_config: {}
rdzv_backend: static
same_network: true
main_training_function: main
use_cpu: false
"""


def launch_two_processes(kit: Kit, names: list[str], data: Path, root: Path) -> dict[str, Path]:
    """The run of each of `names` with 2 processes (gloo, DDP), all in one accelerate launch."""
    runs = {m: root / m for m in names}
    (root / "argvs.json").write_text(json.dumps([kit.argv(m, data, runs[m]) for m in names]))
    (root / "run_many.py").write_text(RUN_MANY)
    (root / "ddp.yaml").write_text(DDP_CONFIG)
    paths = [p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    env.pop("WORLD_SIZE", None)
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(root / "ddp.yaml"),
         "--num_processes", "2", str(root / "run_many.py"), str(root / "argvs.json")],
        env=env, capture_output=True, text=True, timeout=900)
    assert launched.returncode == 0, launched.stderr[-3000:]
    return runs
