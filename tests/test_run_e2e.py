"""End to end through the CLI: tiny random models for the plumbing, the pretrained MiniLM for real learning."""

import json
import re

import pytest
import yaml

import fresh_process
from lora_reference import assert_run_reproduces
from nlora.cli import main

fresh_process.start()

TINY = ["--max-train-samples", "12", "--max-eval-samples", "6", "--batch-size", "4", "--eval-batch-size", "4",
        "--epochs", "1", "--device", "cpu", "--quiet"]


def _run(tmp_path, synthetic_dir, *extra, out="run"):
    return main(["run", "--tasks", "harbor,orchard", "--data-dir", str(synthetic_dir),
                 "--output-dir", str(tmp_path / out), *TINY, *extra])


@pytest.mark.parametrize("model", ["tiny-t5", "tiny-llama"])
def test_run_writes_the_whole_run_directory(tmp_path, synthetic_dir, model, capsys):
    assert _run(tmp_path, synthetic_dir, "--model", model, "--method", "n-lora", "--lambda", "0.01") == 0
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["schema_version"] == 1 and metrics["method"] == "n-lora" and metrics["model"] == model
    assert metrics["tasks"] == ["harbor", "orchard"] and metrics["seed"] == 42
    R = metrics["accuracy_matrix"]
    assert R[0][1] is None and all(isinstance(x, float) for x in (R[0][0], R[1][0], R[1][1]))
    assert metrics["average_accuracy"] == pytest.approx((R[1][0] + R[1][1]) / 2)
    assert metrics["bwt"] == pytest.approx(R[1][0] - R[0][0])
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"] == model and config["lambda"] == 0.01 and config["target_modules"]
    for k, task in enumerate(["harbor", "orchard"]):
        for seen in ["harbor", "orchard"][: k + 1]:
            rows = [json.loads(line) for line in (run / "predictions" / f"{k}-{task}" / f"{seen}.jsonl").open()]
            assert len(rows) == 6 and set(rows[0]) >= {"input", "target", "prediction"}
    # the saved adapters alone (summed per phase, onto a fresh base) reproduce every prediction file
    assert_run_reproduces(run)
    assert "AP" in capsys.readouterr().out
    assert not list(run.rglob("*.tmp")), "temporary files left behind"


def test_existing_run_is_kept_unless_overwrite(tmp_path, synthetic_dir, capsys):
    assert _run(tmp_path, synthetic_dir, "--model", "tiny-t5", "--method", "inc-lora") == 0
    before = (tmp_path / "run" / "metrics.json").read_bytes()
    assert _run(tmp_path, synthetic_dir, "--model", "tiny-t5") == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and str(tmp_path / "run") in err and "--overwrite" in err
    assert (tmp_path / "run" / "metrics.json").read_bytes() == before
    assert _run(tmp_path, synthetic_dir, "--model", "tiny-t5", "--overwrite", "--seed", "7") == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["seed"] == 7


@pytest.mark.parametrize("args,message", [
    (["--method", "nope"], "option 'method': unknown method 'nope'"),
    (["--tasks", "harbor,missing"], "task 'missing' not found"),
    (["--lr", "-1"], "option 'lr'"),
    (["--target-modules", "q_proj"], "option 'target_modules': ['q_proj'] not found in model 'tiny-t5'"),
    (["--bogus-option", "1"], None),
])
def test_bad_input_gives_one_clear_error(tmp_path, synthetic_dir, capsys, args, message):
    if message is None:
        with pytest.raises(SystemExit) as exc:
            _run(tmp_path, synthetic_dir, "--model", "tiny-t5", *args)
        assert exc.value.code == 2 and "--bogus-option" in capsys.readouterr().err
        return
    full = ["--model", "tiny-t5", *args]
    code = main(["run", "--tasks", "harbor,orchard", "--data-dir", str(synthetic_dir),
                 "--output-dir", str(tmp_path / "run"), *TINY, *full]) if "--tasks" not in args else \
        main(["run", "--data-dir", str(synthetic_dir), "--output-dir", str(tmp_path / "run"), *TINY, *full])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_config_file_and_python_entry_point(tmp_path, synthetic_dir):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": "tiny-t5", "tasks": ["harbor"], "data_dir": str(synthetic_dir),
                                   "output_dir": str(tmp_path / "viayaml"), "max_train_samples": 4,
                                   "max_eval_samples": 2, "batch_size": 2, "device": "cpu"}))
    # `python -m nlora`, its __main__ run in a fresh process
    proc = fresh_process.run(fresh_process.run_module, "nlora", ["run", "--config", str(cfg), "--quiet"],
                             log=tmp_path / "run.log")
    assert proc.returncode == 0, proc.output
    assert json.loads((tmp_path / "viayaml" / "metrics.json").read_text())["tasks"] == ["harbor"]


def test_pretrained_encoder_learns_two_tasks_and_the_metrics_follow_the_matrix(tmp_path, synthetic_dir):
    """The offline pretrained MiniLM with the scoring head learns generated tasks far above chance (33%); every
    matrix entry is the share of correct predictions in its predictions file, and AP, BWT, FWT and forgetting
    are those of the matrix (recomputed here by hand); the saved adapters reproduce every prediction."""
    from nlora import RunConfig, run

    run_dir = tmp_path / "minilm"
    metrics = run(RunConfig(model="sentence-transformers/all-MiniLM-L6-v2", method="inc-lora",
                            tasks=["harbor", "orchard"], data_dir=str(synthetic_dir), output_dir=str(run_dir),
                            epochs=5, batch_size=8, lr=1e-3, max_source_length=64, eval_future=True,
                            device="cpu"), progress=False)
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    R, base = on_disk["accuracy_matrix"], on_disk["baseline_accuracy"]
    assert R[0][0] >= 75.0 and R[1][1] >= 75.0, R
    for k, trained in enumerate(["harbor", "orchard"]):
        for j, task in enumerate(["harbor", "orchard"]):
            rows = [json.loads(line) for line in (run_dir / "predictions" / f"{k}-{trained}" / f"{task}.jsonl").open()]
            assert all(r["correct"] == (r["prediction"].strip().lower() == r["target"].lower()) for r in rows)
            assert R[k][j] == pytest.approx(100.0 * sum(r["correct"] for r in rows) / len(rows), abs=1e-4)  # 4 decimals
    assert on_disk["average_accuracy"] == pytest.approx((R[1][0] + R[1][1]) / 2)
    assert on_disk["bwt"] == pytest.approx(R[1][0] - R[0][0])
    assert on_disk["fwt"] == pytest.approx(R[0][1] - base[1])
    assert on_disk["forgetting"] == pytest.approx(max(R[0][0] - R[1][0], 0.0))
    assert metrics["average_accuracy"] == on_disk["average_accuracy"]
    assert_run_reproduces(run_dir)


def _minilm_n_lora(tmp_path, synthetic_dir, out, *extra):
    assert main(["run", "--model", "sentence-transformers/all-MiniLM-L6-v2", "--method", "n-lora",
                 "--tasks", "harbor,orchard", "--data-dir", str(synthetic_dir), "--output-dir", str(tmp_path / out),
                 "--max-train-samples", "16", "--max-eval-samples", "4", "--batch-size", "8",
                 "--max-source-length", "64", "--log-steps", "1", "--device", "cpu", "--quiet", *extra]) == 0
    return [line for line in map(json.loads, (tmp_path / out / "log.jsonl").open()) if line["event"] == "train"]


def test_default_lambda_leaves_the_task_loss_in_charge_and_a_swamping_one_is_warned_of_once(tmp_path, synthetic_dir,
                                                                                         capsys):
    """The default N-LoRA λ with the default (`delta`) penalty form on the pretrained MiniLM: the penalty is a
    small part of the loss (the public scripts' λ 0.4, which belongs to the `reference` form, makes it hundreds of
    times the task loss). A regulariser that large gets one warning line for the whole run, naming the option."""
    lines = _minilm_n_lora(tmp_path, synthetic_dir, "default")
    assert all(line["regularizer"] < 0.1 * line["loss"] for line in lines), lines
    assert "nlora: warning" not in capsys.readouterr().err
    lines = _minilm_n_lora(tmp_path, synthetic_dir, "swamped", "--lambda", "0.4")
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("nlora: warning:")]
    first = next(line for line in lines if line["regularizer"] > 0)  # step 2: B is 0 at the first step
    ratio = first["regularizer_terms"]["l1"] / first["loss"]
    assert ratio > 10 and len(warnings) == 1, err
    said = re.fullmatch(rf"nlora: warning: task 1 \(harbor\), logged step {first['step']}: regulariser 'l1' of "
                        r"method n-lora is (\d+)x the task loss \((\S+) against (\S+)\), so the task is barely "
                        r"learned; lower option 'lambda'", warnings[0])
    assert said, warnings[0]
    assert abs(int(said[1]) - ratio) <= 1 and float(said[3]) == pytest.approx(first["loss"], rel=1e-2)
