"""HiddenKey ("LoRA Meets Dropout under a Unified Framework", Wang et al., Findings ACL 2024, arXiv 2403.00812) as a
training option of any method (`dropout_scheme: hiddenkey`): while a task trains,
  * DropKey, column-wise: in every attention, each key (a column of the logits, per example and head) is dropped
    with probability `hiddenkey_key_rate` for all queries at once: its logit is set to the mask value before the
    softmax, which renormalises over the kept keys (no rescaling);
  * HiddenCut, element-wise: the hidden representation each transformer block outputs is dropped element by element
    with probability `hiddenkey_hidden_rate` and rescaled by 1 / (1 - rate);
  * each batch runs forward twice (independent drops), and the loss per item (answer token, or example) is
    (CE_1 + CE_2) / 2 + hiddenkey_kl_weight · (KL(p_1 ‖ p_2) + KL(p_2 ‖ p_1)) / 2.

The attention is reached through transformers' attention-function registry, not a patched class: the models whose
code calls `ALL_ATTENTION_FUNCTIONS` (T5, LLaMA, BERT and most current ones) compute attention with the function
named by their config's `_attn_implementation`. The scheme registers `nlora_hiddenkey_<original>` (with the mask
function of the original, so that masks are built as before) and points the configs at it while a task trains. The
registered function computes the original's exact call in evaluation mode, and in training computes attention
eagerly (logits, position bias, mask, the dropped keys, softmax in float32, the model's own attention dropout).
HiddenCut is a forward hook on each transformer block. Both act only in training mode.

A query row whose permitted keys would all be dropped (a causal model's first token, say) keeps them all: a softmax
over no key has no value.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..errors import NloraError

PREFIX = "nlora_hiddenkey_"
SUPPORTED = ("sdpa", "eager")  # originals whose mask format the training path reads
# keywords of attention variants the training path does not compute: refused rather than ignored
UNSUPPORTED_KEYWORDS = ("sliding_window", "softcap", "s_aux")
_SCHEMES: dict[int, "HiddenKey"] = {}  # id(config) -> the scheme installed on the model that holds it


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under PEFT's wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_base(model: torch.nn.Module) -> None:
    """Refuse a base whose attention the scheme cannot reach, with one line naming why."""
    model = base_model(model)
    implementation = model.config._attn_implementation
    if implementation not in SUPPORTED:
        raise NloraError(f"option 'dropout_scheme': hiddenkey computes attention itself in training and supports "
                         f"attn_implementation sdpa or eager, not {implementation}; set --attn-implementation sdpa")
    code = sys.modules[type(model).__module__]
    if not hasattr(code, "ALL_ATTENTION_FUNCTIONS") or not hasattr(code, "eager_attention_forward"):
        raise NloraError(f"option 'dropout_scheme': {type(model).__name__} does not compute attention through "
                         "transformers' AttentionInterface, so DropKey cannot reach its attention logits; use "
                         "dropout_scheme none with this base")
    if not attention_blocks(model):
        raise NloraError(f"option 'dropout_scheme': cannot find the transformer blocks of {type(model).__name__} "
                         "(its _no_split_modules) for HiddenCut; use dropout_scheme none with this base")


def attention_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks (classes in `_no_split_modules`) that hold an attention: BERT's embeddings are not one."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names and m is not model
            and any(type(s).__name__.endswith("Attention") for s in m.modules())]


def bidirectional_kl(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(KL(p_1 ‖ p_2) + KL(p_2 ‖ p_1)) / 2 of each row (items × classes), p_i = softmax of the logits, in float64.
    Entries whose logit is not finite in both (an encoder's scores off the example's options) are outside both
    distributions."""
    inside = torch.isfinite(first) & torch.isfinite(second)
    log_p = first.double().masked_fill(~inside, float("-inf")).log_softmax(-1).masked_fill(~inside, 0)
    log_q = second.double().masked_fill(~inside, float("-inf")).log_softmax(-1).masked_fill(~inside, 0)
    p, q = log_p.exp().masked_fill(~inside, 0), log_q.exp().masked_fill(~inside, 0)
    return ((p - q) * (log_p - log_q)).sum(-1) / 2


def permitted_keys(attention_mask: torch.Tensor | None, causal: bool, q_len: int, k_len: int,
                   device) -> torch.Tensor | None:
    """Which (query, key) pairs the model's mask allows, as a bool tensor broadcastable to the logits; None: all.
    A bool mask allows True; an additive one its entries above half the float minimum (the mask value); None
    with a causal module is sdpa's upper-left causal pattern."""
    if attention_mask is None:
        if not (causal and q_len > 1):
            return None
        return (torch.arange(q_len, device=device)[:, None] >= torch.arange(k_len, device=device)[None, :])[None, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def dropkey_logits(logits: torch.Tensor, permitted: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
    """The logits with every dropped key's column set to the mask value; `keep` (batch, heads, 1, keys) is True
    for the kept keys. A row left with no permitted key keeps the keys it had."""
    allowed = torch.ones_like(logits, dtype=torch.bool) if permitted is None else permitted.expand_as(logits)
    kept = allowed & keep
    kept = torch.where(kept.any(-1, keepdim=True), kept, allowed)
    return logits.masked_fill(~kept, torch.finfo(logits.dtype).min)


def dropkey_attention(module, query, key, value, attention_mask, key_rate: float, scaling=None, dropout=0.0,
                      position_bias=None, is_causal=None, **kwargs):
    """Attention in training, computed eagerly as the model's own eager function does, with DropKey: the keep
    mask of the keys is one uniform draw of shape (batch, heads, 1, keys) from the global generator."""
    bad = [k for k in UNSUPPORTED_KEYWORDS if kwargs.get(k) is not None]
    if bad:
        raise NloraError(f"option 'dropout_scheme': hiddenkey does not compute attention with {bad[0]} "
                         f"({type(module).__name__}); use dropout_scheme none with this base")
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped keys and values, repeated per query head
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    logits = torch.matmul(query, key.transpose(2, 3)) * scaling
    if position_bias is not None:
        logits = logits + position_bias
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        logits = logits + attention_mask
    causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
    permitted = permitted_keys(attention_mask, causal, query.shape[2], key.shape[2], query.device)
    batch, heads, _, keys = logits.shape
    keep = torch.rand(batch, heads, 1, keys, device=logits.device) >= key_rate
    logits = dropkey_logits(logits, permitted, keep)
    weights = logits.softmax(-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=True)  # the model's own attention dropout
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _original_function(module: torch.nn.Module, original: str):
    if original == "eager":  # the model's own eager function, as its attention module falls back to
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[original]


def _attention_for(original: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        scheme = _SCHEMES.get(id(getattr(module, "config", None)))
        if scheme is None or not module.training:
            return _original_function(module, original)(module, query, key, value, attention_mask, **kwargs)
        return scheme.train_attention(module, query, key, value, attention_mask, **kwargs)
    attention.__name__ = PREFIX + original
    return attention


def _register(original: str) -> str:
    name = PREFIX + original
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _attention_for(original))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


class HiddenKey:
    """Installed on a model for one task's training (`close` undoes it): the attention of its configs points at
    the scheme's function, and each transformer block has a HiddenCut hook."""

    def __init__(self, model: torch.nn.Module, key_rate: float, hidden_rate: float, kl_weight: float):
        check_base(model)
        model = base_model(model)
        self.key_rate, self.hidden_rate, self.kl_weight = key_rate, hidden_rate, kl_weight
        self.attention_calls = 0  # training calls: a base whose attention bypasses the registry makes none
        configs = {id(c): c for m in model.modules()
                   if (c := getattr(m, "config", None)) is not None and hasattr(c, "_attn_implementation")}
        self._originals = {key: (c, c._attn_implementation) for key, c in configs.items()}
        for key, (config, original) in self._originals.items():
            config._attn_implementation = _register(original)
            _SCHEMES[key] = self
        self._hooks = [block.register_forward_hook(self._hidden_cut) for block in attention_blocks(model)]

    def train_attention(self, module, query, key, value, attention_mask, **kwargs):
        self.attention_calls += 1
        return dropkey_attention(module, query, key, value, attention_mask, self.key_rate, **kwargs)

    def _hidden_cut(self, module, args, output):
        if not module.training or self.hidden_rate == 0:
            return None
        if isinstance(output, torch.Tensor):
            return F.dropout(output, p=self.hidden_rate, training=True)
        return (F.dropout(output[0], p=self.hidden_rate, training=True), *output[1:])

    def check_reached(self) -> None:
        """After a training forward: the attention went through the scheme's function."""
        if self.attention_calls == 0:
            raise NloraError("option 'dropout_scheme': the base model's attention did not go through transformers' "
                             "AttentionInterface, so DropKey cannot act; use dropout_scheme none with this base")

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for key, (config, original) in self._originals.items():
            config._attn_implementation = original
            _SCHEMES.pop(key, None)
        self._originals = {}
