"""The method conformance kit, for any list of methods, built in or from the author's own repository (it needs
pytest: the `test` extra). A test file of two lines runs every check on a method:

    # tests/test_conformance.py of your repository
    from nlora.testing import conformance_tests

    globals().update(conformance_tests(["my-method"], method_module="my_pkg.methods"))

then `pytest tests/test_conformance.py` (add `-m "not distributed"` to skip the 2-process launch; register the
marker `distributed` in your pytest configuration to silence pytest's warning about it). The same from the command
line, without a file: `python -m nlora.testing my-method --method-module my_pkg.methods`.

What it checks, and the runs it makes: nlora.testing.kit. A method's `smoke_options` are the options it runs
with (a strong weight, few samples: what makes its own part act on a run of a few steps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from . import fresh_process
from .kit import Kit, _Runs, builtin_methods, launch_two_processes, write_kit_data
from . import kit as _kit

__all__ = ["conformance_tests", "builtin_methods"]


def conformance_tests(methods: list[str], method_module: str | list[str] | None = None,
                      variants: dict[str, tuple[str, list[str]]] | None = None,
                      distributed: bool = True, launched: dict[str, tuple[str, list[str]]] | None = None
                      ) -> dict[str, Any]:
    """The kit's pytest tests and fixtures for `methods` (names of registered methods), to be put in a test
    module's globals. `method_module`: the modules or .py files that register them (option method_module: the
    runs import them too). `variants`: extra runs, name -> (method, extra command-line options), e.g. a core
    option that changes how any method trains. `distributed`: also compare a 2-process run of each (one
    accelerate launch for all of them; marked `distributed`). `launched`: like variants, runs of that launch only
    (fixture kit_two_process_runs), for the caller's own checks."""
    modules = [method_module] if isinstance(method_module, str) else list(method_module or [])
    kit = Kit([*methods, *sorted(variants or {})], modules, {**(variants or {}), **(launched or {})})
    names = kit.methods
    own = list(methods)
    fresh_process.start()  # its imports overlap the tests collected before these

    @pytest.fixture(scope="module")
    def kit_data(tmp_path_factory) -> Path:
        return write_kit_data(tmp_path_factory.mktemp("kit-data"))

    @pytest.fixture(scope="module")
    def kit_runs(tmp_path_factory, kit_data) -> _Runs:
        """The uninterrupted run of each method, in this process."""
        return _Runs(kit, tmp_path_factory.mktemp("conformance"), kit_data)

    @pytest.mark.parametrize("method", names)
    def test_killed_and_resumed_is_the_uninterrupted_run(tmp_path, kit_data, kit_runs, method):
        _kit.check_killed_and_resumed(kit, method, kit_data, kit_runs[method], tmp_path)

    @pytest.mark.parametrize("method", names)
    def test_method_state_round_trips(tmp_path, kit_runs, method):
        _kit.check_state_round_trips(kit, method, kit_runs[method], tmp_path)

    @pytest.mark.parametrize("method", names)
    def test_what_was_evaluated_is_what_the_saved_adapters_compute(kit_runs, method):
        _kit.check_evaluated_is_what_adapters_compute(kit, method, kit_runs[method])

    @pytest.mark.parametrize("method", names)
    def test_predict_and_export_reproduce_the_last_row(tmp_path, kit_runs, method):
        _kit.check_predict_and_export(kit, method, kit_runs[method], tmp_path)

    @pytest.mark.parametrize("method", own)
    def test_bad_options_are_refused_before_any_write(tmp_path, kit_data, capsys, method):
        _kit.check_bad_options_refused(kit, method, kit_data, tmp_path / "run", capsys)

    def test_every_method_names_its_options_uniquely():
        seen = {}
        for method in own:
            options = kit.method(method).Options
            for key in options.keys():
                assert seen.setdefault(key, options) is options, key

    tests = {name: value for name, value in locals().items() if name.startswith(("test_", "kit_"))}
    if distributed:
        @pytest.fixture(scope="module")
        def kit_two_process_runs(request, tmp_path_factory, kit_data, kit_runs) -> dict[str, Path]:
            """The run of every selected method with 2 processes, all in one launch (after the 1-process runs:
            on few cores the two slow each other down more than running them in turn costs)."""
            selected = sorted({item.callspec.params["method"] for item in request.session.items
                               if "kit_two_process_runs" in getattr(item, "fixturenames", ())})
            return launch_two_processes(kit, selected, kit_data, tmp_path_factory.mktemp("conformance-2"))

        @pytest.mark.distributed
        @pytest.mark.parametrize("method", names)
        def test_two_processes_give_the_one_process_run(kit_runs, kit_two_process_runs, method):
            from .same_run import assert_same_run

            assert_same_run(kit_runs[method], kit_two_process_runs[method], exact=False)

        tests.update(kit_two_process_runs=kit_two_process_runs,
                     test_two_processes_give_the_one_process_run=test_two_processes_give_the_one_process_run)
    return tests
