"""How long the command line takes to answer when it needs no model: `nlora methods`, and `nlora run` with a
mistyped option. Each command runs in a fresh process, first with an empty methods' cache (nlora.method_catalog;
what the first command after an install or an edit of a method pays), then again with the cache it left.

    python benchmarks/cli_startup.py [--tree PATH] [--repeat N]

--tree: the checkout to time (default: this one), e.g. an older one to compare with."""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = (["methods"], ["run", "--lamda", "1"])


def timed(argv: list[str], tree: Path, cache: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of `python -m nlora ARGV` run in `tree`."""
    env = dict(os.environ, PYTHONPATH=str(tree), NLORA_CACHE_DIR=cache, HF_HUB_OFFLINE="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nlora", *argv], cwd=tree, env=env, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--repeat", type=int, default=2, help="warm runs of each command (default: 2)")
    args = ap.parse_args()
    print(f"{'command':<24} {'cache':<6} {'wall s':>7} {'CPU s':>7}")
    for argv in COMMANDS:
        with tempfile.TemporaryDirectory() as cache:
            runs = [("empty", *timed(argv, args.tree, cache))]
            runs += [("kept", *timed(argv, args.tree, cache)) for _ in range(args.repeat)]
        for state, wall, cpu in runs:
            print(f"{'nlora ' + ' '.join(argv):<24} {state:<6} {wall:>7.2f} {cpu:>7.2f}")


if __name__ == "__main__":
    main()
