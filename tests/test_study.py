"""nlora study: the study file, its cells, the ledger, running, resuming and refusing, selection on dev, the
local executor, plan, status and the report."""

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import yaml

import fresh_process
from nlora.errors import NloraError
from nlora.studies.cells import cell_config, dev_cells, table_cells
from nlora.studies.compare import paired
from nlora.studies.execute import run_study
from nlora.studies.ledger import Ledger
from nlora.studies.plan import plan_study
from nlora.studies.select import best_point
from nlora.studies.spec import Study, read_study

fresh_process.start()


def study_dict(data_dir, **changes) -> dict:
    study = {
        "name": "tiny",
        "base": {"model": "tiny-bert", "tasks": ["harbor", "orchard"], "data_dir": str(data_dir),
                 "max_train_samples": 16, "max_eval_samples": 6, "batch_size": 8, "device": "cpu",
                 "checkpoint_steps": 1},
        "methods": {"n-lora": {"lambda": [1e-4, 1e-2]}, "inc-lora": {}},
        "seeds": [1, 2],
        "select": {"dev_samples": 6, "seeds": [0]},
        "baseline": "inc-lora",
    }
    for key, value in changes.items():
        study[key] = value
    return study


def write_study(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic_dir):
    """The tiny study run once without interruption: its directory."""
    out = tmp_path_factory.mktemp("study") / "ref"
    outcome = run_study(Study.from_dict(study_dict(synthetic_dir)), out)
    assert not outcome.failed and len(outcome.ran) == 6
    from nlora.studies.report import write_study_report

    write_study_report(out)
    return out


def table(study_dir: Path) -> dict:
    return json.loads((study_dir / "report" / "table.json").read_text())


# ---------------------------------------------------------------------------------------------- the file

@pytest.mark.parametrize("change, message", [
    ({"metods": {}}, "unknown key 'metods' (did you mean 'methods'?)"),
    ({"base": {"seed": 3}}, "base option 'seed' is set by the study for each cell: give the top-level key 'seeds'"),
    ({"orders": [1, 2]}, "key 'orders' needs a benchmark preset in base"),
    ({"baseline": "o-lora"}, "baseline 'o-lora' is not one of the study's methods"),
    ({"select": {"split": "test"}}, "select.split must be dev"),
    ({"select": {"seed": [0]}}, "unknown key 'select.seed' (did you mean 'seeds'?)"),
    ({"axes": {"lora_rank": [4, 8]}}, "axis 'lora_rank' is not a core run option (did you mean 'lora_r' or"),
    ({"seeds": [1, 1]}, "key 'seeds' repeats a value"),
    ({"methods": {"n-lora": {"lambda": [0.1, 0.1]}}}, "option 'lambda' of method 'n-lora' repeats a value"),
])
def test_a_bad_study_file_is_one_error_naming_the_key(tmp_path, synthetic_dir, change, message):
    data = study_dict(synthetic_dir)
    for key, value in change.items():
        data[key] = {**data[key], **value} if key == "base" else value
    with pytest.raises(NloraError, match=__import__("re").escape(message)):
        read_study(write_study(tmp_path / "s.yaml", data))


@pytest.mark.parametrize("methods, named", [
    ({"nlora": {}}, "unknown method 'nlora'"),
    ({"inc-lora": {"lambda": 0.1}}, "lambda"),
    ({"n-lora": {"lambda": [0.1, "x"]}}, "lambda"),
])
def test_a_bad_cell_is_refused_before_anything_is_written(tmp_path, synthetic_dir, methods, named):
    out = tmp_path / "study"
    with pytest.raises(NloraError) as error:
        run_study(Study.from_dict(study_dict(synthetic_dir, methods=methods, baseline=None)), out)
    assert "cell " in str(error.value) and named in str(error.value)
    assert not out.exists()


def test_cells_cover_every_combination_once(synthetic_dir):
    study = Study.from_dict(study_dict(synthetic_dir, methods={"n-lora": {"lambda": [1e-4, 1e-2], "lora_r": [4, 8]},
                                                               "inc-lora": {}},
                                       seeds=[1, 2, 3], axes={"lora_alpha": [16, 32]},
                                       select={"tune": ["lambda"], "dev_samples": 6, "seeds": [0, 5]}))
    dev = dev_cells(study)
    assert len(dev) == 2 * 2  # λ grid × selection seeds; the untuned lora_r takes its first value on dev
    tests = table_cells(study, {("n-lora", None): {"lambda": 1e-2}})
    # n-lora: 2 lora_r × 2 axis values × 3 seeds; inc-lora: 2 axis values × 3 seeds
    assert len(tests) == 12 + 6 and len({c.id for c in tests}) == len(tests)
    assert all(dict(c.options)["lambda"] == 1e-2 for c in tests if c.method == "n-lora")
    assert {c.row for c in tests} == {"n-lora (lora_r=4, lora_alpha=16)", "n-lora (lora_r=4, lora_alpha=32)",
                                      "n-lora (lora_r=8, lora_alpha=16)", "n-lora (lora_r=8, lora_alpha=32)",
                                      "inc-lora (lora_alpha=16)", "inc-lora (lora_alpha=32)"}
    pending = table_cells(study)
    assert all(c.pending == ("lambda",) for c in pending if c.method == "n-lora")


def test_a_cell_config_is_the_base_with_its_own_values(tmp_path, synthetic_dir):
    study = Study.from_dict(study_dict(synthetic_dir))
    cell = next(c for c in table_cells(study, {("n-lora", None): {"lambda": 0.01}}) if c.method == "n-lora")
    config = cell_config(study, cell, tmp_path)
    assert (config.method, config.lambda_, config.seed, config.max_train_samples) == ("n-lora", 0.01, 1, 16)
    assert config.output_dir == str(tmp_path / "cells" / "test" / "n-lora_lambda0.01" / "seed1")
    dev = cell_config(study, dev_cells(study)[0], tmp_path)
    assert dev.data_dir == str(tmp_path / "dev-data" / "all") and dev.max_train_samples is None
    assert not dev.eval_future


# ----------------------------------------------------------------------------------------------- running

def test_a_study_runs_every_cell_and_a_rerun_skips_them(reference, synthetic_dir):
    ledger = Ledger(reference).read()
    assert len(ledger) == 6 and all(e["state"] == "done" and e["steps"] > 0 for e in ledger.values())
    choice = json.loads((reference / "selection.json").read_text())["choices"][0]
    assert choice["method"] == "n-lora" and len(choice["scores"]) == 2 and choice["chosen"] is not None
    before = (reference / "ledger.json").read_text()
    outcome = run_study(Study.from_dict(study_dict(synthetic_dir)), reference)
    assert outcome.ran == [] and len(outcome.skipped) == 6
    assert (reference / "ledger.json").read_text() == before


def test_the_dev_view_is_carved_from_train_only(reference, synthetic_dir):
    view = reference / "dev-data" / "all" / "synthetic"
    for task in ("harbor", "orchard"):
        train = json.loads((synthetic_dir / "synthetic" / task / "train.json").read_text())
        fit = json.loads((view / task / "train.json").read_text())
        dev = json.loads((view / task / "test.json").read_text())
        assert (len(fit), len(dev)) == (10, 6)
        pool = [json.dumps(r, sort_keys=True) for r in train]
        assert all(json.dumps(r, sort_keys=True) in pool for r in fit + dev)
        assert not {json.dumps(r, sort_keys=True) for r in fit} & {json.dumps(r, sort_keys=True) for r in dev}


def test_an_edited_study_is_refused_naming_the_cell(reference, synthetic_dir):
    data = study_dict(synthetic_dir)
    data["base"]["batch_size"] = 4
    before = (reference / "ledger.json").read_text()
    with pytest.raises(NloraError, match=r"cell dev/n-lora_lambda0.0001/seed0 already ran with another "
                                         r"configuration \(batch_size differ\)"):
        run_study(Study.from_dict(data), reference)
    assert (reference / "ledger.json").read_text() == before


def test_a_new_seed_adds_only_its_cells(reference, synthetic_dir, tmp_path):
    copy = tmp_path / "study"
    shutil.copytree(reference, copy)
    outcome = run_study(Study.from_dict(study_dict(synthetic_dir, seeds=[1, 2, 3])), copy)
    assert sorted(outcome.ran) == ["test/inc-lora/seed3", f"test/{_chosen_nlora(copy)}/seed3"]


def _chosen_nlora(study_dir: Path) -> str:
    chosen = json.loads((study_dir / "selection.json").read_text())["choices"][0]["chosen"]["lambda"]
    return f"n-lora_lambda{chosen:g}"


@pytest.mark.parametrize("fault", ["train_step:7", "ledger_update:3", "file_write:30"])
def test_a_killed_study_run_again_gives_the_same_table(reference, synthetic_dir, tmp_path, fault):
    from nlora.studies.report import write_study_report

    path = write_study(tmp_path / "s.yaml", study_dict(synthetic_dir))
    out = tmp_path / "study"
    killed = fresh_process.run(fresh_process.nlora_main, ["study", "run", str(path), "--output-dir", str(out),
                                                          "--quiet"],
                               log=tmp_path / "killed.log", env=dict(os.environ, NLORA_FAULT=fault))
    assert killed.returncode == -9, killed.output
    if (out / "ledger.json").exists():
        json.loads((out / "ledger.json").read_text())  # whole, whatever the kill interrupted
    outcome = run_study(read_study(path), out)
    assert not outcome.failed
    write_study_report(out)
    assert table(out) == table(reference)


def test_a_failed_cell_does_not_stop_the_others_unless_fail_fast(tmp_path, synthetic_dir, monkeypatch):
    import nlora.studies.execute as execute

    real = execute.run_or_resume

    def failing(config, progress):
        if "inc-lora" in config.output_dir and config.seed == 1:
            raise RuntimeError("out of memory")
        return real(config, progress)

    monkeypatch.setattr(execute, "run_or_resume", failing)
    data = study_dict(synthetic_dir, methods={"inc-lora": {}, "seq-lora": {}})
    outcome = run_study(Study.from_dict(data), tmp_path / "a")
    assert list(outcome.failed) == ["test/inc-lora/seed1"] and "out of memory" in outcome.failed["test/inc-lora/seed1"]
    assert len(outcome.ran) == 3
    assert Ledger(tmp_path / "a").read()["test/inc-lora/seed1"]["state"] == "failed"
    again = run_study(Study.from_dict(data), tmp_path / "a")
    assert again.ran == [] and not again.failed  # a failed cell waits for --rerun-failed
    monkeypatch.setattr(execute, "run_or_resume", real)
    assert run_study(Study.from_dict(data), tmp_path / "a", rerun_failed=True).ran == ["test/inc-lora/seed1"]
    monkeypatch.setattr(execute, "run_or_resume", failing)
    with pytest.raises(NloraError, match="cell test/inc-lora/seed1 failed: RuntimeError: out of memory"):
        run_study(Study.from_dict(data), tmp_path / "b", fail_fast=True)
    assert "test/seq-lora/seed1" not in Ledger(tmp_path / "b").read()  # stopped at the first failure


def test_local_workers_run_cells_in_their_own_processes(tmp_path, synthetic_dir):
    from nlora.studies.local import LocalExecutor

    data = study_dict(synthetic_dir, methods={"inc-lora": {}}, select={})
    outcome = run_study(Study.from_dict(data), tmp_path / "s", LocalExecutor(workers=2))
    assert sorted(outcome.ran) == ["test/inc-lora/seed1", "test/inc-lora/seed2"] and not outcome.failed
    ledger = Ledger(tmp_path / "s").read()
    assert len({e["pid"] for e in ledger.values()} | {os.getpid()}) == 3  # two child processes, not this one
    logs = sorted(p.name for p in (tmp_path / "s" / "logs").iterdir())
    assert logs == ["test__inc-lora__seed1.log", "test__inc-lora__seed2.log"]


# --------------------------------------------------------------------------------------------- selection

def test_the_best_point_wins_and_ties_go_to_bwt_then_grid_order():
    rng = random.Random(0)
    for _ in range(200):
        scores = [{"values": {"x": i}, "score": rng.choice([1.0, 2.0, 3.0]), "bwt": rng.choice([None, -1.0, 0.0])}
                  for i in range(rng.randint(1, 6))]
        for mode, sign in (("max", 1), ("min", -1)):
            top = max(sign * s["score"] for s in scores)
            tied = [s for s in scores if sign * s["score"] == top]
            best_bwt = max((s["bwt"] for s in tied if s["bwt"] is not None), default=None)
            expected = next(s for s in tied if s["bwt"] == best_bwt) if best_bwt is not None else tied[0]
            assert best_point(scores, mode) is expected


def test_paired_interval_is_the_student_t_interval():
    p = paired([70.0, 72.0, 71.0], [69.0, 69.5, 71.5])
    diffs = [1.0, 2.5, -0.5]
    mean = sum(diffs) / 3
    sd = (sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5
    half = 4.302652729911275 * sd / 3 ** 0.5  # t(0.975, 2 degrees of freedom), from the tables
    assert p.interval == pytest.approx((mean - half, mean + half))
    assert (p.higher, p.lower, p.signs, p.separated) == (2, 1, "+ + −", False)
    assert paired([2.0, 3.0, 2.5, 2.0, 3.0], [0.0] * 5).separated  # t(0.975, 4) = 2.776: [1.9, 3.1]
    assert paired([1.0], [0.0]).interval is None and not paired([1.0], [0.0]).separated


# ----------------------------------------------------------------------------- plan, status and the report

def test_plan_counts_each_cells_steps_and_prices_them_from_finished_cells(reference, synthetic_dir):
    plan = plan_study(Study.from_dict(study_dict(synthetic_dir)), reference)
    by_phase = {c.cell.phase: c.steps for c in plan.cells}
    # test: 16 examples per task in batches of 8 (2 steps) × 2 tasks; dev: 10 of them after 6 are carved off
    assert by_phase == {"test": 4, "dev": 4}
    ledger = Ledger(reference).read()
    done = [e["seconds"] / e["steps"] for e in ledger.values()]
    assert plan.seconds_per_step["tiny-bert"] == pytest.approx(sorted(done)[len(done) // 2] if len(done) % 2 else
                                                               sum(sorted(done)[2:4]) / 2)
    for cell in plan.cells:  # the steps each cell actually took
        assert ledger[cell.cell.id]["steps"] == cell.steps


def test_status_counts_cells_and_the_report_has_the_papers_layout(reference, capsys):
    from nlora.cli import main

    assert main(["study", "status", str(reference)]) == 0
    assert "tiny: 6 of 6 cells done" in capsys.readouterr().out
    report = (reference / "report" / "report.md").read_text()
    assert "| row | AP | BWT | FWT | forgetting | seeds |" in report
    assert "| n-lora | AP | 2 |" in report and "95% interval" in report
    assert "| n-lora | all | lambda=0.0001 |" in report
    for plot in ("ap.png", "accuracy_over_sequence.png", "forgetting_per_task.png"):
        assert (reference / "report" / plot).stat().st_size > 5000
        assert f"]({plot})" in report


def test_shipped_studies_read_and_plan():
    from nlora.studies.spec import shipped_studies

    assert "cpu-standard" in shipped_studies()
    for name in shipped_studies():
        study = read_study(name)
        assert study.baseline in study.methods
    cpu = read_study("cpu-standard")
    assert len(dev_cells(cpu)) == 3 + 3 + 4 + 2 and len(table_cells(cpu)) == 13 * 3


def test_the_docs_table_of_the_papers_rows_is_the_published_file():
    from nlora.studies.published import markdown_rows

    readme = (Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md").read_text()
    for row, standard, long, how in markdown_rows("nlora-table1"):
        line = next(x for x in readme.splitlines() if x.startswith(f"| {row} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1:3] == [standard, long] and cells[3].startswith(how), line


def test_the_python_api_runs_a_study_from_a_mapping(reference, synthetic_dir, tmp_path):
    import nlora

    copy = tmp_path / "study"
    shutil.copytree(reference, copy)
    shutil.rmtree(copy / "report")
    outcome = nlora.study(study_dict(synthetic_dir), copy, progress=False)
    assert outcome.ran == [] and len(outcome.skipped) == 6
    assert (copy / "report" / "report.md").is_file()


def test_a_cell_of_several_processes_is_an_accelerate_launch_on_its_own_gpus(synthetic_dir, monkeypatch):
    from nlora.studies.local import cell_command, cell_env, gpu_groups

    study = Study.from_dict(study_dict(synthetic_dir, launch={"num_processes": 2, "gpus_per_cell": 2}))
    cell = dev_cells(study)[0]
    command = cell_command(study, Path("/s"), cell)
    assert command[1:6] == ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    assert command[-5:] == ["nlora", "study", "run-cell", "/s", cell.id]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7,9")
    assert gpu_groups(study, 2) == [["3", "5"], ["6", "7"]]
    assert cell_env(study, ["6", "7"], 2)["CUDA_VISIBLE_DEVICES"] == "6,7"
    with pytest.raises(NloraError, match="3 worker\\(s\\) of 2 GPU\\(s\\) each need 6 GPUs; 5 visible"):
        gpu_groups(study, 3)
    cpu = Study.from_dict(study_dict(synthetic_dir, launch={"threads_per_cell": 3}))
    assert cell_command(cpu, Path("/s"), cell)[1:] == ["-m", "nlora", "study", "run-cell", "/s", cell.id]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    env = cell_env(cpu, [], 2)
    assert env["OMP_NUM_THREADS"] == "3" and "CUDA_VISIBLE_DEVICES" not in env


def test_an_optuna_search_tries_its_trials_and_resumes_the_same(tmp_path, synthetic_dir):
    pytest.importorskip("optuna")
    import optuna

    from nlora.studies.search import storage_url

    data = study_dict(synthetic_dir, methods={"n-lora": {"lambda": [1e-4, 1e-3, 1e-2, 1e-1], "lora_r": [2, 4]}},
                      seeds=[1], baseline=None,
                      select={"dev_samples": 6, "seeds": [0], "search": "optuna", "trials": 3,
                              "tune": ["lambda", "lora_r"]})
    study = Study.from_dict(data)
    outcome = run_study(study, tmp_path / "a")
    assert not outcome.failed
    search = optuna.load_study(study_name="tiny/n-lora/all", storage=storage_url(study, tmp_path / "a"))
    assert len(search.trials) == 3 and all(t.state.name in ("COMPLETE", "FAIL") for t in search.trials)
    dev = [c for c in outcome.ran if c.startswith("dev/")]
    assert 1 <= len(dev) <= 3  # one cell per distinct point asked (a point asked again reuses its cell)
    record = json.loads((tmp_path / "a" / "selection.json").read_text())["choices"][0]
    assert record["chosen"] in [s["values"] for s in record["scores"]] and len(record["scores"]) == len(dev)
    test = [c for c in outcome.ran if c.startswith("test/")]
    assert test == [f"test/n-lora_lambda{record['chosen']['lambda']:g}_lora_r{record['chosen']['lora_r']}/seed1"]
    # the same searches again: nothing new is asked or run
    again = run_study(Study.from_dict(data), tmp_path / "a")
    assert again.ran == [] and len(optuna.load_study(study_name="tiny/n-lora/all",
                                                     storage=storage_url(study, tmp_path / "a")).trials) == 3


def test_optuna_options_go_together(synthetic_dir):
    with pytest.raises(NloraError, match="select.trials goes with select.search optuna"):
        Study.from_dict(study_dict(synthetic_dir, select={"trials": 4}))
