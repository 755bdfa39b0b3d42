import pytest

from nlora.config import RunConfig, load_config
from nlora.errors import NloraError


def test_from_dict_coerces_cli_strings():
    cfg = RunConfig.from_dict({"tasks": "a, b,c", "epochs": "3", "lr": "2e-4", "lambda": "0.5",
                               "overwrite": "true", "max_train_samples": "none"})
    assert cfg.tasks == ["a", "b", "c"]
    assert cfg.epochs == 3 and cfg.lr == 2e-4 and cfg.lambda_ == 0.5 and cfg.overwrite is True
    assert cfg.max_train_samples is None
    assert cfg.to_dict()["lambda"] == 0.5 and "lambda_" not in cfg.to_dict()


def test_unknown_key_is_named_with_valid_keys():
    with pytest.raises(NloraError, match=r"unknown key\(s\) 'learning_rate'.*valid keys:.*\blr\b"):
        RunConfig.from_dict({"learning_rate": 1e-3})


@pytest.mark.parametrize("key,value,message", [
    ("epochs", "two", "key 'epochs' must be an integer"),
    ("lr", "fast", "key 'lr' must be a number"),
    ("overwrite", "maybe", "key 'overwrite' must be true or false"),
    ("tasks", 5, "key 'tasks' must be a list of strings"),
    ("epochs", 1.0e10, "key 'epochs' is out of range: 10000000000"),
    ("seed", "-99999999999", "key 'seed' is out of range: -99999999999"),
])
def test_bad_types_are_named(key, value, message):
    with pytest.raises(NloraError, match=message):
        RunConfig.from_dict({key: value})


@pytest.mark.parametrize("changes,message", [
    ({"tasks": []}, "option 'tasks'"),
    ({"lr": 0.0}, "option 'lr': must be a positive number"),
    ({"lr": -1e-3}, "option 'lr'"),
    ({"lambda_": -0.1}, "option 'lambda': must be >= 0"),
    ({"lora_r": 0}, "option 'lora_r': must be >= 1"),
    ({"epochs": 0}, "option 'epochs'"),
    ({"lora_dropout": 1.0}, "option 'lora_dropout'"),
    ({"method": "ewd"}, "option 'method': unknown method 'ewd' \\(did you mean 'ewc'\\?\\); available: .*n-lora"),
    ({"penalty_form": "l2"}, "option 'penalty_form': 'l2' is not one of delta, reference, factors"),
    ({"tasks": ["a", "a"]}, "option 'tasks': a task appears twice"),
    ({"data_dir": "/nonexistent/nlora-data"}, "option 'data_dir': folder /nonexistent/nlora-data does not exist"),
    ({"tasks": [""]}, r"option 'tasks': task name '' is not a plain dataset name \(it is empty\)"),
    ({"tasks": ["a", "b\\c"]}, r"option 'tasks': task name 'b\\\\c' is not a plain dataset name"),
    ({"tasks": ["a\nb"]}, r"task name 'a\\nb' is not a plain dataset name \(it holds a control character\)"),
    ({"epochs_per_task": [1e10]}, "option 'epochs_per_task': values must be whole numbers from 1 to 2147483647"),
])
def test_validate_rejects_bad_values(changes, message):
    cfg = RunConfig(tasks=["a"]).replace(**changes)
    with pytest.raises(NloraError, match=message):
        cfg.validate()


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tasks: [x, y]\nlambda: 0.3\nepochs: 2\n")
    cfg = load_config(path, {"epochs": "5"})
    assert cfg.tasks == ["x", "y"] and cfg.lambda_ == 0.3 and cfg.epochs == 5


def test_yaml_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("tasks: [x\n")
    with pytest.raises(NloraError, match="bad.yaml: not valid YAML"):
        load_config(path)
    path.write_text("epoch: 3\n")
    with pytest.raises(NloraError, match=r"config file .*bad.yaml: unknown key\(s\) 'epoch'"):
        load_config(path)
    with pytest.raises(NloraError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_cached_type_hints_are_the_resolved_annotations_of_every_options_class():
    """nlora.options caches each class's resolved annotations (the CLI's parser asks for every option's): the same
    as resolving them afresh, for the core options and every method's."""
    import typing

    from nlora.methods import METHODS
    from nlora.options import _type_hints, option_fields

    classes = [RunConfig] + sorted({m.Options for m in METHODS.values()}, key=lambda c: c.__name__)
    for cls in classes:
        assert _type_hints(cls) == typing.get_type_hints(cls)
        assert _type_hints(cls) is _type_hints(cls)
        assert {f.name for f in option_fields(cls)} <= set(_type_hints(cls))


def test_task_metrics_accepts_a_mapping_in_python():
    config = RunConfig(tasks=["a", "b"], task_metrics={"b": "rouge_l", "a": "exact_match"})
    assert config.metric_of_task() == {"b": "rouge_l", "a": "exact_match"}
    assert config.to_dict()["task_metrics"] == ["b=rouge_l", "a=exact_match"]  # as config.yaml records it
