"""A generative model that really learns, end to end: a tiny LLaMA is first fully fine-tuned here on the task
format (random keyword -> option mappings, so it answers with an option but cannot know any task's mapping),
saved as a local "pretrained" model, then a 2-task IncLoRA run on top of it must learn each task in generate
mode. The run is then rebuilt from its saved adapters alone: it reproduces the run's predictions exactly,
batched generation equals generation per example, and score mode agrees with generate mode."""

import json
import random

import pytest
import torch

from conftest import write_task
from lora_reference import add_adapters
from nlora import RunConfig, run
from nlora.eval.evaluate import evaluate
from nlora.models import load_backbone
from nlora.objectives import make_objective
from nlora.runner import load_tasks
from nlora.tasks.data import Example, format_prompt
from test_eval_mode import assert_batched_generation_is_per_example

KEYS = ("sun", "moon", "tree", "rock", "fish", "bird")
POOL = ("red", "blue", "gold", "jade", "onyx", "ruby", "teal", "pink", "gray", "lime", "navy", "plum")
INSTRUCTION = "Pick."


def _mapping(rng: random.Random) -> tuple[list[str], dict[str, str]]:
    labels = rng.sample(POOL, 3)
    return labels, {k: labels[i % 3] for i, k in enumerate(rng.sample(KEYS, len(KEYS)))}


def _rows(rng, mapping, n):
    return [{"label": mapping[k], "sentence": k} for k in (rng.choice(KEYS) for _ in range(n))]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """tiny-llama fully fine-tuned on 40 random mappings of the task format (12 examples each, 5 epochs), saved
    with its tokenizer."""
    torch.manual_seed(0)
    bb = load_backbone("tiny-llama")
    objective = make_objective("decoder", bb.tokenizer, 64, 8)
    rng = random.Random(0)
    examples = []
    for _ in range(40):
        labels, mapping = _mapping(rng)
        examples += [Example("t", r["sentence"], r["label"], tuple(labels),
                             format_prompt(INSTRUCTION, labels, r["sentence"])) for r in _rows(rng, mapping, 12)]
    optimizer = torch.optim.AdamW(bb.model.parameters(), lr=3e-3)
    bb.model.train()
    for _ in range(5):
        rng.shuffle(examples)
        for s in range(0, len(examples), 16):
            objective.loss(bb.model, objective.collate(examples[s: s + 16])).backward()
            optimizer.step()
            optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("pretrained") / "tiny-llama-ft"
    bb.model.save_pretrained(folder)
    bb.tokenizer.save_pretrained(folder)
    return folder


def test_lora_tasks_on_a_pretrained_decoder_learn_in_generate_mode(tmp_path, pretrained):
    rng = random.Random(1)
    data = tmp_path / "data"
    for name in ("first", "second"):
        labels, mapping = _mapping(rng)
        write_task(data, "G", name, labels, _rows(rng, mapping, 64), _rows(rng, mapping, 20))
    (tmp_path / "instructions.json").write_text(json.dumps({"G": INSTRUCTION}))
    config = RunConfig(model=str(pretrained), method="inc-lora", tasks=["first", "second"], data_dir=str(data),
                       instructions=str(tmp_path / "instructions.json"), output_dir=str(tmp_path / "run"),
                       target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], lora_r=8, lora_alpha=16,
                       lora_dropout=0.0, lr=1e-2, max_grad_norm=None, epochs=6, batch_size=8, eval_batch_size=8,
                       max_source_length=64, max_target_length=8, device="cpu")
    metrics = run(config, progress=False)
    R = metrics["accuracy_matrix"]
    assert R[0][0] >= 90 and R[1][1] >= 90, R
    run_dir = tmp_path / "run"
    records = {f.stem: [json.loads(line) for line in f.open()] for f in (run_dir / "predictions" / "1-second")
               .glob("*.jsonl")}
    assert all(r["prediction"] == r["target"] for r in records["second"] if r["correct"])

    # the run rebuilt from its adapter folders alone reproduces its last predictions
    bb = load_backbone(str(pretrained))
    model = add_adapters(bb.model, sorted((run_dir / "adapters").iterdir())).eval()
    tasks = load_tasks(config)
    generate = make_objective("decoder", bb.tokenizer, 64, 8)
    score = make_objective("decoder", bb.tokenizer, 64, 8, eval_mode="score")
    for task in tasks:
        _, rows = evaluate(generate, model, task.test, config.eval_batch_size, progress=False)
        assert rows == records[task.name]
        with torch.no_grad():
            scored = score.predict(model, task.test, "cpu")
        if task is not tasks[-1]:  # an earlier task may be forgotten (IncLoRA), its outputs then no option
            continue
        generated = [r["prediction"] for r in rows]
        agree = [g == s for g, s, e in zip(generated, scored, task.test) if g in e.options]
        # greedy generation and the most likely option are different rules; on a model that learned the task
        # they agree on nearly every example (a broken scorer agrees about a third of the time)
        assert len(agree) >= 0.9 * len(task.test) and sum(agree) >= 0.9 * len(agree), (generated, scored)
    assert_batched_generation_is_per_example("tiny-llama", generate, model, tasks[1].test[:10])
