"""The demo's summary over seeds: the table and the conclusion worded from the paired differences; the
free-text demo's whole path on two tasks."""

import json

import pytest

from nlora.demo import conclusion, format_seeds, mean_sd


def _runs(pairs):
    return [{"average_accuracy": ap, "bwt": bwt} for ap, bwt in pairs]


def test_table_has_each_seed_and_mean_sd():
    results = {"n-lora": _runs([(100.0, 0.0), (94.9, -7.7), (94.9, -7.7)]),
               "inc-lora": _runs([(94.9, -7.7), (100.0, 0.0), (89.8, -15.3)])}
    lines = format_seeds([1, 2, 3], results).splitlines()
    assert lines[0].split() == ["seed", "n-lora", "AP", "n-lora", "BWT", "inc-lora", "AP", "inc-lora", "BWT"]
    assert lines[1].split() == ["1", "100.0", "0.0", "94.9", "-7.7"]
    # n-lora AP: mean 96.6, sd 2.94 (by hand: deviations 3.4, -1.7, -1.7 → sqrt(17.34 / 2))
    assert "96.6 ± 2.9" in lines[-1] and lines[-1].startswith("mean ± sd")
    assert mean_sd([100.0, 94.9, 94.9])[1] == pytest.approx((17.34 / 2) ** 0.5)


def test_a_difference_that_changes_sign_is_reported_as_within_the_spread():
    results = {"n-lora": _runs([(100.0, 0.0), (94.9, -7.7), (94.9, -7.7), (100.0, 0.0)]),
               "inc-lora": _runs([(94.9, -7.7), (100.0, 0.0), (89.8, -15.3), (100.0, 0.0)])}
    text = conclusion(results)
    # AP differences +5.1, -5.1, +5.1, 0: mean +1.3
    assert "AP: n-lora − inc-lora = +1.3 ± 4.9 points" in text
    assert "within the seeds' spread" in text and "no difference between the methods" in text


def test_a_difference_of_one_sign_on_every_seed_says_so():
    results = {"n-lora": _runs([(90.0, -1.0), (80.0, -2.0), (85.0, -3.0)]),
               "inc-lora": _runs([(80.0, -5.0), (79.0, -2.0), (70.0, -9.0)])}
    text = conclusion(results).splitlines()
    # diffs 10, 1, 15: mean 8.67, sd 7.09, t(0.975, 2) = 4.303: half-width 17.6 around 8.67
    assert text[0] == ("AP: n-lora is higher on 3 of 3 seeds (n-lora − inc-lora = +8.7 ± 7.1 points, mean ± sd "
                       "over seeds; 95% t interval [-9.0, +26.3]: it contains 0, so the difference is not separated "
                       "from the seeds' spread).")
    assert text[1].startswith("BWT: n-lora is higher on 2 of 3 seeds, equal on 1")


def test_a_difference_whose_interval_excludes_zero_is_separated():
    results = {"n-lora": _runs([(90.0, 0.0), (91.0, 0.0), (92.0, 0.0)]),
               "inc-lora": _runs([(80.0, 0.0), (80.5, 0.0), (81.0, 0.0)])}  # diffs 10, 10.5, 11
    assert conclusion(results).splitlines()[0].endswith("95% t interval [+9.3, +11.7]: separated).")


def test_one_seed_says_nothing():
    text = conclusion({"n-lora": _runs([(100.0, 0.0)]), "inc-lora": _runs([(94.9, -7.7)])})
    assert "one seed has no spread" in text and "says nothing about the methods" in text


def test_generative_demo_runs_the_whole_path(tmp_path, capsys):
    from nlora.cli import main

    assert main(["demo", "--generative", "--tasks", "sum,harbor", "--epochs", "1", "--max-new-tokens", "4",
                 "--output-dir", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "metrics: sum accuracy_raw, harbor exact_match" in out and "trace_reference mode" in out
    assert "does not learn" in out  # the tiny model is said to be random
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["scoring_mode"] == "standard" and metrics["complete"]  # rescored back: resumable as it is
    assert (tmp_path / "report" / "report.md").is_file()


DEMO = ["demo", "--num-seeds", "1", "--model", "tiny-bert", "--tasks", "harbor,orchard", "--epochs", "1",
        "--max-train-samples", "8", "--max-eval-samples", "4", "--batch-size", "4", "--max-source-length", "128",
        "--quiet"]


def test_demo_counts_its_runs_says_how_to_continue_and_a_rerun_reuses_what_finished(tmp_path, capsys,
                                                                                  monkeypatch):
    """Stopped by SIGTERM in its second run (2 steps per task: the 6th step), the demo says how to continue; the
    same command then reuses the finished run (its files untouched), resumes the stopped one, and prints the
    table. A run of another configuration is not reused."""
    import re

    from nlora import cli
    from nlora.cli import main
    from nlora.config import load_config
    from nlora.demo import saved_state
    from nlora.train import loop

    steps = []

    def stop_at_sixth_step(event):
        if event == "train_step":
            steps.append(event)
            if len(steps) == 6:
                raise cli.Terminated

    argv = [*DEMO, "--output-dir", str(tmp_path)]
    with monkeypatch.context() as m:
        m.setattr(loop, "fault_point", stop_at_sixth_step)
        assert main(argv) == 143
    out, err = capsys.readouterr()
    assert "=== run 1 of 2: seed 42, n-lora: 2 tasks, model tiny-bert\n" in out
    assert re.search(r"=== run 2 of 2: seed 42, inc-lora: 2 tasks, model tiny-bert; about (\d+ min )?\d+ s "
                     r"left\n", out), out
    assert "the same `nlora demo` command continues: finished runs are reused, the stopped one resumes" in err
    finished = {p: p.read_bytes() for p in (tmp_path / "seed-42" / "n-lora").rglob("*") if p.is_file()}

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "=== run 1 of 2: seed 42, n-lora: 2 tasks, model tiny-bert (finished earlier: reused)" in out
    assert "=== run 2 of 2: seed 42, inc-lora: 2 tasks, model tiny-bert (resumed)" in out
    assert "AP and BWT (%) after the whole sequence, 1 seed(s)" in out
    assert {p: p.read_bytes() for p in (tmp_path / "seed-42" / "n-lora").rglob("*") if p.is_file()} == finished
    assert json.loads((tmp_path / "seed-42" / "inc-lora" / "metrics.json").read_text())["complete"]
    saved = load_config(tmp_path / "seed-42" / "inc-lora" / "config.yaml", saved_run=True)
    assert saved_state(saved) == "finished" and saved_state(saved.replace(lr=0.5)) == "new"
