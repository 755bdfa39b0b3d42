"""The conformance kit itself (nlora.testing): it catches a method whose state is not saved, or saved too late, and
passes the same method when it saves its state; nlora's own suite runs the kit on nlora's methods only, whatever
method packages are installed."""

from pathlib import Path

import pytest

from nlora.methods import registry
from nlora.testing import builtin_methods
from nlora.testing.kit import Kit, _Runs, check_killed_and_resumed, write_kit_data

# a step counter that changes every later gradient; `state_dict` returns it (saved), returns the value of the last
# task's end (late: a mid-task checkpoint holds a stale count), or leaves it out (never)
COUNTING = '''
import nlora


@nlora.register
class Counting(nlora.Method):
    name = "counting-{how}"
    adapter_layout = "snapshot"

    def __init__(self, config, options=None):
        super().__init__(config, options)
        self.steps = self.at_task_end = 0

    def transform_gradients(self, k, named, ctx):
        for p in named.values():
            if p.grad is not None:
                p.grad.add_(1e-3 * self.steps)

    def after_step(self, k, ctx):
        self.steps += 1

    def after_task(self, k, ctx):
        self.at_task_end = self.steps

    def state_dict(self):
        return {{"saved": {{"steps": self.steps}}, "late": {{"steps": self.at_task_end}}, "never": {{}}}}["{how}"]

    def load_state_dict(self, state):
        self.steps = self.at_task_end = state.get("steps", 0)
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_kit_data(tmp_path_factory.mktemp("kit-data"))


@pytest.mark.parametrize("how", ["saved", "late", "never"])
def test_the_kit_fails_a_method_whose_state_is_saved_late_or_never(tmp_path, data, how):
    module = tmp_path / f"counting_{how}.py"
    module.write_text(COUNTING.format(how=how))
    try:
        kit = Kit([f"counting-{how}"], [str(module)], {})
        reference = _Runs(kit, tmp_path / "reference", data)[f"counting-{how}"]
        if how == "saved":
            check_killed_and_resumed(kit, f"counting-{how}", data, reference, tmp_path)
            return
        with pytest.raises(AssertionError):  # the resumed run trains with another count
            check_killed_and_resumed(kit, f"counting-{how}", data, reference, tmp_path)
    finally:
        registry.METHODS.pop(f"counting-{how}", None)


def test_an_installed_method_package_does_not_join_nlora_own_kit(tmp_path, monkeypatch):
    (tmp_path / "my_cl_methods.py").write_text(
        "import nlora\n\n@nlora.register\nclass Mine(nlora.Method):\n    name = 'mine-installed'\n")
    info = tmp_path / "my_cl_methods-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-cl-methods\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[nlora.methods]\nmine = my_cl_methods:Mine\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_loaded_entry_points", False)
    try:
        registry.load_methods()
        assert "mine-installed" in registry.METHODS
        assert "mine-installed" not in builtin_methods()
        assert {"n-lora", "seq-lora", "mtl"} <= set(builtin_methods())
    finally:
        registry.METHODS.pop("mine-installed", None)


def test_the_command_runs_the_kit_on_a_method_from_a_file(tmp_path):
    from nlora.testing import fresh_process

    example = Path(__file__).resolve().parents[1] / "examples" / "methods" / "l2_anchor.py"
    done = fresh_process.run(fresh_process.run_module, "nlora.testing",
                             ["l2-anchor", "--method-module", str(example), "--no-distributed", "--", "-q",
                              "-k", "uniquely"], log=tmp_path / "kit.log", cwd=tmp_path)
    assert done.returncode == 0, done.output
    assert "1 passed" in done.output, done.output
