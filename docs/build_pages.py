"""Move the README's manual into the documentation site's pages, and write the short README a newcomer reads.

    python docs/build_pages.py                     # README.md, the whole manual -> docs/**/*.md + a short README.md
    python docs/build_pages.py --source FULL.md    # the manual from another file (README.md is then overwritten)

Every section of the manual (a `#`, `##` or `###` heading outside code blocks, with the text up to the next one)
goes to exactly one page, as SECTIONS says; a heading SECTIONS does not name stops the script, naming it, before
anything is written. Within a page the sections keep the order of SECTIONS, under the title PAGES gives it (or
its first section's heading). Links to files of the repository are rewritten to the site's pages (LINKS). The
API reference page is written from the public names (`__all__`) of the modules in API. Run on a README this
script wrote, it leaves everything as it is.

To move a manual that changed since (a merge that brings edits of the old README): put the whole manual back in
README.md (during the merge, `git checkout HEAD -- README.md`), run this script, add a row to SECTIONS for each
heading it names, and commit README.md and docs/. Then `mkdocs build --strict` (or `mkdocs serve`) builds the
site; tests/test_docs.py checks both.
"""

from __future__ import annotations

import argparse
import importlib
import posixpath
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- Written by docs/build_pages.py: the full documentation is in docs/ (mkdocs serve). -->"

# Each page: its path under docs/, its title (None: its first section's heading) and the line under the title
# that tells who it is for.
PAGES = {
    "index.md": (None, ""),
    "guide/install.md": ("Install and the default job",
                         "Installing nlora, and its offline default job."),
    "guide/your-data.md": (None, "Classification tasks of your own, the options, config files, the Python API."),
    "guide/free-text.md": (None, "Tasks whose answers are free text, and their metrics."),
    "guide/evaluation.md": ("Evaluation", "How the accuracy matrix is evaluated."),
    "guide/using-a-model.md": (None, "The model a run trained, outside nlora."),
    "guide/general-ability.md": (None, "What a task sequence costs the base model's general ability."),
    "guide/diagnostics.md": (None, "What the task updates look like, and reports of runs."),
    "guide/large-models.md": (None, "7B models on one GPU."),
    "guide/tracking.md": (None, "Following a run."),
    "methods.md": (None, "Every method, with its paper and where nlora's version differs from it."),
    "benchmarks.md": (None, "The papers' benchmarks as presets, and the papers' table of results row by row."),
    "studies.md": ("Studies", "A whole table of results (methods, orders, seeds, tuning on dev) in one command."),
    "writing-a-method.md": (None, "For a method author: the contract, the hooks, state and options, and the "
                                  "conformance kit."),
    "run-directory.md": ("The run directory and reliability",
                         "What a run writes, how its metrics are defined, and why a stopped run resumes to the "
                         "same bytes."),
    "scaling-out.md": ("Scaling out", "Several processes through accelerate. A study's cells as SLURM jobs: "
                                      "[Studies](studies.md)."),
    "develop.md": ("Developing nlora", "For a contributor: the test suite and the package's layout."),
    "results.md": ("Results", "What was measured, in short; every number with its machine, command and date: "
                              "[Measurements](measurements.md)."),
}

# Each section of the manual, by its heading, and the page it goes to, in the order it takes there.
SECTIONS = [
    ("nlora", "index.md"),
    ("Install and run the default job", "guide/install.md"),
    ("Running on your data", "guide/your-data.md"),
    ("Free-text tasks: TRACE, SuperNI and your own", "guide/free-text.md"),
    ("Evaluation mode", "guide/evaluation.md"),
    ("Evaluation plan", "guide/evaluation.md"),
    ("Using a trained model", "guide/using-a-model.md"),
    ("General-ability retention (lm-evaluation-harness)", "guide/general-ability.md"),
    ("Parameter diagnostics and reports", "guide/diagnostics.md"),
    ("Large models: precision and memory", "guide/large-models.md"),
    ("Tracking", "guide/tracking.md"),
    ("Methods", "methods.md"),
    ("Full fine-tuning: `seq-ft` and `mtl-ft`", "methods.md"),
    ("Constant cost per task: the frozen adapters are folded (`--fold-adapters`, on by default)", "methods.md"),
    ("The N-LoRA penalty, three forms (`--penalty-form`)", "methods.md"),
    ("The papers' benchmarks", "benchmarks.md"),
    ("The papers' table in nlora", "benchmarks.md"),
    ("Studies: a paper's whole table in one command", "studies.md"),
    ("Writing a method", "writing-a-method.md"),
    ("The run directory", "run-directory.md"),
    ("Metrics", "run-directory.md"),
    ("Reliability", "run-directory.md"),
    ("Several GPUs: accelerate", "scaling-out.md"),
    ("Run the tests", "develop.md"),
    ("The package", "develop.md"),
    ("Measured results", "results.md"),
]

# Files of the repository that links in the manual point to, and the page of the site that shows them.
LINKS = {"benchmarks/RESULTS.md": "measurements.md"}

# Words of the manual that point up or down to a section now on another page, and the link that replaces them
# (by page; spaces match any line break). One no longer found is reported, not an error.
PENALTY_FORMS = "methods.md#the-n-lora-penalty-three-forms-penalty-form"
PAPERS_TABLE = "benchmarks.md#the-papers-table-in-nlora"
CROSS_REFERENCES = [
    ("benchmarks.md", "(see the penalty forms above)", f"(see [the penalty forms]({PENALTY_FORMS}))"),
    ("benchmarks.md", "`nlora study run standard-t5-large`, next section",
     "`nlora study run standard-t5-large`, [Studies](studies.md)"),
    ("methods.md", "the papers' table (see below)", f"the papers' table ([the papers' rows]({PAPERS_TABLE}))"),
    ("results.md", "the commands are above.", "the commands are in [The papers' benchmarks](benchmarks.md)."),
    ("run-directory.md", "null: see above",
     "null: see [folding](methods.md#constant-cost-per-task-the-frozen-adapters-are-folded-fold-adapters-on-by-"
     "default)"),
    ("studies.md", "the table of the papers' rows below", f"the [table of the papers' rows]({PAPERS_TABLE})"),
    ("guide/free-text.md", "a classification task (above)",
     "a classification task ([Running on your data](your-data.md))"),
    ("guide/large-models.md", "(see the penalty forms above)", f"(see [the penalty forms](../{PENALTY_FORMS}))"),
    ("guide/your-data.md", "free-text tasks: below", "free-text tasks: [Free-text tasks](free-text.md)"),
    ("guide/your-data.md", "the reference's normalisation, below",
     "the reference's normalisation, [Evaluation mode](evaluation.md#evaluation-mode)"),
]

# The API reference: each namespace, a line about it, and its public names (None: the module's `__all__`); a
# namespace that does not exist is left out.
API = [
    ("nlora", "What a user and a method author import: a run, a study, the configuration, the method contract.",
     None),
    ("nlora.methods", "The method contract and the registry (the names not already above).", None),
    ("nlora.studies", "A study file read into a plan, and what running it returned.",
     ["spec.Study", "spec.read_study", "execute.Outcome"]),
    ("nlora.testing", "The conformance kit, for a method built in or from your own repository.", None),
]

# The short README: which sections of the manual it opens with (the opening of each, up to and including the
# first paragraph after its first code block), then its own quickstart and the pages to go to next.
README_SECTIONS = ["Install and run the default job", "Run the tests"]
HOME_SECTIONS = ["Install and run the default job"]  # the same on the site's home page
QUICKSTART = '''## Quickstart on your own data

A task is a folder of three JSON files, `train.json` and `test.json` (arrays of `{"sentence": ..., "label": ...}`)
and `labels.json` (the label strings), at `<data>/<group>/<task>/`. Two tasks:

<!-- docs: run -->
```python
import json
from pathlib import Path

tasks = {"sentiment": ["positive", "negative"], "topic": ["sports", "science"]}
for task, labels in tasks.items():
    folder = Path("my_data/mine") / task
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.json").write_text(json.dumps(labels))
    for split in ("train", "test"):
        examples = [{"sentence": f"example {i} of {task}", "label": labels[i % 2]} for i in range(8)]
        (folder / f"{split}.json").write_text(json.dumps(examples))
```

Train them one after the other with N-LoRA on the demo's MiniLM (the default model; `--model` takes any hub name
or local path), follow the run, and read its report:

```bash
nlora run --data-dir my_data --tasks sentiment,topic --method n-lora --output-dir runs/mine
nlora status runs/mine
nlora report runs/mine          # runs/mine/report/report.md and its plots
```

`runs/mine/metrics.json` holds the accuracy matrix, AP, BWT and forgetting; `nlora run --help` lists every option.
'''


class BuildError(Exception):
    """Something the tables above do not cover; the message says what to add."""


@dataclass
class Section:
    heading: str
    level: int
    lines: list[str] = field(default_factory=list)  # the text under the heading
    parent: str | None = None  # the heading of the section one level up

    @property
    def body(self) -> str:
        return "\n".join(self.lines).strip("\n")


def fence_of(line: str) -> str | None:
    """The fence a line opens or closes (``` or ~~~, at least three), else None."""
    match = re.match(r"^\s*(`{3,}|~{3,})", line)
    return match.group(1) if match else None


def split_sections(text: str) -> list[Section]:
    """The manual's sections, by their `#`..`###` headings outside code blocks."""
    sections: list[Section] = []
    open_fence = None
    parents: dict[int, str] = {}
    for line in text.splitlines():
        fence = fence_of(line)
        if fence and (open_fence is None or fence.startswith(open_fence[0] * len(open_fence))):
            open_fence = None if open_fence else fence
        heading = None if open_fence or fence else re.match(r"^(#{1,3}) +(.+?)\s*#*\s*$", line)
        if heading:
            level = len(heading.group(1))
            parents[level] = heading.group(2)
            sections.append(Section(heading.group(2), level, parent=parents.get(level - 1)))
        elif sections:
            sections[-1].lines.append(line)
        elif line.strip():
            raise BuildError(f"text before the first heading: {line!r}")
    return sections


def check_mapping(sections: list[Section]) -> dict[str, str]:
    """Each heading's page; a heading SECTIONS does not name, or names twice, is an error."""
    pages = dict(SECTIONS)
    headings = [s.heading for s in sections]
    unmapped = [h for h in headings if h not in pages]
    if unmapped:
        raise BuildError("README sections that map to no page (add them to SECTIONS in docs/build_pages.py): "
                         + "; ".join(repr(h) for h in unmapped))
    twice = sorted({h for h in headings if headings.count(h) > 1})
    if twice:
        raise BuildError(f"README headings that occur twice: {twice}")
    unknown = sorted({p for p in pages.values() if p not in PAGES})
    if unknown:
        raise BuildError(f"SECTIONS names pages that PAGES lacks: {unknown}")
    stale = [h for h in pages if h not in headings]
    if stale:
        print(f"build_pages: SECTIONS names headings the README no longer has: {stale}", file=sys.stderr)
    return pages


def rewrite_links(text: str, page: str, heading: str) -> str:
    """Links to repository files made to point at the site's pages, relative to `page`."""
    def replace(match: re.Match) -> str:
        target = match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # a URL
            return match.group(0)
        path, _, anchor = target.partition("#")
        if path not in LINKS:
            raise BuildError(f"section {heading!r} links to {target!r}, which no page shows "
                             "(add it to LINKS in docs/build_pages.py)")
        moved = posixpath.relpath(LINKS[path], posixpath.dirname(page) or ".")
        return f"{match.group(1)}({moved}{'#' + anchor if anchor else ''})"
    return re.sub(r"(\[[^\]]*\])\(([^)\s]+)\)", replace, text)


def in_prose(text: str, change, inline_code: bool = False) -> str:
    """`change` applied to the text outside code blocks (and outside inline code, unless `inline_code`)."""
    out, prose, open_fence = [], [], None
    for line in text.split("\n"):
        fence = fence_of(line)
        if open_fence is None and fence:
            out.append(change_inline(prose, change, inline_code))
            prose, open_fence = [], fence
            out.append(line)
        elif open_fence is not None:
            out.append(line)
            if fence and fence.startswith(open_fence[0] * len(open_fence)):
                open_fence = None
        else:
            prose.append(line)
    out.append(change_inline(prose, change, inline_code))
    return "\n".join(part for part in out if part is not None)


def change_inline(lines: list[str], change, inline_code: bool) -> str | None:
    if not lines:
        return None
    if inline_code:
        return change("\n".join(lines))
    parts = re.split(r"(`+[^`]*?`+)", "\n".join(lines))
    return "".join(p if p.startswith("`") else change(p) for p in parts)


def escape_brackets(text: str) -> str:
    """`R[i][j]` in prose is no reference link: MkDocs would look for a target `j`."""
    defined = set(re.findall(r"^\s*\[([^\]]+)\]:", text, flags=re.M))
    return re.sub(r"\[([^\]]*)\]\[([^\]]*)\]",
                  lambda m: m.group(0) if m.group(2) in defined else f"[{m.group(1)}]\\[{m.group(2)}]", text)


def page_text(page: str, sections: list[Section], extra: list[str] = ()) -> str:
    """The page: its title and lead line, then each section at its depth on the page (a `###` whose `##` is on
    another page becomes a `##`), then `extra`'s paragraphs."""
    title, lead = PAGES[page]
    promoted = sections[0] if title is None else None  # the section whose heading is the page's title
    out = [f"# {title or promoted.heading}"] + ([lead] if lead else [])
    on_page = {s.heading for s in sections if s is not promoted}
    for s in sections:
        if s is not promoted:
            depth = 2 + sum(1 for h in ancestors(s, sections) if h in on_page)
            out.append(f"{'#' * depth} {s.heading}")
        if s.body:
            linked = in_prose(s.body, lambda text, h=s.heading: rewrite_links(text, page, h), inline_code=True)
            out.append(in_prose(linked, escape_brackets))
    return "\n\n".join(out + list(extra)) + "\n"


def page_title(page: str) -> str:
    return PAGES[page][0] or next(h for h, p in SECTIONS if p == page)


def ancestors(section: Section, sections: list[Section]) -> list[str]:
    by_heading = {s.heading: s for s in sections}
    out, parent = [], section.parent
    while parent is not None:
        out.append(parent)
        parent = by_heading[parent].parent if parent in by_heading else None
    return out


def build_pages(sections: list[Section]) -> dict[str, str]:
    """Each page's path and text."""
    pages = check_mapping(sections)
    order = [h for h, _ in SECTIONS]
    by_page: dict[str, list[Section]] = {}
    for s in sorted(sections, key=lambda s: order.index(s.heading)):
        by_page.setdefault(pages[s.heading], []).append(s)
    empty = [p for p in PAGES if p not in by_page]
    if empty:
        raise BuildError(f"pages that no README section goes to: {empty}")
    home = openings(sections, HOME_SECTIONS, "") + [QUICKSTART.strip(), "## Where to go next", next_steps("")]
    pages = {page: page_text(page, by_page[page], home if page == "index.md" else ()) for page in PAGES}
    return link_cross_references(pages)


def link_cross_references(pages: dict[str, str]) -> dict[str, str]:
    """Words like "see above" made a link where the section they meant went to another page (CROSS_REFERENCES)."""
    for page, words, link in CROSS_REFERENCES:
        pattern = r"\s+".join(map(re.escape, words.split()))
        pages[page], found = re.subn(pattern, lambda m, link=link: link, pages[page], count=1)
        if not found:
            print(f"build_pages: {page} no longer says {words!r} (CROSS_REFERENCES)", file=sys.stderr)
    return pages


def opening(section: Section) -> str:
    """A section's text up to and including the first paragraph after its first code block."""
    blocks = re.split(r"\n\s*\n", section.body)
    out, seen_code = [], False
    for block in blocks:
        out.append(block)
        if seen_code:
            break
        seen_code = fence_of(block.splitlines()[0]) is not None
    return "\n\n".join(out)


def openings(sections: list[Section], headings: list[str], prefix: str) -> list[str]:
    """The opening of each named section, under its heading, with a link to its page (`prefix` away)."""
    by_heading = {s.heading: s for s in sections}
    out = []
    for heading in headings:
        page = dict(SECTIONS)[heading]
        text = opening(by_heading[heading])
        if not prefix:  # on the site: its links as on the section's page
            text = in_prose(text, lambda t, h=heading: rewrite_links(t, "index.md", h), inline_code=True)
        out += [f"## {heading}", text, f"More: [{page_title(page)}]({prefix}{page})."]
    return out


def readme_text(sections: list[Section]) -> str:
    """The newcomer's README: what nlora is, install and the default job, the tests, a quickstart, the pages."""
    title = sections[0]
    out = [MARKER, f"# {title.heading}", title.body] + openings(sections, README_SECTIONS, "docs/")
    out += [QUICKSTART.strip(), "## Where to go next", next_steps("docs/"),
            "The site: `pip install -e \".[docs]\" && mkdocs serve`, then http://127.0.0.1:8000."]
    return "\n\n".join(out) + "\n"  # its links are the manual's own, relative to the repository's root


def next_steps(prefix: str) -> str:
    """A list of the site's pages, their links prefixed with `prefix` (`docs/` from the repository's root); the
    user's guide's pages (under guide/) as one item."""
    lines, guide_started = [], False
    for page, (_, lead) in PAGES.items():
        if page == "index.md":
            continue
        lead = re.sub(r"\]\(([^)]+)\)", lambda m: f"]({link_from(prefix, m.group(1))})", lead)
        item = f"[{page_title(page)}]({prefix}{page}): {lead}"
        if page.startswith("guide/"):
            lines += [] if guide_started else ["- The user's guide:"]
            guide_started = True
            lines.append(f"    - {item}")
        else:
            lines.append(f"- {item}")
    lines.append(f"- [API reference]({prefix}api.md): the public names, from their docstrings.")
    return "\n".join(lines)


def link_from(prefix: str, page: str) -> str:
    """A link to a page of the site from a file `prefix` away from docs/; from the repository's root, a page that
    only includes a repository file (LINKS) is that file."""
    shown = {page: path for path, page in LINKS.items()}
    return shown[page] if prefix and page in shown else f"{prefix}{page}"


def api_text() -> str:
    """The API reference page: one mkdocstrings block per public class or function."""
    out = ["# API reference", "The public names, from their docstrings. Everything else is internal."]
    done: set[str] = set()
    for namespace, lead, names in API:
        path = ROOT.joinpath(*namespace.split("."))  # this repository's, whatever else is installed
        if not (path.is_dir() or path.with_suffix(".py").is_file()):
            print(f"build_pages: {namespace} does not exist: not in the API reference", file=sys.stderr)
            continue
        module = importlib.import_module(namespace)
        out += [f"## `{namespace}`", lead]
        for name in names if names is not None else module.__all__:
            obj = resolve(module, name)
            path = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
            if not callable(obj) or path in done:
                continue
            done.add(path)
            out.append(f"::: {path}")
    return "\n\n".join(out) + "\n"


def resolve(module, dotted: str):
    obj = module
    for part in dotted.split("."):
        obj = getattr(obj, part) if hasattr(obj, part) else importlib.import_module(f"{obj.__name__}.{part}")
    return obj


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=ROOT / "README.md", help="the whole manual (README.md)")
    parser.add_argument("--output", type=Path, default=ROOT,
                        help="where README.md and docs/ are written (the repository's root)")
    args = parser.parse_args(argv)
    text = args.source.read_text(encoding="utf-8")
    if text.startswith(MARKER):
        print(f"build_pages: {args.source} is already the short README; the pages are in docs/. "
              "Give the whole manual with --source.", file=sys.stderr)
        return 0
    try:
        sections = split_sections(text)
        pages = build_pages(sections)
        readme = readme_text(sections)
        pages["api.md"] = api_text()
    except BuildError as e:
        print(f"build_pages: error: {e}", file=sys.stderr)
        return 1
    for page, content in pages.items():
        (args.output / "docs" / page).parent.mkdir(parents=True, exist_ok=True)
        (args.output / "docs" / page).write_text(content, encoding="utf-8")
    (args.output / "README.md").write_text(readme, encoding="utf-8")
    print(f"build_pages: {len(pages)} pages in docs/, README.md rewritten", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
