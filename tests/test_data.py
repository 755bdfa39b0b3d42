import json

import pytest

from nlora.errors import NloraError
from nlora.tasks.data import (DEFAULT_INSTRUCTIONS, carve_dev, find_task_dir, format_prompt, load_instructions,
                        load_task)
from nlora.tasks.loading import detect_format
from conftest import SHARED_DATA

from nlora.tasks.benchmarks import BENCHMARK_ORDERS, FREE_TEXT_BENCHMARKS

ROWS = [{"label": "pos", "sentence": "great film"}, {"label": "neg", "sentence": "dull plot"},
        {"label": "pos", "sentence": "loved it"}]


def test_prompt_has_instruction_options_sentence_and_cue():
    p = format_prompt("Classify the sentiment of the text.", ["pos", "neg"], "great film")
    assert p == "Classify the sentiment of the text.\nOptions: pos, neg\nText: great film\nAnswer:"


def test_load_task_builds_examples_with_family_instruction(tmp_path, make_task):
    make_task(tmp_path, "SC", "tiny", ["pos", "neg"], ROWS)
    task = load_task(tmp_path, "tiny")
    assert task.family == "SC" and task.instruction == DEFAULT_INSTRUCTIONS["SC"]
    assert [e.label for e in task.train] == ["pos", "neg", "pos"]
    assert task.train[1].options == ("pos", "neg")
    assert task.train[1].prompt == format_prompt(DEFAULT_INSTRUCTIONS["SC"], ["pos", "neg"], "dull plot")


def test_user_instructions_override_by_family_or_dataset(tmp_path, make_task):
    make_task(tmp_path, "SC", "tiny", ["pos", "neg"], ROWS)
    f = tmp_path / "prompts.json"
    f.write_text(json.dumps({"SC": "Is it good or bad?", "other": "x"}))
    assert load_task(tmp_path, "tiny", load_instructions(f)).instruction == "Is it good or bad?"
    f.write_text(json.dumps({"SC": "family", "tiny": "dataset wins"}))
    assert load_task(tmp_path, "tiny", load_instructions(f)).instruction == "dataset wins"
    f.write_text(json.dumps(["not", "a", "mapping"]))
    with pytest.raises(NloraError, match="prompts.json: expected a JSON object"):
        load_instructions(f)


def test_task_directly_under_data_dir(tmp_path, make_task):
    folder = tmp_path / "flat"
    make_task(tmp_path, "", "flat", ["a", "b"], [{"label": "a", "sentence": "s"}])
    assert find_task_dir(tmp_path, "flat") == folder


def test_subsample_is_deterministic_and_seed_dependent(tmp_path, make_task):
    rows = [{"label": "a" if i % 2 else "b", "sentence": f"s{i}"} for i in range(100)]
    make_task(tmp_path, "G", "big", ["a", "b"], rows)
    a = [e.sentence for e in load_task(tmp_path, "big", max_train=10, seed=1).train]
    b = [e.sentence for e in load_task(tmp_path, "big", max_train=10, seed=1).train]
    c = [e.sentence for e in load_task(tmp_path, "big", max_train=10, seed=2).train]
    assert a == b and a != c and len(a) == 10 and len(set(a)) == 10


def test_carve_dev_is_disjoint_from_train(tmp_path, make_task):
    rows = [{"label": "a", "sentence": f"s{i}"} for i in range(20)]
    make_task(tmp_path, "G", "t", ["a"], rows)
    train = load_task(tmp_path, "t").train
    rest, dev = carve_dev(train, 0.25, seed=0)
    assert len(dev) == 5 and len(rest) == 15
    assert not {e.sentence for e in dev} & {e.sentence for e in rest}


@pytest.mark.parametrize("breakage,message", [
    (lambda f: (f / "train.json").write_text('[{"label": "a", "sentence": "x"},\n  {"label": }]'),
     r"train.json: malformed JSON at line 2, column 13"),
    (lambda f: (f / "train.json").write_text("[]"), r"train.json: the split is empty"),
    (lambda f: (f / "train.json").write_text('[{"label": "a"}]'),
     r"train.json: example 0 has no string field 'sentence'"),
    (lambda f: (f / "train.json").write_text('[{"label": "a", "sentence": "x"}, {"label": "zzz", "sentence": "y"}]'),
     r"train.json: example 1 has label 'zzz', which is not in labels.json .*option 'train_unknown_labels'"),
    (lambda f: (f / "labels.json").write_text('{"a": 1}'), r"labels.json: expected a non-empty JSON list"),
    (lambda f: (f / "test.json").unlink(), r"test.json: file not found"),
    (lambda f: (f / "train.json").write_text('{"label": "a"}'), r"train.json: expected a JSON array"),
])
def test_bad_data_gives_one_clear_error_naming_the_file(tmp_path, make_task, breakage, message):
    folder = make_task(tmp_path, "G", "t", ["a", "b"], [{"label": "a", "sentence": "x"}])
    breakage(folder)
    with pytest.raises(NloraError, match=message):
        load_task(tmp_path, "t")


def test_unknown_task_lists_available(tmp_path, make_task):
    make_task(tmp_path, "G", "known", ["a"], [{"label": "a", "sentence": "x"}])
    with pytest.raises(NloraError, match=r"task 'nope' not found in data folder .*available: known$"):
        load_task(tmp_path, "nope")


def test_an_unknown_task_lists_what_tasks_accepts_and_the_close_names(tmp_path, make_task):
    make_task(tmp_path, "sc", "moodtask", ["a"], [{"label": "a", "sentence": "x"}])
    make_task(tmp_path, "tc", "topictask", ["a"], [{"label": "a", "sentence": "x"}])
    (tmp_path / "Reverse").mkdir()
    (tmp_path / "Reverse" / "train.json").write_text('[{"prompt": "ab", "answer": "ba"}]')
    with pytest.raises(NloraError) as e:
        detect_format(tmp_path, "moodtsk")
    assert f"task 'moodtsk' not found in data folder {tmp_path} (did you mean 'moodtask'?)" in str(e.value)
    assert str(e.value).endswith("available: Reverse, moodtask, topictask")  # each accepted as it is listed
    for name in ("moodtask", "topictask", "Reverse"):
        detect_format(tmp_path, name)


def test_a_task_folder_given_as_data_folder_is_named_with_format_detection(tmp_path, make_task):
    folder = make_task(tmp_path, "SC", "yelp", ["a"], [{"label": "a", "sentence": "x"}])
    with pytest.raises(NloraError, match=f"data folder {folder} is the folder of one task \\(yelp\\)"):
        detect_format(folder, "yelp")  # task_format auto


def test_a_task_folder_given_as_data_folder_names_the_folder_to_give(tmp_path, make_task):
    folder = make_task(tmp_path, "SC", "yelp", ["a"], [{"label": "a", "sentence": "x"}])
    with pytest.raises(NloraError) as e:
        load_task(folder, "yelp")
    assert str(e.value) == (f"data folder {folder} is the folder of one task (yelp), not a data folder: give the "
                            f"folder that holds the task family folders, {tmp_path} in the CL_Benchmark layout "
                            "(<data>/SC/yelp)")


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="benchmark data not present")
def test_reads_the_real_benchmark_layout():
    task = load_task(SHARED_DATA, "CB", max_train=20, max_test=10, seed=0)
    assert task.family == "NLI" and len(task.train) == 20 and len(task.test) == 10
    assert set(e.label for e in task.train) <= set(task.labels)
    agnews = load_task(SHARED_DATA, "agnews", max_train=5, max_test=5)
    assert agnews.family == "TC" and agnews.instruction == DEFAULT_INSTRUCTIONS["TC"]


def _task_with_unlabelled_tests(tmp_path, make_task):
    test = [{"label": "a", "sentence": "x"}, {"label": "-", "sentence": "y"}, {"label": "-", "sentence": "z"},
            {"label": "?", "sentence": "w"}]
    return make_task(tmp_path, "NLI", "t", ["a", "b"], [{"label": "b", "sentence": "v"}], test)


def test_test_labels_not_in_labels_json_are_kept_with_one_warning(tmp_path, make_task, capsys):
    folder = _task_with_unlabelled_tests(tmp_path, make_task)
    task = load_task(tmp_path, "t")
    assert [e.label for e in task.test] == ["a", "-", "-", "?"]
    assert task.unknown_labels == {"test": {"-": 2, "?": 1}}
    err = capsys.readouterr().err
    assert err.count("warning") == 1
    assert f"{folder / 'test.json'}: kept 3 of 4 examples" in err and "'-' x 2" in err and "'?' x 1" in err


def test_label_policies_drop_or_refuse(tmp_path, make_task, capsys):
    _task_with_unlabelled_tests(tmp_path, make_task)
    dropped = load_task(tmp_path, "t", unknown_labels={"test": "drop"})
    assert [e.label for e in dropped.test] == ["a"] and dropped.unknown_labels == {}
    assert "dropped 3 of 4 examples" in capsys.readouterr().err
    with pytest.raises(NloraError, match=r"test.json: example 1 has label '-'.*3 example\(s\).*test_unknown_labels"):
        load_task(tmp_path, "t", unknown_labels={"test": "error"})
    # a training split may keep them only when told to
    make_task(tmp_path, "G", "u", ["a"], [{"label": "a", "sentence": "x"}, {"label": "-", "sentence": "y"}])
    with pytest.raises(NloraError, match="train.json"):
        load_task(tmp_path, "u")
    kept = load_task(tmp_path, "u", unknown_labels={"train": "keep"})
    assert kept.unknown_labels == {"train": {"-": 1}, "test": {"-": 1}}  # make_task copies train to test


def test_kept_unlabelled_examples_score_as_wrong_and_are_counted_in_metrics(tmp_path, make_task, capsys):
    from nlora.config import load_config
    from nlora.runner import run

    _task_with_unlabelled_tests(tmp_path / "data", make_task)
    config = load_config(overrides={"model": "tiny-bert", "tasks": "t", "data_dir": str(tmp_path / "data"),
                                    "output_dir": str(tmp_path / "run"), "device": "cpu", "batch_size": 2})
    metrics = run(config, progress=False)
    assert metrics["unknown_labels"] == {"t": {"test": {"-": 2, "?": 1}}}
    records = [json.loads(line) for line in (tmp_path / "run" / "predictions" / "0-t" / "t.jsonl").open()]
    assert [r["correct"] for r in records[1:]] == [False] * 3 and all(r["prediction"] in ("a", "b") for r in records)
    assert metrics["accuracy_matrix"][0][0] == (25.0 if records[0]["correct"] else 0.0)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="benchmark data not present")
@pytest.mark.parametrize("bench,order", [(b, o) for b, orders in BENCHMARK_ORDERS.items() for o in orders
                                         if b not in FREE_TEXT_BENCHMARKS])  # those read other data
def test_every_preset_task_list_passes_validation_on_the_real_data(bench, order, capsys):
    from nlora.config import load_config
    from nlora.runner import load_tasks

    config = load_config(overrides={"benchmark": bench, "order": order, "data_dir": str(SHARED_DATA)})
    tasks = load_tasks(config)
    assert [t.name for t in tasks] == config.tasks
    if "MNLI" in config.tasks:  # its test.json labels 131 examples '-' (no gold label): kept, scored as wrong
        mnli = next(t for t in tasks if t.name == "MNLI")
        assert mnli.unknown_labels == {"test": {"-": 131}} and len(mnli.test) == 7600


@pytest.mark.parametrize("name", ["../flat", "/abs", "..", "", "a/../../b"])
def test_a_task_name_never_leads_out_of_the_data_folder(tmp_path, make_task, name):
    make_task(tmp_path / "data", "G", "t", ["a"], [{"label": "a", "sentence": "s"}])
    make_task(tmp_path, "", "flat", ["a"], [{"label": "a", "sentence": "s"}])  # beside the data folder
    with pytest.raises(NloraError, match=f"task name {name!r} is not a plain dataset name"):
        find_task_dir(tmp_path / "data", name)


def test_a_data_folder_that_is_a_symbolic_link_loop_is_named_so(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    with pytest.raises(NloraError, match=f"data folder: {loop} is a symbolic link loop"):
        find_task_dir(loop, "t")
    dangling = tmp_path / "dangling"
    dangling.symlink_to("nowhere")
    with pytest.raises(NloraError, match=f"{dangling} is a symbolic link to nowhere, which does not exist"):
        find_task_dir(dangling, "t")
