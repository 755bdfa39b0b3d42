"""General-ability retention through lm-evaluation-harness (`nlora eval-general`), offline: a 10-row multiple-choice
task and a 10-row generate-until task of local JSONL files, scored on a tiny LLaMA with stacked adapters. The model
rebuilt in memory gives exactly the log-likelihoods, generations and scores of the exported adapter loaded by
lm-eval itself; general.json resumes without redoing anything and refuses other settings; the report shows it.
The run option general_eval scores the live model as it trains: the same general.json, and the same run."""

import importlib.util
import json
import os
import pickle
import random
import shutil
import signal
import sys

import numpy as np
import pytest
import torch

import fresh_process
from nlora import RunConfig
from nlora.cli import main
from nlora.errors import NloraError
from nlora.runner import run
from same_run import outcome

fresh_process.start()

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-evaluation-harness (the [general] extra) is not installed")

BENCHMARKS = ["nlora_mc", "nlora_gen"]
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone"]

MC_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
GEN_YAML = """task: nlora_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Repeat the word {{{{word}}}}:"
doc_to_target: "{{{{word}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 6
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 2.0
"""


def write_benchmarks(folder, names=("nlora_mc",)):
    """The two local tasks (JSONL data + lm-eval task YAML); `names` are multiple-choice copies."""
    folder.mkdir(parents=True, exist_ok=True)
    mc = folder / "mc.jsonl"
    mc.write_text("".join(json.dumps({"question": f"which word comes {i + 1}th?",
                                      "choices": [WORDS[(i + k) % 10] for k in range(4)], "answer": i % 4}) + "\n"
                          for i in range(10)))
    gen = folder / "gen.jsonl"
    gen.write_text("".join(json.dumps({"word": w}) + "\n" for w in WORDS))
    for name in names:
        (folder / f"{name}.yaml").write_text(MC_YAML.format(name=name, data=mc))
    (folder / "gen.yaml").write_text(GEN_YAML.format(data=gen))
    return folder


@pytest.fixture(scope="module")
def benchmarks_dir(tmp_path_factory):
    return write_benchmarks(tmp_path_factory.mktemp("benchmarks"), names=("nlora_mc", "nlora_mc_copy"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_dir):
    """A tiny LLaMA run with two stacked (folded) adapters; a high learning rate, so that they move the model. The
    base is the built-in tiny LLaMA saved to a folder, so that lm-eval loads it by path as it would a hub model."""
    from nlora.models import load_backbone

    root = tmp_path_factory.mktemp("general")
    base = load_backbone("tiny-llama")
    base.model.save_pretrained(root / "base")
    base.tokenizer.save_pretrained(root / "base")
    out = root / "run"
    run(RunConfig(**_run_options(root / "base", synthetic_dir), output_dir=str(out)), progress=False)
    return out


def _run_options(base, data_dir, **more):
    return dict(dict(model=str(base), method="n-lora", tasks=["harbor", "orchard"], data_dir=str(data_dir),
                     max_train_samples=8, max_eval_samples=4, batch_size=4, eval_batch_size=4, epochs=1, lr=0.05,
                     max_target_length=6, device="cpu", lambda_=0.01, eval_mode="score"), **more)


def _eval_general(run_dir, benchmarks_dir, *extra):
    return main(["eval-general", str(run_dir), "--tasks", ",".join(BENCHMARKS), "--include-path",
                 str(benchmarks_dir), "--batch-size", "4", *extra])


@pytest.fixture(scope="module")
def general_run(trained, benchmarks_dir, tmp_path_factory):
    run_dir = shutil.copytree(trained, tmp_path_factory.mktemp("scored") / "run")
    assert _eval_general(run_dir, benchmarks_dir, "--upto", "1,2") == 0
    return run_dir


def _copy(run_dir, tmp_path):
    return shutil.copytree(run_dir, tmp_path / "run")


def _general(run_dir):
    return json.loads((run_dir / "general.json").read_text())


def _loglikelihoods(results):
    return [ll for s in results["samples"]["nlora_mc"] for ll in s["filtered_resps"]]


def _generations(results):
    return [s["filtered_resps"] for s in results["samples"]["nlora_gen"]]


@needs_lm_eval
def test_in_memory_model_and_exported_adapter_give_identical_loglikelihoods_and_scores(general_run, benchmarks_dir,
                                                                                      tmp_path, capsys):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from nlora.eval.general import GeneralSettings, evaluate_model, lm_eval_command, rebuild_model
    from nlora.export import export_run

    record = _general(general_run)
    settings = GeneralSettings(batch_size=4)
    tasks = TaskManager(include_path=str(benchmarks_dir), include_defaults=False)
    seen = {}
    for after in (0, 2):
        in_memory = evaluate_model(rebuild_model(general_run, after), BENCHMARKS, settings, tasks, log_samples=True)
        # lm-eval's own loading of the exported adapter (PEFT) on the base: the model_args nlora prints
        adapter = export_run(general_run, tmp_path / f"after-{after}", upto=after) if after else None
        command = lm_eval_command(general_run, record, after, BENCHMARKS, benchmarks_dir, adapter_dir=str(adapter))
        model_args = command.split("--model_args ")[1].split()[0]
        assert ("peft=" in model_args) == bool(after) and "dtype=float32" in model_args
        exported = simple_evaluate(model="hf", model_args=model_args, tasks=BENCHMARKS, batch_size=4, device="cpu",
                                   task_manager=tasks, log_samples=True)
        assert _loglikelihoods(in_memory) == _loglikelihoods(exported)  # exactly, float for float
        assert _generations(in_memory) == _generations(exported)
        for b in BENCHMARKS:
            assert in_memory["results"][b] == exported["results"][b]
            held = record["scores"][str(after)][b]
            assert held["score"] == exported["results"][b][record["benchmarks"][b]["metric"]]
            assert held["examples"] == 10
        seen[after] = _loglikelihoods(in_memory)
    assert seen[0] != seen[2], "the adapters must change the model for this test to mean anything"
    assert len(seen[0]) == 40  # 10 questions x 4 choices


@needs_lm_eval
def test_general_json_holds_scores_delta_versions_and_settings(general_run):
    record = _general(general_run)
    assert record["lm_eval_version"] == importlib.import_module("lm_eval").__version__
    assert record["settings"] == {"num_fewshot": None, "limit": None, "batch_size": 4, "apply_chat_template": False,
                                  "seeds": [0, 1234, 1234, 1234], "dtype": "float32",
                                  "quantization": None}
    assert list(record["scores"]) == ["0", "1", "2"] and record["labels"] == {"0": "base", "1": "harbor",
                                                                              "2": "orchard"}
    mc, gen = record["benchmarks"]["nlora_mc"], record["benchmarks"]["nlora_gen"]
    assert (mc["metric"], mc["version"], gen["metric"], gen["version"]) == ("acc,none", 1.0, "exact_match,none", 2.0)
    assert mc["tasks"]["nlora_mc"]["documents"] == 10 and len(mc["tasks"]["nlora_mc"]["config_sha256"]) == 64
    assert mc["n_shot"] == {"nlora_mc": 0} and mc["higher_is_better"] is True
    for after in ("1", "2"):  # ΔG recomputed by hand
        deltas = {b: record["scores"][after][b]["score"] - record["scores"]["0"][b]["score"] for b in BENCHMARKS}
        assert record["delta"][after]["per_benchmark"] == deltas
        assert record["delta"][after]["mean"] == pytest.approx(sum(deltas.values()) / 2)
    assert set(record["scores"]["0"]["nlora_mc"]["metrics"]) == {"acc,none", "acc_stderr,none", "acc_norm,none",
                                                                 "acc_norm_stderr,none"}


def test_mean_delta_needs_every_benchmark_in_one_direction():
    from nlora.eval.general import mean_delta, summarize

    up = {"higher_is_better": True}
    record = {"benchmarks": {"a": up, "b": up},
              "scores": {"0": {"a": {"score": 0.5}, "b": {"score": 0.25}},
                         "1": {"a": {"score": 0.25}, "b": {"score": 0.5}}, "2": {"a": {"score": 0.75}}}}
    assert summarize(record) == {"1": {"per_benchmark": {"a": -0.25, "b": 0.25}, "mean": 0.0},
                                 "2": {"per_benchmark": {"a": 0.25}, "mean": None}}
    assert mean_delta({"a": 1.0, "b": 2.0}, {"a": up, "b": {"higher_is_better": False}}) is None


@needs_lm_eval
def test_resumes_without_redoing_and_scores_only_what_is_missing(general_run, benchmarks_dir, tmp_path, monkeypatch,
                                                                capsys):
    from nlora.eval import general

    run_dir = _copy(general_run, tmp_path)
    calls = []
    real = general.evaluate_model
    monkeypatch.setattr(general, "evaluate_model",
                        lambda scored, benchmarks, *a, **k: calls.append(list(benchmarks)) or real(scored, benchmarks,
                                                                                                   *a, **k))
    before = (run_dir / "general.json").read_bytes()
    held = json.loads(before)
    assert _eval_general(run_dir, benchmarks_dir, "--upto", "2,1") == 0
    assert calls == [] and (run_dir / "general.json").read_bytes() == before
    out = capsys.readouterr().out
    assert f"lm_eval --model hf --model_args pretrained={held['run']['model']},peft=ADAPTER_DIR,dtype=float32" in out
    # a benchmark added later: scored for the base and task 2 only, the held scores kept as they were
    record = general.eval_general(run_dir, [*BENCHMARKS, "nlora_mc_copy"], upto=[2],
                                  settings=general.GeneralSettings(batch_size=4), include_path=benchmarks_dir)
    assert calls == [["nlora_mc_copy"], ["nlora_mc_copy"]]
    for after in ("0", "1", "2"):
        for b in BENCHMARKS:
            assert record["scores"][after][b] == held["scores"][after][b]
    assert record["scores"]["2"]["nlora_mc_copy"] == record["scores"]["2"]["nlora_mc"]  # the same task, renamed
    assert record["delta"]["1"]["mean"] is None and record["delta"]["2"]["mean"] is not None  # row 1 is incomplete
    assert _general(run_dir) == record
    # what a runner calls after a phase: nothing to do, so the model is never built
    scores = general.score_phase(run_dir, 1, BENCHMARKS, general.GeneralSettings(batch_size=4), benchmarks_dir,
                                 model=lambda: pytest.fail("the model was built though every score is held"))
    assert scores == {b: held["scores"]["1"][b] for b in BENCHMARKS}


@needs_lm_eval
def test_other_settings_or_benchmark_definitions_are_refused(general_run, benchmarks_dir, tmp_path, capsys):
    from nlora.eval.general import GeneralSettings, ScoredModel, score_phase

    run_dir = _copy(general_run, tmp_path)
    before = (run_dir / "general.json").read_bytes()
    for extra, message in [(["--limit", "5"], "limit None (asked: 5)"),
                           (["--num-fewshot", "1"], "num_fewshot None (asked: 1)")]:
        assert _eval_general(run_dir, benchmarks_dir, *extra) == 2
        err = capsys.readouterr().err
        assert message in err and "never mixed" in err and "move general.json aside" in err
    assert main(["eval-general", str(run_dir), "--tasks", "nlora_mc", "--include-path", str(benchmarks_dir)]) == 2
    assert "batch_size 4 (asked: 8)" in capsys.readouterr().err
    # the same name, another definition (its prompt changed)
    edited = write_benchmarks(tmp_path / "edited")
    (edited / "nlora_mc.yaml").write_text((edited / "nlora_mc.yaml").read_text().replace("Answer:", "A:"))
    assert _eval_general(run_dir, edited) == 2
    assert "another definition of benchmark 'nlora_mc'" in capsys.readouterr().err
    # weights in another dtype (a run's dtype 'auto' scored on another kind of device), refused before scoring
    with pytest.raises(NloraError, match="weights in float32 .this model's: bfloat16"):
        score_phase(run_dir, 2, ["nlora_mc_copy"], GeneralSettings(batch_size=4), benchmarks_dir,
                    model=lambda: ScoredModel(None, None, "decoder", "bfloat16"))
    assert (run_dir / "general.json").read_bytes() == before


@needs_lm_eval
def test_bad_requests_fail_before_any_model_is_loaded(trained, benchmarks_dir, tmp_path, capsys, monkeypatch):
    from lm_eval import tasks

    from nlora.eval import general

    monkeypatch.setattr(general, "rebuild_model", lambda *a: pytest.fail("a model was loaded"))
    # lm-eval's index of its built-in tasks takes seconds to build: leave it out (no benchmark here needs it)
    local = tasks.TaskManager
    monkeypatch.setattr(tasks, "TaskManager", lambda include_path=None, **kw: local(include_path=include_path,
                                                                                include_defaults=False))
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    for args, message in [
        (["--tasks", "nlora_mc,no_such_benchmark"], "'no_such_benchmark' is not an lm-eval task, group or tag"),
        (["--tasks", "nlora_mc", "--upto", "3"], "--upto: must be between 1 and 2"),
        (["--tasks", "nlora_mc", "--upto", "x"], "--upto: a comma-separated list"),
        (["--tasks", "nlora_mc", "--batch-size", "0"], "--batch-size: must be an integer >= 1"),
        (["--tasks", "nlora_mc", "--include-path", str(tmp_path / "none")], "is not a folder"),
    ]:
        if "--include-path" not in args:
            args = [*args, "--include-path", str(benchmarks_dir)]
        assert main(["eval-general", str(run_dir), *args]) == 2
        assert message in capsys.readouterr().err
    assert not (run_dir / "general.json").exists()
    with pytest.raises(NloraError, match="this model is an encoder"):
        general.evaluate_model(general.ScoredModel(None, None, "encoder", "float32"), ["nlora_mc"],
                               general.GeneralSettings(), None)


def test_without_the_extra_the_error_names_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # the package is not installed
    assert main(["eval-general", str(tmp_path), "--tasks", "mmlu"]) == 2
    assert 'pip install "nlora[general]"' in capsys.readouterr().err


@needs_lm_eval
def test_report_shows_general_ability_and_refuses_to_compare_other_settings(general_run, tmp_path):
    from nlora.analysis.report import GENERAL_PLOT, write_report

    a = shutil.copytree(general_run, tmp_path / "a")
    folder = write_report(a)
    text = (folder / "report.md").read_text()
    record = _general(a)
    assert "## General ability (lm-evaluation-harness)" in text and (folder / GENERAL_PLOT).is_file()
    mc = record["scores"]["2"]["nlora_mc"]["score"]
    delta = record["delta"]["2"]["per_benchmark"]["nlora_mc"]
    assert f"| 2 orchard | {mc:.4f} ({delta:+.4f}) |" in text
    b = shutil.copytree(general_run, tmp_path / "b")
    same = write_report([a, b], tmp_path / "same")
    assert (same / GENERAL_PLOT).is_file() and "Not compared" not in (same / "report.md").read_text()
    other = _general(b)
    other["settings"]["limit"] = 5
    (b / "general.json").write_text(json.dumps(other))
    mixed = write_report([a, b], tmp_path / "mixed")
    text = (mixed / "report.md").read_text()
    assert "Not compared across runs" in text and "limit None vs 5" in text and "**Smoke test**" in text
    assert not (mixed / GENERAL_PLOT).exists()


# ------------------------------------------------------------------------------------------- the run option


def _training_state(adapters) -> tuple:
    """What training and the run's evaluation read of the model and the process."""
    model = adapters.model
    generators = pickle.dumps((random.getstate(), np.random.get_state(), torch.get_rng_state().tolist()))
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [(m.active_adapters, m.disable_adapters) for _, m in adapters.lora_layers()], torch.is_grad_enabled(),
            generators)


@needs_lm_eval
def test_a_run_scores_the_live_model_as_eval_general_does_and_trains_the_same(trained, general_run, benchmarks_dir,
                                                                            synthetic_dir, tmp_path, monkeypatch):
    from nlora.eval import general

    scored, watched = [], []
    evaluate, score = general.evaluate_model, general.RunScoring.score
    monkeypatch.setattr(general, "evaluate_model", lambda *a, **k: scored.append(a[1]) or evaluate(*a, **k))

    def score_watched(self, after, adapters, active):
        before = _training_state(adapters)
        score(self, after, adapters, active)
        watched.append(after)
        assert _training_state(adapters) == before, f"scoring after task {after} changed what training reads"
    monkeypatch.setattr(general.RunScoring, "score", score_watched)
    out = tmp_path / "run"
    run(RunConfig(**_run_options(trained.parent / "base", synthetic_dir), output_dir=str(out), general_eval=BENCHMARKS,
                  general_eval_include_path=str(benchmarks_dir), general_eval_batch_size=4), progress=False)
    assert watched == [0, 1, 2] and len(scored) == 3  # lm-eval ran (and reseeded) each time
    # the same run as without the option: adapters, predictions, metrics and log
    assert outcome(out, log=True) == outcome(trained, log=True)
    # the scores of `nlora eval-general --upto 1,2` from the saved adapters, in the same file
    assert _general(out) == _general(general_run)
    before = (out / "general.json").read_bytes()
    monkeypatch.setattr(general, "evaluate_model", lambda *a, **k: pytest.fail("a held score was computed again"))
    assert _eval_general(out, benchmarks_dir, "--upto", "1,2") == 0
    assert (out / "general.json").read_bytes() == before


@needs_lm_eval
def test_a_killed_run_resumes_without_redoing_its_general_scores(trained, general_run, benchmarks_dir, synthetic_dir,
                                                                 tmp_path, monkeypatch, capsys):
    from nlora.eval import general

    out = tmp_path / "run"
    argv = ["run", "--model", str(trained.parent / "base"), "--method", "n-lora", "--lambda", "0.01",
            "--tasks", "harbor,orchard", "--data-dir", str(synthetic_dir), "--output-dir", str(out),
            "--max-train-samples", "8", "--max-eval-samples", "4", "--batch-size", "4", "--eval-batch-size", "4",
            "--lr", "0.05", "--max-target-length", "6", "--device", "cpu", "--eval-mode", "score", "--quiet",
            "--general-eval", "nlora_mc", "--general-eval-every", "3", "--general-eval-batch-size", "4",
            "--general-eval-include-path", str(benchmarks_dir)]
    # killed once task 1's adapter is saved: general.json holds the base model's scores only
    killed = fresh_process.run(fresh_process.nlora_main, argv, log=tmp_path / "killed.log",
                               env=dict(os.environ, NLORA_FAULT="task_trained:1"))
    assert killed.returncode == -signal.SIGKILL, killed.output
    held = _general(out)
    assert list(held["scores"]) == ["0"]
    assert held["scores"]["0"]["nlora_mc"] == _general(general_run)["scores"]["0"]["nlora_mc"]
    scored = []
    evaluate = general.evaluate_model
    monkeypatch.setattr(general, "evaluate_model", lambda *a, **k: scored.append(a[1]) or evaluate(*a, **k))
    assert main(["resume", str(out), "--quiet"]) == 0, capsys.readouterr().err
    record = _general(out)
    # every 3rd task, and always the last: task 2 scored now, the base not again
    assert list(record["scores"]) == ["0", "2"] and scored == [["nlora_mc"]]
    assert record["scores"]["0"] == held["scores"]["0"] and set(record["delta"]) == {"2"}


def test_scoring_puts_back_modes_trainable_parameters_grad_mode_and_generators():
    from nlora.eval.general import kept_for_training

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5))
    model.train()
    model[0].bias.requires_grad_(False)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    with kept_for_training(model):  # what lm-eval does
        model.eval()
        model[0].bias.requires_grad_(True)
        torch.set_grad_enabled(False)
        random.seed(0), np.random.seed(1234), torch.manual_seed(1234)
        random.random(), np.random.rand(), torch.rand(1)
    assert model.training and model[1].training and torch.is_grad_enabled()
    assert [p.requires_grad for p in model.parameters()] == [True, False]
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


@needs_lm_eval
def test_the_run_option_is_checked_before_anything_is_written(benchmarks_dir, synthetic_dir, tmp_path, monkeypatch):
    from lm_eval import tasks

    local = tasks.TaskManager  # lm-eval's index of its built-in tasks takes seconds to build: leave it out
    monkeypatch.setattr(tasks, "TaskManager", lambda include_path=None, **kw: local(include_path=include_path,
                                                                                include_defaults=False))
    out = tmp_path / "run"
    options = _run_options("tiny-llama", synthetic_dir, output_dir=str(out), general_eval=["nlora_mc"],
                           general_eval_include_path=str(benchmarks_dir))
    per_task = {k: v for k, v in options.items() if k != "lambda_"}
    for config, message in [
        (RunConfig(**{**options, "general_eval": ["nlora_mc", "no_such_benchmark"]}),
         "option 'general_eval': 'no_such_benchmark' is not an lm-eval task, group or tag"),
        (RunConfig(**options, sharding="fsdp2"),
         "not with sharding fsdp2.*nlora eval-general RUN_DIR --tasks nlora_mc"),
        (RunConfig(**{**per_task, "method": "per-task"}), "method 'per-task' .* no single model to score"),
        (RunConfig(**{**options, "model": "tiny-bert"}), "model 'tiny-bert' is an encoder"),
        (RunConfig(**options, general_eval_every=0), "option 'general_eval_every': must be >= 1"),
        (RunConfig(**{**options, "general_eval_include_path": str(tmp_path / "none")}),
         "option 'general_eval_include_path': .* is not a folder"),
    ]:
        with pytest.raises(NloraError, match=message):
            run(config, progress=False)
        assert not out.exists()


def test_a_run_without_the_extra_names_it(synthetic_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # the package is not installed
    out = tmp_path / "run"
    assert main(["run", "--model", "tiny-llama", "--tasks", "harbor", "--data-dir", str(synthetic_dir),
                 "--output-dir", str(out), "--general-eval", "mmlu", "--quiet"]) == 2
    assert 'pip install "nlora[general]"' in capsys.readouterr().err and not out.exists()


def test_a_run_started_over_drops_the_general_scores_of_the_old_one(tmp_path):
    from nlora.rundir import prepare_output_dir

    (tmp_path / "general.json").write_text("{}")
    with pytest.raises(NloraError, match=r"already holds a run \(general.json\)"):
        prepare_output_dir(RunConfig(tasks=["harbor"], output_dir=str(tmp_path)), resume=False)
    prepare_output_dir(RunConfig(tasks=["harbor"], output_dir=str(tmp_path), overwrite=True), resume=False)
    assert not (tmp_path / "general.json").exists()


def test_scoring_runs_the_model_without_the_autocast_of_mixed_precision_training():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from nlora.eval.general import without_mixed_precision

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    with torch.no_grad():
        weights_alone = model(x)
        AcceleratorState._reset_state()  # as a run's accelerator does: another precision than the last one's
        try:
            Accelerator(cpu=True, mixed_precision="bf16").prepare(model)  # wraps model.forward in a bf16 autocast
        finally:
            AcceleratorState._reset_state()
        autocast = model(x)
        with without_mixed_precision(model):
            assert torch.equal(model(x), weights_alone)
        assert torch.equal(model(x), autocast) and not torch.equal(autocast, weights_alone)


@needs_lm_eval
def test_a_built_in_tiny_model_gets_a_plain_lm_eval_command_that_loads_it(general_run, benchmarks_dir, tmp_path,
                                                                           monkeypatch, capfd):
    """The run's base is the built-in tiny-llama (the fixture's saved copy, renamed back): lm-eval cannot load it
    by name, so the printed command writes the model out first and loads it from there, for the base and after a
    task; the scores are those nlora holds. nlora's own scoring says nothing about git outside a checkout."""
    import shlex

    import yaml
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from nlora.eval.general import GeneralSettings, evaluate_model, lm_eval_command, rebuild_model

    run_dir = _copy(general_run, tmp_path)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**config, "model": "tiny-llama"}, sort_keys=False))
    record = _general(run_dir)
    record["run"]["model"] = "tiny-llama"
    monkeypatch.chdir(tmp_path)  # not a git checkout
    tasks = TaskManager(include_path=str(benchmarks_dir), include_defaults=False)
    for after in (0, 2):
        model_dir = tmp_path / f"model-{after}"
        prepare, command = lm_eval_command(run_dir, record, after, BENCHMARKS, benchmarks_dir,
                                           model_dir=str(model_dir)).split(" && ")
        assert "pretrained=tiny-llama" not in command
        if after:
            assert main(shlex.split(prepare)[1:]) == 0  # nlora export ... --merge
        else:
            argv = shlex.split(prepare)  # python -c "...": the base as nlora builds it
            assert argv[:2] == ["python", "-c"]
            exec(argv[2], {})
        model_args = command.split("--model_args ")[1].split()[0]
        exported = simple_evaluate(model="hf", model_args=model_args, tasks=BENCHMARKS, batch_size=4,
                                   device="cpu", task_manager=tasks)
        for b in BENCHMARKS:
            metric = record["benchmarks"][b]["metric"]
            assert exported["results"][b][metric] == pytest.approx(record["scores"][str(after)][b]["score"])
    capfd.readouterr()
    evaluate_model(rebuild_model(run_dir, 2), BENCHMARKS, GeneralSettings(batch_size=4), tasks)
    assert "not a git repository" not in capfd.readouterr().err
