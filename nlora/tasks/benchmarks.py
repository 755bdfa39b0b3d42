"""The papers' benchmarks as presets, and the numbers the papers published.

`--benchmark standard --order {1,2,3}` and `--benchmark long --order {4,5,6}` read the YAML file
`nlora/tasks/presets/<benchmark>-order<k>.yaml`: the task sequence and the training protocol of the N-LoRA paper's
T5-large experiments, with the public scripts each value comes from cited in the file. `--benchmark
o-lora-standard --order {1,2,3}` and `--benchmark o-lora-long --order 6` are O-LoRA's own protocol, from its
public scripts (1 epoch, global batch 64, lr 1e-3, λ₁ / λ₂ per task on the long order). `--benchmark trace --order
1` (TRACE's 8 free-text tasks and its LoRA script's schedule) and `--benchmark superni --order {1,2}` (SAPT's 15
SuperNI tasks and its T5 script's schedule) read the user's copy of that data. A preset sits between
RunConfig's defaults and the user's config file: defaults < preset < --config FILE < command-line flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import NloraError

PRESET_DIR = Path(__file__).resolve().parent / "presets"
# standard / long: N-LoRA's protocol; o-lora-standard / o-lora-long: O-LoRA's own (its public scripts cover the
# three standard orders and one long order, 6).
BENCHMARK_ORDERS: dict[str, tuple[int, ...]] = {"standard": (1, 2, 3), "long": (4, 5, 6),
                                                "o-lora-standard": (1, 2, 3), "o-lora-long": (6,),
                                                "trace": (1,), "superni": (1, 2)}
# The presets of free-text tasks (TRACE's layout, SuperNI task files): the others are classification benchmarks
# in the CL_Benchmark layout.
FREE_TEXT_BENCHMARKS = ("trace", "superni")
BENCHMARK_CHOICES = ("none", *BENCHMARK_ORDERS)
# The task sequence each preset family runs (the key of PUBLISHED).
BENCHMARK_BASE = {"standard": "standard", "long": "long", "o-lora-standard": "standard", "o-lora-long": "long"}
# Where each preset family comes from: (paper, public script; {order} is the preset's order).
PRESET_SOURCES = {
    "standard": ("N-LoRA, arXiv 2410.10179", "PKU-YuanGroup/N-LoRA scripts/order_{order}.sh"),
    "long": ("N-LoRA, arXiv 2410.10179", "PKU-YuanGroup/N-LoRA scripts/order_{order}.sh"),
    "o-lora-standard": ("O-LoRA, arXiv 2310.14152", "cmnfriend/O-LoRA scripts/order_{order}.sh"),
    "o-lora-long": ("O-LoRA, arXiv 2310.14152", "cmnfriend/O-LoRA scripts/long.sh"),
    "trace": ("TRACE, arXiv 2310.06762", "BeyonderXX/TRACE scripts/train_lora.sh"),
    "superni": ("SAPT, ACL 2024", "circle-hit/SAPT gen_script_superni_t5.py"),
}

# Average accuracy (AP, %) after the last task, averaged over the benchmark's task orders, T5-large.
# Source: N-LoRA, "Is Parameter Collision Hindering Continual Learning in LLMs?" (arXiv 2410.10179, COLING 2025),
# Table 1 (the O-LoRA and MTL rows are the baselines as that table reports them; O-LoRA's own paper,
# arXiv 2310.14152, Table 1, gives the same O-LoRA and MTL values).
PUBLISHED: dict[str, dict[str, float]] = {
    "standard": {"o-lora": 75.8, "n-lora": 78.8, "mtl": 80.0},
    "long": {"o-lora": 69.6, "n-lora": 72.4, "mtl": 76.5},
}
PUBLISHED_SOURCE = "N-LoRA (arXiv 2410.10179) Table 1: AP (%) of T5-large, mean over the benchmark's task orders"


def preset_name(benchmark: str, order: int) -> str:
    return f"{benchmark}-order{order}"


def check_benchmark_order(benchmark: str | None, order: int | None) -> None:
    """A clear error for any combination that names no preset."""
    pairs = "; ".join(f"--benchmark {b} --order {{{','.join(map(str, o))}}}" for b, o in BENCHMARK_ORDERS.items())
    if benchmark in (None, "none"):
        if order is not None:
            raise NloraError(f"option 'order': order {order} needs option 'benchmark' ({pairs})")
        return
    if benchmark not in BENCHMARK_ORDERS:
        raise NloraError(f"option 'benchmark': {benchmark!r} is not one of {', '.join(BENCHMARK_CHOICES)}")
    orders = BENCHMARK_ORDERS[benchmark]
    if order is None:
        raise NloraError(f"option 'order': benchmark '{benchmark}' needs an order, one of "
                         f"{', '.join(map(str, orders))} ({pairs})")
    if order not in orders:
        raise NloraError(f"option 'order': benchmark '{benchmark}' has orders {', '.join(map(str, orders))}, "
                         f"not {order} ({pairs})")


def preset_path(benchmark: str, order: int) -> Path:
    check_benchmark_order(benchmark, order)
    return PRESET_DIR / f"{preset_name(benchmark, order)}.yaml"


def load_preset(benchmark: str, order: int) -> dict[str, Any]:
    """The keys a preset sets (the user-facing names, as in a config file)."""
    path = preset_path(benchmark, order)
    if not path.is_file():
        raise NloraError(f"preset file {path} is missing from the installation")
    values = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(values, dict):
        raise NloraError(f"preset file {path}: expected a mapping of keys to values")
    return values


def list_presets() -> list[tuple[str, int, Path]]:
    return [(b, o, preset_path(b, o)) for b, orders in BENCHMARK_ORDERS.items() for o in orders]


def preset_source(benchmark: str, order: int) -> tuple[str, str]:
    """(paper, public script) a preset's protocol comes from."""
    paper, script = PRESET_SOURCES[benchmark]
    return paper, script.format(order=order)


def published_ap(benchmark: str, method: str) -> float | None:
    """The published AP of `method` on `benchmark`'s task sequence (None where the papers give none)."""
    return PUBLISHED.get(BENCHMARK_BASE.get(benchmark, benchmark), {}).get(method)
