"""Free-text tasks: TRACE's layout and SuperNI task files read into Example/TaskData, their errors, and the
generated TRACE-layout stream."""

import json

import pytest

from nlora.errors import NloraError
from nlora.tasks.data import Example
from nlora.tasks.freetext import load_superni_task, load_trace_task, read_trace_split, superni_prompt
from nlora.tasks.scoring import example_scores
from nlora.tasks.synthetic import TRACE_TASK_NAMES, TRACE_TASKS, write_synthetic_trace


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def _rows(n, answer="a"):
    return [{"prompt": f"Q{i}?", "answer": answer} for i in range(n)]


# ------------------------------------------------------------------------------------------------ TRACE layout

def test_classification_examples_are_unchanged():
    e = Example("t", "s", "b", ("a", "b"), "p")
    assert (e.prompt_format, e.references, e.free_text, e.answers) == ("nlora", (), False, ("b",))


def test_trace_records_as_released(tmp_path):
    """Hand-written records in the released prompt formats (no licensed text)."""
    _write(tmp_path / "FOMC" / "train.json", [
        {"prompt": "What is the monetary policy stance for the following text? A. dovish, B. hawkish, C. neutral. "
                   "Choose one from A, B and C.\nRates will stay low for a long while.", "answer": "A"}])
    _write(tmp_path / "FOMC" / "test.json", [{"prompt": "Rates rise.", "answer": "B"}])  # no prefix: kept whole
    _write(tmp_path / "ScienceQA" / "train.json", [
        {"prompt": "Choose an answer for the following question and give your reasons.\n\nQuestion: Which is "
                   "a mammal?\nOptions: (A) whale (B) trout", "answer": "A\nBecause a whale breathes air."}])
    _write(tmp_path / "ScienceQA" / "test.json", _rows(1))
    fomc = load_trace_task(tmp_path, "FOMC", metric="accuracy_raw")
    [train], [test] = fomc.train, fomc.test
    assert train == Example("FOMC", "Rates will stay low for a long while.", "A", (), train.prompt, "trace")
    assert train.prompt.startswith("What is the monetary policy stance") and train.free_text
    assert test.sentence == test.prompt == "Rates rise."
    assert (fomc.kind, fomc.metric, fomc.family, fomc.labels, fomc.dev) == ("free_text", "accuracy_raw", "trace", [],
                                                                           [])
    sqa = load_trace_task(tmp_path, "ScienceQA", metric="first_char_accuracy")
    assert sqa.train[0].sentence == "Question: Which is a mammal?\nOptions: (A) whale (B) trout"
    assert sqa.train[0].answers == ("A\nBecause a whale breathes air.",)
    # a prefix given explicitly wins over TRACE's
    assert load_trace_task(tmp_path, "FOMC", prefix="").train[0].sentence == train.prompt


def test_trace_splits_jsonl_dev_and_subsampling(tmp_path):
    task = tmp_path / "T"
    task.mkdir()
    (task / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(30)) + "\n", encoding="utf-8")
    _write(task / "dev.json", _rows(4))
    _write(task / "test.json", _rows(6))
    data = load_trace_task(tmp_path, "T")
    assert [e.prompt for e in data.train] == [f"Q{i}?" for i in range(30)]
    assert len(data.dev) == 4 and len(data.test) == 6 and data.metric == "exact_match"
    small = load_trace_task(tmp_path, "T", max_train=10, seed=3)
    again = load_trace_task(tmp_path, "T", max_train=10, seed=3)
    assert small.train == again.train and len(small.train) == 10 and set(small.train) <= set(data.train)
    assert load_trace_task(tmp_path, "T", max_train=10, seed=4).train != small.train
    # eval.json is TRACE's name and is looked for first
    _write(task / "eval.json", _rows(2))
    assert len(load_trace_task(tmp_path, "T").dev) == 2


def test_trace_layout_errors(tmp_path):
    task = tmp_path / "T"
    _write(task / "train.json", _rows(3))
    with pytest.raises(NloraError, match=r"T: no test\.json \(the task's test split\)"):
        load_trace_task(tmp_path, "T")
    _write(task / "test.json", _rows(3))
    with pytest.raises(NloraError, match=r"no eval\.json or dev\.json \(the task's dev split\)"):
        load_trace_task(tmp_path, "T", require_dev=True)
    with pytest.raises(NloraError, match="task 'U' not found in data folder .*; available: T"):
        load_trace_task(tmp_path, "U")
    with pytest.raises(NloraError, match="task 'T' metric: unknown metric 'bleu'"):
        load_trace_task(tmp_path, "T", metric="bleu")
    (task / "test.jsonl").write_text("{}\n")
    with pytest.raises(NloraError, match="both test.json and test.jsonl exist"):
        load_trace_task(tmp_path, "T")


@pytest.mark.parametrize("content, message", [
    ({"prompt": "a", "answer": "b"}, r"expected a JSON array of \{\"prompt\", \"answer\"\} objects"),
    ([], "the split is empty"),
    ([{"prompt": "a", "answer": "b"}, "x"], "record 1 is not an object"),
    ([{"prompt": "a", "answer": "b"}, {"prompt": "c"}], r"record 1 has no string field 'answer' \(no such field\)"),
    ([{"prompt": 3, "answer": "b"}], r"record 0 has no string field 'prompt' \(int 3\)"),
    ([{"prompt": " \n", "answer": "b"}], "record 0 has an empty 'prompt'"),
])
def test_malformed_trace_split(tmp_path, content, message):
    path = _write(tmp_path / "train.json", content)
    with pytest.raises(NloraError, match=f"{path}: {message}"):
        read_trace_split(path)


def test_malformed_jsonl_names_record_and_line(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text('{"prompt": "a", "answer": "b"}\n\n{"prompt": "c", "answer": \n', encoding="utf-8")
    with pytest.raises(NloraError, match=r"test\.jsonl: record 1 \(line 3\) is malformed JSON"):
        read_trace_split(path)
    assert read_trace_split(_write(tmp_path / "empty_answer.json", [{"prompt": "a", "answer": ""}]))[0]["answer"] == ""


# ------------------------------------------------------------------------------------------------ SuperNI

def _superni(instances, definition=("Summarize the dialogue.  ", "unused second definition")):
    return {"Contributors": ["x"], "Categories": ["Summarization"], "Definition": list(definition),
            "Positive Examples": [{"input": "p", "output": "q"}], "Instances": instances}


def test_superni_prompt_and_outputs(tmp_path):
    folder = tmp_path / "SuperNI" / "task1572_samsum_summary"
    train = [{"id": f"t{i}", "input": f"A: hi {i}\nB: bye", "output": [f"They greet {i}."]} for i in range(8)]
    _write(folder / "train.json", _superni(train))
    _write(folder / "dev.json", _superni(train[:2]))
    _write(folder / "test.json", _superni([{"id": "s0", "input": "A: x", "output": ["one", "two", "three"]},
                                           {"id": "s1", "input": "A: y", "output": "plain"}]))
    data = load_superni_task(tmp_path, "task1572_samsum_summary")
    first = data.train[0]
    assert first.prompt == ("Definition: Summarize the dialogue.\n\nNow complete the following example -\n"
                            "Input: A: hi 0\nB: bye\nOutput: ")
    assert first.prompt == superni_prompt("Summarize the dialogue.  ", "A: hi 0\nB: bye")
    assert (first.sentence, first.label, first.references, first.options) == ("A: hi 0\nB: bye", "They greet 0.", (),
                                                                             ())
    assert (data.kind, data.metric, data.family, data.instruction) == ("free_text", "rouge_l", "superni",
                                                                       "Summarize the dialogue.  ")
    several, plain = data.test
    assert several.references == ("one", "two", "three") and several.label in several.references
    assert plain.answers == ("plain",)
    # the pick is reproducible from the seed
    assert load_superni_task(tmp_path, "task1572_samsum_summary").test == data.test
    picks = {load_superni_task(tmp_path, "task1572_samsum_summary", seed=s).test[0].label for s in range(20)}
    assert len(picks) > 1
    assert len(data.dev) == 2 and len(load_superni_task(tmp_path, "task1572_samsum_summary", max_train=3).train) == 3


@pytest.mark.parametrize("content, message", [
    ([1], "expected a SuperNI task object"),
    ({"Instances": [{"input": "a", "output": "b"}]}, "'Definition' must be a non-empty string"),
    ({"Definition": [], "Instances": [{"input": "a", "output": "b"}]}, "'Definition' must be"),
    (_superni([]), "'Instances' must be a non-empty list"),
    (_superni([{"id": "x1", "input": "a", "output": "b"}, {"id": "x2", "input": 5, "output": "b"}]),
     r"Instances\[1\] \(id 'x2'\) has no string field 'input'"),
    (_superni([{"input": "a", "output": []}]), r"Instances\[0\]: 'output' must be a string or a non-empty list"),
    (_superni([{"input": "a", "output": ["b", 3]}]), r"Instances\[0\]: 'output' must be"),
    (_superni(["a"]), r"Instances\[0\] is not an object"),
])
def test_malformed_superni_file(tmp_path, content, message):
    path = _write(tmp_path / "t" / "train.json", content)
    _write(tmp_path / "t" / "test.json", _superni([{"input": "a", "output": "b"}]))
    with pytest.raises(NloraError, match=f"{path}: {message}"):
        load_superni_task(tmp_path, "t")


# ------------------------------------------------------------------------------------------------ generated stream

def test_synthetic_trace_stream(tmp_path):
    root = write_synthetic_trace(tmp_path / "a", n_train=12, n_eval=4, n_test=5, seed=1)
    write_synthetic_trace(tmp_path / "b", n_train=12, n_eval=4, n_test=5, seed=1)
    write_synthetic_trace(tmp_path / "c", n_train=12, n_eval=4, n_test=5, seed=2)
    for name in TRACE_TASK_NAMES:
        for split in ("train", "eval", "test"):
            a = (tmp_path / "a" / name / f"{split}.json").read_bytes()
            assert a == (tmp_path / "b" / name / f"{split}.json").read_bytes()
            assert a != (tmp_path / "c" / name / f"{split}.json").read_bytes()
        prefix, metric = TRACE_TASKS[name]
        task = load_trace_task(root, name, metric=metric, prefix=prefix)
        assert (len(task.train), len(task.dev), len(task.test)) == (12, 4, 5)
        assert all(e.prompt == prefix + e.sentence and "\n" not in e.sentence for e in task.train)
        # its own answers score 100 under the task's metric, and copying the input does not
        test = task.test
        answers, inputs = [e.label for e in test], [e.sentence for e in test]
        assert example_scores(task.metric, answers, answers, sources=inputs) == [100] * 5
        assert sum(example_scores(task.metric, inputs, answers, sources=inputs)) < 500
    with pytest.raises(ValueError, match="unknown synthetic TRACE task 'x'"):
        write_synthetic_trace(tmp_path / "d", tasks=("x",))


def test_synthetic_trace_answers_follow_their_rules(tmp_path):
    root = write_synthetic_trace(tmp_path, n_train=20, n_eval=1, n_test=1, tasks=("reverse", "sum", "simplify",
                                                                                     "headline", "choice"))
    load = {name: load_trace_task(root, name, prefix=TRACE_TASKS[name][0]).train for name in TRACE_TASK_NAMES}
    assert all(e.label == e.sentence[::-1] for e in load["reverse"])
    assert all(int(e.label) == sum(map(int, e.sentence.split(" + "))) for e in load["sum"])
    assert all(e.label == " ".join(w for w in e.sentence.split() if not w.startswith("[")) for e in load["simplify"])
    assert all(e.label.split() == e.sentence.split()[:3] for e in load["headline"])
    for e in load["choice"]:
        letter, because = e.label.split("\n")
        assert f"{letter}. {because.split()[1]}" in e.sentence
