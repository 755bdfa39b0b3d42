"""Experiment tracking: log.jsonl of a tiny run (every number checked against the run's own metrics, the
configuration or a recomputation), TensorBoard event files through accelerate, the error for a tracker that is
not installed, and the pieces (windows of steps, token counts, the gradient norm before clipping, a resumed log)."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from nlora import tracking
from nlora.adapters import ContinualAdapters
from nlora.cli import main
from nlora.config import RunConfig
from nlora.errors import NloraError
from nlora.methods import get_method
from nlora.models import load_backbone
from nlora.objectives import make_objective
from nlora.tasks.data import Example
from nlora.tracking import RunLogger, StepWindow, batch_tokens, read_log
from nlora.train.engine import make_accelerator
from nlora.train.loop import epoch_order, train_task
from nlora.train.regularization import LayerFactors

# 12 examples in batches of 4 for 2 epochs: 6 steps per task; warm-up over 3 steps; a line every 2 steps
TINY = ["--model", "tiny-t5", "--method", "o-lora", "--orth-lambda", "0.5", "--l2-lambda", "0.01",
        "--tasks", "harbor,orchard", "--max-train-samples", "12", "--max-eval-samples", "6", "--batch-size", "4",
        "--eval-batch-size", "4", "--epochs", "2", "--max-target-length", "4", "--warmup-steps", "3",
        "--lr", "0.002", "--log-steps", "4", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, synthetic_dir):
    out = tmp_path_factory.mktemp("tracked") / "run"
    report_to = "tensorboard" if tracking.tracker_available("tensorboard") else "none"
    assert main(["run", "--data-dir", str(synthetic_dir), "--output-dir", str(out), *TINY,
                 "--report-to", report_to]) == 0
    return out


def test_log_jsonl_of_a_tiny_run(tracked_run):
    metrics = json.loads((tracked_run / "metrics.json").read_text())
    log = read_log(tracked_run / "log.jsonl")
    assert [line["event"] for line in log] == ["start"] + (["train_begin"] + ["train"] * 2 + ["train_end", "eval"]) + \
        (["train_begin"] + ["train"] * 2 + ["train_end", "eval", "eval"]) + ["summary"]
    begun = [(x["task"], x["phase"], x["steps"], x["global_step"]) for x in log if x["event"] == "train_begin"]
    assert begun == [("harbor", 0, 6, 0), ("orchard", 1, 6, 6)]  # the step totals, before any logging step
    trains = [line for line in log if line["event"] == "train"]
    # every 4th step, and the last step of each task
    assert [(x["task"], x["phase"], x["step"], x["steps"], x["global_step"]) for x in trains] == \
        [("harbor", 0, 4, 6, 4), ("harbor", 0, 6, 6, 6), ("orchard", 1, 4, 6, 10), ("orchard", 1, 6, 6, 12)]
    assert [x["epoch"] for x in trains] == [pytest.approx(4 / 3, abs=1e-4), 2.0] * 2
    for x in trains:
        assert x["lr"] == pytest.approx(0.002 * min(1.0, x["step"] / 3))  # the rate of the logged step
        assert x["grad_norm"] > 0 and math.isfinite(x["grad_norm"])
        assert x["examples_per_s"] * x["s_per_step"] == pytest.approx(4, rel=1e-4)  # 4 examples a step
        assert x["tokens_per_s"] * x["s_per_step"] > 4 and x["s_per_step"] > 0
        assert "peak_memory_mb" not in x  # CPU: no accelerator memory to report
    ends = {line["phase"]: line for line in log if line["event"] == "train_end"}
    for k, task in enumerate(metrics["tasks"]):
        mine = [x for x in trains if x["phase"] == k]
        stats = metrics["train"][task]
        assert ends[k]["steps"] == stats["steps"] == 6
        # the lines' means over their windows (4 steps, then 2) make up the task's means
        for key, total in (("loss", "mean_loss"), ("regularizer", "mean_regularizer")):
            assert (4 * mine[0][key] + 2 * mine[1][key]) / 6 == pytest.approx(stats[total], rel=1e-5)
    assert trains[0]["regularizer"] > 0  # O-LoRA's L2 term from the first task on
    evals = [line for line in log if line["event"] == "eval"]
    R = metrics["accuracy_matrix"]
    assert [(x["phase"], x["task"], x["accuracy"], x["examples"]) for x in evals] == \
        [(0, "harbor", R[0][0], 6), (1, "harbor", R[1][0], 6), (1, "orchard", R[1][1], 6)]
    assert all(x["seconds"] > 0 for x in evals)
    summary = log[-1]
    for key in ("average_accuracy", "bwt", "fwt", "forgetting"):
        assert summary[key] == metrics[key]
    assert [x["elapsed"] for x in log] == sorted(x["elapsed"] for x in log)


def test_tensorboard_event_files(tracked_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = tracked_run / "tensorboard" / "nlora"
    assert list(folder.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(folder))
    events.Reload()
    scalars = events.Tags()["scalars"]
    trains = [x for x in read_log(tracked_run / "log.jsonl") if x["event"] == "train"]
    for key in ("loss", "regularizer", "lr", "grad_norm"):
        logged = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert logged == [(x["global_step"], pytest.approx(x[key], rel=1e-5)) for x in trains], key
    metrics = json.loads((tracked_run / "metrics.json").read_text())
    R = metrics["accuracy_matrix"]
    assert [(e.step, e.value) for e in events.Scalars("accuracy/harbor")] == [(6, R[0][0]), (12, R[1][0])]
    assert [(e.step, e.value) for e in events.Scalars("accuracy/orchard")] == [(12, R[1][1])]
    assert [e.value for e in events.Scalars("summary/AP")] == [pytest.approx(metrics["average_accuracy"])]
    assert "summary/FWT" not in scalars  # not measured without --eval-future: not logged
    hparams = list(folder.rglob("hparams.yml"))
    assert hparams and "o-lora" in hparams[0].read_text()


@pytest.mark.parametrize("asked,missing", [("tensorboard", "tensorboard"), ("wandb,mlflow", "wandb mlflow"),
                                           ("mlflow", "mlflow")])
def test_a_tracker_not_installed_is_refused_before_anything_is_written(tmp_path, synthetic_dir, capsys,
                                                                       monkeypatch, asked, missing):
    monkeypatch.setattr(tracking, "tracker_available", lambda name: False)
    out = tmp_path / "run"
    assert main(["run", "--data-dir", str(synthetic_dir), "--output-dir", str(out), *TINY,
                 "--report-to", asked]) == 2
    err = capsys.readouterr().err
    assert f"option 'report_to': {', '.join(asked.split(','))} asked for but not installed" in err
    assert f"pip install {missing}" in err and f"nlora[{asked}]" in err
    assert not out.exists()


@pytest.mark.parametrize("value,message", [("tensorbord", "'tensorbord' is not one of none, all, tensorboard"),
                                           ("all,wandb", "'none' and 'all' stand alone"), ("", "is not one of")])
def test_bad_report_to(value, message):
    with pytest.raises(NloraError, match="option 'report_to'") as e:
        tracking.parse_report_to(value)
    assert message in str(e.value)


def test_report_to_names():
    assert tracking.parse_report_to("none") == []
    assert tracking.parse_report_to("TensorBoard, wandb") == ["tensorboard", "wandb"]
    assert tracking.hyperparameters({"tasks": ["a", "b"], "lr": 0.1, "x": None}) == \
        {"tasks": "a,b", "lr": 0.1, "x": None}


def test_step_window_means_over_its_steps():
    window = StepWindow()
    # step 1: two micro-batches; step 2: one
    window.add(1.0, 0.5, 10, 2, {"orth": 0.25, "l2": 0.25})
    window.add(3.0, 0.5, 20, 2, {"orth": 0.5, "l2": 0.0})
    window.end_step()
    window.add(2.0, 2.0, 30, 4, {"orth": 1.0, "l2": 1.0})
    window.end_step()
    window.start -= 2.0  # two seconds
    values = window.flush()
    assert values["loss"] == pytest.approx(3.0) and values["regularizer"] == pytest.approx(1.5)
    assert values["regularizer_terms"] == {"orth": pytest.approx(0.875), "l2": pytest.approx(0.625)}
    assert values["tokens_per_s"] == pytest.approx(30, rel=1e-3)
    assert values["examples_per_s"] == pytest.approx(4, rel=1e-3)
    assert values["s_per_step"] == pytest.approx(1.0, rel=1e-3)
    assert window.steps == 0 and window.tokens == 0 and not window.terms  # a new window


def _example(prompt: str, label: str) -> Example:
    return Example("a", prompt, label, ("yes", "no"), prompt)


@pytest.mark.parametrize("model", ["tiny-t5", "tiny-llama", "tiny-bert"])
def test_batch_tokens_count_no_padding(model):
    bb = load_backbone(model)
    obj = make_objective(bb.kind, bb.tokenizer, 64, 8)
    examples = [_example("short", "yes"), _example("a much longer prompt than the first", "no"),
                _example("mid length", "no")]
    together = batch_tokens(obj.collate(examples))
    alone = sum(batch_tokens(obj.collate([e])) for e in examples)
    batch = obj.collate(examples)
    if bb.kind == "encoder":  # the label options are embedded once per batch, shared by its examples
        alone -= (len(examples) - 1) * int(batch["option_attention_mask"].sum())
    assert together == alone  # padding is not counted
    masks = sum(int(v.sum()) for k, v in batch.items() if k.endswith("attention_mask"))
    if bb.kind == "seq2seq":  # the targets are a sequence of their own
        assert together == masks + int((batch["labels"] != -100).sum())
    else:  # a decoder's answer is inside input_ids: not counted twice
        assert together == masks


class Recorder:
    def __init__(self):
        self.lines = []

    def train_begin(self, phase, step, steps):
        self.begin = (phase, step, steps)

    def log_train(self, phase, epoch, step, steps, values):
        self.lines.append(values)

    def train_end(self, phase, stats):
        self.end = stats


@pytest.mark.parametrize("max_grad_norm", [None, 1e-3])
def test_grad_norm_is_the_norm_before_clipping(tmp_path, max_grad_norm):
    """The logged norm and losses of a one-step task equal a recomputation by hand, with clipping on or off."""
    config = RunConfig(model="tiny-llama", method="o-lora", tasks=["a"], batch_size=4, epochs=1, lr=1e-2,
                       lora_dropout=0.0, l2_lambda=0.1, max_grad_norm=max_grad_norm, log_steps=1, device="cpu",
                       output_dir=str(tmp_path / "run"))
    bb = load_backbone("tiny-llama")
    adapters = ContinualAdapters(bb.model, bb.kind, 4, 8.0, 0.0, ["q_proj", "v_proj"])
    adapters.add("task0")
    adapters.activate(["task0"], trainable="task0")
    method = get_method("o-lora")(config)
    obj = make_objective(bb.kind, bb.tokenizer, 64, 8)
    examples = [_example(f"prompt number {i}", "yes" if i % 2 else "no") for i in range(4)]
    params = [p for p in bb.model.parameters() if p.requires_grad]

    bb.model.train()
    batch = obj.collate([examples[i] for i in epoch_order(4, config.seed, 0, 0)])
    loss = obj.loss(bb.model, batch)
    reg = sum(term.weight * term.per_layer(LayerFactors(f.layer, f.A, f.B, f.scaling))
              for term in method.loss_terms(0) for f in adapters.factors("task0"))
    (loss + reg).backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)).item()
    for p in params:
        p.grad = None

    recorder = Recorder()
    train_task(adapters, obj, method, examples, config, 0, make_accelerator(config), progress=False,
               logger=recorder)
    assert recorder.begin == (0, 0, 1) and len(recorder.lines) == 1 and recorder.end["steps"] == 1
    values = recorder.lines[0]
    assert values["grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert values["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert values["regularizer"] == pytest.approx(reg.item(), rel=1e-6)
    assert values["lr"] == 1e-2


def test_measuring_the_norm_without_clipping_leaves_the_gradients_as_they_are():
    """Without clipping, the norm is measured by accelerate's clip_grad_norm_ with an infinite maximum."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    layer = torch.nn.Linear(5, 3)
    layer(torch.randn(7, 5)).pow(2).sum().mul(1e4).backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    norm = accelerator.clip_grad_norm_(list(layer.parameters()), math.inf)
    assert float(norm) == pytest.approx(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item(), rel=1e-6)
    assert all(torch.equal(p.grad, g) for p, g in zip(layer.parameters(), grads))


class FakeAccelerator:
    """What RunLogger uses of an Accelerator, recording what reaches the trackers."""

    def __init__(self):
        self.is_main_process = True
        self.log_with = ["fake"]
        self.trackers = []
        self.sent = []

    def init_trackers(self, project, config=None, init_kwargs=None):
        self.trackers = [SimpleNamespace(finish=lambda: None)]
        self.config = config

    def log(self, values, step=None):
        self.sent.append((step, dict(values)))


def _values(loss):
    return {"loss": loss, "regularizer": 0.0, "lr": 0.1, "grad_norm": 1.0, "tokens_per_s": 1.0,
            "examples_per_s": 1.0, "s_per_step": 1.0}


def test_resumed_log_drops_what_is_redone_and_trackers_get_each_step_once(tmp_path):
    acc = FakeAccelerator()
    logger = RunLogger(tmp_path, acc, ["a", "b"]).start({"tasks": ["a", "b"]})
    assert acc.config == {"tasks": "a,b"}
    logger.train_begin(0, 0, 2)
    for step in (1, 2):
        logger.log_train(0, step / 2, step, 2, _values(float(step)))
    logger.train_end(0, {"steps": 2, "mean_loss": 1.5, "mean_regularizer": 0.0, "seconds": 1.0})
    logger.eval_begin(0)
    logger.log_eval(0, "a", 50.0, 4, 0.5)
    logger.train_begin(1, 0, 3)
    logger.log_train(1, 1 / 3, 1, 3, _values(10.0))
    logger.log_train(1, 2 / 3, 2, 3, _values(20.0))  # after the checkpoint of step 1: redone after the crash
    logger._file.close()  # killed: no close(), and the last line cut
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"event": "tra')

    acc2 = FakeAccelerator()
    logger = RunLogger(tmp_path, acc2, ["a", "b"]).start({}, resumed=True)
    logger.train_begin(1, 1, 3)  # from the checkpoint at step 1
    logger.log_train(1, 2 / 3, 2, 3, _values(21.0))
    logger.log_train(1, 1.0, 3, 3, _values(30.0))
    logger.train_end(1, {"steps": 3, "mean_loss": 20.0, "mean_regularizer": 0.0, "seconds": 1.0})
    logger.log_eval(1, "a", 25.0, 4, 0.5)
    logger.close()

    log = read_log(tmp_path / "log.jsonl")
    assert len(log) == len((tmp_path / "log.jsonl").read_text().splitlines())  # the cut line is gone
    trains = [(x["phase"], x["step"], x["global_step"], x["loss"]) for x in log if x["event"] == "train"]
    assert trains == [(0, 1, 1, 1.0), (0, 2, 2, 2.0), (1, 1, 3, 10.0), (1, 2, 4, 21.0), (1, 3, 5, 30.0)]
    assert [x["event"] for x in log].count("start") == 2
    # a phase's step total once, however often it is resumed
    assert [(x["phase"], x["steps"]) for x in log if x["event"] == "train_begin"] == [(0, 2), (1, 3)]
    # the trackers had step 4 before the crash; after it they get only what is new
    assert [step for step, _ in acc.sent] == [1, 2, 2, 3, 4]
    assert [(step, v.get("train/loss")) for step, v in acc2.sent] == [(5, 30.0), (5, None)]
    assert acc2.sent[1][1] == {"accuracy/a": 25.0}
    assert log[-1]["elapsed"] >= log[0]["elapsed"]
