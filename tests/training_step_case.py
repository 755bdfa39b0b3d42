"""The first optimizer step of `train_task`, captured, and the same gradient by plain autograd.

Shared by tests/test_training_step.py (1 process, in the test's own process) and run as a script under
`accelerate launch` for 2 processes: `python -m accelerate.commands.launch ... training_step_case.py OUT_DIR`
writes each case's captured gradients to OUT_DIR/<case>.safetensors (from the main process).

The reference is built without nlora's objectives, collation or training loop: each example is run alone and
unpadded through a fresh base model whose adapted layers add Σ_adapters s·B·A·x by a forward hook, the loss is
formed from the logits by hand, and autograd gives the gradient of
    mean cross-entropy over the answer tokens of the whole step + λ · Σ_layers ‖s·B_t·A_t‖₁
with respect to the current adapter's factors."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from nlora import RunConfig
from nlora.adapters import ContinualAdapters
from nlora.methods import get_method
from nlora.models import load_backbone
from nlora.objectives import make_objective
from nlora.tasks.data import Example
from nlora.train.engine import make_accelerator
from nlora.train.loop import train_task

MODELS = {"tiny-t5": ["q", "v"], "tiny-llama": ["q_proj", "v_proj"], "tiny-bert": ["query", "value"]}
R, ALPHA, LAM = 4, 8.0, 0.01
SCALING = ALPHA / R
# (batch_size, accumulation steps, examples): one optimizer step covers every example, so the step's gradient
# does not depend on the data order. 5 examples in micro-batches of 2: the last micro-batch holds one example,
# so with 2 processes one process has none of it.
SHAPES = {"b6": (6, 1, 6), "b2x3": (2, 3, 5)}
OPTIONS = ("amber", "cobalt", "jade stone")
SENTENCES = ["the sailor today again, at dawn", "a diver", "the captain quietly somehow, in fog, by the sea",
             "pilot", "the merchant still", "fisher maybe indeed, at dusk"]


def examples(n: int) -> list[Example]:
    """Answers of different token counts (5, 6, 10 bytes), so per-process or per-micro-batch means would differ
    from the step's mean."""
    out = []
    for i in range(n):
        label = OPTIONS[i % 3]
        prompt = f"Classify.\nOptions: {', '.join(OPTIONS)}\nText: {SENTENCES[i]}\nAnswer:"
        out.append(Example("t", SENTENCES[i], label, OPTIONS, prompt))
    return out


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """The tiny models' own dropout (T5, BERT: 0.1) off, so that a training step is deterministic."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr in ("dropout", "attention_dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    return model


def lora_values(name: str) -> dict[tuple[str, str, str], torch.Tensor]:
    """(layer, adapter, "A"|"B") -> random values; B is non-zero, so the L1 penalty has a gradient at step 1."""
    base = load_backbone(name).model
    gen = torch.Generator().manual_seed(7)
    out = {}
    for layer, module in base.named_modules():
        if isinstance(module, torch.nn.Linear) and layer.rsplit(".", 1)[-1] in MODELS[name]:
            for adapter in ("task0", "task1"):
                out[layer, adapter, "A"] = torch.randn(R, module.in_features, generator=gen) * 0.1
                out[layer, adapter, "B"] = torch.randn(module.out_features, R, generator=gen) * 0.1
    return out


def _split(param_name: str) -> tuple[str, str, str] | None:
    """peft's 'base_model.model.<layer>.lora_A.<adapter>.weight' -> (layer, adapter, 'A')."""
    for which in ("A", "B"):
        marker = f".lora_{which}."
        if marker in param_name and param_name.endswith(".weight"):
            head, tail = param_name.split(marker)
            return head.removeprefix("base_model.model."), tail.removesuffix(".weight"), which
    return None


def captured_step(name: str, shape: str) -> dict[tuple[str, str, str], torch.Tensor]:
    """Phase 1 of n-lora (task0 frozen and active, task1 trained) through `train_task`; returns the gradients
    the optimizer sees at its first step."""
    batch_size, accum, n = SHAPES[shape]
    config = RunConfig(model=name, method="n-lora", tasks=["a", "b"], lora_r=R, lora_alpha=ALPHA,
                       lora_dropout=0.0, target_modules=MODELS[name], lambda_=LAM, batch_size=batch_size,
                       gradient_accumulation_steps=accum, max_grad_norm=None, epochs=1, lr=1e-3,
                       device="cpu", max_source_length=128, max_target_length=16)
    backbone = load_backbone(name)
    without_dropout(backbone.model)
    adapters = ContinualAdapters(backbone.model, backbone.kind, R, ALPHA, 0.0, MODELS[name])
    values = lora_values(name)
    params = {}
    for adapter in ("task0", "task1"):  # each set right after it is added: task0 is frozen by the time task1 is
        adapters.add(adapter)
        with torch.no_grad():
            for pname, p in adapters.model.named_parameters():
                key = _split(pname)
                if key is not None and key[1] == adapter:
                    p.copy_(values[key])
                    params[key] = p
    assert set(params) == set(values)
    objective = make_objective(backbone.kind, backbone.tokenizer, config.max_source_length,
                               config.max_target_length)
    method = get_method("n-lora")(config)
    adapters.activate(method.active_for_training(1, adapters.names), trainable="task1")
    accelerator = make_accelerator(config)

    seen = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        if not seen:
            seen.append({id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                         if p.grad is not None})
        return real_step(self, *args, **kwargs)

    torch.optim.AdamW.step = step
    try:
        train_task(adapters, objective, method, examples(n), config, 1, accelerator, progress=False)
    finally:
        torch.optim.AdamW.step = real_step
    assert len(seen) == 1, "no optimizer step was taken"
    by_id = {id(p): key for key, p in params.items()}
    grads = {by_id[i]: g for i, g in seen[0].items()}
    assert {k[1] for k in grads} == {"task1"}, "only the current adapter has gradients"
    return grads


def reference_step(name: str, n: int, lam: float = LAM) -> dict[tuple[str, str, str], torch.Tensor]:
    """d/d(task1's factors) of (mean CE over all answer tokens of the n examples + lam · Σ‖s·B·A‖₁)."""
    backbone = load_backbone(name)
    model, tok = without_dropout(backbone.model), backbone.tokenizer
    values = lora_values(name)
    factors = {k: v.clone().requires_grad_(k[1] == "task1") for k, v in values.items()}
    layers = {k[0] for k in factors}

    def add_lora(layer):
        def hook(module, inputs, output):
            x = inputs[0]
            return output + sum(SCALING * (x @ factors[layer, a, "A"].T) @ factors[layer, a, "B"].T
                                for a in ("task0", "task1"))
        return hook

    for layer, module in model.named_modules():
        if layer in layers:
            module.register_forward_hook(add_lora(layer))
    exs = examples(n)
    if backbone.kind == "encoder":
        total, count = _encoder_losses(model, tok, exs)
    else:
        total, count = torch.zeros(()), 0
        for e in exs:
            nll, tokens = _generative_nll(backbone.kind, model, tok, e)
            total, count = total + nll, count + tokens
    loss = total / count
    penalty = sum((SCALING * factors[layer, "task1", "B"] @ factors[layer, "task1", "A"]).abs().sum()
                  for layer in layers)
    loss = loss + lam * penalty
    current = [k for k in factors if k[1] == "task1"]
    grads = torch.autograd.grad(loss, [factors[k] for k in current])
    return dict(zip(current, grads))


def _generative_nll(kind, model, tok, e: Example) -> tuple[torch.Tensor, int]:
    """Summed -log p of the answer tokens of one unpadded example, and their count."""
    if kind == "seq2seq":  # the decoder reads <pad> then the label, and predicts the label then </s>
        src = torch.tensor([tok(e.prompt)["input_ids"]])
        target = tok(text_target=e.label)["input_ids"]
        decoder_in = torch.tensor([[model.config.decoder_start_token_id] + target[:-1]])
        logits = model(input_ids=src, decoder_input_ids=decoder_in).logits[0]
        answer = torch.tensor(target)
        return -logits.log_softmax(-1).gather(-1, answer[:, None]).sum(), len(target)
    prompt = tok(e.prompt)["input_ids"]
    prompt = prompt[:-1] if prompt[-1] == tok.eos_token_id else prompt
    answer = tok(" " + e.label, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    logits = model(input_ids=torch.tensor([prompt + answer])).logits[0]
    predicting = logits[len(prompt) - 1: len(prompt) + len(answer) - 1]  # position t predicts token t+1
    return -predicting.log_softmax(-1).gather(-1, torch.tensor(answer)[:, None]).sum(), len(answer)


def _encoder_losses(model, tok, exs: list[Example]) -> tuple[torch.Tensor, int]:
    """Cross-entropy over each example's options of 20 · cos(mean-pooled prompt, mean-pooled option)."""
    def embed(text):
        hidden = model(input_ids=torch.tensor([tok(text)["input_ids"]])).last_hidden_state[0]
        return F.normalize(hidden.mean(0), dim=-1)

    total = torch.zeros(())
    for e in exs:
        prompt = embed(e.prompt)
        logits = torch.stack([20.0 * prompt @ embed(o) for o in e.options])
        total = total - logits.log_softmax(-1)[e.options.index(e.label)]
    return total, len(exs)


def main(out_dir: str) -> None:
    from accelerate import PartialState
    from safetensors.torch import save_file

    for name in MODELS:
        for shape in SHAPES:
            grads = captured_step(name, shape)
            if PartialState().is_main_process:
                save_file({"|".join(k): v.contiguous() for k, v in grads.items()},
                          str(Path(out_dir) / f"{name}-{shape}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
