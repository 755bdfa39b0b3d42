"""The papers' numbers a study's report shows beside its rows (published.yaml beside this file): each with its
paper, the protocol it belongs to (benchmark preset, base model) and how sure its transcription is. A study matches
a table's column when its base benchmark is one of the column's and its model is the table's (by name); the value
stands beside the study's mean over the same orders."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

PUBLISHED_FILE = Path(__file__).with_name("published.yaml")


@dataclass(frozen=True)
class Published:
    table: str
    paper: str
    row: str  # the paper's name of the row
    column: str  # e.g. Standard
    orders: tuple[int, ...]
    value: float
    sure: str


@lru_cache(maxsize=1)
def tables() -> list[dict]:
    return yaml.safe_load(PUBLISHED_FILE.read_text(encoding="utf-8"))["tables"]


def published_for(benchmark: str | None, model: str, metric: str = "average_accuracy") -> dict[str, list[Published]]:
    """{nlora method: its published values} for a study of `benchmark` on `model`."""
    out: dict[str, list[Published]] = {}
    for table in tables():
        if table["metric"] != metric or table["model"] not in model.lower():
            continue
        for column, spec in table["columns"].items():
            if benchmark not in spec["benchmark"]:
                continue
            for row in table["rows"]:
                if row.get("method") and column in row:
                    value, sure = row[column]
                    out.setdefault(row["method"], []).append(
                        Published(table["name"], table["paper"], row["row"], column, tuple(spec["orders"]),
                                  float(value), sure))
    return out


def markdown_rows(table_name: str) -> list[tuple[str, ...]]:
    """(row, each column's value, how sure) of one table, as the README's table of the papers' rows lists them."""
    table = next(t for t in tables() if t["name"] == table_name)
    out = []
    for row in table["rows"]:
        values = [row[c] for c in table["columns"]]
        sure = {s for _, s in values}
        how = values[0][1] if len(sure) == 1 else ", ".join(f"{c} {row[c][1]}" for c in table["columns"])
        out.append((row["row"], *(f"{v:.1f}" for v, _ in values), how))
    return out
