"""The training step against plain autograd: the gradient `train_task` hands to the optimizer at its first step
equals the gradient of (mean cross-entropy over the answer tokens of the global batch + λ·Σ‖s·B·A‖₁),
computed independently (tests/training_step_case.py), for each model kind, for 1 and 2 processes and for k x b
gradient accumulation. Clipping is off and B starts random, so the penalty has a gradient and no rescaling is hidden."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import training_step_case as case
from nlora.models import load_backbone
from nlora.objectives import make_objective

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-6  # float32: the captured and reference gradients differ by ~3e-7; the gradients are ~0.1


@functools.lru_cache(maxsize=None)
def _reference(name: str, n: int, lam: float = case.LAM):
    return case.reference_step(name, n, lam)


def _assert_close(got: dict, want: dict, label: str) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        diff = (got[key] - value).abs().max().item()
        assert diff <= ATOL, f"{label} {key}: gradient differs by {diff:.2e}"


@pytest.mark.parametrize("shape", case.SHAPES)
@pytest.mark.parametrize("name", case.MODELS)
def test_one_process_step_is_plain_autograd(name, shape):
    n = case.SHAPES[shape][2]
    want = _reference(name, n)
    _assert_close(case.captured_step(name, shape), want, f"{name} {shape}")
    # both terms move the gradient far more than the tolerance, so neither can be lost or rescaled unseen
    task_only = _reference(name, n, 0.0)
    assert max(v.abs().max().item() for v in task_only.values()) > 1e4 * ATOL
    assert max((want[k] - task_only[k]).abs().max().item() for k in want) > 1e4 * ATOL


@pytest.mark.distributed
def test_two_process_step_is_plain_autograd(tmp_path):
    # launched by this test, not in the background of the 1-process cases: on 2 cores the two slow each other down
    # (thread contention) more than running them in turn costs (measured: 18 s together, 13 s in turn)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")  # two processes on a small machine: no thread oversubscription
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(ROOT / "examples" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
         str(Path(case.__file__)), str(tmp_path)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    for name in case.MODELS:
        for shape, (_, _, n) in case.SHAPES.items():
            saved = load_file(str(tmp_path / f"{name}-{shape}.safetensors"))
            got = {tuple(k.split("|")): v for k, v in saved.items()}
            _assert_close(got, _reference(name, n), f"2 processes {name} {shape}")


@pytest.mark.parametrize("name", case.MODELS)
def test_count_terms_counts_the_answer_tokens(name):
    """seq2seq: the label's bytes + </s>; decoder: ' ' + label + eos; encoder: one term per example. Counts
    add up over any split of a step (what the step's normalisation relies on)."""
    backbone = load_backbone(name)
    objective = make_objective(backbone.kind, backbone.tokenizer, 128, 16)
    exs = case.examples(6)
    per_example = {"seq2seq": lambda e: len(e.label.encode()) + 1,
                   "decoder": lambda e: len((" " + e.label).encode()) + 1,
                   "encoder": lambda e: 1}[backbone.kind]
    assert objective.count_terms(objective.collate(exs)) == sum(map(per_example, exs))
    for e in exs:
        assert objective.count_terms(objective.collate([e])) == per_example(e)
    long = case.examples(1)[0].__class__("t", "s", "x" * 40, ("x" * 40,), "p")  # beyond max_target_length
    cut = {"seq2seq": 16, "decoder": 17, "encoder": 1}[backbone.kind]
    assert objective.count_terms(objective.collate([long])) == cut


def test_the_penalty_is_computed_once_per_optimizer_step(monkeypatch):
    """A and B are the same in every micro-batch of a step: with 3 micro-batches the penalty is evaluated as
    often as with one batch (once per adapted layer), and the gradient above is still the reference one."""
    from nlora.methods import n_lora

    calls, real = [], n_lora.lora_l1
    monkeypatch.setattr(n_lora, "lora_l1", lambda *a, **k: calls.append(1) or real(*a, **k))
    counts = {}
    for shape in ("b6", "b2x3"):
        calls.clear()
        case.captured_step("tiny-llama", shape)
        counts[shape] = len(calls)
    layers = len(case.MODELS["tiny-llama"]) * load_backbone("tiny-llama").model.config.num_hidden_layers
    assert counts == {"b6": layers, "b2x3": layers}
