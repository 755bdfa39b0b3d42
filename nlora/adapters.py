"""Per-task LoRA adapters on one frozen base model, through PEFT's multi-adapter support.

Every adapter added so far is active in the forward pass (PEFT sums the active adapters' updates, so inference
needs no task id); only the current task's adapter has requires_grad. Adapters are saved one folder each, in
PEFT's own format, so `PeftModel.from_pretrained(base, folder)` loads any of them.

Folding (`ContinualAdapters.fold`): once a task's adapter is trained and saved, the frozen adapters of a method
that always sums them all are replaced by their sum, built from the saved per-task files (float32), so that a
resumed run rebuilds the very same model from any point. The sum is kept as one frozen "past" LoRA adapter,
    A_past = [A_0; A_1; ...; A_k]                    (r·(k+1) × d_in, concatenated along the rank)
    B_past = [s_0·B_0, s_1·B_1, ..., s_k·B_k]         (d_out × r·(k+1)), scaling 1, no dropout,
so that B_past·A_past = Σ_s s_s·B_s·A_s exactly, and either runs as a second LoRA path per layer or is merged
into the base weights.

Two forms, chosen per run at the first fold (`fold_form`):
  merge   where every adapted base weight is a plain float32 tensor (not quantized, not sharded, not offloaded),
          each task's update is added into the base weight once, when the task is folded:
          W ← fp32(W + s_k·B_k·A_k), the product formed in float64, so the only error is one float32 rounding of
          W per task (relative 6e-8 of |W|). The frozen tasks then cost nothing: training and evaluation run the
          base layer plus the current adapter, exactly what task 1 runs. Tasks are added one at a time in task
          order, so a resumed run, which re-adds them from the saved files, rebuilds the very same weights.
  concat  otherwise (a bf16/fp16 base, where the update would round into the weight; a 4-bit/8-bit base, which
          PEFT cannot merge losslessly; a sharded base): the past path above is a second LoRA path per layer.
Both keep the past adapter (A_past, B_past) in the model: in the merge form it is never active and serves only
the terms that read the earlier A's (O-LoRA). After a merge, the bare base model is gone from this model
(`activate([])` refuses); the base model's scores (FWT baseline) are taken before the first fold, and
`nlora export` / `predict` load the base afresh.
PEFT's `add_weighted_adapter(combination_type="cat")` builds nearly the concat form, but puts the scaling into A
(O-LoRA needs the bare A_s) and copies the first adapter's dropout onto the frozen path; hence a plain LoRA adapter
of rank r·k (lora_alpha r·k: scaling 1, dropout 0) filled with the concatenated factors. PEFT's own `merge()` is
not used for the merge form: it keeps the adapter and unmerges it whenever adapter layers are disabled.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from .errors import NloraError
from .faults import fault_point
from .io import naming_the_file, replace_dir_atomic, staging_dir
from .rundir import ADAPTER_FILE, layer_scale

TASK_TYPES = {"seq2seq": "SEQ_2_SEQ_LM", "decoder": "CAUSAL_LM", "encoder": "FEATURE_EXTRACTION"}
PAST = "past"  # the PEFT adapter that holds the folded frozen adapters
_A, _B = ".lora_A.weight", ".lora_B.weight"  # key suffixes of a saved adapter (PEFT's format)


@dataclass
class LayerFactors:
    """One adapted layer of one adapter: ΔW = scaling · B @ A (`ContinualAdapters.factors`). A loss term
    (nlora.train.regularization) gets the trained adapter's, with `earlier_A` filled: the A of every other adapter
    the layer holds (the frozen earlier tasks, one tensor each, or one concatenated "past" adapter where those are
    folded; Σ_s Σ|A_s A_tᵀ| is the same either way); elsewhere it is empty."""
    layer: str  # the module's name in the model
    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scaling: float
    earlier_A: list[torch.Tensor] = field(default_factory=list)


@contextlib.contextmanager
def quiet_peft_wrap():
    """Wrapping a model in a PeftModel reads transformers' deprecated `is_gradient_checkpointing`, whose
    FutureWarning every command that loads a model would print; only that warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def folding(method, config) -> bool:
    """Whether a run folds its frozen adapters: option 'fold_adapters' on, and a stacked method that declares
    its frozen adapters always active together (`Method.folds_past`). The snapshot layout has nothing to fold."""
    return bool(config.fold_adapters) and method.adapter_layout == "stacked" and bool(method.folds_past)


def _saved_scaling(config: dict, folder: Path) -> float:
    if config.get("use_dora") or config.get("alpha_pattern") or config.get("rank_pattern"):
        raise NloraError(f"adapter {folder}: DoRA or per-layer rank/alpha patterns cannot be folded into one "
                         "LoRA path; set option 'fold_adapters' to false")
    r = config["r"]
    alpha = config.get("lora_alpha", r)
    return alpha / r ** 0.5 if config.get("use_rslora") else alpha / r


def read_saved_adapter(folder: str | Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """An adapter written by `ContinualAdapters.save`: (its adapter_config.json, {layer: (A, B)}), the layer named
    by PEFT's key prefix (e.g. "base_model.model.encoder.layer.0.attention.self.query")."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        state = load_file(str(folder / ADAPTER_FILE))
    except Exception as e:
        raise NloraError(f"adapter {folder} is unreadable: {e}") from None
    layers = {}
    for key in state:
        if key.endswith(_A):
            layer = key[: -len(_A)]
            if layer + _B not in state:
                raise NloraError(f"adapter {folder}: layer {layer} has lora_A but no lora_B")
            layers[layer] = (state[key], state[layer + _B])
    if not layers:
        raise NloraError(f"adapter {folder} holds no LoRA layers")
    return config, layers


SavedLayers = dict[str, tuple[torch.Tensor, torch.Tensor]]  # {layer: (A, B)} of one saved adapter
Scale = float | torch.Tensor | Callable[[], float | torch.Tensor]  # a multiplier of an adapter's update


def _read_scaled(folder: str | Path) -> tuple[float, SavedLayers]:
    """(scaling, {layer: (A, B)}) of the adapter saved in `folder`."""
    config, layers = read_saved_adapter(folder)
    return _saved_scaling(config, Path(folder)), layers


def _concatenate(folders: list[str | Path], read: list[tuple[float, SavedLayers]],
                 scales: "list[float | dict[str, float] | None] | None" = None) -> SavedLayers:
    """`concatenate_saved` of adapters already read (`read[i]` from `folders[i]`)."""
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    first: set[str] | None = None
    for i, (folder, (scaling, layers)) in enumerate(zip(folders, read)):
        scale = scales[i] if scales else None
        if first is not None and set(layers) != first:
            raise NloraError(f"adapter {folder} adapts other layers than {folders[0]}: "
                             f"{sorted(set(layers) ^ first)[:3]}")
        first = set(layers)
        for layer, (A, B) in layers.items():
            dtype = torch.promote_types(A.dtype, torch.float32)  # float32 at least (float64 stays)
            factor = scaling * layer_scale(scale, layer)
            parts.setdefault(layer, []).append((A.to(dtype), factor * B.to(dtype)))
    return {layer: (torch.cat([A for A, _ in ab]), torch.cat([B for _, B in ab], dim=1))
            for layer, ab in parts.items()}


def concatenate_saved(folders: list[str | Path], scales: "list[float | dict[str, float] | None] | None" = None
                      ) -> SavedLayers:
    """The summed update of the adapters saved in `folders` as one LoRA per layer, in float32 or wider: A = the A's
    concatenated along the rank, B = the scaled B's side by side, so that B @ A = Σ c_s · scaling_s · B_s @ A_s,
    where c_s is `scales[s]` (a number, or one per layer; 1 where not given)."""
    return _concatenate(folders, [_read_scaled(folder) for folder in folders], scales)


def _mergeable(layer: LoraLayer) -> bool:
    """Whether a folded update can be added exactly into this layer's base weight: that of a torch.nn.Linear,
    float32, a plain tensor in memory (not quantized, not a DTensor shard, not offloaded to meta)."""
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    return (isinstance(base, torch.nn.Linear) and weight is not None and weight.dtype == torch.float32
            and not weight.is_meta and type(weight.data) is torch.Tensor)


class ContinualAdapters:
    """The LoRA adapters of a run on one frozen base model (a method's `ctx.adapters`): `names` (every adapter
    added, in task order), `current` (the one being trained), `model` (the model with its adapters, unwrapped),
    `factors(name)` (each adapted layer's LayerFactors: the live tensors), `using(names)` (a block with other
    adapters active), `scale_by(name, scale)` (an adapter's weight in every forward), `copy_frozen(source, name)`
    (a frozen copy that only extra passes run)."""

    def __init__(self, model: torch.nn.Module, kind: str, r: int, alpha: float, dropout: float,
                 target_modules: list[str], merge_fp32: bool = True):
        self.base_model = model
        self.lora_config = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                                task_type=TASK_TYPES[kind])
        self.peft_model: PeftModel | None = None
        self.names: list[str] = []  # every adapter added, in task order (folded ones included)
        self.folded: list[str] = []  # those replaced by their sum (see `fold`)
        self.merge_fp32 = merge_fp32  # False: always the concat form
        self.fold_form: str | None = None  # "merge" or "concat", set by the first fold
        self._scales: dict[str, Scale | dict[str, Scale]] = {}  # adapter -> its multiplier (see scale_by)
        self._scale_hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}

    @property
    def model(self) -> torch.nn.Module:
        return self.peft_model if self.peft_model is not None else self.base_model

    @property
    def current(self) -> str:
        """The adapter being trained: the last one added."""
        return self.names[-1]

    def add(self, name: str, factors: str = "both") -> str:
        """Add a fresh adapter, activate it with all earlier ones, and make only it trainable (only `factors` of it:
        "both", "A" or "B"). PEFT draws A (kaiming-uniform, bound 1/√d_in) and sets B = 0, so ΔW = 0. With
        factors "A" the roles swap: A = 0 and B drawn as PEFT draws A, for the transposed layer (bound 1/√d_out),
        since A alone next to B = 0 could never learn (its gradient s·Bᵀ·g·xᵀ is zero)."""
        config = LoraConfig(**self.lora_config)
        if self.peft_model is None:
            for p in self.base_model.parameters():
                p.requires_grad_(False)
            try:
                with quiet_peft_wrap():
                    self.peft_model = get_peft_model(self.base_model, config, adapter_name=name)
            except ValueError as e:
                raise NloraError(f"option 'target_modules': {e}") from None
        else:
            self.peft_model.add_adapter(name, config)
        self.names.append(name)
        if factors == "A":
            self._swap_init(name)
        self.activate(self.names, trainable=name, factors=factors)
        return name

    def _swap_init(self, name: str) -> None:
        """A = 0, B random (see `add`)."""
        with torch.no_grad():
            for f in self.factors(name):
                f.A.zero_()
                torch.nn.init.kaiming_uniform_(f.B.T, a=5 ** 0.5)  # fan-in of Bᵀ (r × d_out): d_out

    def copy_frozen(self, source: str, name: str) -> None:
        """Hold a copy of adapter `source`'s current factors in a frozen adapter `name` (created by the first call,
        overwritten by later ones) that only `using([name])` runs: a method's reference point for an extra pass (a
        teacher, an anchor). It is none of the run's adapters (`names`): never trained, activated, saved or
        folded by the engine; what trains and what is active stay as they were. A loss term's `earlier_A`
        (nlora.train.regularization) lists it with the layer's other adapters."""
        if name in self.names or name == PAST:
            raise ValueError(f"copy_frozen: {name!r} is one of the run's adapters")
        if name not in self.peft_model.peft_config:
            trains = [(p, p.requires_grad) for p in self.model.parameters()]
            active = [(m, m._active_adapter, m._disable_adapters) for _, m in self.lora_layers()]
            with torch.random.fork_rng(devices=[]):  # PEFT's initial values are overwritten below
                self.peft_model.add_adapter(name, LoraConfig(**self.lora_config, inference_mode=True))
            for p, flag in trains:  # PEFT re-marks the active adapters trainable when it adds one
                p.requires_grad_(flag)
            for m, adapter, disabled in active:
                m._active_adapter, m._disable_adapters = adapter, disabled
        copies = {f.layer: f for f in self._factors(name)}
        with torch.no_grad():
            for f in self.factors(source):
                copy = copies[f.layer]
                copy.A.copy_(f.A)
                copy.B.copy_(f.B)
                copy.A.requires_grad_(False)
                copy.B.requires_grad_(False)

    def activate(self, names: list[str], trainable: str | None = None, factors: str = "both") -> None:
        """Make `names` the summed active adapters (none: the bare base model); freeze all but `trainable`, of
        which only `factors` train ("both", "A" or "B")."""
        peft_names = self.lora_paths(names)
        if not peft_names:  # the bare base (or, merged, the base holding every folded task)
            self.peft_model.base_model.disable_adapter_layers()
            return
        self.peft_model.base_model.enable_adapter_layers()
        self.peft_model.base_model.set_adapter(peft_names, inference_mode=True)
        if trainable is not None:
            for f in self.factors(trainable):
                f.A.requires_grad_(factors in ("both", "A"))
                f.B.requires_grad_(factors in ("both", "B"))

    def scale_by(self, name: str, scale: "Scale | dict[str, Scale] | None") -> None:
        """Multiply adapter `name`'s update by `scale`: one value for every layer, or {layer: value} (a layer left
        out keeps alpha / r); None restores alpha / r in every layer. A value is a number, a 0-dim tensor or a
        function returning one, read at every forward of the layer (a forward pre-hook), so that a learnable
        scalar gets its gradient through PEFT's `result + B(A(x)) * scaling` and its optimizer updates take
        effect: pass the learnable tensor itself, or a function of it, never a value derived from it once.
        Saved adapter files keep alpha / r: a method that scales adapters keeps the scale in its own state and
        declares it (`Method.update_scales`)."""
        if scale is None:
            self._scales.pop(name, None)
        else:
            self._scales[name] = scale
        for layer_name, layer in self.lora_layers():
            if name in layer.lora_A:
                layer.scaling[name] = layer.lora_alpha[name] / layer.r[name]
            if layer_name not in self._scale_hooks:
                self._scale_hooks[layer_name] = layer.register_forward_pre_hook(self._scale_hook(layer_name))

    def _scale_hook(self, layer_name: str):
        def apply(layer, args):
            for name, scale in self._scales.items():
                if name not in layer.lora_A:
                    continue
                value = scale.get(layer_name) if isinstance(scale, dict) else scale
                if value is not None:
                    value = value() if callable(value) else value
                    layer.scaling[name] = value * (layer.lora_alpha[name] / layer.r[name])
        return apply

    @contextlib.contextmanager
    def using(self, names: list[str]):
        """Run the forward passes inside the block with the adapters `names` active instead (none: the base),
        without touching which parameters train: for a method's extra pass (a teacher, a stable copy) on the same
        model, with no copy of it. Restores the active set on exit."""
        peft_names = self.lora_paths(names)
        layers = [m for _, m in self.lora_layers()]
        saved = [(m._active_adapter, m._disable_adapters) for m in layers]
        try:
            for m in layers:  # PEFT's own set_adapter would also change requires_grad
                m._active_adapter = list(peft_names) or m._active_adapter
                m._disable_adapters = not peft_names
            yield self.model
        finally:
            for m, (active, disabled) in zip(layers, saved):
                m._active_adapter, m._disable_adapters = active, disabled

    def lora_layers(self) -> list[tuple[str, LoraLayer]]:
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, LoraLayer)]

    def lora_paths(self, names: list[str]) -> list[str]:
        """The PEFT adapters the forward pass runs to compute the sum of `names`: the past path stands for all the
        folded ones (concat form), or nothing does, as the base weights hold them (merge form)."""
        names = list(names)
        folded = [n for n in names if n in self.folded]
        if folded and folded != self.folded:
            raise NloraError(f"adapters {self.folded} are folded into one path and can only be active together, "
                             f"but {folded} were asked for; a method that activates earlier adapters one by one "
                             "must set folds_past = False")
        if self.fold_form == "merge" and self.folded and not folded:
            raise NloraError(f"adapters {self.folded} are merged into the base weights, so this model cannot run "
                             "without them; load the base model afresh for that")
        past = [PAST] if folded and self.fold_form == "concat" else []
        return past + [n for n in names if n not in self.folded]

    def _factors(self, peft_name: str) -> list[LayerFactors]:
        out = []
        for layer_name, layer in self.lora_layers():
            if peft_name in layer.lora_A:
                scaling = layer.scaling[peft_name]  # a tensor where a method scales the adapter (scale_by)
                out.append(LayerFactors(layer_name, layer.lora_A[peft_name].weight, layer.lora_B[peft_name].weight,
                                       float(scaling.detach() if torch.is_tensor(scaling) else scaling)))
        return out

    def factors(self, name: str) -> list[LayerFactors]:
        """The factors of adapter `name` (one that is not folded: the current one, or any with folding off)."""
        if name in self.folded:
            raise ValueError(f"adapter {name!r} is folded into the past path; read past_factors()")
        return self._factors(name)

    def past_factors(self) -> list[LayerFactors]:
        """The past path, per adapted layer: A_past (r·k × d_in), B_past (d_out × r·k, each task's scaling
        folded in), scaling 1. Empty while nothing is folded."""
        return self._factors(PAST) if self.folded else []

    def fold(self, saved: dict[str, str | Path]) -> None:
        """Replace the adapters `saved` (name → the folder `save` wrote it to; the first adapters of the run, in
        order, including every one folded before) by their sum, built from those files: merged into the float32
        base weights or as one frozen past LoRA path (see the module's doc). No dropout on the folded tasks;
        evaluation sums them with any adapter not folded, as before."""
        names = list(saved)
        if names != self.names[: len(names)] or len(names) < len(self.folded):
            raise ValueError(f"fold: {names} are not the first adapters {self.names} (folded: {self.folded})")
        folders = list(saved.values())
        read = [_read_scaled(folder) for folder in folders]  # each file once: for the past adapter and the merge
        layers = _concatenate(folders, read)
        live = {n for n, _ in self.lora_layers()}
        if set(layers) != live:
            raise NloraError(f"adapters {list(saved.values())} do not match the model's adapted layers: "
                             f"{sorted(set(layers) ^ live)[:3]}")
        ranks = {A.shape[0] for A, _ in layers.values()}
        if len(ranks) != 1:
            raise NloraError(f"adapters {list(saved.values())} have different ranks per layer; set option "
                             "'fold_adapters' to false")
        rank = ranks.pop()
        with warnings.catch_warnings():  # PEFT names a new active adapter for each deleted one; activate() decides
            warnings.simplefilter("ignore", UserWarning)
            for name in [*names, PAST]:
                if name in self.peft_model.peft_config:
                    self.peft_model.delete_adapter(name)
        config = LoraConfig(**{**self.lora_config, "r": rank, "lora_alpha": rank, "lora_dropout": 0.0})
        with torch.random.fork_rng(devices=[]):  # the initial values are overwritten; leave the RNG as it was
            self.peft_model.add_adapter(PAST, config)
        self.peft_model.active_adapter = PAST  # PeftModel's own pointer (its config), not what the layers sum
        with torch.no_grad():
            for layer_name, layer in self.lora_layers():
                A, B = layers[layer_name]
                for weight, value in ((layer.lora_A[PAST].weight, A), (layer.lora_B[PAST].weight, B)):
                    weight.copy_(value)
                    weight.requires_grad_(False)
        if self.fold_form is None:
            mergeable = self.merge_fp32 and all(_mergeable(layer) for _, layer in self.lora_layers())
            self.fold_form = "merge" if mergeable else "concat"
        if self.fold_form == "merge":
            for scaling, task_layers in read[len(self.folded):]:  # one at a time, in task order, as on resume
                self._merge_into_base(scaling, task_layers)
        self.folded = names

    def _merge_into_base(self, scaling: float, layers: SavedLayers) -> None:
        """W ← fp32(W + s·B·A) for each layer of one saved adapter, the product in float64."""
        modules = dict(self.lora_layers())
        with torch.no_grad():
            for layer_name, (A, B) in layers.items():
                weight = modules[layer_name].get_base_layer().weight
                # MPS has no float64: the sum is formed on the CPU there
                at = torch.device("cpu") if weight.device.type == "mps" else weight.device
                delta = B.to(at, torch.float64) @ A.to(at, torch.float64)
                weight.copy_(weight.to(at, torch.float64).add_(delta, alpha=scaling))

    def adapter_parameters(self, name: str) -> list[torch.nn.Parameter]:
        return [p for f in self.factors(name) for p in (f.A, f.B)]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def save(self, name: str, folder: str | Path, extra: Callable[[Path], None] | None = None) -> Path:
        """Write adapter `name` to `folder` in PEFT's format (adapter_config.json + adapter_model.safetensors),
        atomically: the folder appears complete or not at all. `extra(staging_folder)` writes further files that
        must appear with it (the method's state)."""
        folder = Path(folder)
        tmp = staging_dir(folder)
        state = get_peft_model_state_dict(self.peft_model, adapter_name=name)
        with naming_the_file(folder / ADAPTER_FILE):
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                      str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        config = copy.copy(self.peft_model.peft_config[name])
        if config.base_model_name_or_path is None:  # PEFT records it for the first adapter only, not add_adapter's
            config.base_model_name_or_path = self.base_model.__dict__.get("name_or_path") or None
        if isinstance(config.target_modules, (set, frozenset)):  # PEFT writes a set in hash order: a run's files
            config.target_modules = sorted(config.target_modules)  # would differ between identical processes
        with naming_the_file(folder / "adapter_config.json"):
            config.save_pretrained(str(tmp))
        if extra is not None:
            extra(tmp)
        fault_point("adapter_save")
        replace_dir_atomic(tmp, folder)
        return folder

    def load(self, name: str, folder: str | Path) -> None:
        """Load weights saved by `save` into the existing adapter `name`."""
        path = Path(folder) / ADAPTER_FILE
        try:
            state = load_file(str(path))
        except Exception as e:
            raise NloraError(f"adapter file {path} is unreadable: {e}") from None
        result = set_peft_model_state_dict(self.peft_model, state, adapter_name=name)
        missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
        if missing or result.unexpected_keys:
            raise NloraError(f"adapter file {path} does not match the model: missing {missing[:3]}, "
                             f"unexpected {list(result.unexpected_keys)[:3]}")
