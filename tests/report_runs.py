"""Run directories for the report, written directly (metrics.json, small adapters, log.jsonl, general.json) rather
than trained, so that a report of 15 tasks or 6 runs takes seconds."""

import json
import random

from test_diagnostics import LAYERS, rows_factor, write_run


def synthetic_run(root, n_tasks: int, method: str = "n-lora", seed: int = 0, eval_future: bool = False,
                  metrics: list[str] | None = None, log_steps: int = 4, steps: list[int] | None = None,
                  general: bool = False, spread: float = 1.0):
    """A complete run of `n_tasks` tasks: an adapter per task on two layers, an accuracy matrix (the upper triangle
    only with `eval_future`), the continual-learning metrics, a log.jsonl whose tasks train `steps` steps each
    (logged every `log_steps`), and with `general` a general.json of two benchmarks. `spread`: the last task's update
    is that many times larger (norms over decades: a log scale)."""
    rng = random.Random(seed)
    tasks = [f"task{k}" for k in range(n_tasks)]
    adapters = [{LAYERS[0]: rows_factor(range(k % 3, k % 3 + 3), seed=seed + k),
                 LAYERS[1]: rows_factor(range(6), seed=seed + 100 + k)} for k in range(n_tasks)]
    adapters[-1] = {layer: (A, B * spread) for layer, (A, B) in adapters[-1].items()}
    write_run(root, adapters, tasks=tasks)
    matrix = [[round(rng.uniform(40, 95), 2) if j <= i or eval_future else None for j in range(n_tasks)]
              for i in range(n_tasks)]
    record = json.loads((root / "metrics.json").read_text())
    record.update({"method": method, "seed": seed, "accuracy_matrix": matrix, "average_accuracy": 70.0, "bwt": -3.0,
                   "fwt": 1.0 if eval_future else None, "forgetting": 4.0})
    if metrics:
        record["metrics"] = dict(zip(tasks, metrics))
    (root / "metrics.json").write_text(json.dumps(record))
    _write_log(root / "log.jsonl", tasks, steps or [10] * n_tasks, log_steps, rng)
    if general:
        _write_general(root / "general.json", tasks, rng)
    return root


def _write_log(path, tasks: list[str], steps: list[int], log_steps: int, rng: random.Random) -> None:
    """The train lines of nlora.tracking: a line every `log_steps` steps and at a task's last step."""
    lines, offset = [], 0
    for phase, (task, n) in enumerate(zip(tasks, steps)):
        logged = sorted({s for s in range(log_steps, n + 1, log_steps)} | {n})
        for step in logged:
            lines.append({"event": "train", "task": task, "phase": phase, "step": step, "steps": n,
                          "global_step": offset + step, "loss": rng.uniform(0.2, 2.0),
                          "regularizer": rng.uniform(0.0, 0.5)})
        lines.append({"event": "train_end", "task": task, "phase": phase, "steps": n, "mean_loss": 1.0,
                      "mean_regularizer": 0.1, "seconds": 2.0, "global_step": offset + n})
        offset += n
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def _write_general(path, tasks: list[str], rng: random.Random) -> None:
    benchmarks = ["arc_easy", "hellaswag"]
    scores = {str(k): {b: {"score": rng.uniform(0.3, 0.6)} for b in benchmarks} for k in range(len(tasks) + 1)}
    delta = {after: {"per_benchmark": {b: scores[after][b]["score"] - scores["0"][b]["score"] for b in benchmarks}}
             for after in scores if after != "0"}
    for d in delta.values():
        d["mean"] = sum(d["per_benchmark"].values()) / len(benchmarks)
    path.write_text(json.dumps({
        "schema_version": 1, "harness": "lm-eval", "lm_eval_version": "0.4.8",
        "settings": {"num_fewshot": None, "limit": None, "batch_size": 8, "dtype": "float32"},
        "benchmarks": {b: {"metric": "acc", "version": 1, "tasks": [b]} for b in benchmarks},
        "labels": {str(k + 1): t for k, t in enumerate(tasks)}, "scores": scores, "delta": delta}))
