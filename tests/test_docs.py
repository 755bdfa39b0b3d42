"""The documentation site: it builds with warnings as errors, its code examples run or parse, and the script that
moved the README's manual into its pages places every section on exactly one page."""

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RUN_MARKER = "<!-- docs: run -->"  # on the line before a ```python block: the test runs it

sys.path.insert(0, str(DOCS))
import build_pages  # noqa: E402


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def code_blocks(path: Path) -> list[tuple[str, str, bool]]:
    """(language, code, marked to run) of each fenced block of a markdown file."""
    out, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        match = re.match(r"^(\s*)(`{3,}|~{3,})\s*(\w*)", lines[i])
        if not match:
            i += 1
            continue
        indent, fence, language = match.groups()
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(fence)
                   and not lines[j].strip()[len(fence):].strip())
        code = "\n".join(line[len(indent):] for line in lines[i + 1:end])
        out.append((language, code, i > 0 and lines[i - 1].strip() == RUN_MARKER))
        i = end + 1
    return out


def test_the_site_builds_with_warnings_as_errors(tmp_path):
    missing = [m for m in ("mkdocs", "material", "mkdocstrings_handlers.python") if importlib.util.find_spec(
        m.split(".")[0]) is None]
    if missing:
        pytest.skip(f"mkdocs, mkdocs-material or mkdocstrings-python not installed ({missing}): "
                    'pip install -e ".[docs]"')
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                           str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "api" / "index.html").is_file()
    assert "RunConfig" in (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")


def test_the_marked_python_examples_run(tmp_path):
    """Each page's marked blocks run in order in one process, in a folder of their own."""
    pages = {p: [code for language, code, run in code_blocks(p) if language == "python" and run]
             for p in documents()}
    pages = {p: blocks for p, blocks in pages.items() if blocks}
    assert pages, f"no ```python block is marked {RUN_MARKER}"
    for page, blocks in pages.items():
        folder = tmp_path / page.relative_to(ROOT).with_suffix("").as_posix().replace("/", "_")
        folder.mkdir()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run([sys.executable, "-c", "\n\n".join(blocks)], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{page}: {done.stderr}"


def test_every_python_and_yaml_example_is_well_formed():
    for page in documents():
        for language, code, _ in code_blocks(page):
            if language == "python":
                compile(code, str(page), "exec")
            elif language == "yaml":
                yaml.safe_load(code)


def nlora_commands(code: str) -> list[list[str]]:
    """The arguments of each `nlora ...` command of a shell block (also after `accelerate launch ... -m`)."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
        command: list[str] = []
        for word in words + [";"]:
            if word in (";", "&&", "||", "|"):
                if "nlora" in command:
                    start = command.index("nlora")
                    if start == 0 or command[start - 1] == "-m":
                        out.append([w for w in command[start + 1:] if w != "..."])
                command = []
            else:
                command.append(word)
    return out


def test_nlora_commands_of_the_shell_examples_parse(monkeypatch):
    from nlora.cli import build_parser

    monkeypatch.chdir(ROOT)  # --method-module examples/methods/... is a path from the repository's root

    count = 0
    for page in documents():
        for language, code, _ in code_blocks(page):
            if language not in ("bash", "sh", "shell"):
                continue
            for argv in nlora_commands(code):
                try:
                    build_parser(argv).parse_args(argv)
                except SystemExit:
                    pytest.fail(f"{page.relative_to(ROOT)}: `nlora {shlex.join(argv)}` does not parse")
                count += 1
    assert count > 20


def test_a_misspelt_command_is_caught():
    commands = nlora_commands("for k in 1 2; do\n  nlora run --order $k --no-such-flag 1 ...  # comment\ndone\n"
                              "pip install x && nlora demo\naccelerate launch -m nlora run --config a.yaml\n")
    assert commands == [["run", "--order", "$k", "--no-such-flag", "1"], ["demo"], ["run", "--config", "a.yaml"]]
    from nlora.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser(commands[0]).parse_args(commands[0])


MANUAL = """# nlora

What it is.

## Install and run the default job

```bash
pip install nlora
# Not a heading: a comment in a code block
```

After the block. The matrix R[i][j], and `R[i][j]` in code.

More text, not in the README.

## Run the tests

```bash
python -m pytest -q --durations=10 tests
```

Four minutes.

### Writing a method

See [the numbers](benchmarks/RESULTS.md#speed) and [a site](https://example.org).
"""


@pytest.fixture
def small_tables(monkeypatch):
    monkeypatch.setattr(build_pages, "PAGES", {"index.md": (None, ""), "guide/install.md": ("Install", "Lead."),
                                               "develop.md": (None, "For contributors.")})
    monkeypatch.setattr(build_pages, "SECTIONS", [("nlora", "index.md"),
                                                  ("Install and run the default job", "guide/install.md"),
                                                  ("Writing a method", "guide/install.md"),
                                                  ("Run the tests", "develop.md")])
    monkeypatch.setattr(build_pages, "API", [])
    monkeypatch.setattr(build_pages, "CROSS_REFERENCES", [
        ("guide/install.md", "More text, not in the README.", "More text, [elsewhere](../develop.md)."),
        ("develop.md", "Words no longer there", "")])


def test_build_pages_places_every_section_once(small_tables, tmp_path, capsys):
    source = tmp_path / "MANUAL.md"
    source.write_text(MANUAL)
    assert build_pages.main(["--source", str(source), "--output", str(tmp_path)]) == 0
    install = (tmp_path / "docs" / "guide" / "install.md").read_text()
    # a `###` whose `##` is on another page becomes a `##`; the code block's comment stays a comment
    assert [(s.level, s.heading) for s in build_pages.split_sections(install)] == [
        (1, "Install"), (2, "Install and run the default job"), (2, "Writing a method")]
    assert "# Not a heading" in install and "R[i]\\[j]" in install and "`R[i][j]`" in install
    assert "[the numbers](../measurements.md#speed)" in install and "(https://example.org)" in install
    assert "More text, [elsewhere](../develop.md)." in install  # a cross-reference made a link
    assert "develop.md no longer says 'Words no longer there'" in capsys.readouterr().err
    develop = (tmp_path / "docs" / "develop.md").read_text()
    assert develop.startswith("# Run the tests\n\nFor contributors.") and "Writing a method" not in develop
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith(build_pages.MARKER)
    assert "python -m pytest -q --durations=10 tests" in readme and "Four minutes." in readme
    assert "After the block." in readme and "More text, not in the README." not in readme
    # run again on the same manual, or on its own output, it writes the same files
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.md")}
    assert build_pages.main(["--source", str(source), "--output", str(tmp_path)]) == 0
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.md")} == before
    assert build_pages.main(["--source", str(tmp_path / "README.md"), "--output", str(tmp_path)]) == 0
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.md")} == before


def test_build_pages_names_a_section_that_maps_nowhere(small_tables, tmp_path, capsys):
    source = tmp_path / "MANUAL.md"
    source.write_text(MANUAL + "\n## A new section\n\nText.\n")
    assert build_pages.main(["--source", str(source), "--output", str(tmp_path)]) == 1
    assert "'A new section'" in capsys.readouterr().err
    assert not (tmp_path / "README.md").exists() and not (tmp_path / "docs").exists()


def test_build_pages_names_a_link_no_page_shows(small_tables, tmp_path, capsys):
    source = tmp_path / "MANUAL.md"
    source.write_text(MANUAL + "\nSee [the example](examples/methods/l2_anchor.py).\n")
    assert build_pages.main(["--source", str(source), "--output", str(tmp_path)]) == 1
    assert "'examples/methods/l2_anchor.py'" in capsys.readouterr().err


def test_the_pages_are_the_scripts_and_the_readme_is_its_output():
    written = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert written == set(build_pages.PAGES) | {"api.md", "measurements.md"}
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.startswith(build_pages.MARKER)
    # the README's test command is the one CI runs
    command = "python -m pytest -q --durations=10 tests"
    assert command in readme and command in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert set(build_pages.PAGES) == {page for _, page in build_pages.SECTIONS}


def inline_code(path: Path) -> list[str]:
    """The inline code spans of a markdown file, outside its code blocks."""
    text = re.sub(r"^(\s*)(`{3,}|~{3,}).*?^\1\2\s*$", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    return re.findall(r"`([^`\n]+)`", text)


def resolves(dotted: str) -> bool:
    """Whether `nlora.a.b.c` is a module or an attribute reached from one."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for part in parts[i:]:
                obj = getattr(obj, part)
        except AttributeError:
            return False
        return True
    return False


def test_the_files_and_names_the_docs_mention_exist():
    """A repository path (`nlora/train/loop.py`, `examples/...`) or a dotted name (`nlora.tasks.scoring.score`)
    in the docs' inline code names something that exists, so a file moved or a name renamed fails here."""
    missing = []
    for page in documents():
        for code in inline_code(page):
            for path in re.findall(r"(?<![\w/.-])((?:nlora|examples|benchmarks|tests|\.ci)/[\w./<>{}*-]+)", code):
                if not re.search(r"[<>{}*]", path) and not (ROOT / path.rstrip(".,")).exists():
                    missing.append(f"{page.relative_to(ROOT)}: {path}")
            for name in re.findall(r"(?<![\w/.])(nlora(?:\.\w+)+)", code):
                if not resolves(name):
                    missing.append(f"{page.relative_to(ROOT)}: {name}")
    assert not missing, "the docs name what does not exist: " + "; ".join(missing)
