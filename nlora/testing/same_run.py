"""The suite's one definition of "the same run", in two strengths:

- `assert_same_run(a, b)`: exactly the same run (a resumed run against an uninterrupted one, folded against
  unfolded): the same files, metrics.json without its timings, the same bytes in every adapter, method state and
  predictions file, and (with `log=True`) the same log.jsonl without its timings;
- `assert_same_run(a, b, exact=False)`: the same run computed with another float summation order (1 against N
  processes): the same files, accuracy matrix and predictions, training statistics within rel 1e-5, adapters and
  method state within ADAPTER_ATOL with a small share of outliers (see OUTLIER_SHARE).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

# keys of metrics.json and log.jsonl that measure time, not what was computed
TIMING = ("elapsed", "time", "seconds", "tokens_per_s", "examples_per_s", "s_per_step", "eval_seconds")
ADAPTER_ATOL = 1e-5
# The L1 penalty's subgradient sign(ΔW) is discontinuous: the entries of ΔW it pushes to zero then hover there, and
# a float-rounding difference of the all-reduce can flip one's sign, so a few entries may drift apart (measured:
# 6 of 512 by up to 2e-4). A mis-scaled loss or penalty moves nearly all entries (measured with the penalty
# counted once per process: 30-98% of each tensor, by up to 5e-3), so a small share of outliers is allowed.
OUTLIER_SHARE, OUTLIER_ATOL = 0.02, 1e-3
COMPARED_SUFFIXES = (".safetensors", ".jsonl")


def _metrics(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop("eval_seconds", None)
    for stats in metrics["train"].values():
        stats.pop("seconds", None)
        stats.pop("hook_seconds", None)
    return metrics


def _log(run_dir: Path) -> list[dict]:
    from nlora.tracking import read_log

    return [{k: v for k, v in line.items() if k not in TIMING} for line in read_log(run_dir / "log.jsonl")
            if line["event"] != "start"]


def outcome(run_dir: Path, log: bool = False) -> dict:
    """What two exactly equal runs share: metrics without timings, and the bytes of every adapter, method state
    (both files) and predictions file."""
    run_dir = Path(run_dir)
    files = {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
             if p.is_file() and (p.suffix in COMPARED_SUFFIXES or p.name == "method_state.json")
             and p.name != "log.jsonl"}
    out = {"metrics": _metrics(run_dir), "files": files}
    if log:
        out["log"] = _log(run_dir)
    return out


def _listing(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in Path(run_dir).rglob("*"))


def assert_same_run(a: Path, b: Path, exact: bool = True, log: bool = False) -> None:
    a, b = Path(a), Path(b)
    if exact:
        left, right = outcome(a, log), outcome(b, log)
        assert left["metrics"] == right["metrics"]
        assert left["files"].keys() == right["files"].keys()
        differ = [name for name in left["files"] if left["files"][name] != right["files"][name]]
        assert not differ, f"files differ: {differ}"
        if log:
            assert left["log"] == right["log"]
        return
    assert _listing(a) == _listing(b)
    m1, m2 = _metrics(a), _metrics(b)
    assert m2["accuracy_matrix"] == m1["accuracy_matrix"] and m2["complete"] == m1["complete"]
    assert m1["train"].keys() == m2["train"].keys()
    for task in m1["train"]:
        assert m1["train"][task]["steps"] == m2["train"][task]["steps"]
        for key in ("mean_loss", "mean_regularizer"):
            assert m2["train"][task][key] == pytest.approx(m1["train"][task][key], rel=1e-5, abs=1e-9), (task, key)
    assert_close_tensors(a, b)
    for path in sorted((a / "predictions").rglob("*.jsonl")):
        rows = [json.loads(line) for line in (b / path.relative_to(a)).open()]
        assert rows == [json.loads(line) for line in path.open()], path


def assert_close_tensors(a: Path, b: Path) -> None:
    """Every .safetensors file (adapters, method state) within ADAPTER_ATOL, with a small share of outliers."""
    left = {str(p.relative_to(a)): load_file(str(p)) for p in sorted(Path(a).rglob("*.safetensors"))}
    right = {str(p.relative_to(b)): load_file(str(p)) for p in sorted(Path(b).rglob("*.safetensors"))}
    assert left.keys() == right.keys() and left
    for name, tensors in left.items():
        assert tensors.keys() == right[name].keys()
        for key, value in tensors.items():
            other = right[name][key].float()
            scale = max(1.0, value.float().abs().max().item())  # method state (a Fisher) may be large
            diff = (other - value.float()).abs() / scale
            share = (diff > ADAPTER_ATOL).float().mean().item()
            assert share <= OUTLIER_SHARE and diff.max() <= OUTLIER_ATOL, \
                f"{name} {key}: {share:.1%} of entries differ by > {ADAPTER_ATOL}, at most {diff.max():.2e}"
