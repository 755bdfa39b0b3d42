"""A run directory written before methods owned their options (its config.yaml records every method's options at
their defaults, and lacks the keys added since) still resumes, exports, predicts and reports; a run of another
method's non-default option in such a file is refused, naming the owner."""

import json

import yaml

from nlora.cli import main

OLD_KEYS = {"lambda": 0.4, "lambda_per_task": None, "penalty_form": "delta", "penalty_chunk_size": None,
            "orth_lambda": 0.5, "l2_lambda": 0.0, "orth_lambda_per_task": None, "l2_lambda_per_task": None,
            "l2_form": "squared", "replay_per_task": 50, "replay_base": "seq-lora"}
NEW_KEYS = ("method_module", "train_factors")


def test_a_run_written_by_the_previous_release_still_works(tmp_path, synthetic_dir, capsys):
    run = tmp_path / "run"
    assert main(["run", "--model", "tiny-bert", "--method", "inc-lora", "--tasks", "harbor,orchard", "--data-dir",
                 str(synthetic_dir), "--output-dir", str(run), "--max-train-samples", "4", "--max-eval-samples",
                 "4", "--batch-size", "4", "--device", "cpu", "--quiet"]) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    old = {k: v for k, v in config.items() if k not in NEW_KEYS} | OLD_KEYS
    (run / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    record = json.loads((run / "run.json").read_text())  # the previous release recorded no digest
    for session in record["sessions"]:
        session.pop("config_digest", None)
    (run / "run.json").write_text(json.dumps(record))
    assert main(["resume", str(run), "--quiet"]) == 0
    assert main(["export", str(run), str(tmp_path / "export")]) == 0
    assert main(["predict", str(run), "--tasks", "harbor", "--output", str(tmp_path / "p.jsonl"), "--quiet"]) == 0
    assert main(["report", str(run)]) == 0
    assert main(["status", str(run)]) == 0
    old["orth_lambda"] = 0.7  # not what the previous release wrote for an inc-lora run: another method's choice
    (run / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    capsys.readouterr()
    assert main(["resume", str(run), "--quiet"]) == 2  # resumed once, the run has a digest: the edit is named
    assert "was changed after the run started" in capsys.readouterr().err
    (run / "run.json").write_text(json.dumps(record))  # as the previous release left it: no digest, the option's
    # owner is named
    assert main(["resume", str(run), "--quiet"]) == 2
    assert "option 'orth_lambda' belongs to method 'o-lora'" in capsys.readouterr().err
