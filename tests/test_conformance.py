"""The method conformance kit: every registered method (parametrised from the registry, so a new method gets every
check) runs the same tiny sequence (tiny-llama, whose base has no dropout: 2 tasks of 2 optimizer steps, a checkpoint
every step, LoRA dropout 0; a classification task, then a free-text one) with its `smoke_options`, and must show,
each time against an independent reference:

- a run killed mid-way through its second task (SIGKILL, in a process of its own) and resumed ends exactly as the
  uninterrupted run: adapters, method state, metrics, predictions and log (tests/same_run.py);
- its saved method state loads back and saves to the same bytes;
- what it evaluated is what its saved adapters compute, rebuilt without nlora or PEFT (tests/lora_reference.py):
  the sum of adapters 0..k (stacked, folded or not), the one adapter of phase k (snapshot), or task j's own
  adapter (task id); a folding method is thereby checked folded against unfolded; for a method that trains the
  base (Method.trains "base"), the whole model saved after phase k, loaded with plain transformers (the phases
  whose model is kept: at least the last);
- `nlora predict` and `nlora export` reproduce its last row of predictions (an exported whole model loaded with
  plain transformers and its exported tokenizer);
- an option of another method, or a bad value of its own, is refused before anything is written;
- 2 processes give the 1-process run (one accelerate launch runs every method in turn; marked distributed).

Core options that change how any method trains (grad_mask migu) get the same checks as a variant (VARIANTS). The
same launch runs the engine's other configurations on free text (LAUNCHED): FSDP2, and a seq2seq base with sampled
decoding under DDP and FSDP2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fresh_process
from lora_reference import add_adapters, load_saved_model
from nlora.cli import main
from nlora.method_state import load_state, save_state
from nlora.methods import METHODS, get_method
from nlora.options import base_type, option_fields, public_name
from nlora.tasks.synthetic import write_synthetic_benchmark, write_synthetic_trace
from same_run import assert_same_run

fresh_process.start()

ROOT = Path(__file__).resolve().parents[1]
# a method from outside the package, registered through option method_module (as a user's own would be)
EXTERNAL = {"l2-anchor": str(ROOT / "examples" / "methods" / "l2_anchor.py")}
get_method("l2-anchor", list(EXTERNAL.values()))
REGISTERED = sorted(METHODS)
# options of the core that change how any method trains, each run with one method as a variant of its own
# (MIGU on seq-lora: a new adapter's B after its first Adam step holds ±lr entries, rows tie, and the float noise
# that orders tied rows differs with the batch split, so a stacked method matches 1 = 2 processes only up to them)
VARIANTS = {"seq-lora+migu": ("seq-lora", ["--grad-mask", "migu", "--migu-q", "0.5"])}
METHOD_NAMES = REGISTERED + sorted(VARIANTS)


# runs of the 2-process launch only, each against the 1-process run of the same name without "+fsdp2" (one
# process does not shard): n-lora with the base sharded (FSDP2), and on a seq2seq base under DDP and FSDP2 (a tiny
# T5 saved without dropout, SEQ2SEQ_MODEL, so that 1 and 2 processes compute the same run), with sampled decoding,
# whose draws must not depend on the process count
SEQ2SEQ_MODEL = "tiny-t5-without-dropout"
SEQ2SEQ = ["--decoding", "sample", "--temperature", "1.0"]
LAUNCHED = {"n-lora+fsdp2": ("n-lora", ["--sharding", "fsdp2"]),
            "n-lora+seq2seq": ("n-lora", SEQ2SEQ),
            "n-lora+seq2seq+fsdp2": ("n-lora", [*SEQ2SEQ, "--sharding", "fsdp2"])}


def _variant(name: str) -> tuple[str, list[str]]:
    """The registered method a run of the kit uses, and the options it adds to the method's kit run."""
    return {**VARIANTS, **LAUNCHED}.get(name, (name, []))


def _base(name: str) -> str:
    return _variant(name)[0]


# a classification task, then a free-text one (TRACE's layout, scored by edit similarity): every check covers both
# kinds of answer, and the run is killed while it trains on free text
TASKS = ["harbor", "reverse"]
# tiny-llama: a base without dropout of its own (tiny-t5's 0.1 draws other masks when the batch is split across
# processes, so 1 and 2 processes could not compute the same run)
BASE = ["--model", "tiny-llama", "--tasks", ",".join(TASKS), "--task-metrics", "reverse=edit_similarity",
        "--max-train-samples", "8", "--max-eval-samples", "4",
        "--batch-size", "4", "--eval-batch-size", "4", "--epochs", "1", "--checkpoint-steps", "1",
        "--max-target-length", "4", "--lora-dropout", "0", "--device", "cpu", "--quiet", "--log-steps", "1"]


def _flags(options: dict) -> list[str]:
    out = []
    for key, value in options.items():
        out += [f"--{key.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return out


def argv(method: str, data: Path, out: Path) -> list[str]:
    module = ["--method-module", EXTERNAL[method]] if method in EXTERNAL else []
    extra = _variant(method)[1]
    base = list(BASE)
    if "seq2seq" in method:
        base[base.index("--model") + 1] = str(data / SEQ2SEQ_MODEL)
    return ["run", "--method", _base(method), *module, *_flags(METHODS[_base(method)].smoke_options), *extra,
            *base, "--data-dir", str(data), "--output-dir", str(out)]


class _Runs(dict):
    """The uninterrupted run of each method, made on first use (a `-k` selection runs only its methods)."""

    def __init__(self, root: Path, data: Path):
        super().__init__()
        self.root, self.data = root, data

    def __missing__(self, method: str) -> Path:
        out = self.root / method
        assert main(argv(method, self.data, out)) == 0, method
        self[method] = out
        return out


@pytest.fixture(scope="module")
def kit_data(tmp_path_factory) -> Path:
    """The kit's tasks: harbor in the CL_Benchmark layout, reverse in TRACE's, in one data folder; beside them
    SEQ2SEQ_MODEL, tiny-t5 saved with its dropout off."""
    root = tmp_path_factory.mktemp("kit-data")
    write_synthetic_benchmark(root, n_train=8, n_test=4, tasks=("harbor",))
    write_synthetic_trace(root, n_train=8, n_eval=4, n_test=4, tasks=("reverse",))
    from nlora.models import load_backbone

    t5 = load_backbone("tiny-t5")
    t5.model.config.dropout_rate = 0.0
    t5.model.save_pretrained(root / SEQ2SEQ_MODEL)
    t5.tokenizer.save_pretrained(root / SEQ2SEQ_MODEL)
    return root


@pytest.fixture(scope="module")
def references(tmp_path_factory, kit_data) -> dict[str, Path]:
    """The uninterrupted run of every method, in this process."""
    return _Runs(tmp_path_factory.mktemp("conformance"), kit_data)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_killed_and_resumed_is_the_uninterrupted_run(tmp_path, kit_data, references, method):
    out = tmp_path / "run"
    # 4 optimizer steps in all (2 tasks of 2, or mtl's one phase of 4): the last one, after the checkpoint of the
    # step before it (a checkpoint is written after the step's fault point)
    fault = "train_step:4"
    killed = fresh_process.run(fresh_process.nlora_main, argv(method, kit_data, out), log=tmp_path / "k.log",
                               env=dict(os.environ, NLORA_FAULT=fault))
    assert killed.returncode == -9, killed.output
    assert (out / "checkpoint").is_dir(), "killed after a mid-task checkpoint"
    assert main(["resume", str(out), "--quiet"]) == 0
    assert_same_run(references[method], out, log=True)


def _config(run_dir: Path):
    from nlora.config import load_config

    return load_config(run_dir / "config.yaml", saved_run=True)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_method_state_round_trips(tmp_path, references, method):
    config = _config(references[method])
    for folder in sorted((references[method] / "adapters").iterdir()):
        state = load_state(folder)
        if state is None:
            continue
        fresh = get_method(_base(method))(config)
        fresh.load_state_dict(state)
        (tmp_path / folder.name).mkdir()
        save_state(fresh.state_dict(), tmp_path / folder.name)
        for name in ("method_state.json", "method_state.safetensors"):
            if (folder / name).exists():
                assert (tmp_path / folder.name / name).read_bytes() == (folder / name).read_bytes(), name


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


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_what_was_evaluated_is_what_the_saved_adapters_compute(references, method):
    from nlora.eval.evaluate import evaluate, generation_of, scoring_of
    from nlora.models import load_backbone
    from nlora.objectives import make_objective
    from nlora.runner import load_tasks

    run = references[method]
    config = _config(run)
    m = get_method(_base(method))(config)
    tasks = load_tasks(config)
    checked = 0
    rows = _rows(run)
    for row in rows[-1:]:  # the last row: every adapter of the run takes part (summed, folded, or its own)
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


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_predict_and_export_reproduce_the_last_row(tmp_path, references, method):
    run = references[method]
    config = _config(run)
    last = _rows(run)[-1]
    assert main(["predict", str(run), "--tasks", ",".join(TASKS), "--output", str(tmp_path / "p.jsonl"),
                 "--quiet"]) == 0
    predicted = [json.loads(line) for line in (tmp_path / "p.jsonl").open()]
    evaluated = [json.loads(line) for name in TASKS for line in (last / f"{name}.jsonl").open()]
    assert [r["prediction"] for r in predicted] == [r["prediction"] for r in evaluated]
    if get_method(_base(method))(config).needs_task_id:
        assert main(["export", str(run), str(tmp_path / "export")]) == 2  # no single model to export
        return
    assert main(["export", str(run), str(tmp_path / "export")]) == 0
    from nlora.models import load_backbone

    backbone = load_backbone(config.model, config.model_kind)
    tokenizer = backbone.tokenizer
    if get_method(_base(method))(config).trains == "base":  # the export is the whole model, with its tokenizer
        from transformers import AutoTokenizer

        model = load_saved_model(tmp_path / "export", backbone.kind)
        tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    else:
        model = add_adapters(backbone.model, [tmp_path / "export"]).eval()
    from nlora.eval.evaluate import evaluate, generation_of
    from nlora.objectives import make_objective
    from nlora.runner import load_tasks

    objective = make_objective(backbone.kind, tokenizer, config.max_source_length,
                               config.max_target_length, config.eval_mode)
    k = int(last.name.split("-")[0])
    rows = [r for j, t in enumerate(load_tasks(config))
            for r in evaluate(objective, model, t.test, 4, progress=False, generation=generation_of(config, t, j, k))[1]]
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in evaluated]


def _other_methods_option(method: str) -> str:
    mine = set(METHODS[method].Options.keys())
    return next(k for m in REGISTERED if m != method for k in METHODS[m].Options.keys() if k not in mine)


@pytest.mark.parametrize("method", REGISTERED)
def test_bad_options_are_refused_before_any_write(tmp_path, kit_data, capsys, method):
    out = tmp_path / "run"
    foreign = _other_methods_option(method)
    module = ["--method-module", EXTERNAL[method]] if method in EXTERNAL else []
    assert main(["run", "--method", method, *module, f"--{foreign.replace('_', '-')}", "1", *BASE, "--data-dir",
                 str(kit_data), "--output-dir", str(out)]) == 2
    assert f"option '{foreign}' belongs to method" in capsys.readouterr().err
    options = METHODS[method].Options
    for f in option_fields(options):  # a value of the wrong type or out of the choices, for each own option
        if base_type(options, f) is str and not f.metadata.get("choices"):
            continue  # any text is a valid value
        key = public_name(f.name)
        bad = [f"--{key.replace('_', '-')}", "not-a-value"]
        if base_type(options, f) is bool:  # a flag takes no value: the bad value comes from a config file
            (tmp_path / "bad.yaml").write_text(f"{key}: not-a-value\n")
            bad = ["--config", str(tmp_path / "bad.yaml")]
        assert main(["run", "--method", method, *module, *bad, *BASE, "--data-dir", str(kit_data),
                     "--output-dir", str(out)]) == 2, key
        assert f"'{key}'" in capsys.readouterr().err
    assert not out.exists()


def test_every_method_names_its_options_uniquely():
    seen = {}
    for method in REGISTERED:
        for key in METHODS[method].Options.keys():
            assert seen.setdefault(key, METHODS[method].Options) is METHODS[method].Options, key


# ------------------------------------------------------------------------------------------- 2 processes

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


@pytest.fixture(scope="module")
def two_process_runs(request, tmp_path_factory, kit_data, references) -> dict[str, Path]:
    """The run of every selected method with 2 processes (gloo), all in one launch."""
    root = tmp_path_factory.mktemp("conformance-2")
    selected = sorted({item.callspec.params["method"] for item in request.session.items
                       if "two_process_runs" in getattr(item, "fixturenames", ())})
    runs = {m: root / m for m in selected}
    (root / "argvs.json").write_text(json.dumps([argv(m, kit_data, runs[m]) for m in selected]))
    (root / "run_many.py").write_text(RUN_MANY)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("WORLD_SIZE", None)
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(ROOT / "examples" / "accelerate" / "ddp.yaml"), "--num_processes", "2", str(root / "run_many.py"),
         str(root / "argvs.json")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert launched.returncode == 0, launched.stderr[-3000:]
    return runs


@pytest.mark.distributed
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_two_processes_give_the_one_process_run(references, two_process_runs, method):
    assert_same_run(references[method], two_process_runs[method], exact=False)


@pytest.mark.distributed
@pytest.mark.parametrize("method", sorted(LAUNCHED))
def test_sharded_and_seq2seq_runs_give_the_one_process_run(references, two_process_runs, method):
    """FSDP2 (sharded generation included: a seq2seq model's encoder runs outside the root's forward), and a
    seq2seq base with sampled decoding under DDP and FSDP2."""
    assert_same_run(references[method.removesuffix("+fsdp2")], two_process_runs[method], exact=False)
    if "seq2seq" in method:
        path = two_process_runs[method] / "predictions" / "1-reverse" / "reverse.jsonl"
        assert all(json.loads(line)["prediction"] for line in path.open())  # sampled text, not an EOS at once
