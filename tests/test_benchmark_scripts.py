"""The benchmark scripts' own logic (tables, file names, configs) on stand-in runs, so a script does not fail at
the end of an hour of training."""

import importlib.util
import sys
from pathlib import Path

import pytest
from nlora.errors import NloraError

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_reproduce_cpu_is_the_shipped_study_with_its_profile(tmp_path):
    module = _load("reproduce_cpu")
    quick = module.study_for(module.parse_args(["--data-dir", str(tmp_path)]))
    assert (quick.name, quick.base["max_train_samples"], quick.select.dev_samples) == ("cpu-standard", 64, 24)
    assert quick.base["data_dir"] == str(tmp_path) and len(quick.methods) == 13 and quick.seeds == [42, 43, 44]
    full = module.study_for(module.parse_args(["--full", "--seeds", "7", "--methods", "n-lora,mtl",
                                               "--data-dir", str(tmp_path)]))
    assert (full.name, full.base["max_eval_samples"], full.select.train_samples, full.select.dev_samples) == \
        ("cpu-standard-full", 250, 250, 80)
    assert list(full.methods) == ["n-lora", "mtl"] and full.seeds == [7] and full.baseline is None
    with pytest.raises(NloraError, match="--methods: nlora not in the study"):
        module.study_for(module.parse_args(["--methods", "nlora"]))


def test_demo_cost_estimates_the_one_seed_demo_from_per_unit_costs(tmp_path, monkeypatch, capsys):
    module = _load("demo_cost")
    for seed in (1, 2):
        for method in ("n-lora", "inc-lora"):
            folder = tmp_path / f"seed-{seed}" / method
            folder.mkdir(parents=True)
            metrics = {"method": method, "n_test": [10, 10],
                       "accuracy_matrix": [[50.0, None], [50.0, 50.0]],  # 3 cells of 10 examples: 30 evaluated
                       "train": {"a": {"steps": 5, "seconds": 5.0}, "b": {"steps": 5, "seconds": 5.0}},
                       "eval_seconds": {"a": 1.0, "b": 2.0}}
            (folder / "metrics.json").write_text(__import__("json").dumps(metrics))
    monkeypatch.setattr(sys, "argv", ["demo_cost.py", str(tmp_path), "--wall", "60"])
    module.main()
    out = capsys.readouterr().out
    # 4 runs: 40 steps in 40 s (1 s/step), 120 examples in 12 s (0.1 s each), other (60 - 52) / 4 = 2 s per run;
    # the one-seed demo: 2 runs x 3 tasks x 4 epochs x 19 steps = 456 steps, 2 x 150 x 6 = 1800 examples:
    # 456 + 180 + 4 = 640 s, ratio 60 / 640 = 0.09
    assert "| this demo (measured) | 4 | 40 | 120 | 60 |" in out
    assert "| 2 | 456 | 1800 | 640 |" in out and "ratio this / earlier demo: 0.09" in out


def test_penalty_chunks_prints_one_row_per_chunk_size(monkeypatch, capsys):
    module = _load("penalty_chunks")
    monkeypatch.setattr(sys, "argv", ["penalty_chunks.py", "--dim", "64", "--tokens", "8", "--chunks", "64,16",
                                      "--repeats", "1"])
    module.main()
    out = capsys.readouterr().out
    assert "| delta_l1, chunk 64 |" in out and "| delta_l1, chunk 16 |" in out and "| layer fwd" in out


def test_gpu_check_cpu_smoke_runs_every_section(tmp_path, capsys):
    """benchmarks/gpu_check.py --cpu-smoke: every section runs at a tiny size on the CPU and gives its row; the
    killed and resumed run equals the uninterrupted one, and the comparison sees a changed prediction."""
    import torch

    module = _load("gpu_check")
    out, work = tmp_path / "table.md", tmp_path / "work"
    assert module.main(["--cpu-smoke", "--out", str(out), "--work-dir", str(work)]) == 0
    text = out.read_text()
    assert capsys.readouterr().out == text  # the runs' own printout goes to stderr
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert {r[0][2:] for r in rows} == set(module.SECTIONS)
    assert not [r for r in rows if r[2] in ("failed", "skipped")], text
    results = {}
    for r in rows:
        results.setdefault(r[0][2:], r[2])  # each section's first row
    assert "fold form concat" in results["e2e"]  # the recipe's bf16 base folds by concatenation
    assert "identical:" in text and "report.md written" in text
    assert results["quantized"] in ("not installed", "needs CUDA")

    run, killed = work / "e2e-run", work / "e2e-killed"
    assert module.compare_runs(run, killed).startswith("identical")
    prediction = next((killed / "predictions").rglob("*.jsonl"))
    prediction.write_bytes(prediction.read_bytes().replace(b'"prediction": "', b'"prediction": "x', 1))
    assert module.compare_runs(run, killed).startswith("differs")
    # tokens up to and including the first eos (id 1); a row without one counts whole
    assert module.generated_tokens(torch.tensor([[5, 1, 0], [5, 6, 7]]), eos=1) == 5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_full_ft_memory_formula_is_what_a_step_keeps(dtype):
    module = _load("full_ft_memory")
    r = module.measure(dict(model="tiny", dtype=dtype, optimizer="adamw", prompt=8))
    kept = r["weights"] + r["gradients"] + r["moments"]  # torch AdamW's step counters: 4 bytes per tensor more
    assert kept == pytest.approx(r["computed"]["total"], rel=2e-3)
    assert module.bytes_per_parameter(dtype, "adamw")["total"] == {"float32": 16, "bfloat16": 8}[dtype]
    assert module.bytes_per_parameter("bfloat16", "adamw8bit")["total"] == pytest.approx(6.03125)
    assert "| LLaMA-2-7B | bfloat16 | adamw | 13.5 | 13.5 | 27.0 | 53.9 (50.2) |" in module.computed_table()
