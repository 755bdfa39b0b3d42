"""The package's layout keeps its promises: what reads a run directory (nlora.analysis) imports no training code,
and a method's toolbox (nlora.methods) does not reach into the training loop."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nlora"


def imported_modules(path: Path) -> set[str]:
    """The nlora modules `path` imports at run time (absolute, relative resolved; `from X import name` counts X and
    X.name)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: never imported at run time
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}
    return {name for name in found if name == "nlora" or name.startswith("nlora.")}


def modules_under(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).glob("*.py"))


def test_imported_modules_resolves_relative_imports(tmp_path):
    assert "nlora.train.loop" in imported_modules(PACKAGE / "runner.py")
    assert "nlora.errors" in imported_modules(PACKAGE / "analysis" / "status.py")


@pytest.mark.parametrize("path", modules_under("analysis"), ids=lambda p: p.name)
def test_analysis_imports_no_training_code(path):
    forbidden = ("nlora.train", "nlora.runner", "nlora.methods", "nlora.adapters")
    bad = sorted(m for m in imported_modules(path) if m.startswith(forbidden))
    assert not bad, f"{path.name} imports training code: {bad}"


@pytest.mark.parametrize("path", [p for p in modules_under("methods") if p.name != "registry.py"],
                         ids=lambda p: p.name)
def test_methods_never_import_the_training_loop_or_runner(path):
    # the registry reads the core option names (lazily) to refuse a method option that shadows one
    bad = sorted(m for m in imported_modules(path)
                 if m.startswith(("nlora.train.loop", "nlora.runner", "nlora.config", "nlora.cli")))
    assert not bad, f"{path.name} imports {bad}"


def test_every_module_imports_first():
    """Each module of the package imports in an interpreter where no other nlora module is loaded yet (an import
    cycle fails only for the module imported first, e.g. a method author's `from nlora.train.regularization import
    LossTerm`). One child process; the nlora modules are dropped from sys.modules between imports."""
    modules = sorted(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
                     for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")
    script = (
        "import importlib, sys, torch, transformers, peft\n"
        "failed = []\n"
        f"for name in {modules!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'nlora' or m.startswith('nlora.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        failed.append(f'{name}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(failed))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "", done.stdout


def test_the_import_contracts_hold():
    """The layers written down in pyproject.toml ([tool.importlinter]), checked on grimp's import graph (imports
    inside functions count; those under TYPE_CHECKING do not)."""
    done = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())"], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]
    assert "0 broken" in done.stdout
