"""Methods from outside the package: a .py file or module named by option method_module (the CLI and nlora.run),
and an installed distribution's `nlora.methods` entry point; the commands that read no model import no torch."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import nlora
from nlora.cli import main
from nlora.errors import NloraError
from nlora import method_catalog
from nlora.methods import METHODS, registry

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "methods" / "l2_anchor.py")


def test_a_method_module_works_through_the_python_api(tmp_path, synthetic_dir):
    config = nlora.RunConfig(model="tiny-bert", method="l2-anchor", method_module=[EXAMPLE], anchor_lambda=5.0,
                             tasks=["harbor", "orchard"], data_dir=str(synthetic_dir), output_dir=str(tmp_path),
                             max_train_samples=4, max_eval_samples=2, batch_size=4, device="cpu")
    metrics = nlora.run(config, progress=False)
    assert metrics["complete"] and metrics["method"] == "l2-anchor"
    assert (tmp_path / "adapters" / "0-harbor" / "method_state.safetensors").is_file()
    assert "method_module" in (tmp_path / "config.yaml").read_text()  # resume and launched processes import it


def test_a_method_module_file_is_recorded_resolved(tmp_path, synthetic_dir, monkeypatch):
    (tmp_path / "mine").mkdir()
    (tmp_path / "work").mkdir()
    shutil.copy(EXAMPLE, tmp_path / "mine" / "l2_anchor.py")
    monkeypatch.chdir(tmp_path / "work")
    assert main(["run", "--model", "tiny-bert", "--method", "l2-anchor", "--method-module", "../mine/l2_anchor.py",
                 "--tasks", "harbor", "--data-dir", str(synthetic_dir), "--output-dir", "run", "--max-train-samples",
                 "4", "--max-eval-samples", "2", "--batch-size", "4", "--device", "cpu", "--quiet"]) == 0
    saved = yaml.safe_load((tmp_path / "work" / "run" / "config.yaml").read_text())["method_module"]
    assert saved == [str(tmp_path / "mine" / "l2_anchor.py")]  # found from any folder
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "work/run", "--tasks", "harbor", "--output", "p.jsonl", "--quiet"]) == 0


def test_a_missing_or_broken_method_module_is_named(tmp_path):
    with pytest.raises(NloraError, match="option 'method_module': file .*nothere.py does not exist"):
        registry.import_method_modules([str(tmp_path / "nothere.py")])
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(NloraError, match="importing .*broken.py.* failed: RuntimeError: boom"):
        registry.import_method_modules([str(tmp_path / "broken.py")])


def test_an_entry_point_registers_a_method(tmp_path, monkeypatch):
    (tmp_path / "my_cl_methods.py").write_text(
        "import nlora\n\n@nlora.register\nclass Mine(nlora.Method):\n    name = 'mine-from-ep'\n")
    info = tmp_path / "my_cl_methods-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-cl-methods\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[nlora.methods]\nmine = my_cl_methods:Mine\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_loaded_entry_points", False)
    try:
        assert registry.get_method("mine-from-ep").name == "mine-from-ep"
    finally:
        METHODS.pop("mine-from-ep", None)


def _install_entry_point(tmp_path, monkeypatch, name: str, module_text: str) -> None:
    """An installed distribution declaring `name` in the nlora.methods group, from a module of `module_text`."""
    (tmp_path / f"{name}_module.py").write_text(module_text)
    info = tmp_path / f"{name}_dist-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-dist\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[nlora.methods]\n{name} = {name}_module:Mine\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_loaded_entry_points", False)


def test_a_broken_entry_point_costs_a_warning_naming_it(tmp_path, monkeypatch, capsys, synthetic_dir):
    _install_entry_point(tmp_path, monkeypatch, "broken", "raise ImportError('no such thing')\n")
    assert main(["methods"]) == 0
    out, err = capsys.readouterr()
    assert "n-lora" in out
    assert err.strip().splitlines() == [
        "nlora: warning: entry point 'broken' (broken_module:Mine) of group nlora.methods failed to load, its "
        "methods are not available: ImportError: no such thing"]
    monkeypatch.setattr(registry, "_loaded_entry_points", False)
    assert main(["run", "--tasks", "harbor", "--data-dir", str(synthetic_dir), "--output-dir", str(tmp_path / "r"),
                 "--model", "tiny-bert", "--dry-run"]) == 0  # any run still works


@pytest.mark.parametrize("case", ["missing", "syntax", "raises", "method name taken", "option name taken"])
def test_a_bad_method_module_is_one_error_line_from_nlora_run(tmp_path, capsys, case):
    texts = {"syntax": "def (\n", "raises": "raise RuntimeError('boom')\n",
             "method name taken": "import nlora\n\n@nlora.register\nclass Mine(nlora.Method):\n"
                                  "    name = 'n-lora'\n",
             "option name taken": "from dataclasses import dataclass\nimport nlora\n\n@dataclass\n"
                                  "class Opts(nlora.MethodOptions):\n    lr: float = nlora.option('x', default=1.0)\n\n"
                                  "@nlora.register\nclass Mine(nlora.Method):\n    name, Options = 'mine-x', Opts\n"}
    module = tmp_path / f"mod_{case.replace(' ', '_')}.py"
    if case in texts:
        module.write_text(texts[case])
    code = main(["run", "--method-module", str(module), "--tasks", "a", "--lamda", "1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("nlora: error: option 'method_module': ") and str(module) in err


def test_a_mistyped_option_or_method_is_named_with_the_closest_names(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--tasks", "a", "--lamda", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: nlora run ")
    assert "nlora run: error: unrecognized arguments: --lamda 1 (did you mean '--lambda'" in err
    assert main(["run", "--method", "nlora"]) == 2
    assert "option 'method': unknown method 'nlora' (did you mean 'n-lora'" in capsys.readouterr().err


def test_a_method_not_loaded_is_named_before_its_options(capsys):
    assert main(["run", "--method", "agem", "--agem-batch", "2"]) == 2  # its --method-module left out
    err = capsys.readouterr().err
    assert "unknown method 'agem'" in err and "--method-module FILE.py" in err and "unrecognized" not in err


def test_methods_name_lists_each_options_choices(capsys):
    assert main(["methods", "n-lora"]) == 0
    assert "(one of delta, reference, factors; default: delta)" in capsys.readouterr().out


def test_the_method_catalog_is_the_registry_and_a_broken_cache_is_ignored():
    catalog = method_catalog.method_catalog()
    assert catalog == method_catalog.describe(METHODS) == json.loads(json.dumps(catalog))
    method_catalog._cache_file().write_text("{not json")
    assert method_catalog.method_catalog() == catalog
    cached = json.loads(method_catalog._cache_file().read_text())  # what another process will read
    assert cached == {name: entry for name, entry in catalog.items()
                      if METHODS[name].__module__.startswith("nlora.methods.")}


def _no_home(cls):
    raise RuntimeError("Could not determine home directory")  # what Path.home() raises without HOME or a user


def test_a_cache_folder_that_cannot_be_written_costs_only_time(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("NLORA_CACHE_DIR", str(tmp_path / "file" / "cache"))  # under a file: never a folder
    assert method_catalog.method_catalog() == method_catalog.describe(METHODS)
    monkeypatch.delenv("NLORA_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("HOME")
    monkeypatch.setattr(Path, "home", classmethod(_no_home))
    assert method_catalog.method_catalog() == method_catalog.describe(METHODS)


def test_clashing_option_names_are_refused():
    from dataclasses import dataclass

    @dataclass
    class Clash(nlora.MethodOptions):
        orth_lambda: float = nlora.option("taken by o-lora", default=1.0)

    class Other(nlora.Method):
        name, Options = "clash-test", Clash

    with pytest.raises(NloraError, match="option 'orth_lambda' is already method 'o-lora'"):
        nlora.register(Other)
    assert "clash-test" not in METHODS


@pytest.mark.parametrize("argv", [["--help"], ["presets"], ["status", "RUN"], ["methods"], ["methods", "ewc"],
                                  ["run", "--lamda", "1"], ["run", "--method", "nlora"], ["run", "--help"],
                                  ["export", "no-such-run", "out"], ["predict", "no-such-run", "--tasks", "a"],
                                  ["rescore", "no-such-run"]])
def test_commands_that_read_no_model_import_no_torch(tmp_path, synthetic_dir, argv):
    method_catalog.method_catalog()  # the methods' catalog as a first command leaves it
    run = tmp_path / "run"
    if "RUN" in argv:
        (run).mkdir()
        (run / "config.yaml").write_text("method: n-lora\ntasks: [harbor]\n")
        argv = [a if a != "RUN" else str(run) for a in argv]
    code = ("import sys\nfrom nlora.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n" % (argv,))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
