"""LwF (nlora.methods.lwf): the KL term against a hand computation and its gradient, the loss of a batch against
the items and teachers rebuilt by hand on the three model kinds (the decoder's shift included), the teacher of each
layout, and runs where LwF keeps the outputs on the first task closer to the teacher's than its base method does."""

import math
from types import SimpleNamespace

import pytest
import torch

from lora_reference import add_adapters
from same_run import assert_same_run
from nlora import RunConfig
from nlora.adapters import ContinualAdapters
from nlora.cli import main
from nlora.methods import get_method
from nlora.methods.lwf import TEACHER, distillation_kl
from nlora.models import default_target_modules, load_backbone
from nlora.objectives import IGNORE, make_objective
from nlora.tasks.data import load_task

INF = float("inf")


def _hand_kl(teacher, student, T):
    """Σ_c q_c·log(q_c/p_c) over the classes where the teacher's logit is finite, in plain Python."""
    keep = [c for c, z in enumerate(teacher) if math.isfinite(z)]

    def softmax(z):
        e = [math.exp(z[c] / T) for c in keep]
        return [v / sum(e) for v in e]
    q, p = softmax(teacher), softmax(student)
    return sum(qi * math.log(qi / pi) for qi, pi in zip(q, p))


def test_kl_matches_a_hand_computation():
    teacher = [[1.0, 2.0, 3.0], [0.3, -INF, -1.2], [4.0, 0.0, -INF]]
    student = [[0.5, -1.0, 2.0], [-0.7, -INF, 0.4], [0.0, 1.0, -INF]]
    for T in (1.0, 2.0, 3.5):
        kl = distillation_kl(torch.tensor(student), torch.tensor(teacher), T)
        expected = [_hand_kl(t, s, T) for t, s in zip(teacher, student)]
        assert kl.tolist() == pytest.approx(expected, rel=1e-5)
    same = distillation_kl(torch.tensor(teacher), torch.tensor(teacher), 2.0)
    assert same.abs().max() < 1e-6


def test_gradient_is_temperature_times_p_minus_q():
    """d(T²·KL)/dz = T·(softmax(z/T) − softmax(z_teacher/T)) on the teacher's classes, 0 elsewhere, never NaN."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(4, 5, generator=g)
    teacher[1, 2] = teacher[3, 0] = teacher[3, 4] = -INF  # an encoder's scores off the example's options
    student = torch.randn(4, 5, generator=g).masked_fill(torch.isinf(teacher), -INF).requires_grad_()
    T = 2.0
    (T ** 2 * distillation_kl(student, teacher, T).sum()).backward()
    finite = torch.isfinite(teacher)

    def softmax(z):
        return (z / T).masked_fill(~finite, -INF).softmax(-1)
    expected = (T * (softmax(student.detach()) - softmax(teacher))).masked_fill(~finite, 0)
    assert torch.isfinite(student.grad).all()
    torch.testing.assert_close(student.grad, expected)


# ---------------------------------------------------------------------------------------------- a batch's loss
def _context(model_name, synthetic_dir, base, merge_fp32=True):
    bb = load_backbone(model_name)
    adapters = ContinualAdapters(bb.model, bb.kind, r=2, alpha=4, dropout=0.0,
                                 target_modules=default_target_modules(bb.model_type), merge_fp32=merge_fp32)
    objective = make_objective(bb.kind, bb.tokenizer, 256, 6)
    tasks = [load_task(synthetic_dir, name, max_train=4) for name in ("harbor", "orchard")]
    accelerator = SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1)
    config = RunConfig(method="lwf", tasks=["harbor", "orchard"], lwf_base=base, lwf_lambda=3.0,
                       lwf_temperature=1.5)
    config.validate()
    return SimpleNamespace(adapters=adapters, objective=objective, accelerator=accelerator, device="cpu",
                           tasks=tasks, config=config, bb=bb), get_method("lwf")(config)


def _randomize(adapters, name, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for f in adapters.factors(name):
            f.A.copy_(torch.randn(f.A.shape, generator=g) * scale)
            f.B.copy_(torch.randn(f.B.shape, generator=g) * scale)


def _item_logits_by_hand(ctx, model, batch):
    """(items, classes) in batch order: a seq2seq model's logit at each labelled position; a decoder's logit at
    position t for the label at t + 1 (the full, unshifted forward); an encoder's option scores per example."""
    kind = ctx.bb.kind
    with torch.no_grad():
        if kind == "encoder":
            return ctx.objective.scores(model, batch)[batch["target"] != IGNORE]
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask")},
                       **({"labels": batch["labels"]} if kind == "seq2seq" else {})).logits
    rows = []
    for i in range(logits.shape[0]):
        labels = batch["labels"][i]
        for t in range(labels.shape[0]):
            if kind == "seq2seq" and labels[t] != IGNORE:
                rows.append(logits[i, t])
            if kind == "decoder" and t + 1 < labels.shape[0] and labels[t + 1] != IGNORE:
                rows.append(logits[i, t])
    return torch.stack(rows)


@pytest.mark.parametrize("base,fold", [("inc-lora", None), ("inc-lora", "merge"), ("inc-lora", "concat"),
                                       ("seq-lora", None)])
@pytest.mark.parametrize("model_name", ["tiny-t5", "tiny-llama", "tiny-bert"])
def test_batch_loss_is_the_kl_to_the_teacher_over_the_answer_items(tmp_path, synthetic_dir, model_name, base, fold):
    """The teacher of inc-lora also with the first adapter folded (merged into the base weights, or one frozen
    concatenated path)."""
    ctx, method = _context(model_name, synthetic_dir, base, merge_fp32=fold != "concat")
    ad = ctx.adapters
    first = ad.add(method.adapter_name(0))
    _randomize(ad, first, 0)
    batch = ctx.objective.collate(ctx.tasks[1].train)
    ad.model.eval()  # no dropout: the training pass and the hand reference see the same model
    assert method.batch_loss(0, batch, ctx.objective.forward(ad.model, batch), ctx) is None  # no teacher yet
    teacher_by_hand = _item_logits_by_hand(ctx, ad.model, batch)  # the model as task 1 begins
    if fold:
        ad.fold({first: ad.save(first, tmp_path / first)})
        assert ad.fold_form == fold
    if base == "inc-lora":
        ad.add(method.adapter_name(1))
    ad.activate(ad.names, trainable=ad.current)
    method.before_task(1, ctx)
    _randomize(ad, ad.current, 1)  # training moves the adapter; the teacher stays
    out = ctx.objective.forward(ad.model, batch)
    loss = method.batch_loss(1, batch, out, ctx)
    student_by_hand = _item_logits_by_hand(ctx, ad.model, batch)
    assert teacher_by_hand.shape == student_by_hand.shape == (out.items, teacher_by_hand.shape[1])
    assert not torch.allclose(teacher_by_hand, student_by_hand)
    expected = 3.0 * 1.5 ** 2 * sum(_hand_kl(t.tolist(), s.tolist(), 1.5)
                                    for t, s in zip(teacher_by_hand.double(), student_by_hand.double()))
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    loss.backward()  # the gradient reaches the trained adapter only
    assert all(f.B.grad is not None for f in ad.factors(ad.current))
    assert all(p.grad is None for n, p in ad.model.named_parameters() if not p.requires_grad)


def test_the_shared_teacher_is_a_frozen_inactive_copy(synthetic_dir):
    ctx, method = _context("tiny-bert", synthetic_dir, "seq-lora")
    ad = ctx.adapters
    ad.add("shared", factors="B")
    _randomize(ad, "shared", 0)
    ad.activate(ad.names, trainable="shared", factors="B")
    method.before_task(1, ctx)
    trains = {n for n, p in ad.model.named_parameters() if p.requires_grad}
    assert trains == {n for n in trains if ".lora_B.shared." in n} and trains  # as activate left it
    assert ad.names == ["shared"]
    layers = [m for _, m in ad.lora_layers()]
    assert all(m.active_adapters == ["shared"] for m in layers)
    for f, copy in zip(ad.factors("shared"), ad.factors(TEACHER)):
        assert torch.equal(f.A, copy.A) and torch.equal(f.B, copy.B) and not copy.B.requires_grad
    _randomize(ad, "shared", 1)
    method.before_task(2, ctx)  # the next task's teacher: the adapter as it is now
    assert all(torch.equal(f.B, copy.B) for f, copy in zip(ad.factors("shared"), ad.factors(TEACHER)))


# ---------------------------------------------------------------------------------------------- runs
def _first_task_drift(run, adapter_sets, tasks_dir):
    """Mean KL(model after task 1 ‖ model after task 2) over the answer tokens of the first task's test examples
    (teacher forcing on the gold answers), each model rebuilt from saved adapter folders."""
    folders = sorted((run / "adapters").iterdir())
    logits = []
    for names in adapter_sets:
        bb = load_backbone("tiny-llama")
        model = add_adapters(bb.model, [folders[i] for i in names]).eval()
        objective = make_objective(bb.kind, bb.tokenizer, 256, 6)
        batch = objective.collate(load_task(tasks_dir, "harbor", max_test=12).test)
        logits.append(_item_logits_by_hand(SimpleNamespace(bb=bb, objective=objective), model, batch))
    return distillation_kl(logits[1], logits[0], 1.0).mean().item()


@pytest.mark.parametrize("base,layout", [("inc-lora", [[0], [0, 1]]), ("seq-lora", [[0], [1]])])
def test_lwf_keeps_the_first_task_closer_to_the_teacher_than_its_base(tmp_path, synthetic_dir, base, layout):
    """tiny-llama has no dropout of its own, so the teacher's outputs are what the trained model starts from."""
    common = ["--model", "tiny-llama", "--tasks", "harbor,orchard", "--data-dir", str(synthetic_dir),
              "--max-train-samples", "16", "--max-eval-samples", "2", "--max-target-length", "4",
              "--batch-size", "4", "--epochs", "1", "--lr", "1e-2", "--lora-dropout", "0", "--device", "cpu",
              "--quiet"]
    assert main(["run", "--method", base, *common, "--output-dir", str(tmp_path / "base")]) == 0
    assert main(["run", "--method", "lwf", "--lwf-base", base, "--lwf-lambda", "100", *common,
                 "--output-dir", str(tmp_path / "lwf")]) == 0
    first = "adapters/0-harbor/adapter_model.safetensors"
    assert (tmp_path / "base" / first).read_bytes() == (tmp_path / "lwf" / first).read_bytes()  # no teacher yet
    saved = (tmp_path / "lwf" / "adapters" / "1-orchard" / "adapter_model.safetensors").read_bytes()
    assert TEACHER.encode() not in saved  # the teacher is never saved
    drift_base = _first_task_drift(tmp_path / "base", layout, synthetic_dir)
    drift_lwf = _first_task_drift(tmp_path / "lwf", layout, synthetic_dir)
    assert drift_lwf < 0.2 * drift_base


class Stop(Exception):
    pass


def test_stacked_lwf_stopped_mid_task_and_resumed_ends_the_same(tmp_path, synthetic_dir, monkeypatch):
    """The conformance kit kills and resumes the smoke options' shared layout; the stacked teacher (the frozen,
    folded adapters) likewise: stopped after a checkpoint of the second task, resumed in this process."""
    import nlora.train.loop as training

    argv = ["run", "--method", "lwf", "--lwf-lambda", "10", "--model", "tiny-t5", "--tasks", "harbor,orchard",
            "--data-dir", str(synthetic_dir), "--max-train-samples", "8", "--max-eval-samples", "2",
            "--max-target-length", "4", "--batch-size", "4", "--epochs", "1", "--checkpoint-steps", "1",
            "--device", "cpu", "--quiet", "--log-steps", "1"]
    assert main([*argv, "--output-dir", str(tmp_path / "whole")]) == 0
    seen = {"steps": 0}
    real = training.fault_point

    def stop_at(event):
        if event == "train_step":
            seen["steps"] += 1
            if seen["steps"] == 4:  # task 2's second (last) step; the checkpoint of its first is on disk
                raise Stop
        real(event)

    monkeypatch.setattr(training, "fault_point", stop_at)
    with pytest.raises(Stop):
        main([*argv, "--output-dir", str(tmp_path / "stopped")])
    monkeypatch.setattr(training, "fault_point", real)
    assert (tmp_path / "stopped" / "checkpoint").is_dir()
    assert main(["resume", str(tmp_path / "stopped"), "--quiet"]) == 0
    assert_same_run(tmp_path / "whole", tmp_path / "stopped", log=True)


def test_the_teacher_pass_runs_without_dropout_while_the_model_trains(synthetic_dir):
    """The teacher's outputs inside a training step (model in training mode, dropout on: T5's own and LoRA's) are
    the eval-mode outputs of the teacher's adapters, and the model is left training."""
    from nlora.methods.passes import auxiliary_outputs

    bb = load_backbone("tiny-t5")
    adapters = ContinualAdapters(bb.model, bb.kind, r=2, alpha=4, dropout=0.5,
                                 target_modules=default_target_modules(bb.model_type))
    for k, name in enumerate(("teacher", "student")):
        adapters.add(name)
        _randomize(adapters, name, k)
    adapters.activate(["student"], trainable="student")
    objective = make_objective(bb.kind, bb.tokenizer, 256, 6)
    batch = objective.collate(load_task(synthetic_dir, "harbor", max_train=4).train)
    with torch.no_grad(), adapters.using(["teacher"]) as model:
        expected = objective.forward(model.eval(), batch).logits
        torch.manual_seed(0)
        dropped = objective.forward(model.train(), batch).logits
    assert not torch.allclose(dropped, expected)  # dropout changes this model's outputs
    torch.manual_seed(0)
    teacher = auxiliary_outputs(SimpleNamespace(adapters=adapters, objective=objective), ["teacher"], batch)
    assert adapters.model.training
    torch.testing.assert_close(teacher.logits, expected)
