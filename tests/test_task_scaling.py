"""benchmarks/task_scaling.py on the tiny model: the configurations it measures are the ones it names (LoRA paths
per layer), and what autograd keeps for backward grows with the task count unfolded and stays flat folded (either
form); merged, one LoRA path runs whatever the task count."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_task_scaling_measures_what_it_claims():
    spec = importlib.util.spec_from_file_location("bench_task_scaling", ROOT / "benchmarks" / "task_scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.measure("tiny-bert", [1, 3], repeats=1, r=4, dropout=0.1)
    by = {(r["mode"], r["tasks"]): r for r in rows}
    assert [by[("unfolded", n)]["paths"] for n in (1, 3)] == [1, 3]
    assert [by[("concat", n)]["paths"] for n in (1, 3)] == [1, 2]
    assert [by[("merge", n)]["paths"] for n in (1, 3)] == [1, 1]
    for mode in ("concat", "merge"):
        assert by[(mode, 3)]["saved"] == by[(mode, 1)]["saved"] == by[("unfolded", 1)]["saved"]
    assert by[("unfolded", 3)]["saved"] > by[("unfolded", 1)]["saved"]  # one dropout mask per frozen path
    assert all(r["train_s"] > 0 and r["eval_s"] > 0 for r in rows)
    # the exact work of a step: merged, task 3 runs what task 1 runs; each separate path adds operators
    assert (by[("merge", 3)]["flops"], by[("merge", 3)]["ops"]) == (by[("merge", 1)]["flops"], by[("merge", 1)]["ops"])
    assert by[("unfolded", 3)]["ops"] > by[("concat", 3)]["ops"] > by[("concat", 1)]["ops"]
    assert by[("unfolded", 3)]["flops"] == by[("concat", 3)]["flops"] > by[("merge", 3)]["flops"]
    text = module.table(rows, 1.10)
    assert "| tiny-bert | merge |" in text and "| tiny-bert | concat |" in text and ("met |" in text)
