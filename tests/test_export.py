"""Using a trained run: the exported summed adapter (PEFT) and the merged model predict exactly what the run
predicted after its last task (or after task K with --upto); `nlora predict` reproduces the run's predictions
through the evaluation code of training; bad requests fail with one clear error."""

import json
import shutil

import pytest
import torch
from peft import PeftConfig, PeftModel

from safetensors.torch import load_file

from nlora import RunConfig
from nlora.cli import main
from nlora.config import load_config
from nlora.errors import NloraError
from nlora.eval.evaluate import evaluate
from nlora.export import export_run, read_run
from nlora.models import load_backbone
from nlora.objectives import make_objective
from nlora.predict import load_model, predict_run
from nlora.runner import load_tasks, run

TASKS = ["harbor", "orchard", "library"]


def _train(root, synthetic_dir, model, method, tasks=TASKS, **kw):
    out = root / f"{model}-{method}"
    options = dict(model=model, method=method, tasks=tasks, data_dir=str(synthetic_dir), output_dir=str(out),
                   max_train_samples=8, max_eval_samples=6, batch_size=4, eval_batch_size=4, epochs=1, lr=5e-3,
                   max_target_length=6, device="cpu", **({"lambda_": 0.01} if method == "n-lora" else {}))
    run(RunConfig(**{**options, **kw}), progress=False)
    return out


def _run_predictions(run_dir, k, task, seen):
    return [json.loads(line) for line in (run_dir / "predictions" / f"{k}-{task}" / f"{seen}.jsonl").open()]


def _predictions(model, kind_source, run_dir, tasks):
    config = load_config(run_dir / "config.yaml")
    backbone = load_backbone(kind_source)
    objective = make_objective(backbone.kind, backbone.tokenizer, config.max_source_length,
                               config.max_target_length, config.eval_mode)
    data = {t.name: t for t in load_tasks(config)}
    return {t: [r["prediction"] for r in evaluate(objective, model, data[t].test, 4, progress=False)[1]]
            for t in tasks}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_dir):
    root = tmp_path_factory.mktemp("trained")
    # a high learning rate, and scoring (random T5 generates nothing), so the adapters move the predictions
    return {"tiny-t5": _train(root, synthetic_dir, "tiny-t5", "n-lora", lr=0.05, eval_mode="score"),
            "tiny-bert": _train(root, synthetic_dir, "tiny-bert", "o-lora", lr=0.05)}


@pytest.mark.parametrize("model", ["tiny-t5", "tiny-bert"])
def test_exported_adapter_and_merged_model_predict_what_the_run_predicted(tmp_path, runs, model):
    run_dir = runs[model]
    expected = {t: [r["prediction"] for r in _run_predictions(run_dir, 2, "library", t)] for t in TASKS}
    adapter = export_run(run_dir, tmp_path / "adapter")
    config = PeftConfig.from_pretrained(str(adapter))
    assert config.r == 3 * 8 and config.lora_alpha == 3 * 8 and config.lora_dropout == 0.0
    # its update is the sum of the saved per-task updates
    exported = load_file(str(adapter / "adapter_model.safetensors"))
    saved = [load_file(str(run_dir / "adapters" / f"{k}-{t}" / "adapter_model.safetensors"))
             for k, t in enumerate(TASKS)]
    for key in [k for k in exported if k.endswith("lora_A.weight")]:
        b = key.replace("lora_A", "lora_B")
        torch.testing.assert_close(exported[b] @ exported[key], sum(4.0 * s[b] @ s[key] for s in saved))
    bare = _predictions(load_backbone(model).model.eval(), model, run_dir, TASKS)
    assert bare != expected, "the run's adapters must change the predictions for this test to mean anything"
    peft_model = PeftModel.from_pretrained(load_backbone(model).model, str(adapter)).eval()
    assert _predictions(peft_model, model, run_dir, TASKS) == expected
    merged = export_run(run_dir, tmp_path / "merged", merge=True)
    assert (merged / "config.json").is_file() and not (merged / "adapter_config.json").exists()
    merged_model = load_backbone(str(merged)).model  # AutoModel*.from_pretrained of the folder
    assert not any("lora" in n for n, _ in merged_model.named_parameters())
    assert _predictions(merged_model, str(merged), run_dir, TASKS) == expected


def test_export_upto_takes_the_model_after_task_k(tmp_path, runs):
    run_dir = runs["tiny-t5"]
    adapter = export_run(run_dir, tmp_path / "after-1", upto=1)
    assert PeftConfig.from_pretrained(str(adapter)).r == 8
    model = PeftModel.from_pretrained(load_backbone("tiny-t5").model, str(adapter)).eval()
    assert _predictions(model, "tiny-t5", run_dir, ["harbor"]) == \
        {"harbor": [r["prediction"] for r in _run_predictions(run_dir, 0, "harbor", "harbor")]}
    info = json.loads((adapter / "nlora_export.json").read_text())
    assert info["upto"] == 1 and info["tasks"] == ["harbor"] and info["method"] == "n-lora"


def test_predict_reproduces_the_runs_predictions(tmp_path, runs, synthetic_dir, capsys):
    run_dir = runs["tiny-t5"]
    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(run_dir), "--tasks", "harbor,library", "--output", str(out), "--quiet"]) == 0
    rows = [json.loads(line) for line in out.open()]
    expected = [{"task": t, **r} for t in ("harbor", "library") for r in _run_predictions(run_dir, 2, "library", t)]
    assert rows == expected
    assert "harbor:" in capsys.readouterr().err
    # --upto 2 and a JSONL input: the run's model after task 2, on the same examples given as sentences
    data = {t.name: t for t in load_tasks(load_config(run_dir / "config.yaml"))}
    task = data["orchard"]
    # the task name picks the instruction the task was trained with (its family's: "synthetic")
    lines = [{"sentence": e.sentence, "options": list(e.options), "task": "orchard",
              **({"label": e.label} if i % 2 else {})} for i, e in enumerate(task.test)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    records = predict_run(run_dir, input_file=tmp_path / "in.jsonl", upto=2, output=tmp_path / "o.jsonl",
                          progress=False)
    want = _run_predictions(run_dir, 1, "orchard", "orchard")
    assert [r["prediction"] for r in records] == [r["prediction"] for r in want]
    assert [r["input"] for r in records] == [r["input"] for r in want]
    assert all(("correct" in r) == bool(i % 2) for i, r in enumerate(records))
    # a run written before run.json recorded the tasks' instructions: read from its data folder
    old = tmp_path / "old-run"
    shutil.copytree(run_dir, old)
    record = json.loads((old / "run.json").read_text())
    for session in record["sessions"]:
        del session["tasks"]
    (old / "run.json").write_text(json.dumps(record))
    again = predict_run(old, input_file=tmp_path / "in.jsonl", upto=2, output=tmp_path / "o2.jsonl", progress=False)
    assert [r["input"] for r in again] == [r["input"] for r in want]


def test_predict_reads_and_folds_as_the_run_did(tmp_path, synthetic_dir):
    # a run in the reference prompt format, with folding off: predict must build the run's prompts (not nlora's
    # own layout) and sum the adapters as separate paths, as the run evaluated them
    instructions = tmp_path / "instructions.json"
    instructions.write_text(json.dumps({t: f"Which label fits this {t} text? Choose one from the option.\n"
                                        for t in TASKS}))
    run_dir = _train(tmp_path, synthetic_dir, "tiny-bert", "n-lora", tasks=TASKS[:2], lr=0.05,
                     prompt_format="reference", add_task_name=True, add_dataset_name=True,
                     instructions=str(instructions), fold_adapters=False)
    rows = predict_run(run_dir, tasks=TASKS[:2], output=tmp_path / "p.jsonl", progress=False)
    want = [r for t in TASKS[:2] for r in _run_predictions(run_dir, 1, "orchard", t)]
    assert [r["input"] for r in rows] == [r["input"] for r in want]
    assert all(r["input"].startswith("Task:synthetic\nDataset:") for r in rows)
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in want]
    (tmp_path / "in.jsonl").write_text(json.dumps({"sentence": "a plain sentence", "options": ["x", "y"],
                                                   "task": "harbor"}) + "\n")
    (record,) = predict_run(run_dir, input_file=tmp_path / "in.jsonl", output=tmp_path / "o.jsonl", progress=False)
    assert record["input"] == ("Task:synthetic\nDataset:harbor\nWhich label fits this harbor text? Choose one from "
                               "the option.\nOption: x, y \na plain sentence\nAnswer:")
    adapters, _ = load_model(read_run(run_dir))
    assert adapters.fold_form is None and adapters.folded == []


def test_snapshot_and_per_task_runs(tmp_path, synthetic_dir):
    seq = _train(tmp_path, synthetic_dir, "tiny-bert", "seq-lora", tasks=TASKS[:2], lr=0.05)
    adapter = export_run(seq, tmp_path / "seq", upto=1)  # the shared adapter as it was after task 1
    model = PeftModel.from_pretrained(load_backbone("tiny-bert").model, str(adapter)).eval()
    assert _predictions(model, "tiny-bert", seq, ["harbor"]) == \
        {"harbor": [r["prediction"] for r in _run_predictions(seq, 0, "harbor", "harbor")]}
    per_task = _train(tmp_path, synthetic_dir, "tiny-bert", "per-task", tasks=TASKS[:2], lr=0.05)
    with pytest.raises(NloraError, match="needs the task id|its own adapter"):
        export_run(per_task, tmp_path / "pt")
    assert not (tmp_path / "pt").exists()
    # per-task predicts each task with its own adapter, as the run did
    rows = predict_run(per_task, tasks=["harbor", "orchard"], output=tmp_path / "pt.jsonl", progress=False)
    assert [r["prediction"] for r in rows] == [r["prediction"] for t in ("harbor", "orchard")
                                               for r in _run_predictions(per_task, 1, "orchard", t)]
    with pytest.raises(NloraError, match="needs the task id"):
        predict_run(per_task, tasks=["library"], data_dir=str(synthetic_dir), progress=False)


def test_bad_requests_fail_clearly(tmp_path, runs, capsys):
    run_dir = runs["tiny-t5"]
    for args, message in [
        (["export", str(run_dir), str(tmp_path / "x"), "--upto", "4"], "--upto: must be between 1 and 3"),
        (["export", str(tmp_path), str(tmp_path / "x")], "not a run directory"),
        (["predict", str(run_dir), "--input", str(tmp_path / "missing.jsonl")], "cannot read"),
    ]:
        assert main(args) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"sentence": "a", "options": ["x"]}\n{"sentence": "b"}\n')
    with pytest.raises(NloraError, match=r"bad.jsonl:2: \"options\""):
        predict_run(run_dir, input_file=tmp_path / "bad.jsonl", progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(NloraError, match="not empty"):
        export_run(run_dir, tmp_path / "full")
    assert not list(tmp_path.glob(".*.tmp"))
