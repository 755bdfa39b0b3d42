"""A fresh process without the cost of a fresh interpreter: the target runs in a child forked from a multiprocessing
forkserver that has already imported nlora (torch, transformers, peft: ~5 s of a new interpreter's start). The
server never computes anything, so each child starts with fresh torch/OpenMP state (a plain fork of the pytest
process, which has run torch ops, is not safe with libgomp); the environment is set in the child, as for a
subprocess, before the target runs."""

import multiprocessing
import os
import sys
from pathlib import Path
from types import SimpleNamespace

_CONTEXT = multiprocessing.get_context("forkserver")
# the modules the CLI imports lazily too, so the children import nothing heavy themselves
_CONTEXT.set_forkserver_preload(["nlora.cli", "nlora.runner", "nlora.analysis.summary", "nlora.train.engine"])


def start() -> None:
    """Start the server now (its imports take seconds): called where the tests using it are collected, so its
    imports overlap the tests that run before them."""
    from multiprocessing import forkserver

    if multiprocessing.parent_process() is None:  # not in a child (test_fresh_clone's runs pytest)
        forkserver.ensure_running()


def _child(target, args, env, cwd, log):
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)  # stdout and stderr to one file (the server's own are pytest's capture files)
    os.dup2(fd, 2)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.exit(target(*args))


def run(target, *args, log: Path, env: dict | None = None, cwd=None, timeout=300) -> SimpleNamespace:
    """target(*args) in a fresh child; its return value is the exit code. The target is one of this module's
    functions (the child imports the target's module: a test module would start a server of its own). Returns the
    exit code (-9 if killed by SIGKILL) and the child's output (stdout and stderr together, also left in `log`)."""
    process = _CONTEXT.Process(target=_child, args=(target, args, dict(env if env is not None else os.environ),
                                                   str(cwd or os.getcwd()), str(log)))
    process.start()
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
        raise TimeoutError(f"{target.__name__}{args} still running after {timeout} s")
    return SimpleNamespace(returncode=process.exitcode, output=Path(log).read_text(errors="replace"))


def nlora_main(argv):
    from nlora.cli import main

    return main(argv)


def run_module(name, argv):
    """`python -m NAME ARGV...`: the module run as __main__ with sys.argv set, as the interpreter does."""
    import runpy

    sys.argv = [name, *argv]
    runpy.run_module(name, run_name="__main__", alter_sys=True)
    return 0


def pytest_main(args):
    import pytest

    return int(pytest.main(args))
