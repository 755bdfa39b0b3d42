"""Parameter diagnostics of a run: how the tasks' weight updates ΔW_t collide, overlap and how sparse they are,
computed from the run directory's saved adapters alone (no base model) and written to RUN_DIR/diagnostics.json.

The update of task t in one adapted layer is ΔW_t = s · B_t A_t (PEFT's LoRA, s = lora_alpha / r, or
lora_alpha / √r with rsLoRA), times the weight c_t a method that learns one gives the adapter in the final model
(s-lora's α_t / ‖s·B_t A_t‖_F, read from update_scales.json beside the last adapter). With the "stacked" layout (a separate adapter per task) that is the task's adapter;
with the "snapshot" layout (one adapter trained through every phase; adapters/<k>-<task>/ holds its state after
phase k) it is the change over the phase: ΔW_k = ΔW(after phase k) − ΔW(after the previous saved phase), the
first phase measured from the freshly initialised adapter (B = 0, so ΔW = 0).

Threshold. Trained weights are never exactly zero, so "non-zero" means |x| > ε, with ε relative to the scale of
each ΔW_t in each layer: ε = rel_eps · max|ΔW_t| (scale "max", the default) or rel_eps · RMS(ΔW_t) (scale
"rms"). Each matrix of a pair is thresholded with its own ε.

Per layer, for every task t and every pair of tasks s < t:
    sparsity_t          fraction of the entries of ΔW_t with |x| ≤ ε_t
    l1_norm_t           Σ|ΔW_t|   (the quantity N-LoRA penalises)
    nuclear_norm_t      Σ singular values of ΔW_t, from the r × r core of the QR factors of B and Aᵀ
    collision_rate      fraction of all d_out·d_in positions where both ΔW_s and ΔW_t are non-zero
    collision_jaccard   the same count over the positions where either is non-zero (1 for identical supports)
    delta_cosine        |⟨ΔW_s, ΔW_t⟩_F| / (‖ΔW_s‖_F ‖ΔW_t‖_F): the orthogonality of the updates themselves
    olora_overlap       ‖A_s A_tᵀ‖_F, and olora_l1 = Σ|A_s A_tᵀ| (O-LoRA's penalty); stacked layout only
    subspace_overlap    mean squared cosine of the principal angles between the row spaces of ΔW_s and ΔW_t
                        (‖V_sᵀ V_t‖_F² / min(k_s, k_t) for orthonormal bases V): 0 orthogonal, 1 nested
Aggregates over layers: counts are pooled (position-weighted collision rate and sparsity), norms summed (nuclear,
L1) or combined as the norm of the whole block-diagonal update (Frobenius, O-LoRA), principal-angle cosines
pooled over all angles of all layers, and delta_cosine = Σ_l |⟨ΔW_s,ΔW_t⟩_l| / (‖ΔW_s‖_F ‖ΔW_t‖_F) over the
whole model. The summary averages the pairs (and the tasks).

Relation to the papers. N-LoRA (arXiv 2410.10179) calls it a parameter collision when two tasks' updates are both
non-zero at the same position of ΔW, and argues that non-collision is sufficient, not necessary, for
orthogonality: with disjoint supports every term of ⟨ΔW_s, ΔW_t⟩_F = Σ ΔW_s[i,j] ΔW_t[i,j] vanishes. Here
collision_rate counts such positions with the explicit threshold above instead of exact zeros, normalised by all
positions of the layer, pooled over layers and averaged over pairs; delta_cosine is that Frobenius inner product,
normalised to [0, 1]. The paper's headline figures are ratios between methods (e.g. N-LoRA vs O-LoRA), which is
how these numbers compare too. O-LoRA (arXiv 2310.14152) keeps A_t orthogonal to the earlier A_s through
O_{s,t} = A_s A_tᵀ (its public code penalises Σ|O_{s,t}|, see nlora.methods.penalties): olora_l1 and olora_overlap
report it, and subspace_overlap is its scale-free form on the spans of the updates.

Memory: layers are handled one at a time, and ΔW is only formed in blocks of rows that hold, across all tasks
together, at most one layer's d_out × d_in entries (plus their masks); norms and overlaps come from the factors.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import NloraError
from ..io import write_json_atomic
from ..paths import check_plain_name
from ..rundir import layer_scale, read_update_scales

__all__ = ["DEFAULT_REL_EPS", "EPS_SCALES", "DIAGNOSTICS_FILE", "LowRankUpdate", "diagnose_run", "compute_diagnostics",
           "load_or_diagnose", "format_diagnostics", "support_statistics", "subspace_overlap", "olora_overlap"]

SCHEMA_VERSION = 1
DIAGNOSTICS_FILE = "diagnostics.json"
DEFAULT_REL_EPS = 1e-2
EPS_SCALES = ("max", "rms")
# Directions of ΔW whose singular value is below this fraction of the largest carry < 1e-6 of its energy; they are
# left out of the row-space basis (and of the reported rank) so that numerical dust does not count as a direction.
SUBSPACE_RTOL = 1e-3
# float32 sums of 0/1 masks stay exact below 2**24 entries per row block.
_MAX_BLOCK = 1 << 24
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<layer>.+)\.lora_(?P<which>[AB])\.weight$")


# ------------------------------------------------------------------------------------- low-rank algebra

@contextlib.contextmanager
def _one_thread():
    """Small factorisations run single-threaded: on a busy machine, waking a thread pool for an r × r problem
    costs far more (milliseconds) than the problem itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class LowRankUpdate:
    """ΔW = B @ A with any scaling folded into B: B is (d_out, r), A is (r, d_in)."""
    B: torch.Tensor
    A: torch.Tensor

    @classmethod
    def from_lora(cls, A: torch.Tensor, B: torch.Tensor, scaling: float) -> "LowRankUpdate":
        return cls(B.to(torch.float64) * scaling, A.to(torch.float64))

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], self.A.shape[1]

    def minus(self, other: "LowRankUpdate") -> "LowRankUpdate":
        """self − other, exactly, as a factorisation of rank r_self + r_other."""
        return LowRankUpdate(torch.cat([self.B, -other.B], dim=1), torch.cat([self.A, other.A], dim=0))

    def dense(self, rows: slice = slice(None), dtype=torch.float32) -> torch.Tensor:
        return self.B[rows].to(dtype) @ self.A.to(dtype)

    def gram(self, other: "LowRankUpdate") -> float:
        """⟨self, other⟩_F = tr(Aᵀ Bᵀ B' A') = Σ (BᵀB') ⊙ (A A'ᵀ), without forming either matrix."""
        return float(((self.B.T @ other.B) * (self.A @ other.A.T)).sum())

    def frobenius(self) -> float:
        # from the singular values, not gram(self): that cancels badly for a difference of close snapshots
        return float(self.svd()[0].square().sum().sqrt())

    def svd(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Singular values of ΔW (descending) and an orthonormal basis (d_in × k) of its row space, from the QR
        factors B = Q_b R_b, Aᵀ = Q_a R_a: ΔW = Q_b (R_b R_aᵀ) Q_aᵀ, so only the small core is decomposed."""
        with _one_thread():
            q_b, r_b = torch.linalg.qr(self.B)
            q_a, r_a = torch.linalg.qr(self.A.T)
            _, sigma, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
        top = float(sigma[0]) if sigma.numel() else 0.0
        keep = sigma > SUBSPACE_RTOL * top if top > 0 else torch.zeros_like(sigma, dtype=torch.bool)
        return sigma, q_a @ vh[keep].T


def subspace_overlap(V_s: torch.Tensor, V_t: torch.Tensor) -> tuple[float, int]:
    """(Σ cos² of the principal angles, number of angles) between the spans of two orthonormal bases (d × k);
    the mean squared cosine is the ratio (0: orthogonal subspaces, 1: one contains the other)."""
    k = min(V_s.shape[1], V_t.shape[1])
    if k == 0:
        return 0.0, 0
    return float((V_s.T @ V_t).square().sum()), k


def olora_overlap(A_s: torch.Tensor, A_t: torch.Tensor) -> tuple[float, float]:
    """O-LoRA's overlap of two adapters' A matrices (r × d_in): (‖A_s A_tᵀ‖_F, Σ|A_s A_tᵀ|)."""
    product = A_s.to(torch.float64) @ A_t.to(torch.float64).T
    return float(torch.linalg.matrix_norm(product)), float(product.abs().sum())


def support_statistics(updates: list[LowRankUpdate], rel_eps: float, scale: str = "max",
                       max_elements: int | None = None) -> dict:
    """Thresholded supports of the ΔW of one layer for several tasks, formed a block of rows at a time.

    Returns per task "epsilon", "below" (entries with |x| ≤ ε), "l1"; and "both", the matrix of counts of
    positions where tasks s and t are both non-zero (its diagonal: each task's non-zero count). At most
    `max_elements` entries of ΔW (default: one layer's d_out·d_in) are held at once across all tasks."""
    if scale not in EPS_SCALES:
        raise ValueError(f"unknown epsilon scale {scale!r}; expected one of {', '.join(EPS_SCALES)}")
    d_out, d_in = updates[0].shape
    n = len(updates)
    budget = max_elements or d_out * d_in
    rows = max(1, min(d_out, budget // (n * d_in), _MAX_BLOCK // d_in))
    blocks = [slice(i, i + rows) for i in range(0, d_out, rows)]

    # all tasks' factors zero-padded to one rank, so that each block of every ΔW is one batched product
    rank = max(u.B.shape[1] for u in updates)
    Bs = torch.zeros(n, d_out, rank)
    As = torch.zeros(n, rank, d_in)
    for i, u in enumerate(updates):
        Bs[i, :, : u.B.shape[1]] = u.B
        As[i, : u.A.shape[0]] = u.A

    def magnitudes(block: slice) -> torch.Tensor:  # (n, rows, d_in)
        return torch.bmm(Bs[:, block], As).abs_()

    if scale == "max":
        peak = torch.zeros(n)
        for block in blocks:
            peak = torch.maximum(peak, magnitudes(block).amax(dim=(1, 2)))
        ref = peak.tolist()
    else:
        ref = [u.frobenius() / math.sqrt(d_out * d_in) for u in updates]
    eps = [rel_eps * x for x in ref]

    below = torch.zeros(n, dtype=torch.int64)
    l1 = torch.zeros(n, dtype=torch.float64)
    both = torch.zeros(n, n, dtype=torch.int64)
    threshold = torch.tensor(eps, dtype=torch.float32).view(n, 1, 1)
    for block in blocks:
        magnitude = magnitudes(block)
        l1 += magnitude.sum(dim=(1, 2), dtype=torch.float64)
        nonzero = (magnitude > threshold).reshape(n, -1).to(torch.float32)
        both += (nonzero @ nonzero.T).round().to(torch.int64)
        below += nonzero.shape[1] - nonzero.sum(dim=1).round().to(torch.int64)
    return {"epsilon": eps, "below": below.tolist(), "l1": l1.tolist(), "both": both.tolist()}


# ------------------------------------------------------------------------------------- the run's adapters

@dataclass
class SavedAdapter:
    phase: int
    task: str
    folder: Path
    config: dict


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NloraError(f"{path.parent} is not a run directory: no {path.name} ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NloraError(f"{path} is corrupt ({e})") from None


def saved_adapters(run_dir: Path, metrics: dict) -> list[SavedAdapter]:
    """The adapters saved so far, in phase order (adapters/<k>-<task>/ of each trained phase)."""
    tasks = metrics["tasks"]
    for task in tasks:  # each becomes part of an adapter's path
        check_plain_name(task, f"{run_dir / 'metrics.json'}: task name")
    found = []
    for k in sorted(metrics.get("phases") or range(len(tasks))):
        folder = run_dir / "adapters" / f"{k}-{tasks[k]}"
        if (folder / "adapter_model.safetensors").is_file():
            found.append(SavedAdapter(k, tasks[k], folder, _read_json(folder / "adapter_config.json",
                                                                      "the adapter's configuration")))
    return found


def learned_scales(adapters: list[SavedAdapter]) -> list:
    """The weight the method gives each saved adapter in the model after the last of them (update_scales.json
    beside it, written by a method that learns one, e.g. s-lora); None where there is none (weight 1)."""
    recorded = read_update_scales(adapters[-1].folder) if adapters else None
    if recorded is None:
        return [None] * len(adapters)
    return [recorded[a.phase] if a.phase < len(recorded) else None for a in adapters]


def _scaling(config: dict, layer: str, r: int) -> float:
    if config.get("use_dora"):
        raise NloraError("DoRA adapters rescale ΔW with the base weights, which diagnostics do not load")
    alpha = config.get("lora_alpha", r)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?{pattern}$", layer):
            alpha = value
            break
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def natural_key(name: str) -> list:
    """Sort key that puts block.2 before block.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _layer_keys(handle) -> dict[str, dict[str, str]]:
    layers: dict[str, dict[str, str]] = {}
    for key in handle.keys():
        m = _KEY.match(key)
        if m:
            layers.setdefault(m["layer"], {})[m["which"]] = key
    return {name: keys for name, keys in layers.items() if set(keys) == {"A", "B"}}


# ------------------------------------------------------------------------------------- the diagnostics

def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _num(x):
    """Numbers as written to diagnostics.json: 8 significant digits (None stays None)."""
    return None if x is None else float(f"{x:.8g}")


def compute_diagnostics(run_dir: str | Path, rel_eps: float = DEFAULT_REL_EPS, eps_scale: str = "max") -> dict:
    """The diagnostics of a run directory (see the module docstring), without writing them."""
    run_dir = Path(run_dir)
    if not (isinstance(rel_eps, (int, float)) and math.isfinite(rel_eps) and rel_eps >= 0):
        raise NloraError(f"rel_eps must be a finite number >= 0, got {rel_eps!r}")
    if eps_scale not in EPS_SCALES:
        raise NloraError(f"eps_scale must be one of {', '.join(EPS_SCALES)}, got {eps_scale!r}")
    metrics = _read_json(run_dir / "metrics.json", "written by `nlora run`")
    layout = metrics.get("adapter_layout", "stacked")
    adapters = saved_adapters(run_dir, metrics)
    names = [a.task for a in adapters]
    n = len(adapters)
    scales = learned_scales(adapters)
    pairs = list(combinations(range(n), 2))

    task_acc = [dict(below=0, positions=0, l1=0.0, nuclear=0.0, fro2=0.0) for _ in range(n)]
    pair_acc = {p: dict(both=0, union=0, positions=0, olora2=0.0, olora_l1=0.0, cos2=0.0, angles=0, inner=0.0)
                for p in pairs}
    layer_records = []
    with contextlib.ExitStack() as stack:
        handles = []
        for a in adapters:
            try:
                handles.append(stack.enter_context(safe_open(str(a.folder / "adapter_model.safetensors"), "pt")))
            except Exception as e:  # safetensors raises its own error types for damaged files
                raise NloraError(f"adapter file {a.folder / 'adapter_model.safetensors'} is unreadable: {e}") from None
        keys = [_layer_keys(h) for h in handles]
        layers = sorted(set.intersection(*(set(k) for k in keys)), key=natural_key) if keys else []
        for layer in layers:
            A = [h.get_tensor(k[layer]["A"]) for h, k in zip(handles, keys)]
            saved = [LowRankUpdate.from_lora(a, h.get_tensor(k[layer]["B"]),
                                             _scaling(ad.config, layer, a.shape[0])
                                             * layer_scale(scale, k[layer]["A"].removesuffix(".lora_A.weight")))
                     for a, h, k, ad, scale in zip(A, handles, keys, adapters, scales)]
            if layout == "snapshot":
                updates = [saved[0]] + [saved[i].minus(saved[i - 1]) for i in range(1, n)]
            else:
                updates = saved
            layer_records.append(_layer(layer, updates, A if layout == "stacked" else None, names, rel_eps,
                                        eps_scale, task_acc, pair_acc))

    per_task = []
    for name, adapter, acc in zip(names, adapters, task_acc):
        per_task.append({"task": name, "phase": adapter.phase,
                         "sparsity": _num(_ratio(acc["below"], acc["positions"])),
                         "l1_norm": _num(acc["l1"]), "nuclear_norm": _num(acc["nuclear"]),
                         "frobenius_norm": _num(math.sqrt(acc["fro2"]))})
    per_pair = []
    for (s, t), acc in pair_acc.items():
        norms = math.sqrt(task_acc[s]["fro2"] * task_acc[t]["fro2"])
        per_pair.append({"tasks": [names[s], names[t]],
                         "collision_rate": _num(_ratio(acc["both"], acc["positions"])),
                         "collision_jaccard": _num(_ratio(acc["both"], acc["union"])),
                         "delta_cosine": _num(_ratio(acc["inner"], norms)),
                         "olora_overlap": _num(math.sqrt(acc["olora2"])) if layout == "stacked" else None,
                         "olora_l1": _num(acc["olora_l1"]) if layout == "stacked" else None,
                         "subspace_overlap": _num(_ratio(acc["cos2"], acc["angles"]))})

    def mean_of(rows, key):
        return _num(_mean(r[key] for r in rows)) if rows else None

    return {
        "schema_version": SCHEMA_VERSION,
        "method": metrics.get("method"),
        "model": metrics.get("model"),
        "adapter_layout": layout,
        "tasks": names,
        "phases": [a.phase for a in adapters],
        "update": ("ΔW_t = c_t·s·B_t·A_t of task t's own adapter, c_t its learned weight in the final model "
                   "(1 unless the method learns one)" if layout == "stacked" else
                   "ΔW_t = ΔW(after phase t) − ΔW(after the previous phase) of the one adapter trained through "
                   "every phase (the first phase from the initial ΔW = 0)"),
        "epsilon": {"mode": "relative", "scale": eps_scale, "value": rel_eps,
                    "rule": f"an entry x of ΔW_t counts as non-zero when |x| > {rel_eps:g} · "
                            f"{'max|ΔW_t|' if eps_scale == 'max' else 'RMS(ΔW_t)'}, per layer and task"},
        "summary": {
            "n_updates": n,
            "n_pairs": len(pairs),
            "mean_collision_rate": mean_of(per_pair, "collision_rate"),
            "mean_collision_jaccard": mean_of(per_pair, "collision_jaccard"),
            "mean_delta_cosine": mean_of(per_pair, "delta_cosine"),
            "mean_olora_overlap": mean_of(per_pair, "olora_overlap"),
            "mean_subspace_overlap": mean_of(per_pair, "subspace_overlap"),
            "mean_sparsity": mean_of(per_task, "sparsity"),
            "mean_l1_norm": mean_of(per_task, "l1_norm"),
            "mean_nuclear_norm": mean_of(per_task, "nuclear_norm"),
        },
        "per_task": per_task,
        "pairs": per_pair,
        "layers": layer_records,
    }


def _layer(name: str, updates: list[LowRankUpdate], A: list[torch.Tensor] | None, tasks: list[str],
           rel_eps: float, eps_scale: str, task_acc: list[dict], pair_acc: dict) -> dict:
    """One layer's record; adds its counts and norms into the run's accumulators."""
    d_out, d_in = updates[0].shape
    positions = d_out * d_in
    # a thread pool only pays off on big layers; on small ones its wake-ups dominate, badly so on a busy machine
    with _one_thread() if positions * len(updates) <= _MAX_BLOCK else contextlib.nullcontext():
        support = support_statistics(updates, rel_eps, eps_scale)
    spectra = [u.svd() for u in updates]
    fro = [float(sigma.square().sum().sqrt()) for sigma, _ in spectra]
    both = support["both"]
    task_rows = []
    for i, (u, (sigma, basis)) in enumerate(zip(updates, spectra)):
        acc = task_acc[i]
        acc["below"] += support["below"][i]
        acc["positions"] += positions
        acc["l1"] += support["l1"][i]
        acc["nuclear"] += float(sigma.sum())
        acc["fro2"] += fro[i] ** 2
        task_rows.append({"task": tasks[i], "epsilon": _num(support["epsilon"][i]),
                          "sparsity": _num(support["below"][i] / positions), "l1_norm": _num(support["l1"][i]),
                          "nuclear_norm": _num(float(sigma.sum())), "frobenius_norm": _num(fro[i]),
                          "rank": basis.shape[1]})
    pair_rows = []
    for (s, t), acc in pair_acc.items():
        union = both[s][s] + both[t][t] - both[s][t]
        inner = abs(updates[s].gram(updates[t]))
        cos2, angles = subspace_overlap(spectra[s][1], spectra[t][1])
        acc["both"] += both[s][t]
        acc["union"] += union
        acc["positions"] += positions
        acc["inner"] += inner
        acc["cos2"] += cos2
        acc["angles"] += angles
        row = {"tasks": [tasks[s], tasks[t]], "collision_rate": _num(both[s][t] / positions),
               "collision_jaccard": _num(_ratio(both[s][t], union)),
               "delta_cosine": _num(_ratio(inner, fro[s] * fro[t])),
               "olora_overlap": None, "olora_l1": None,
               "subspace_overlap": _num(_ratio(cos2, angles))}
        if A is not None:
            frob, l1 = olora_overlap(A[s], A[t])
            acc["olora2"] += frob ** 2
            acc["olora_l1"] += l1
            row["olora_overlap"], row["olora_l1"] = _num(frob), _num(l1)
        pair_rows.append(row)
    return {"layer": name, "shape": [d_out, d_in], "tasks": task_rows, "pairs": pair_rows}


def diagnose_run(run_dir: str | Path, rel_eps: float = DEFAULT_REL_EPS, eps_scale: str = "max") -> dict:
    """Compute the parameter diagnostics of the run in `run_dir` from its saved adapters, write them atomically to
    run_dir/diagnostics.json, and return them."""
    diagnostics = compute_diagnostics(run_dir, rel_eps, eps_scale)
    write_json_atomic(Path(run_dir) / DIAGNOSTICS_FILE, diagnostics)
    return diagnostics


def load_or_diagnose(run_dir: str | Path, rel_eps: float | None = None, eps_scale: str | None = None) -> dict:
    """diagnostics.json of the run if it is current (same adapters, and the same threshold when one is given);
    otherwise recompute it, and write it where the run directory is writable."""
    run_dir = Path(run_dir)
    path = run_dir / DIAGNOSTICS_FILE
    metrics = _read_json(run_dir / "metrics.json", "written by `nlora run`")
    try:
        cached = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        cached = None
    if cached is not None and cached.get("schema_version") == SCHEMA_VERSION \
            and cached.get("phases") == [a.phase for a in saved_adapters(run_dir, metrics)] \
            and rel_eps in (None, cached["epsilon"]["value"]) and eps_scale in (None, cached["epsilon"]["scale"]):
        return cached
    diagnostics = compute_diagnostics(run_dir, DEFAULT_REL_EPS if rel_eps is None else rel_eps, eps_scale or "max")
    try:
        write_json_atomic(path, diagnostics)
    except OSError as e:
        print(f"nlora: warning: could not write {path} ({e.strerror or e}); using the diagnostics unsaved",
              file=sys.stderr)
    return diagnostics


def format_diagnostics(diagnostics: dict) -> str:
    """A few lines for the terminal: the summary of a run's diagnostics."""
    s = diagnostics["summary"]

    def f(x):
        return "-" if x is None else f"{x:.4g}"

    plural = "" if s["n_updates"] == 1 else "s"
    return (f"{diagnostics['method']}: {s['n_updates']} task update{plural}, {s['n_pairs']} pairs "
            f"({diagnostics['epsilon']['rule']})\n"
            f"  collision rate {f(s['mean_collision_rate'])}   ΔW cosine {f(s['mean_delta_cosine'])}   "
            f"O-LoRA |A_s A_t^T|_F {f(s['mean_olora_overlap'])}   subspace overlap {f(s['mean_subspace_overlap'])}\n"
            f"  sparsity {f(s['mean_sparsity'])}   nuclear norm {f(s['mean_nuclear_norm'])}   "
            f"L1 norm {f(s['mean_l1_norm'])}")
