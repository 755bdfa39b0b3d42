"""Full fine-tuning (nlora.methods.seq_ft on nlora.full_model): every base weight trains where a LoRA method leaves
the base untouched, its update is of full rank where SeqLoRA's is of rank r, only the latest model stays saved
unless asked, a run killed between tasks resumes to the uninterrupted run from the one model kept, bf16 weights with
gradient checkpointing train and save in bf16, 8-bit AdamW, and the combinations that cannot train the base are
refused before anything is written."""

from __future__ import annotations

import inspect
import json
import os

import pytest
import torch

import fresh_process
from lora_reference import load_saved_model
from nlora import RunConfig
from nlora.adapters import ContinualAdapters
from nlora.cli import main
from nlora.errors import NloraError
from nlora.full_model import FullModel, load_weights
from nlora.methods import get_method, resolve
from nlora.models import default_target_modules, load_backbone
from nlora.objectives import make_objective
from nlora.preflight import check_trained_state
from nlora.tasks.data import load_task
from nlora.train.engine import make_accelerator
from nlora.train.loop import train_task
from same_run import assert_same_run

fresh_process.start()

RUN = ["--model", "tiny-t5", "--tasks", "harbor,orchard", "--max-train-samples", "8", "--max-eval-samples", "4",
       "--batch-size", "4", "--eval-batch-size", "4", "--epochs", "1", "--checkpoint-steps", "1",
       "--max-target-length", "4", "--device", "cpu", "--quiet", "--log-steps", "1"]


def _train(method_name: str, synthetic_dir, **options):
    """Phase 0 of `method_name` on tiny-t5 (2 steps, rank 2): (base weights before, the model's trainable state)."""
    config = RunConfig(method=method_name, model="tiny-t5", tasks=["harbor"], batch_size=4, lr=1e-2, device="cpu",
                       lora_r=2, lora_alpha=2, lora_dropout=0.0, checkpoint_steps=0, **options)
    method = resolve(config)
    backbone = load_backbone("tiny-t5")
    before = {n: p.detach().clone() for n, p in backbone.model.named_parameters()}
    if method.trains == "base":
        state = FullModel(backbone.model)
    else:
        state = ContinualAdapters(backbone.model, backbone.kind, 2, 2, 0.0, default_target_modules("t5"))
    state.add(method.adapter_name(0))
    objective = make_objective(backbone.kind, backbone.tokenizer, 256, 4)
    examples = load_task(synthetic_dir, "harbor", max_train=8).train
    train_task(state, objective, method, examples, config, 0, make_accelerator(config), progress=False)
    return before, state


def _rank(matrix: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(matrix.double(), rtol=1e-6))


def test_seq_ft_trains_every_base_weight_with_a_full_rank_update_where_seq_lora_trains_rank_r(synthetic_dir,
                                                                                                monkeypatch):
    made = []  # the loop takes its optimizer from the method (Method.optimizer)
    original = get_method("seq-ft").optimizer
    monkeypatch.setattr(get_method("seq-ft"), "optimizer",
                        lambda self, params, config: made.append(len(params)) or original(self, params, config))
    before, full = _train("seq-ft", synthetic_dir)
    after = dict(full.model.named_parameters())
    assert made == [len(after)] and after.keys() == before.keys()
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"base weights SeqFT left unchanged: {unchanged}"
    layer = "encoder.block.0.layer.0.SelfAttention.q.weight"  # 64 x 64
    assert _rank(after[layer].detach() - before[layer]) > 2

    before, lora = _train("seq-lora", synthetic_dir)
    base = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p
            for n, p in lora.model.named_parameters() if "lora_" not in n}
    assert base.keys() == before.keys()
    assert all(torch.equal(before[n], base[n]) for n in before), "a LoRA method changed a base weight"
    (f,) = [f for f in lora.factors("shared") if f.layer.endswith(layer.removesuffix(".weight"))]
    delta = f.scaling * f.B.detach() @ f.A.detach()
    assert delta.abs().max() > 0 and _rank(delta) <= 2


@pytest.mark.parametrize("name", ["add", "activate", "save", "load", "factors", "lora_layers",
                                  "trainable_parameters"])
def test_full_model_takes_what_the_engine_passes_to_adapters(name):
    """The engine calls FullModel where it calls ContinualAdapters: every argument of the one the other takes."""
    theirs = inspect.signature(getattr(ContinualAdapters, name)).parameters
    ours = inspect.signature(getattr(FullModel, name)).parameters
    assert list(ours) == list(theirs), name


def test_load_weights_refuses_a_model_of_other_shape(tmp_path):
    t5, llama = load_backbone("tiny-t5"), load_backbone("tiny-llama")
    t5.model.save_pretrained(tmp_path)
    with pytest.raises(NloraError, match="does not match the model"):
        load_weights(llama.model, tmp_path)
    with pytest.raises(NloraError, match="holds no model.safetensors"):
        load_weights(t5.model, tmp_path / "nothing")


def _argv(data, out, *extra):
    return ["run", "--method", "seq-ft", *RUN, *extra, "--data-dir", str(data), "--output-dir", str(out)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic_dir):
    out = tmp_path_factory.mktemp("seq-ft") / "run"
    assert main(_argv(synthetic_dir, out)) == 0
    return out


def test_only_the_final_model_stays_saved_by_default(reference):
    assert [p.name for p in (reference / "adapters").iterdir()] == ["1-orchard"]
    assert sorted(p.name for p in (reference / "predictions").iterdir()) == ["0-harbor", "1-orchard"]
    assert not (reference / "checkpoint").exists()
    with pytest.raises(NloraError, match="keeps only its latest model"):
        from nlora.trained_run import read_run

        read_run(reference, upto=1)


@pytest.mark.parametrize("fault", ["model_saved:2", "task_trained:2"])
def test_killed_between_tasks_resumes_from_the_one_model_kept(tmp_path, synthetic_dir, reference, fault):
    """model_saved:2: task 2's model saved, task 1's not yet removed (nor task 2's checkpoint); task_trained:2:
    task 2's model saved and task 1's removed, task 2 not evaluated: the resumed run must start from task 2's
    model, not train task 1 again."""
    out = tmp_path / "run"
    killed = fresh_process.run(fresh_process.nlora_main, _argv(synthetic_dir, out), log=tmp_path / "k.log",
                               env=dict(os.environ, NLORA_FAULT=fault))
    assert killed.returncode == -9, killed.output
    saved = sorted(p.name for p in (out / "adapters").iterdir())
    assert saved == (["0-harbor", "1-orchard"] if fault.startswith("model_saved") else ["1-orchard"])
    assert (out / "checkpoint").exists() == fault.startswith("model_saved")
    assert main(["resume", str(out), "--quiet"]) == 0
    assert not (out / "checkpoint").exists()
    assert_same_run(reference, out, log=True)  # the same files: the earlier model is gone


@pytest.mark.xfail(reason="with transformers 5.25 the bf16 model reloaded from its folder generates other tokens "
                          "than the run's own evaluation on some examples; "
                          "found at nlora 0c6be18 too, not yet explained", strict=False)
def test_bf16_with_checkpointing_keeps_every_task_s_model_in_bf16(tmp_path, synthetic_dir):
    out = tmp_path / "run"
    argv = ["run", "--method", "seq-ft", *RUN, "--seqft-save-every-task", "--dtype", "bfloat16",
            "--gradient-checkpointing", "--lr", "1e-2", "--data-dir", str(synthetic_dir), "--output-dir", str(out)]
    argv[argv.index("tiny-t5")] = "tiny-llama"
    assert main(argv) == 0
    from nlora.eval.evaluate import evaluate
    from nlora.trained_run import read_run_config
    from nlora.runner import load_tasks

    config = read_run_config(out)
    tasks = load_tasks(config)
    base = load_backbone("tiny-llama")
    objective = make_objective(base.kind, base.tokenizer, config.max_source_length, config.max_target_length,
                               config.eval_mode)
    previous = {n: p.to(torch.bfloat16) for n, p in base.model.named_parameters()}
    for k, task in enumerate(tasks):  # every task's model kept, loaded with plain transformers
        folder = out / "adapters" / f"{k}-{task.name}"
        model = load_saved_model(folder, "decoder")
        weights = dict(model.named_parameters())
        assert {p.dtype for p in weights.values()} == {torch.bfloat16}
        assert all(not torch.equal(weights[n], previous[n]) for n in previous), f"task {k} left weights unchanged"
        previous = {n: p.detach().clone() for n, p in weights.items()}
        for j in range(k + 1):
            _, rows = evaluate(objective, model, tasks[j].test, config.eval_batch_size, progress=False)
            path = out / "predictions" / f"{k}-{task.name}" / f"{tasks[j].name}.jsonl"
            assert rows == [json.loads(line) for line in path.open()], path
    train = [json.loads(line) for line in (out / "log.jsonl").open() if '"train"' in line]
    assert train and all(line["loss"] == line["loss"] for line in train)  # finite, not NaN


def test_mtl_ft_trains_once_on_the_union(synthetic_dir):
    config = RunConfig(method="mtl-ft", tasks=["harbor", "orchard", "library"])
    method = resolve(config)
    tasks = [load_task(synthetic_dir, name, max_train=3) for name in config.tasks]
    assert method.phases(3) == [2] and method.trains == "base"
    assert method.training_examples(tasks, 2) == [e for t in tasks for e in t.train]


@pytest.mark.parametrize("option, value, message", [
    ("sharding", "fsdp2", "option 'sharding'"),
    ("load_in_4bit", True, "option 'load_in_4bit'"),
    ("train_factors", "A", "option 'train_factors'"),
    ("grad_mask", "migu", "option 'grad_mask'"),
])
def test_what_cannot_train_the_base_is_refused(option, value, message):
    config = RunConfig(method="seq-ft", tasks=["harbor"], **{option: value})
    with pytest.raises(NloraError, match=message):
        check_trained_state(config, resolve(config))
    check_trained_state(RunConfig(method="seq-lora", tasks=["harbor"], **{option: value}),
                        resolve(RunConfig(method="seq-lora", tasks=["harbor"])))  # a LoRA method may


def test_8bit_adamw_without_bitsandbytes_is_refused_before_any_write(tmp_path, synthetic_dir, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes"
                        else real(name, *a))
    out = tmp_path / "run"
    assert main(_argv(synthetic_dir, out, "--seqft-optimizer", "adamw8bit")) == 2
    assert "option 'seqft_optimizer': adamw8bit needs bitsandbytes" in capsys.readouterr().err
    assert not out.exists()


def test_8bit_adamw_trains_and_resumes_exactly(tmp_path, synthetic_dir):
    bitsandbytes = pytest.importorskip("bitsandbytes")
    config = RunConfig(method="seq-ft", tasks=["harbor"], seqft_optimizer="adamw8bit", lr=1e-3)
    params = [torch.nn.Parameter(torch.randn(64, 128))]
    assert isinstance(resolve(config).optimizer(params, config), bitsandbytes.optim.AdamW8bit)
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert main(_argv(synthetic_dir, reference, "--seqft-optimizer", "adamw8bit")) == 0
    killed = fresh_process.run(fresh_process.nlora_main, _argv(synthetic_dir, out, "--seqft-optimizer", "adamw8bit"),
                               log=tmp_path / "k.log", env=dict(os.environ, NLORA_FAULT="train_step:4"))
    assert killed.returncode == -9, killed.output
    assert (out / "checkpoint").is_dir()
    assert main(["resume", str(out), "--quiet"]) == 0
    assert_same_run(reference, out, log=True)
