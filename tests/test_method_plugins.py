"""Methods from outside the package: a .py file or module named by option method_module (the CLI and nlora.run),
and an installed distribution's `nlora.methods` entry point; the commands that read no model import no torch."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import nlora
from nlora.cli import main
from nlora.errors import NloraError
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


@pytest.mark.parametrize("argv", [["--help"], ["presets"], ["status", "RUN"]])
def test_commands_that_read_no_model_import_no_torch(tmp_path, synthetic_dir, argv):
    run = tmp_path / "run"
    if "RUN" in argv:
        (run).mkdir()
        (run / "config.yaml").write_text("method: n-lora\ntasks: [harbor]\n")
        argv = [a if a != "RUN" else str(run) for a in argv]
    code = ("import sys\nfrom nlora.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n" % (argv,))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
