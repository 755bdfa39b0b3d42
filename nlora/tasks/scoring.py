"""Per-task scores of generated answers, on a 0-100 scale: the metric registry of free-text tasks.

A metric is named by a spec string, `name` or `name(option=value, ...)`, e.g. `rouge_l(tokenizer=char)`; its
canonical form (`str(parse_metric(text))`) is what a run records for each task. Every metric scores each example
in [0, 100]; a task's score is the mean over its examples.

| metric              | an example's score                                                                   |
|---------------------|--------------------------------------------------------------------------------------|
| exact_match         | 100 if the answers are equal after `metrics.normalize_answer` (case, punctuation, spaces) |
| accuracy_raw        | 100 if the strings are equal as they are (TRACE's accuracy: no normalisation at all) |
| first_char_accuracy | 100 if the first non-space characters are equal (TRACE's ScienceQA: the answer letter) |
| rouge_l             | ROUGE-L F x 100, Google's `rouge-score` (SuperNI, SAPT); options `tokenizer`, `stemmer` |
| edit_similarity     | rapidfuzz `fuzz.ratio`: 100 x (1 - Indel distance / total length); option `py150_literals` |
| sari                | SARI x 100 of the prediction against the raw input (the source) and the references  |

An example may have several acceptable answers: it scores the best of them (SuperNI's convention), except SARI,
which takes all references at once as it is defined to.

`rouge_l` tokenizers: `google` (rouge-score's own: lower case, only [a-z0-9] runs are words, Porter stemming of
words over 3 characters unless `stemmer=false`), `unicode` (lower case, runs of Unicode word characters: German
umlauts stay inside words) and `char` (each letter or digit a token: Chinese). The Google tokenizer drops every
character outside [a-z0-9], so Chinese text scores nothing with it.

SARI (Xu et al., 2016) is HF `evaluate`'s sentence-level SARI, rewritten here: lower case, sacrebleu's 13a
tokenisation, n-grams of 1-4 words; per n, keep F1, deletion precision and addition F1 (0/0 counts as 1, so a
perfect rewrite scores 100), averaged over n, then over the three.

Scoring mode `trace_reference` reproduces the TRACE scripts (BeyonderXX/TRACE metrics.py, evaluations/), to
compare with numbers published from them, never as a metric of its own:
- an empty prediction or answer is skipped but counted: it scores 0;
- accuracy_raw: raw string equality; first_char_accuracy: the first characters as they are;
- rouge_l: the `rouge` 1.0.1 package (pltrdy), called as TRACE calls it, with the answer as hypothesis and the
  prediction as reference; sentences split on '.', words on single spaces, sets of unique words, case kept, no
  stemming, F with its 1e-8 in the denominator. Where that package raises (a side with no sentence, e.g. "..."),
  TRACE's script stops; here the example scores 0;
- edit_similarity: fuzzywuzzy 0.18's `fuzz.ratio` as TRACE's requirements install it (no python-Levenshtein):
  difflib's Ratcliff-Obershelp ratio x 100, rounded to an integer (Python's round, halves to even);
- sari: the source is the whole prompt, instruction included (TRACE passes its prompts), one reference.
exact_match, which TRACE never computes, scores as in standard mode.

The metrics of standard mode need the optional extra `generative` (rouge-score, rapidfuzz, sacrebleu); a missing
library is a NloraError that names it. The TRACE ports need only sacrebleu (for SARI).
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import NloraError
from ..eval.continual import normalize_answer

SCORING_MODES = ("standard", "trace_reference")
EXTRA = "generative"
INSTALL_HINT = "pip install 'nlora[generative]'"

References = Sequence[str | Sequence[str]]


@dataclass(frozen=True)
class MetricSpec:
    """A metric and its options (as given; defaults are filled in by `option`)."""
    name: str
    options: tuple[tuple[str, str], ...] = ()

    def option(self, key: str) -> str:
        return dict(self.options).get(key, METRICS[self.name].options[key][0])

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in self.options)})"


@dataclass(frozen=True)
class Metric:
    name: str
    summary: str
    # option -> its allowed values, the first being the default
    options: dict[str, tuple[str, ...]]
    # scoring mode -> the Python modules it imports
    libraries: dict[str, tuple[str, ...]]
    standard: Callable[..., list[float]]
    trace: Callable[..., list[float]]


# --------------------------------------------------------------------------------------------------- spec strings

_SPEC = re.compile(r"^\s*([a-z_]+)\s*(?:\(\s*(.*?)\s*\))?\s*$")


def parse_metric(text: str | MetricSpec, where: str = "metric") -> MetricSpec:
    """`name` or `name(key=value, ...)`, checked against the registry; `where` names the setting in errors."""
    if isinstance(text, MetricSpec):
        return text
    match = _SPEC.match(text) if isinstance(text, str) else None
    if match is None:
        raise NloraError(f"{where}: {text!r} is not a metric (expected name or name(option=value, ...))")
    name, body = match.groups()
    if name not in METRICS:
        raise NloraError(f"{where}: unknown metric {name!r}; available: {', '.join(METRICS)}")
    metric, options = METRICS[name], {}
    for item in filter(None, (part.strip() for part in (body or "").split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or key not in metric.options:
            allowed = ", ".join(metric.options) or "none"
            raise NloraError(f"{where}: {item!r} is not an option of metric {name!r} (its options: {allowed})")
        if value.lower() not in metric.options[key]:
            raise NloraError(f"{where}: option {key!r} of metric {name!r} must be one of "
                             f"{', '.join(metric.options[key])}, got {value!r}")
        options[key] = value.lower()
    if name == "rouge_l" and options.get("stemmer") == "true" and options.get("tokenizer", "google") != "google":
        raise NloraError(f"{where}: metric 'rouge_l': the Porter stemmer is English-only and applies to the google "
                         "tokenizer alone")
    return MetricSpec(name, tuple(sorted(options.items())))


def require_libraries(metric: str | MetricSpec, mode: str = "standard") -> None:
    """Fail early, naming the extra to install, when a metric's library is missing."""
    spec = parse_metric(metric)
    _check_mode(mode)
    missing = [m for m in METRICS[spec.name].libraries[mode] if importlib.util.find_spec(m) is None]
    if missing:
        raise NloraError(f"metric {str(spec)!r} needs {', '.join(missing)}, from the optional extra "
                         f"{EXTRA!r}: {INSTALL_HINT}")


def _check_mode(mode: str) -> None:
    if mode not in SCORING_MODES:
        raise NloraError(f"scoring mode {mode!r} is not one of {', '.join(SCORING_MODES)}")


# --------------------------------------------------------------------------------------------------- public entry


def example_scores(metric: str | MetricSpec, predictions: Sequence[str], references: References,
                   sources: Sequence[str] | None = None, prompts: Sequence[str] | None = None,
                   mode: str = "standard") -> list[float]:
    """Each example's score in [0, 100]. `references[i]` is the answer or a list of acceptable answers; `sources`
    are the raw inputs (SARI's source in standard mode), `prompts` the whole prompts (its source in
    trace_reference mode)."""
    spec = parse_metric(metric)
    _check_mode(mode)
    refs = [(r,) if isinstance(r, str) else tuple(r) for r in references]
    if len(predictions) != len(refs):
        raise ValueError(f"{len(predictions)} predictions for {len(refs)} references")
    if any(not r for r in refs):
        raise ValueError("an example has no reference answer")
    require_libraries(spec, mode)
    context = sources if mode == "standard" else prompts
    if spec.name == "sari":
        if context is None or len(context) != len(refs):
            needed = "sources (raw inputs)" if mode == "standard" else "prompts"
            raise ValueError(f"metric 'sari' in {mode} mode needs one of its {needed} per prediction")
    scorer = METRICS[spec.name].standard if mode == "standard" else METRICS[spec.name].trace
    return scorer(spec, list(predictions), refs, context)


def score(metric: str | MetricSpec, predictions: Sequence[str], references: References,
          sources: Sequence[str] | None = None, prompts: Sequence[str] | None = None,
          mode: str = "standard") -> float:
    """A task's score: the mean of `example_scores`."""
    if not predictions:
        raise ValueError("score of an empty set of examples")
    values = example_scores(metric, predictions, references, sources, prompts, mode)
    return sum(values) / len(values)


# --------------------------------------------------------------------------------------------------- helpers


def _best(values: Sequence[float]) -> float:
    return max(values)


def _percent(hit: bool) -> float:
    return 100.0 if hit else 0.0


def _first_reference(refs: list[tuple[str, ...]]) -> list[str]:
    """TRACE scores against its one answer."""
    return [r[0] for r in refs]


def _trace_skips(prediction: str, answer: str) -> bool:
    """TRACE's `if prediction == "" or target == "": continue`, with the mean still over all examples."""
    return prediction == "" or answer == ""


def py150_literals(code: str) -> str:
    """TRACE's Py150 post-processing (evaluations/eval_Py150.py): `<NUM_LIT>` -> 0, `<STR_LIT>` and `<CHAR_LIT>`
    -> nothing, `<STR_LIT:x>` (also NUM, CHAR) -> x."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    return re.sub(r"<(?:STR|NUM|CHAR)_LIT:(.*?)>", lambda m: m.group(1), code, flags=re.S)


# --------------------------------------------------------------------------------------------------- exact, raw


def _exact_match(spec, predictions, refs, _context) -> list[float]:
    return [_percent(any(normalize_answer(p) == normalize_answer(r) for r in rs)) for p, rs in zip(predictions, refs)]


def _accuracy_raw(spec, predictions, refs, _context) -> list[float]:
    return [_percent(p in rs) for p, rs in zip(predictions, refs)]


def _accuracy_raw_trace(spec, predictions, refs, _context) -> list[float]:
    return [_percent(not _trace_skips(p, a) and p == a) for p, a in zip(predictions, _first_reference(refs))]


def _first_char(text: str) -> str:
    return text.lstrip()[:1]


def _first_char_accuracy(spec, predictions, refs, _context) -> list[float]:
    return [_percent(any(_first_char(p) == _first_char(r) for r in rs)) for p, rs in zip(predictions, refs)]


def _first_char_accuracy_trace(spec, predictions, refs, _context) -> list[float]:
    # eval_ScienceQA.py: answer = text[0]
    return [_percent(not _trace_skips(p, a) and p[0] == a[0]) for p, a in zip(predictions, _first_reference(refs))]


# --------------------------------------------------------------------------------------------------- ROUGE-L


class _UnicodeWords:
    """Lower-cased runs of Unicode word characters."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())


class _Characters:
    """Each letter or digit a token, lower-cased (scripts written without spaces)."""

    def tokenize(self, text: str) -> list[str]:
        return [c for c in text.lower() if c.isalnum()]


def rouge_tokenizer(name: str, stemmer: bool):
    """A tokenizer object for rouge-score's RougeScorer."""
    if name == "google":
        from rouge_score.tokenizers import DefaultTokenizer
        return DefaultTokenizer(use_stemmer=stemmer)
    return {"unicode": _UnicodeWords, "char": _Characters}[name]()


def _rouge_l(spec, predictions, refs, _context) -> list[float]:
    from rouge_score.rouge_scorer import RougeScorer
    tokenizer = rouge_tokenizer(spec.option("tokenizer"), spec.option("stemmer") == "true")
    scorer = RougeScorer(["rougeL"], tokenizer=tokenizer)
    return [100.0 * _best([scorer.score(r, p)["rougeL"].fmeasure for r in rs]) for p, rs in zip(predictions, refs)]


def _rouge_l_trace(spec, predictions, refs, _context) -> list[float]:
    return [0.0 if _trace_skips(p, a) else 100.0 * pltrdy_rouge_l(a, p)
            for p, a in zip(predictions, _first_reference(refs))]


def _pltrdy_sentences(text: str) -> list[list[str]]:
    """Sentences are the non-empty pieces between '.', their whitespace runs made single spaces; words are what
    one space separates (a blank piece becomes the one word '')."""
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if piece]


def _lcs_words(x: list[str], y: list[str]) -> set[str]:
    """The words of one longest common subsequence of x and y, traced back from the end of both, preferring to
    drop a word of y on ties (the choice decides which words count when there are several LCSs)."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            table[i][j] = (table[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1]
                           else max(table[i - 1][j], table[i][j - 1]))
    words, i, j = set(), len(x), len(y)
    while i and j:
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def pltrdy_rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F (0-1) as `rouge` 1.0.1's Rouge(metrics=["rouge-l"]).get_scores(hypothesis, reference) computes it
    (summary level, exclusive): the union over reference sentences r and hypothesis sentences c of the words of
    LCS(r, c), over the unique words of each side. 0 where that package raises (a side without sentences)."""
    hyp, ref = _pltrdy_sentences(hypothesis), _pltrdy_sentences(reference)
    if not hyp or not ref:
        return 0.0
    union: set[str] = set()
    for r in ref:
        for c in hyp:
            union |= _lcs_words(r, c)
    recall = len(union) / len({w for s in ref for w in s})
    precision = len(union) / len({w for s in hyp for w in s})
    return 2.0 * precision * recall / (precision + recall + 1e-8)


# --------------------------------------------------------------------------------------------------- edit similarity


def _code_form(spec, text: str) -> str:
    return py150_literals(text) if spec.option("py150_literals") == "true" else text


def _edit_similarity(spec, predictions, refs, _context) -> list[float]:
    from rapidfuzz import fuzz
    return [_best([fuzz.ratio(_code_form(spec, p), _code_form(spec, r)) for r in rs])
            for p, rs in zip(predictions, refs)]


def fuzzywuzzy_ratio(a: str, b: str) -> int:
    """fuzzywuzzy 0.18 `fuzz.ratio` without python-Levenshtein: 100 if equal, 0 if either is empty, else
    round(100 x difflib ratio)."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def _edit_similarity_trace(spec, predictions, refs, _context) -> list[float]:
    out = []
    for p, a in zip(predictions, _first_reference(refs)):
        p, a = _code_form(spec, p), _code_form(spec, a)  # eval_Py150 post-processes before caculate_fuzz skips
        out.append(0.0 if _trace_skips(p, a) else float(fuzzywuzzy_ratio(p, a)))
    return out


# --------------------------------------------------------------------------------------------------- SARI


def sari_tokens(text: str) -> list[str]:
    """Lower case, sacrebleu's 13a tokenisation, split on single spaces (an empty text is the one token '')."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    return Tokenizer13a()(text.lower()).split(" ")


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _sari_ngram(source: Counter, output: Counter, references: list[Counter]) -> tuple[float, float, float]:
    """(keep F1, deletion precision, addition F1) of one n-gram order. Source and output counts are scaled by the
    number of references, so that n-grams kept or deleted by some references count partly."""
    k = len(references)
    ref_all = sum(references, Counter())
    src = Counter({g: c * k for g, c in source.items()})
    out = Counter({g: c * k for g, c in output.items()})

    kept = src & out                   # what the output keeps of the source
    kept_good = kept & ref_all         # ... and the references keep too
    kept_wanted = src & ref_all        # what the references keep of the source
    keep_p = sum(kept_good[g] / kept[g] for g in kept_good) / len(kept) if kept else 1.0
    keep_r = sum(kept_good.values()) / sum(kept_wanted.values()) if kept_wanted else 1.0

    deleted = src - out
    deleted_good = deleted - ref_all   # deleted beyond what the references keep
    del_p = sum(deleted_good[g] / deleted[g] for g in deleted_good) / len(deleted) if deleted else 1.0

    added = set(output) - set(source)  # additions count as a set
    wanted = set(ref_all) - set(source)
    added_good = added & wanted
    add_p = len(added_good) / len(added) if added else 1.0
    add_r = len(added_good) / len(wanted) if wanted else 1.0
    return _f1(keep_p, keep_r), del_p, _f1(add_p, add_r)


def sari_sentence(source: str, prediction: str, references: Sequence[str]) -> float:
    """SARI (0-1) of one prediction."""
    src, out = sari_tokens(source), sari_tokens(prediction)
    refs = [sari_tokens(r) for r in references]
    parts = [_sari_ngram(_ngrams(src, n), _ngrams(out, n), [_ngrams(r, n) for r in refs]) for n in range(1, 5)]
    keep, delete, add = (sum(p[i] for p in parts) / 4 for i in range(3))
    return (keep + delete + add) / 3


def _sari(spec, predictions, refs, sources) -> list[float]:
    return [100.0 * sari_sentence(s, p, rs) for s, p, rs in zip(sources, predictions, refs)]


def _sari_trace(spec, predictions, refs, prompts) -> list[float]:
    # metrics.py caculate_sari: no skipping; the sources are the prompts
    return [100.0 * sari_sentence(s, p, [a]) for s, p, a in zip(prompts, predictions, _first_reference(refs))]


# --------------------------------------------------------------------------------------------------- registry

_NONE: tuple[str, ...] = ()
METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("exact_match", "equal after normalize_answer (case, punctuation, whitespace)", {},
           {"standard": _NONE, "trace_reference": _NONE}, _exact_match, _exact_match),
    Metric("accuracy_raw", "equal as strings", {},
           {"standard": _NONE, "trace_reference": _NONE}, _accuracy_raw, _accuracy_raw_trace),
    Metric("first_char_accuracy", "equal first non-space character", {},
           {"standard": _NONE, "trace_reference": _NONE}, _first_char_accuracy, _first_char_accuracy_trace),
    Metric("rouge_l", "ROUGE-L F (rouge-score)",
           {"tokenizer": ("google", "unicode", "char"), "stemmer": ("true", "false")},
           {"standard": ("rouge_score",), "trace_reference": _NONE}, _rouge_l, _rouge_l_trace),
    Metric("edit_similarity", "Indel similarity (rapidfuzz fuzz.ratio)", {"py150_literals": ("false", "true")},
           {"standard": ("rapidfuzz",), "trace_reference": _NONE}, _edit_similarity, _edit_similarity_trace),
    Metric("sari", "SARI against the raw input and the references (13a tokens)", {},
           {"standard": ("sacrebleu",), "trace_reference": ("sacrebleu",)}, _sari, _sari_trace),
)}
