"""`python -m nlora.testing METHOD... [--method-module M] [--no-distributed] [-- PYTEST-ARGS]`: the conformance
kit on the named methods, without a test file of one's own (it writes one in a temporary folder and runs pytest)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

TEST_FILE = '''from nlora.testing import conformance_tests

globals().update(conformance_tests({methods!r}, method_module={modules!r}, distributed={distributed!r}))
'''


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m nlora.testing", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("methods", nargs="+", help="names of registered methods")
    parser.add_argument("--method-module", action="append", default=[],
                        help="a module name or .py file that registers them (repeatable)")
    parser.add_argument("--no-distributed", action="store_true", help="skip the 2-process launch")
    args = parser.parse_args(argv)
    modules = [str(Path(m).resolve()) if m.endswith(".py") else m for m in args.method_module]
    import pytest

    with tempfile.TemporaryDirectory(prefix="nlora-kit-") as folder:
        test_file = Path(folder) / "test_nlora_conformance.py"
        test_file.write_text(TEST_FILE.format(methods=args.methods, modules=modules,
                                              distributed=not args.no_distributed))
        return int(pytest.main([str(test_file), "-p", "no:cacheprovider", "--rootdir", folder,
                                "-o", "markers=distributed: launches 2 processes", *pytest_args]))


if __name__ == "__main__":
    sys.exit(main())
