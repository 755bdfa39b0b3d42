"""CPU-scale reproduction of the Standard CL benchmark, order 1 (dbpedia → amazon → yahoo → agnews), on the real
CL_Benchmark data with the pretrained all-MiniLM-L6-v2 encoder (scoring head), for seq-lora, inc-lora, o-lora,
n-lora and mtl. Prints one table: AP, BWT, forgetting, mean pairwise collision rate and overlap of the task
adapters (nlora.analysis.diagnostics, when available) and train+eval time per method, mean ± std over seeds.

Each (method, seed) is a normal nlora run directory, OUTPUT_DIR/<method>/seed<seed>: a complete one is reused,
an incomplete one resumed, so rerunning the same command finishes an interrupted benchmark or rebuilds the table.

    python benchmarks/reproduce_cpu.py                      # default profile, 1 seed (under ~60 min on 2 cores)
    python benchmarks/reproduce_cpu.py --quick              # small profile (under ~10 min)
    python benchmarks/reproduce_cpu.py --seeds 42,43,44     # mean ± std over seeds
    python benchmarks/reproduce_cpu.py --sweep              # choose λ / lr on a dev split carved from train

--sweep never uses test.json (nor dev.json, a copy of it): it builds a data view whose test split is a dev set
carved from a training sample of each task (nlora.tasks.data.carve_dev) and runs the grid on it; the chosen values
are this script's defaults (DEFAULTS below).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ORDER_1 = ("dbpedia", "amazon", "yahoo", "agnews")
METHODS = ("seq-lora", "inc-lora", "o-lora", "n-lora", "mtl", "replay", "ewc", "lwf", "clora", "inflora", "s-lora",
           "i-lora", "seq-ft")
# Examples per task (yahoo has only 171 train / 138 test examples here, so it is capped there).
PROFILES = {
    "full": dict(train_samples=250, test_samples=250, dev_samples=80, epochs=2),
    "quick": dict(train_samples=64, test_samples=64, dev_samples=24, epochs=2),
}
# Chosen by --sweep on the dev split carved from train (see the module docstring).
DEFAULTS = dict(lr=1e-3, batch_size=16, max_source_length=128, lora_r=8, lora_alpha=32.0)
# The one tuned value of each method that has one: (method, its RunConfig field, flag, default, what it is). The
# defaults were chosen by --sweep on the dev split carved from train (RESULTS.md); every other option of a method
# keeps nlora's default. --sweep-<flag>s gives the values a sweep tries.
TUNED = (
    ("n-lora", "lambda_", "lambda", 1e-5, "N-LoRA λ (delta form: λ · Σ_layers ‖scaling·B·A‖₁)"),
    ("o-lora", "orth_lambda", "orth-lambda", 0.5, "O-LoRA λ₁"),
    ("ewc", "ewc_lambda", "ewc-lambda", 1.0, "EWC λ (Fisher normalised by its mean)"),
    ("lwf", "lwf_lambda", "lwf-lambda", 1.0, "LwF λ (T = 2)"),
    ("clora", "clora_lambda", "clora-lambda", 0.1, "CLoRA λ"),
    ("seq-ft", "lr", "seqft-lr", 1e-5, "learning rate of full fine-tuning (seq-ft)"),
)
SWEEP_GRIDS = {"lambda": "1e-5,1e-4,1e-3", "orth-lambda": "0.5"}  # the others: none unless given
SWEEP_SEED = 0
SWEEP_DIAGNOSTICS = ("mean_collision_rate", "mean_sparsity", "mean_nuclear_norm", "mean_olora_overlap")
# Keys that may differ between a finished run and the command that would reuse it: where to write, and what the
# run resolved from this script's `auto` (config.yaml records the value used).
REUSE_FREE_KEYS = ("output_dir", "overwrite", "model_kind", "target_modules", "dtype", "attn_implementation")


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small profile (target: under 10 minutes)")
    p.add_argument("--seeds", default="42", help="comma-separated seeds (default: 42)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated (default: {','.join(METHODS)})")
    p.add_argument("--output-dir", default=None,
                   help="root of the run directories (default: runs/reproduce_cpu, or runs/reproduce_cpu_quick)")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "CL_Benchmark"),
                   help="CL_Benchmark folder (default: ../shared/data/CL_Benchmark from the repository root)")
    p.add_argument("--model", default=None, help="base model (default: nlora's DEFAULT_MODEL, all-MiniLM-L6-v2)")
    p.add_argument("--train-samples", type=int, help="training examples per task (profile default)")
    p.add_argument("--test-samples", type=int, help="test examples per task (profile default)")
    p.add_argument("--epochs", type=int, help="epochs per task (profile default)")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    for method, field, flag, default, what in TUNED:
        p.add_argument(f"--{flag}", dest=field if field != "lr" else flag.replace("-", "_"), type=float,
                       default=default, help=f"{what} ({method} runs only; default {default:g})")
    p.add_argument("--penalty-form", default="delta", choices=("delta", "reference", "factors"),
                   help="N-LoRA penalty form (n-lora runs only; see the README)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--max-source-length", type=int, default=DEFAULTS["max_source_length"])
    p.add_argument("--overwrite", action="store_true", help="retrain runs that already exist")
    p.add_argument("--progress", action="store_true", help="show nlora's progress bars")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--sweep", action="store_true",
                   help="run the selection grid on a dev split carved from train instead of the benchmark")
    p.add_argument("--dev-samples", type=int,
                   help="--sweep: dev examples carved from each task's training sample (profile default)")
    for method, field, flag, default, what in TUNED:
        grid = SWEEP_GRIDS.get(flag, "")
        p.add_argument(f"--sweep-{flag}s", default=grid, help=f"--sweep: {what} values ({grid or 'none'} by default)")
    p.add_argument("--sweep-lrs", default="", help="--sweep: learning rates tried on inc-lora (default: --lr)")
    args = p.parse_args(argv)
    profile = PROFILES["quick" if args.quick else "full"]
    for key, value in profile.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.output_dir is None:
        args.output_dir = str(REPO / "runs" / ("reproduce_cpu_quick" if args.quick else "reproduce_cpu"))
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    args.data_dir = Path(args.data_dir).resolve()
    if not args.data_dir.is_dir():
        p.error(f"--data-dir: {args.data_dir} does not exist. It must be the CL_Benchmark folder "
                "(<group>/<dataset>/{train,test,labels}.json); by default ../shared/data/CL_Benchmark "
                "next to the repository")
    return args


# ------------------------------------------------------------------------------------------------ runs

def base_config(args, **changes):
    from nlora.config import DEFAULT_MODEL, RunConfig

    values = dict(model=args.model or DEFAULT_MODEL, tasks=list(ORDER_1), data_dir=str(args.data_dir),
                  max_train_samples=args.train_samples, max_eval_samples=args.test_samples, epochs=args.epochs,
                  batch_size=args.batch_size, lr=args.lr, max_source_length=args.max_source_length,
                  lora_r=DEFAULTS["lora_r"], lora_alpha=DEFAULTS["lora_alpha"], device="cpu", checkpoint_steps=50)
    values.update(tuned_values(args, changes.get("method")))  # only its own (another method's is an error)
    values.update(changes)
    if values.get("method") not in (None, "mtl"):  # the base model's score on each task (zero-shot) and FWT
        values.setdefault("eval_future", True)
    return RunConfig(**values)


def tuned_values(args, method: str | None) -> dict:
    """The tuned options of `method` as this invocation sets them."""
    values = {field: getattr(args, field if field != "lr" else flag.replace("-", "_"))
              for m, field, flag, _, _ in TUNED if m == method}
    if method == "n-lora":
        values["penalty_form"] = args.penalty_form
    return values


def tuned_text(args, methods) -> str:
    return ", ".join(f"{m} {field.rstrip('_')} {getattr(args, field if field != 'lr' else flag.replace('-', '_')):g}"
                     for m, field, flag, _, _ in TUNED if m in methods)


def run_or_reuse(config, overwrite: bool, progress: bool) -> tuple[dict, str]:
    """Run `config` unless its directory holds the same run complete; resume it if it stopped part-way.
    Returns (metrics, what was done)."""
    from nlora.config import load_config
    from nlora.errors import NloraError
    from nlora.runner import run

    root = Path(config.output_dir)
    saved_config, metrics_file = root / "config.yaml", root / "metrics.json"
    if overwrite or not saved_config.is_file():
        return run(config.replace(overwrite=True), progress=progress), "ran"
    # both as the run reads them: the core options and the method's own (a run of an older release recorded
    # every method's options; those of other methods do not matter)
    saved = load_config(saved_config, saved_run=True).to_dict()
    current = config.validate().to_dict()
    differ = sorted(k for k in set(saved) | set(current)
                    if k not in REUSE_FREE_KEYS and saved.get(k) != current.get(k))
    if differ:
        raise NloraError(f"{root} holds a run with other settings ({', '.join(differ)}); pass --overwrite to "
                         "replace it or choose another --output-dir")
    if metrics_file.is_file() and json.loads(metrics_file.read_text()).get("complete"):
        return json.loads(metrics_file.read_text()), "reused"
    return run(config, progress=progress, resume=True), "resumed"


def run_seconds(metrics: dict) -> float:
    """Training + evaluation time recorded in the run (excludes model loading)."""
    return sum(s["seconds"] for s in metrics["train"].values()) + sum(metrics["eval_seconds"].values())


def diagnostics_of(run_dir: Path) -> dict | None:
    try:
        from nlora.analysis import diagnostics
    except ImportError:
        return None
    diagnose = getattr(diagnostics, "load_or_diagnose", None) or diagnostics.diagnose_run  # the first caches
    return diagnose(run_dir).get("summary", {})


# ----------------------------------------------------------------------------------------------- table

COLUMNS = (  # (header, key of a result row)
    ("zero-shot AP", "zero_shot"), ("AP", "ap"), ("FWT", "fwt"), ("BWT", "bwt"), ("forgetting", "forgetting"),
    ("collision", "mean_collision_rate"),
    ("overlap ‖A_s A_tᵀ‖", "mean_olora_overlap"), ("subspace overlap", "mean_subspace_overlap"),
    ("sparsity", "mean_sparsity"), ("time (min)", "minutes"),
)


def mean_std(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    fmt = ".2f" if abs(mean) >= 1 or mean == 0 else ".3g"  # accuracies in points, ratios to 3 digits
    if len(values) == 1:
        return f"{mean:{fmt}}"
    return f"{mean:{fmt}} ± {statistics.stdev(values):{fmt}}"


def result_row(method: str, seed: int, metrics: dict, run_dir: Path) -> dict:
    diag = diagnostics_of(run_dir) or {}
    return {"method": method, "seed": seed, "run_dir": str(run_dir), "ap": metrics["average_accuracy"],
            "bwt": metrics["bwt"], "fwt": metrics.get("fwt"),
            "zero_shot": statistics.fmean(metrics["baseline_accuracy"]) if metrics.get("baseline_accuracy")
            else None,
            "forgetting": metrics["forgetting"], "minutes": run_seconds(metrics) / 60,
            "final_row": metrics["accuracy_matrix"][-1], "diagnostics_available": bool(diag),
            **{k: diag.get(k) for k in ("mean_collision_rate", "mean_collision_jaccard", "mean_delta_cosine",
                                        "mean_olora_overlap", "mean_subspace_overlap", "mean_sparsity",
                                        "mean_l1_norm", "mean_nuclear_norm")}}


def format_table(rows: list[dict], methods: list[str], tasks=ORDER_1) -> str:
    head = ["method", "seeds"] + [h for h, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        if mine:
            cells = [m, str(len(mine))] + [mean_std([r[k] for r in mine]) for _, k in COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Final accuracy (%) per task after the whole sequence:", "",
              "| method | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        if mine:
            lines.append(f"| {m} | " + " | ".join(mean_std([r["final_row"][j] for r in mine])
                                                  for j in range(len(tasks))) + " |")
    return "\n".join(lines)


def machine_line() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   cpu)
    load = ", load average %.1f / %.1f / %.1f (1/5/15 min)" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    return (f"{cpu}, {os.cpu_count()} CPU cores{load}, no GPU used; python {platform.python_version()}, "
            f"torch {torch.__version__}")


# ----------------------------------------------------------------------------------------- benchmark

def run_benchmark(args) -> list[dict]:
    out = Path(args.output_dir)
    rows = []
    started = time.perf_counter()
    for method in args.methods:
        for seed in args.seeds:
            run_dir = out / method / f"seed{seed}"
            config = base_config(args, method=method, seed=seed, output_dir=str(run_dir))
            t0 = time.perf_counter()
            print(f"[{method} seed {seed}] {run_dir}", flush=True)
            metrics, done = run_or_reuse(config, args.overwrite, args.progress)
            row = result_row(method, seed, metrics, run_dir)
            rows.append(row)
            print(f"[{method} seed {seed}] {done} in {time.perf_counter() - t0:.0f}s: AP {row['ap']:.2f}  "
                  f"BWT {fmt_opt(row['bwt'])}  final {row['final_row']}", flush=True)
    wall = time.perf_counter() - started
    table = format_table(rows, args.methods)
    notes = [f"Standard CL benchmark, order 1 ({' → '.join(ORDER_1)}), {args.train_samples} train / "
             f"{args.test_samples} test examples per task (yahoo: all 171 / 138 at most), {args.epochs} epochs, "
             f"batch {args.batch_size}, lr {args.lr:g}, LoRA r {DEFAULTS['lora_r']} α {DEFAULTS['lora_alpha']:g} "
             f"on query/value, max {args.max_source_length} tokens; {tuned_text(args, args.methods)} (n-lora "
             f"{args.penalty_form} form); every other option nlora's default; model {base_config(args).model} "
             "(scoring head).",
             f"Seeds {','.join(map(str, args.seeds))} (the seed also draws the train/test subsets); "
             "time = training + evaluation recorded in each run's metrics.json (evaluation includes the "
             "base model and every task before it is trained, for zero-shot AP and FWT; mtl: final row only).",
             f"Machine: {machine_line()}. Date {datetime.date.today()}.",
             f"Command: python {' '.join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])}",
             f"Wall time of this invocation: {wall / 60:.1f} min (reused runs cost nothing)."]
    if not any(r["diagnostics_available"] for r in rows):
        notes.append("collision/overlap: n/a (nlora.analysis.diagnostics not importable); rerun this command once it "
                     "exists to fill them in (the runs are reused).")
    text = table + "\n\n" + "\n".join(notes)
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"rows": rows, "notes": notes}, indent=1))
    return rows


def fmt_opt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


# --------------------------------------------------------------------------------------------- sweep

def write_dev_view(args) -> Path:
    """A CL_Benchmark-layout folder built from a sample of train_samples of each task's train.json: dev_samples
    of it carved off as test.json, the rest as train.json. No example of the real test split is used.
    Deterministic, so rebuilding it gives the same files and the sweep runs stay reusable."""
    from nlora.tasks.data import carve_dev, load_task

    key = hashlib.sha1(f"{args.data_dir}|{args.train_samples}|{args.dev_samples}|{SWEEP_SEED}".encode())
    root = Path(tempfile.gettempdir()) / f"nlora-dev-view-{key.hexdigest()[:10]}"
    pool_size = args.train_samples
    for name in ORDER_1:
        task = load_task(args.data_dir, name, max_train=pool_size, max_test=1, seed=SWEEP_SEED)
        fit, dev = carve_dev(task.train, args.dev_samples / pool_size, seed=SWEEP_SEED)
        folder = root / task.family / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "labels.json").write_text(json.dumps(task.labels))
        for split, examples in (("train", fit), ("test", dev)):
            rows = [{"label": e.label, "sentence": e.sentence} for e in examples]
            (folder / f"{split}.json").write_text(json.dumps(rows))
        print(f"dev view {name}: {len(fit)} train / {len(dev)} dev (both from train.json)")
    return root


def run_sweep(args) -> list[dict]:
    view = write_dev_view(args)
    out = Path(args.output_dir) / "sweep"
    lrs = parse_floats(args.sweep_lrs) or [args.lr]
    specs = [("inc-lora", dict(lr=lr)) for lr in lrs]
    form = {} if args.penalty_form == "delta" else {"penalty_form": args.penalty_form}
    for method, field, flag, _, _ in TUNED:
        grid = parse_floats(getattr(args, f"sweep_{flag.replace('-', '_')}s"))
        specs += [(method, {field: value, **(form if method == "n-lora" else {})}) for value in grid]
    rows = []
    for method, changes in specs:
        shown = {k.rstrip("_"): f"{v:g}" if isinstance(v, float) else v for k, v in changes.items()}
        label = method + "".join(f" {k}={v}" for k, v in shown.items())
        run_dir = out / (method + "".join(f"_{k}{v}" for k, v in shown.items()))
        config = base_config(args, method=method, seed=SWEEP_SEED, output_dir=str(run_dir), data_dir=str(view),
                             eval_future=False, max_train_samples=None, max_eval_samples=None, **changes)
        t0 = time.perf_counter()
        metrics, done = run_or_reuse(config, args.overwrite, args.progress)
        train = metrics["train"].values()
        loss = statistics.fmean(s["mean_loss"] for s in train)
        reg = statistics.fmean(s["mean_regularizer"] for s in train)
        diag = diagnostics_of(run_dir) or {}
        rows.append({"config": label, "dev_ap": metrics["average_accuracy"], "dev_bwt": metrics["bwt"],
                     "accuracy_matrix": metrics["accuracy_matrix"], "loss": loss, "reg": reg,
                     "minutes": run_seconds(metrics) / 60,
                     **{k: diag.get(k) for k in SWEEP_DIAGNOSTICS}})
        print(f"[sweep] {label}: {done} in {time.perf_counter() - t0:.0f}s, dev AP {metrics['average_accuracy']:.2f}"
              f" BWT {fmt_opt(metrics['bwt'])}, mean task loss {loss:.3f}, mean penalty {reg:.3g}", flush=True)
    header = ("| config | dev AP | dev BWT | mean task loss | mean penalty (λ·term) | collision | sparsity | "
              "nuclear norm | overlap ‖A_s A_tᵀ‖ | time (min) |")
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        diag = " | ".join(mean_std([r[k]]) for k in SWEEP_DIAGNOSTICS)
        lines.append(f"| {r['config']} | {r['dev_ap']:.2f} | {fmt_opt(r['dev_bwt'])} | {r['loss']:.3f} | "
                     f"{r['reg']:.3g} | {diag} | {r['minutes']:.1f} |")
    text = ("\n".join(lines) + f"\n\nDev split carved from train.json (seed {SWEEP_SEED}): {args.dev_samples} "
            f"of {args.train_samples} training examples per task held out as dev (yahoo: of 171); "
            f"{args.epochs} epochs, lr {args.lr:g} unless the row says otherwise.\nCommand: python "
            f"{' '.join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])}")
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text(text + "\n")
    (out / "sweep.json").write_text(json.dumps(rows, indent=1))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    from nlora.errors import NloraError

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        run_sweep(args) if args.sweep else run_benchmark(args)
    except NloraError as e:
        print(f"reproduce_cpu: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
