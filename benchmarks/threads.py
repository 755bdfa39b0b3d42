"""CPU threads under load: the wall and CPU time of `nlora demo --num-seeds 1` and of a short MiniLM run, with 1
and 2 intra-op threads, on the machine as it is and with one extra busy core (a bounded busy-loop process started
beside the workload, as another job on a shared machine would be).

Each case runs in a fresh process, in a folder of its own (the demo with --overwrite: a rerun would reuse finished
runs), with OMP_NUM_THREADS set (torch's threads; `auto`: unset, nlora's default) and, where named,
OMP_WAIT_POLICY; the load average before each case is recorded next to its numbers, since the machine may be
loaded by other work. A case that runs past --cap seconds is stopped and reported as such.

    python benchmarks/threads.py --out runs/threads            # the table for benchmarks/RESULTS.md
    python benchmarks/threads.py --workloads minilm --threads 1,2 --cap 120
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
BUSY_LOOP = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def workload(name: str, out: Path) -> list[str]:
    """The command of one workload, writing under `out`."""
    nlora = [sys.executable, "-m", "nlora"]
    if name == "demo":
        return [*nlora, "demo", "--num-seeds", "1", "--output-dir", str(out), "--quiet", "--overwrite"]
    if name == "minilm":  # two generated tasks, 100 training examples each, 2 epochs: 26 steps
        return [*nlora, "run", "--model", MINILM, "--method", "n-lora", "--lambda", "1e-4", "--tasks",
                "harbor,orchard", "--data-dir", str(out.parent / "data"), "--max-train-samples", "100",
                "--max-eval-samples", "50", "--epochs", "2", "--batch-size", "16", "--max-source-length", "64",
                "--device", "cpu", "--quiet", "--overwrite", "--output-dir", str(out)]
    raise SystemExit(f"unknown workload {name!r}: demo or minilm")


def timed(command: list[str], env: dict, cap: float) -> tuple[float, float | None, bool]:
    """(wall s, CPU s of the process and its children, finished) of one run; stopped after `cap` seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = start + cap
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            wall = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr.read().decode()[-2000:]}")
            return wall, usage.ru_utime + usage.ru_stime, True
        if time.perf_counter() > deadline:
            proc.kill()
            proc.wait()
            return time.perf_counter() - start, None, False
        time.sleep(0.2)


def run_case(name: str, threads: str, loaded: bool, policy: str | None, out: Path, cap: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=threads, HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if threads == "auto":
        env.pop("OMP_NUM_THREADS")
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    load = os.getloadavg()[0]
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(seconds=cap + 30)]) if loaded else None
    try:
        case = out / f"{name}-{threads}-{policy or 'default'}-{'busy' if loaded else 'none'}"
        wall, cpu, finished = timed(workload(name, case), env, cap)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    return {"workload": name, "threads": threads, "policy": policy or "default", "extra load": loaded,
            "load before": load, "wall": wall, "cpu": cpu, "finished": finished}


def row(r: dict) -> str:
    wall = f"{r['wall']:.0f}" if r["finished"] else f"> {r['wall']:.0f} (stopped)"
    cpu = f"{r['cpu']:.0f}" if r["cpu"] is not None else "-"
    return (f"| {r['workload']} | {r['threads']} | {r['policy']} | {'1 busy core' if r['extra load'] else 'none'} "
            f"| {r['load before']:.2f} | {wall} | {cpu} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/threads"))
    p.add_argument("--workloads", default="minilm,demo")
    p.add_argument("--threads", default="1,2", help="counts, or auto (OMP_NUM_THREADS unset: nlora's default)")
    p.add_argument("--policies", default="default", help="OMP_WAIT_POLICY values to try (default: unset)")
    p.add_argument("--loads", default="none,busy", help="none, busy (one extra busy-loop process), or both")
    p.add_argument("--cap", type=float, default=300.0, help="seconds after which a case is stopped")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from nlora.tasks.synthetic import write_synthetic_benchmark

    shutil.rmtree(args.out / "data", ignore_errors=True)
    write_synthetic_benchmark(args.out / "data", n_train=100, n_test=50, seed=42, tasks=("harbor", "orchard"))
    print(f"machine: {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| workload | threads | OMP_WAIT_POLICY | extra load | load avg (1 min) before | wall s | CPU s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.workloads.split(","):
        for loaded in [x == "busy" for x in args.loads.split(",")]:
            for policy in args.policies.split(","):
                for threads in args.threads.split(","):
                    print(row(run_case(name, threads, loaded, None if policy == "default" else policy, args.out,
                                       args.cap)), flush=True)


if __name__ == "__main__":
    main()
