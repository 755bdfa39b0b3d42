import tomllib
from pathlib import Path

import pytest
import yaml

from nlora.cli import main
from nlora.config import RunConfig, load_config
from nlora.errors import NloraError
from nlora.runner import run
from nlora.tasks.benchmarks import (BENCHMARK_ORDERS, FREE_TEXT_BENCHMARKS, PUBLISHED, list_presets, load_preset, preset_path, preset_source,
                              published_ap)

from conftest import SHARED_DATA

# The task orders of the papers, as the data README lists them.
ORDERS = {
    1: "dbpedia amazon yahoo agnews",
    2: "dbpedia amazon agnews yahoo",
    3: "yahoo amazon agnews dbpedia",
    4: "MNLI CB WiC COPA QQP BoolQA RTE IMDB yelp amazon SST-2 dbpedia agnews MultiRC yahoo",
    5: "MultiRC BoolQA WiC MNLI CB COPA QQP RTE IMDB SST-2 dbpedia agnews yelp amazon yahoo",
    6: "yelp amazon MNLI CB COPA QQP RTE IMDB SST-2 dbpedia agnews yahoo MultiRC BoolQA WiC",
}
# (lr, global batch, lambda per task) of N-LoRA's public scripts/order_<k>.sh, T5-large.
SCHEDULES = {
    1: (1e-3, 48, [0.4] * 4),
    2: (1e-3, 32, [0.4] * 4),
    3: (1e-3, 32, [0.4] * 4),
    4: (5e-4, 32, [0.4, 0.4, 1.2, 0.4, 0.4, 0.4, 1.2, 1.2, 1.2, 0.4, 1.2, 1.2, 0.4, 0.4, 1.2]),
    5: (8e-4, 32, [0.55] * 15),
    6: (1e-3, 32, [1.8] * 15),
}
BENCHMARK_OF = {o: b for b in ("standard", "long") for o in BENCHMARK_ORDERS[b]}  # N-LoRA's protocol


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_preset_expands_to_the_papers_sequence_and_protocol(order):
    cfg = load_config(overrides={"benchmark": BENCHMARK_OF[order], "order": str(order)}).validate()
    lr, batch, lambdas = SCHEDULES[order]
    assert cfg.tasks == ORDERS[order].split()
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.warmup_steps) == (lr, batch, 10, 0)
    assert [cfg.lambda_per_task[k] if cfg.lambda_per_task else cfg.lambda_ for k in range(len(cfg.tasks))] \
        == lambdas
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (8, 32.0, 0.1)
    assert cfg.target_modules is None  # the model's query/value default: T5 q, v; LLaMA q_proj, v_proj
    assert cfg.model == "google-t5/t5-large" and cfg.method == "n-lora"
    assert cfg.penalty_form == "reference"  # the form the scripts' lambda was tuned for
    assert (cfg.max_source_length, cfg.max_target_length, cfg.eval_mode) == (512, 50, "generate")
    assert cfg.data_dir is None  # the user's


@pytest.mark.parametrize("bench,order,path", list_presets())  # not `benchmark`: a pytest plugin's fixture name
def test_preset_files_are_readable_and_cite_their_source(bench, order, path):
    text = path.read_text()
    assert path == preset_path(bench, order) and path.name == f"{bench}-order{order}.yaml"
    paper, script = preset_source(bench, order)
    assert script in text and paper.split(",")[0] in text
    values = yaml.safe_load(text)
    if bench in FREE_TEXT_BENCHMARKS:  # the user's copy of the data, read as it is released
        assert values["task_format"] in ("trace", "superni") and "not shipped" in text
        RunConfig.from_dict(values)
        return
    assert ("penalty_form: reference" if bench in ("standard", "long") else "l2_form: reference") in text
    assert "prompt_format: reference" in text and "add_task_name: true" in text and "add_dataset_name: true" in text
    RunConfig.from_dict(values)  # only known keys, of the right types
    assert "benchmark" not in values and "order" not in values  # a copy works as a plain --config file


def test_precedence_defaults_preset_file_flags(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("lr: 2.0e-4\nepochs: 3\nmodel: tiny-t5\n")
    cfg = load_config(path, {"epochs": "1", "benchmark": "long", "order": "5"})
    assert cfg.tasks == ORDERS[5].split() and cfg.lambda_ == 0.55  # preset over defaults
    assert cfg.lr == 2e-4 and cfg.model == "tiny-t5"  # file over preset
    assert cfg.epochs == 1  # flags over file
    assert cfg.seed == RunConfig().seed  # untouched default
    path.write_text("benchmark: standard\norder: 3\nbatch_size: 4\n")  # the preset can be named in the file
    cfg = load_config(path, {"order": "2"})
    assert cfg.tasks == ORDERS[2].split() and cfg.batch_size == 4 and cfg.order == 2


def test_user_lambda_replaces_the_presets_per_task_list(tmp_path):
    assert load_config(overrides={"benchmark": "long", "order": "4"}).lambda_per_task == SCHEDULES[4][2]
    cfg = load_config(overrides={"benchmark": "long", "order": "4", "lambda": "0.3"})
    assert cfg.lambda_per_task is None and cfg.lambda_ == 0.3
    mine = [0.1] * 15
    cfg = load_config(overrides={"benchmark": "long", "order": "4", "lambda": "0.3", "lambda_per_task": mine})
    assert cfg.lambda_per_task == mine


@pytest.mark.parametrize("overrides,message", [
    ({"benchmark": "long", "order": "1"},
     r"option 'order': benchmark 'long' has orders 4, 5, 6, not 1 .*--benchmark standard --order \{1,2,3\}"),
    ({"benchmark": "standard", "order": "5"}, r"benchmark 'standard' has orders 1, 2, 3, not 5"),
    ({"benchmark": "standard"}, r"benchmark 'standard' needs an order, one of 1, 2, 3"),
    ({"order": "2"}, r"order 2 needs option 'benchmark'"),
    ({"benchmark": "huge", "order": "1"}, r"option 'benchmark': 'huge' is not one of none, standard, long"),
    ({"benchmark": "long", "order": "four"}, r"key 'order' must be an integer"),
])
def test_bad_benchmark_order_is_a_clear_error(overrides, message):
    with pytest.raises(NloraError, match=message):
        load_config(overrides=overrides)


def test_validate_checks_the_pair_too():
    with pytest.raises(NloraError, match="benchmark 'long' has orders 4, 5, 6"):
        RunConfig(tasks=["a"], benchmark="long", order=2).validate()


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(overrides={"benchmark": "long", "order": "6", "epochs": "2"})
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(saved).to_dict() == cfg.to_dict()  # what `nlora resume` reloads


def test_cli_dry_run_prints_the_expanded_keys(capsys):
    assert main(["run", "--benchmark", "long", "--order", "4", "--epochs", "2", "--dry-run"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["tasks"] == ORDERS[4].split() and shown["lambda_per_task"] == SCHEDULES[4][2]
    assert (shown["lr"], shown["epochs"], shown["benchmark"], shown["order"]) == (5e-4, 2, "long", 4)


def test_cli_bad_order_exits_with_the_options(capsys):
    assert main(["run", "--benchmark", "long", "--order", "1", "--dry-run"]) == 2
    assert "benchmark 'long' has orders 4, 5, 6" in capsys.readouterr().err


def test_cli_presets_lists_and_prints(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(f"--benchmark {BENCHMARK_OF[o]} --order {o}" in out for o in ORDERS)
    assert "n-lora 78.8" in out and "o-lora 69.6" in out
    assert main(["presets", "long", "5"]) == 0
    assert capsys.readouterr().out == preset_path("long", 5).read_text()
    assert main(["presets", "long", "2"]) == 2


def test_published_numbers():
    assert PUBLISHED == {"standard": {"o-lora": 75.8, "n-lora": 78.8, "mtl": 80.0},
                         "long": {"o-lora": 69.6, "n-lora": 72.4, "mtl": 76.5}}
    assert published_ap("long", "n-lora") == 72.4 and published_ap("long", "inc-lora") is None


def test_presets_ship_with_the_package():
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "tasks/presets/*.yaml" in pyproject["tool"]["setuptools"]["package-data"]["nlora"]
    assert all(load_preset(b, o) for b, o, _ in list_presets())


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="CL_Benchmark data not available")
def test_a_preset_run_writes_the_expanded_config(tmp_path):
    """The standard order-1 preset on a tiny model and a few real examples: the run's config.yaml holds every
    key the preset expanded to."""
    config = load_config(overrides={
        "benchmark": "standard", "order": "1", "model": "tiny-t5", "data_dir": str(SHARED_DATA),
        "output_dir": str(tmp_path / "run"), "epochs": "1", "batch_size": "4", "max_train_samples": "4",
        "max_eval_samples": "3", "max_source_length": "64", "max_target_length": "8", "device": "cpu",
        "eval_mode": "score"})
    metrics = run(config, progress=False)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["benchmark"], saved["order"], saved["tasks"]) == ("standard", 1, ORDERS[1].split())
    assert (saved["lr"], saved["lambda"], saved["penalty_form"], saved["lora_alpha"]) == (1e-3, 0.4, "reference", 32)
    assert metrics["tasks"] == ORDERS[1].split() and metrics["complete"]


# O-LoRA's public scripts (cmnfriend/O-LoRA scripts/order_<k>.sh and scripts/long.sh): 8 GPUs x batch 8, lr 1e-3,
# 1 epoch (2 for MNLI on the long order), lamda_1 / lamda_2 per task.
OLORA_LONG = {
    "tasks": ORDERS[6].split(),
    "epochs": [1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    "lamda_1": [0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 5, 5, 5, 5, 5, 5],
    "lamda_2": [0, 0, 0, 0, 0.1, 0.1, 0.3, 0, 0.1, 0, 0, 0.1, 0, 0.1, 0.3],
}


@pytest.mark.parametrize("order", [1, 2, 3])
def test_olora_standard_presets_follow_olora_scripts(order):
    cfg = load_config(overrides={"benchmark": "o-lora-standard", "order": order}).validate()
    assert cfg.tasks == ORDERS[order].split() and cfg.method == "o-lora"
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.warmup_steps) == (1e-3, 64, 1, 0)
    assert (cfg.orth_lambda, cfg.l2_lambda, cfg.l2_form) == (0.5, 0.0, "reference")
    assert (cfg.prompt_format, cfg.add_task_name, cfg.add_dataset_name) == ("reference", True, True)
    assert published_ap("o-lora-standard", "o-lora") == PUBLISHED["standard"]["o-lora"]


def test_olora_long_preset_sets_epochs_and_both_lambdas_per_task():
    cfg = load_config(overrides={"benchmark": "o-lora-long", "order": 6}).validate()
    assert cfg.tasks == OLORA_LONG["tasks"] and (cfg.lr, cfg.batch_size) == (1e-3, 64)
    assert cfg.epochs_per_task == OLORA_LONG["epochs"]
    assert cfg.orth_lambda_per_task == OLORA_LONG["lamda_1"] and cfg.l2_lambda_per_task == OLORA_LONG["lamda_2"]
    # a scalar the user gives replaces the preset's list of it
    cfg = load_config(overrides={"benchmark": "o-lora-long", "order": 6, "epochs": 3, "orth_lambda": 0.1})
    assert cfg.epochs_per_task is None and cfg.epochs == 3
    assert cfg.orth_lambda_per_task is None and cfg.l2_lambda_per_task == OLORA_LONG["lamda_2"]
    with pytest.raises(NloraError, match="benchmark 'o-lora-long' has orders 6, not 4"):
        load_config(overrides={"benchmark": "o-lora-long", "order": 4})


def test_presets_listing_names_paper_and_script(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for b, o, _ in list_presets():
        line = next(x for x in out.splitlines() if x.startswith(f"--benchmark {b} --order {o} "))
        paper, script = preset_source(b, o)
        assert paper in line and script in line
