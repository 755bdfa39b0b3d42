"""Free-text tasks through the whole engine, on the built-in tiny models and nlora's generated TRACE-layout
stream: a mixed classification + free-text sequence end to end (each column scored with its own metric and
recorded in metrics.json; the scores recomputed here from the predictions with nlora.tasks.scoring directly), `nlora
rescore` reproducing metrics.json and switching mode and BWT denominator, the tools (status, report, predict,
export, tracking) on such a run, seeded sampled decoding, the prompt styles, kind detection, presets, and what is
refused before anything is written."""

import functools
import json
import os
import shutil
import signal

import pytest
import yaml

import fresh_process
from same_run import outcome

from nlora import RunConfig, run
from nlora.cli import main
from nlora.errors import NloraError
from nlora.eval.continual import backward_transfer, normalize_answer
from nlora.eval.evaluate import Scoring, score_records, scoring_of, trace_prompt
from nlora.tasks.loading import detect_format, load_run_tasks
from nlora.tasks.scoring import example_scores, score
from nlora.tasks.synthetic import TRACE_TASKS, write_synthetic_benchmark, write_synthetic_trace
from nlora.tracking import metric_key, read_log

fresh_process.start()
MIXED = ["choice", "harbor", "sum"]
METRICS = {"choice": "first_char_accuracy", "harbor": "exact_match", "sum": "accuracy_raw"}
TINY = ["--max-train-samples", "8", "--max-eval-samples", "4", "--batch-size", "4", "--eval-batch-size", "4",
        "--epochs", "1", "--max-target-length", "8", "--max-source-length", "96", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("generative") / "data"
    write_synthetic_trace(root, n_train=8, n_eval=2, n_test=4, tasks=("choice", "sum", "simplify"))
    write_synthetic_benchmark(root, n_train=8, n_test=4, tasks=("harbor",))
    return root


def _task_metrics(tasks) -> str:
    return ",".join(f"{t}={TRACE_TASKS[t][1]}" for t in tasks if t in TRACE_TASKS)


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, data):
    """choice (free text), harbor (classification), sum (free text) on tiny-llama, with the base model scored."""
    out = tmp_path_factory.mktemp("mixed") / "run"
    report_to = "tensorboard" if _has("tensorboard") else "none"
    assert main(["run", "--model", "tiny-llama", "--method", "inc-lora", "--tasks", ",".join(MIXED),
                 "--data-dir", str(data), "--output-dir", str(out), "--task-metrics", _task_metrics(MIXED),
                 "--eval-future", "--max-new-tokens", "6", "--report-to", report_to, *TINY]) == 0
    return out


def _has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def _records(path):
    return [json.loads(line) for line in path.open()]


def test_a_mixed_sequence_scores_each_column_with_its_metric(mixed_run):
    metrics = json.loads((mixed_run / "metrics.json").read_text())
    assert metrics["metrics"] == METRICS and metrics["complete"]
    assert (metrics["scoring_mode"], metrics["bwt_denominator"]) == ("standard", "t-1")
    R = metrics["accuracy_matrix"]
    for k, trained in enumerate(MIXED):
        for j, task in enumerate(MIXED):
            records = _records(mixed_run / "predictions" / f"{k}-{trained}" / f"{task}.jsonl")
            assert len(records) == 4
            if task == "harbor":
                assert set(records[0]) == {"input", "target", "prediction", "correct"}
                expected = 100.0 * sum(normalize_answer(r["prediction"]) == normalize_answer(r["target"])
                                       for r in records) / 4
            else:  # the generated text is kept, with what any metric needs to score it again
                assert set(records[0]) == {"input", "source", "target", "prediction", "score"}
                assert records[0]["input"].endswith("\nAnswer: ")  # prompt style nlora's separator
                assert records[0]["input"] == TRACE_TASKS[task][0] + records[0]["source"] + "\nAnswer: "
                expected = score(METRICS[task], [r["prediction"] for r in records], [r["target"] for r in records])
            assert R[k][j] == round(expected, 4), (k, j)
    base = [_records(mixed_run / "predictions" / "base" / f"{t}.jsonl") for t in MIXED]
    assert metrics["baseline_accuracy"] == [round(score(METRICS[t], [r["prediction"] for r in b],
                                                         [r["target"] for r in b]), 4) for t, b in zip(MIXED, base)]
    config = yaml.safe_load((mixed_run / "config.yaml").read_text())
    assert (config["prompt_style"], config["answer_separator"]) == ("nlora", "\nAnswer: ")


def test_rescore_reproduces_the_run_and_switches_conventions(mixed_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(mixed_run, run_dir)
    original = json.loads((run_dir / "metrics.json").read_text())
    assert main(["rescore", str(run_dir)]) == 0
    assert json.loads((run_dir / "metrics.json").read_text()) == original
    assert "metrics: choice first_char_accuracy, harbor exact_match, sum accuracy_raw" in capsys.readouterr().out

    assert main(["rescore", str(run_dir), "--bwt-denominator", "t"]) == 0
    rescored = json.loads((run_dir / "metrics.json").read_text())
    assert rescored["bwt_denominator"] == "t" and rescored["accuracy_matrix"] == original["accuracy_matrix"]
    assert rescored["bwt"] == pytest.approx(original["bwt"] * 2 / 3)  # the same sum over T = 3 instead of 2
    assert rescored["bwt"] == pytest.approx(backward_transfer(original["accuracy_matrix"], "t"))
    assert main(["resume", str(run_dir), "--quiet"]) == 2  # rescored otherwise than config.yaml: refused
    assert "rescored with bwt_denominator 't'" in capsys.readouterr().err

    # a prediction changed on disk changes the score rescoring gives: the scores come from the files
    path = run_dir / "predictions" / "2-sum" / "sum.jsonl"
    records = _records(path)
    records[0]["prediction"] = "x" if records[0]["prediction"] == records[0]["target"] else records[0]["target"]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["rescore", str(run_dir), "--bwt-denominator", "t-1", "--metric", "sum=exact_match"]) == 0
    changed = json.loads((run_dir / "metrics.json").read_text())
    assert changed["metrics"]["sum"] == "exact_match"
    edited = round(score("exact_match", [r["prediction"] for r in records], [r["target"] for r in records]), 4)
    assert changed["accuracy_matrix"][2][2] == edited != original["accuracy_matrix"][2][2]


def test_trace_reference_mode_through_rescore(mixed_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(mixed_run, run_dir)
    assert main(["rescore", str(run_dir), "--scoring-mode", "trace_reference"]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["scoring_mode"] == "trace_reference"
    records = _records(run_dir / "predictions" / "2-sum" / "choice.jsonl")
    preds, targets = [r["prediction"] for r in records], [r["target"] for r in records]
    assert metrics["accuracy_matrix"][2][0] == round(sum(example_scores(
        "first_char_accuracy", preds, targets, mode="trace_reference")) / 4, 4)


def test_tools_on_a_generative_run(mixed_run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["status", str(mixed_run)]) == 0
    status = capsys.readouterr().out
    assert "score (0-100, each task's metric) after each task" in status and "sum accuracy_raw" in status
    # predict gives the run's own predictions of a free-text task
    out = tmp_path / "sum.jsonl"
    assert main(["predict", str(mixed_run), "--tasks", "sum", "--output", str(out), "--quiet"]) == 0
    predicted = _records(out)
    recorded = _records(mixed_run / "predictions" / "2-sum" / "sum.jsonl")
    assert [{k: v for k, v in r.items() if k != "task"} for r in predicted] == recorded
    assert "sum: " in capsys.readouterr().err
    lines = tmp_path / "input.jsonl"
    lines.write_text(json.dumps({"prompt": recorded[0]["input"].removesuffix("\nAnswer: "), "task": "sum"}) + "\n")
    assert main(["predict", str(mixed_run), "--input", str(lines), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["prediction"] == recorded[0]["prediction"]
    # export, and a report naming each task's metric
    assert main(["export", str(mixed_run), str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert main(["report", str(mixed_run), "--output-dir", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Score matrices" in report and "choice (first_char_accuracy)" in report
    assert "choice `first_char_accuracy`" in report and (tmp_path / "report" / "accuracy_matrix.png").is_file()


def test_eval_lines_and_trackers_name_the_metric(mixed_run):
    evals = [x for x in read_log(mixed_run / "log.jsonl") if x["event"] == "eval"]
    assert {(x["task"], x["metric"]) for x in evals} == set(METRICS.items())
    assert (metric_key("rouge_l(tokenizer=char)"), metric_key("exact_match")) == ("rouge_l", "accuracy")
    if not (mixed_run / "tensorboard").is_dir():
        return
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(mixed_run / "tensorboard" / "nlora"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"first_char_accuracy/choice", "accuracy/harbor", "accuracy_raw/sum", "base_accuracy_raw/sum"} <= set(tags)


def test_seeded_sampling_on_seq2seq_with_the_trace_style(data, tmp_path, capsys):
    def once(out):
        return run(RunConfig(model="tiny-t5", method="seq-lora", tasks=["simplify", "sum"], data_dir=str(data),
                             output_dir=str(out), task_metrics=_task_metrics(["simplify", "sum"]).split(","),
                             prompt_style="trace", decoding="sample", temperature=1.0, max_new_tokens=6,
                             max_train_samples=8, max_eval_samples=4, batch_size=4, eval_batch_size=2,
                             max_target_length=8, max_source_length=96, device="cpu"), progress=False)

    first = once(tmp_path / "a")
    assert "decoding 'sample'" in capsys.readouterr().err  # the warning about variance
    assert once(tmp_path / "b")["accuracy_matrix"] == first["accuracy_matrix"]
    for f in (tmp_path / "a" / "predictions").rglob("*.jsonl"):
        a = _records(f)
        assert a == _records(tmp_path / "b" / f.relative_to(tmp_path / "a"))
        assert all(r["input"] == TRACE_TASKS[f.stem][0] + r["source"] for r in a)  # the prompt as it is
    assert first["metrics"] == {"simplify": "sari", "sum": "accuracy_raw"}
    # sampled at temperature 1, a random model writes text rather than stopping at once
    assert any(r["prediction"] for f in (tmp_path / "a" / "predictions").rglob("*.jsonl") for r in _records(f))


def test_free_text_needs_a_generating_model_and_generate_mode(data, tmp_path):
    base = dict(tasks=["harbor", "sum"], data_dir=str(data), max_train_samples=4, max_eval_samples=2,
                device="cpu")
    with pytest.raises(NloraError, match="encoder.*free-text tasks sum need a seq2seq or decoder model"):
        run(RunConfig(model="tiny-bert", output_dir=str(tmp_path / "a"), **base), progress=False)
    with pytest.raises(NloraError, match="eval_mode': score .* free-text tasks sum have none"):
        run(RunConfig(model="tiny-t5", eval_mode="score", output_dir=str(tmp_path / "b"), **base), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_kinds_are_detected_and_a_folder_missing_tasks_names_them_all(data, tmp_path):
    superni = tmp_path / "SuperNI" / "task1_x"
    superni.mkdir(parents=True)
    for split in ("train", "test"):
        (superni / f"{split}.json").write_text(json.dumps({"Definition": ["Copy."], "Instances": [
            {"id": "a", "input": "hi", "output": ["hi"]}]}))
    assert detect_format(tmp_path, "task1_x") == "superni"
    assert [detect_format(data, t) for t in ("harbor", "sum")] == ["cl_benchmark", "trace"]
    broken = tmp_path / "broken"
    for split in ("train", "test"):
        (broken / "sum").mkdir(parents=True, exist_ok=True)
        (broken / "sum" / f"{split}.json").write_text(json.dumps([{"prompt": "1 + 1"}]))
    config = RunConfig(tasks=["sum", "FOMC"], data_dir=str(broken), output_dir=str(tmp_path / "o"))
    with pytest.raises(NloraError) as e:
        load_run_tasks(config)
    text = str(e.value)
    assert "2 of the 2 tasks cannot be read" in text and "record 0 has no string field 'answer'" in text
    assert str(broken / "sum" / "train.json") in text and "task 'FOMC' not found" in text
    flat = tmp_path / "flat" / "plain"  # a classification task declared to be in TRACE's layout
    flat.mkdir(parents=True)
    for name in ("train", "test", "labels"):
        (flat / f"{name}.json").write_text(json.dumps(["a"] if name == "labels" else [{"label": "a", "sentence": "s"}]))
    with pytest.raises(NloraError, match="train.json: record 0 has no string field 'prompt'"):
        load_run_tasks(RunConfig(tasks=["plain"], data_dir=str(flat.parent), task_format="trace"))


def test_presets_of_free_text_benchmarks_refuse_a_folder_that_does_not_match(data):
    from nlora.config import load_config

    config = load_config(overrides={"benchmark": "trace", "order": 1, "data_dir": str(data)}).validate()
    assert config.epochs_per_task == [5, 3, 7, 5, 3, 5, 5, 7] and config.prompt_style == "trace"
    assert (config.lr, config.batch_size * config.gradient_accumulation_steps) == (1e-4, 32)
    assert (config.max_source_length, config.max_target_length, config.max_new_tokens_of(7)) == (1024, 512, 512)
    assert config.metric_of_task()["Py150"] == "edit_similarity(py150_literals=true)"
    with pytest.raises(NloraError, match="8 of the 8 tasks cannot be read") as e:
        load_run_tasks(config)
    assert all(f"task '{t}' not found" in str(e.value) for t in config.tasks)
    kept = load_config(overrides={"benchmark": "trace", "order": 1, "tasks": "FOMC,20Minuten", "epochs": 1})
    assert kept.validate().metric_of_task() == {"FOMC": "accuracy_raw", "20Minuten": "sari"}
    superni = load_config(overrides={"benchmark": "superni", "order": 2}).validate()
    assert superni.tasks[0] == "task748_glucose_reverse_cause_event_detection" and superni.task_format == "superni"


def test_score_records_is_the_scoring_of_nlora_scoring():
    records = [{"input": "Cut.\nabc\nAnswer: ", "source": "abc", "target": "ab", "prediction": "ab"},
               {"input": "Cut.\nxyz\nAnswer: ", "source": "xyz", "target": "xy", "references": ["xy", "x"],
                "prediction": "x"}]
    value = score_records(records, Scoring("sari", "standard", "\nAnswer: "))
    expected = example_scores("sari", ["ab", "x"], [["ab"], ["xy", "x"]], sources=["abc", "xyz"])
    assert [r["score"] for r in records] == expected and value == sum(expected) / 2
    trace = score_records(records, Scoring("sari", "trace_reference", "\nAnswer: "))
    assert trace == sum(example_scores("sari", ["ab", "x"], ["ab", "xy"], prompts=["Cut.\nabc", "Cut.\nxyz"],
                                       mode="trace_reference")) / 2
    assert trace_prompt("p\nAnswer: ", "\nAnswer: ") == "p" and trace_prompt("p", "") == "p"


def test_prompt_styles_and_the_decoder_training_sequence(data):
    from nlora.models import load_backbone
    from nlora.objectives import IGNORE, make_objective
    from nlora.tasks.prompts import trace_prompt_ids

    tasks = {s: load_run_tasks(RunConfig(tasks=["sum"], data_dir=str(data), prompt_style=s,
                                         answer_separator=" => "))[0] for s in ("nlora", "trace")}
    nlora, trace = tasks["nlora"].train[0], tasks["trace"].train[0]
    assert nlora.prompt == trace.prompt + " => " and trace.prompt_format == "trace"
    assert scoring_of(RunConfig(prompt_style="nlora", answer_separator=" => "), tasks["nlora"]).separator == " => "
    tokenizer = load_backbone("tiny-llama").tokenizer
    objective = make_objective("decoder", tokenizer, 12, 4)
    prompt, answer = objective.training_ids(trace)
    body = tokenizer(trace.prompt, add_special_tokens=False)["input_ids"]
    assert prompt == body[-12:]  # the start of the prompt is cut, the end stays (no BOS in this tokenizer)
    assert answer == tokenizer(trace.label, add_special_tokens=False)["input_ids"][:4] + [tokenizer.eos_token_id]
    batch = objective.collate([trace])
    assert batch["labels"][0].tolist() == [IGNORE] * len(prompt) + answer  # the loss on the answer only

    class WithBos:  # a decoder tokenizer with a BOS token
        bos_token_id, eos_token_id = 1, 2

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [1] * add_special_tokens + [10 + ord(c) % 50 for c in text]}

    assert trace_prompt_ids(WithBos(), "abcdef", 4, "decoder") == [1] + WithBos()("def", False)["input_ids"]
    t5 = load_backbone("tiny-t5").tokenizer
    ids = trace_prompt_ids(t5, "abcdef", 4, "seq2seq")
    assert ids == t5("def")["input_ids"] and ids[-1] == t5.eos_token_id  # the EOS stays, the start is cut


def _resume_argv(data, out):
    return ["run", "--model", "tiny-llama", "--method", "n-lora", "--lambda", "0.001", "--tasks", "simplify,harbor",
            "--data-dir", str(data), "--output-dir", str(out), "--task-metrics", "simplify=sari",
            "--decoding", "sample", "--temperature", "1.0", "--max-new-tokens", "5", "--epochs", "2",
            "--checkpoint-steps", "2", "--log-steps", "1", "--max-train-samples", "8", "--max-eval-samples", "4",
            "--batch-size", "4", "--eval-batch-size", "2", "--max-target-length", "8", "--max-source-length", "96",
            "--device", "cpu", "--quiet"]  # 4 steps per task, 2 batches per evaluation


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    @functools.cache
    def build():
        out = tmp_path_factory.mktemp("uninterrupted") / "run"
        assert main(_resume_argv(data, out)) == 0
        return outcome(out, log=True)
    return build


@pytest.mark.parametrize("fault", ["eval_batch:2"])  # killed in the middle of a sampled evaluation
def test_a_killed_generative_run_resumes_to_the_same_result(data, tmp_path, uninterrupted, capsys, fault):
    out = tmp_path / "run"
    killed = fresh_process.run(fresh_process.nlora_main, _resume_argv(data, out), log=tmp_path / "killed.log",
                               env=dict(os.environ, NLORA_FAULT=fault))
    assert killed.returncode == -signal.SIGKILL, killed.output
    assert main(["resume", str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert outcome(out, log=True) == uninterrupted()
