"""Metrics of free-text tasks: hand-computed values, each library-backed metric against a brute-force computation on
small strings, the SARI port against its published example, and the TRACE-reference ports against the packages
TRACE used (when installed)."""

import importlib.util
import random
import warnings

import pytest

from nlora.errors import NloraError
from nlora.tasks.scoring import (
    METRICS,
    example_scores,
    fuzzywuzzy_ratio,
    parse_metric,
    pltrdy_rouge_l,
    py150_literals,
    require_libraries,
    sari_sentence,
    score,
)

WORDS = ("a", "b", "c", "d", "the", "cat")


def _lcs(x, y) -> int:
    """Longest common subsequence length, by the textbook recursion on prefixes."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i, xi in enumerate(x):
        for j, yj in enumerate(y):
            table[i + 1][j + 1] = table[i][j] + 1 if xi == yj else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def _rouge_l_by_hand(prediction: str, reference: str) -> float:
    p, r = prediction.lower().split(), reference.lower().split()
    if not p or not r:
        return 0.0
    lcs = _lcs(p, r)
    precision, recall = lcs / len(p), lcs / len(r)
    return 100 * 2 * precision * recall / (precision + recall) if lcs else 0.0


def _random_text(rng, low=0, high=6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


# ------------------------------------------------------------------------------------------------ specs, registry

def test_metric_specs():
    assert str(parse_metric("rouge_l")) == "rouge_l"
    spec = parse_metric(" rouge_l( tokenizer = CHAR , stemmer=false ) ")
    assert str(spec) == "rouge_l(stemmer=false, tokenizer=char)" and parse_metric(str(spec)) == spec
    assert parse_metric("rouge_l").option("tokenizer") == "google"
    assert parse_metric("rouge_l").option("stemmer") == "true"
    assert parse_metric("edit_similarity(py150_literals=true)").option("py150_literals") == "true"
    with pytest.raises(NloraError, match="task 'x' metric: unknown metric 'bleu'; available: exact_match"):
        parse_metric("bleu", where="task 'x' metric")
    with pytest.raises(NloraError, match="'lang=de' is not an option of metric 'rouge_l'"):
        parse_metric("rouge_l(lang=de)")
    with pytest.raises(NloraError, match="must be one of google, unicode, char, got 'jieba'"):
        parse_metric("rouge_l(tokenizer=jieba)")
    with pytest.raises(NloraError, match="English-only"):
        parse_metric("rouge_l(tokenizer=unicode, stemmer=true)")
    with pytest.raises(NloraError, match="not a metric"):
        parse_metric("rouge-l")
    with pytest.raises(NloraError, match="scoring mode 'trace'"):
        score("exact_match", ["a"], ["a"], mode="trace")


def test_missing_library_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rapidfuzz" else real(name, *a))
    with pytest.raises(NloraError, match=r"needs rapidfuzz, from the optional extra 'generative': pip install "
                                         r"'nlora\[generative\]'"):
        score("edit_similarity", ["a"], ["a"])
    require_libraries("edit_similarity", "trace_reference")  # the TRACE port needs no library


def test_every_metric_scores_identical_answers_100_and_lengths_are_checked():
    pytest.importorskip("rouge_score"), pytest.importorskip("rapidfuzz"), pytest.importorskip("sacrebleu")
    for name in METRICS:
        assert score(name, ["Der Hund läuft."], ["Der Hund läuft."], sources=["Der große Hund läuft."]) == 100
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        score("exact_match", ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="needs one of its sources"):
        score("sari", ["a"], ["a"])


# ------------------------------------------------------------------------------------------------ exact and raw

def test_exact_raw_and_first_character():
    preds, refs = ["The answer.", " B since", "", "42 "], ["the answer", "B\nBecause", "", "42"]
    assert example_scores("exact_match", preds, refs) == [100, 0, 100, 100]
    assert example_scores("accuracy_raw", preds, refs) == [0, 0, 100, 0]
    assert example_scores("first_char_accuracy", preds, refs) == [0, 100, 100, 100]  # 'T' != 't'
    # several acceptable answers: the best counts
    assert example_scores("exact_match", ["Paris"], [["London", "paris!"]]) == [100]
    assert score("accuracy_raw", ["1", "2", "3", "4"], ["1", "2", "x", "y"]) == 50


def test_trace_reference_exact_and_first_character():
    preds, refs = ["A", "", " B", "Bx"], ["A", "", "B", "B\nBecause"]
    # empty pairs are skipped but counted: 0; no stripping anywhere
    assert example_scores("accuracy_raw", preds, refs, mode="trace_reference") == [100, 0, 0, 0]
    assert example_scores("first_char_accuracy", preds, refs, mode="trace_reference") == [100, 0, 0, 100]
    assert example_scores("exact_match", ["a."], ["A"], mode="trace_reference") == [100]


# ------------------------------------------------------------------------------------------------ ROUGE-L

def test_rouge_l_hand_computed():
    pytest.importorskip("rouge_score")
    # LCS "the cat on the mat" = 5 of 5 predicted and 6 reference words: F = 2 (1)(5/6) / (11/6) = 10/11
    assert score("rouge_l", ["the cat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1000 / 11)
    assert score("rouge_l", ["x y"], ["a b"]) == 0
    # stemming (google tokenizer): 'cats' ~ 'cat', 'running' ~ 'run'
    assert score("rouge_l", ["cats running"], ["cat run"]) == pytest.approx(100)
    assert score("rouge_l(stemmer=false)", ["cats running"], ["cat run"]) == 0
    # the google tokenizer keeps only [a-z0-9]: Chinese vanishes, umlauts split words
    assert score("rouge_l", ["今天天气很好"], ["今天天气不好"]) == 0
    assert score("rouge_l(tokenizer=char)", ["今天天气很好"], ["今天天气不好"]) == pytest.approx(100 * 5 / 6)
    assert score("rouge_l(stemmer=false)", ["größer"], ["größte"]) == pytest.approx(100 / 2)  # gr, er / gr, te
    assert score("rouge_l(tokenizer=unicode)", ["größer Hund"], ["größte hund"]) == pytest.approx(100 / 2)
    # best of several references
    assert score("rouge_l", ["a b"], [["c d", "a b"]]) == pytest.approx(100)


def test_rouge_l_matches_lcs_by_hand_on_random_texts():
    pytest.importorskip("rouge_score")
    rng = random.Random(0)
    preds, refs = [_random_text(rng) for _ in range(300)], [_random_text(rng) for _ in range(300)]
    got = example_scores("rouge_l(stemmer=false)", preds, refs)
    assert got == pytest.approx([_rouge_l_by_hand(p, r) for p, r in zip(preds, refs)])
    assert len(set(got)) > 10  # the cases are varied


# ------------------------------------------------------------------------------------------------ edit similarity

def test_edit_similarity_hand_computed_and_by_lcs():
    pytest.importorskip("rapidfuzz")
    # kitten / sitting: LCS 'ittn' = 4 of 6 + 7 characters: 200 x 4 / 13
    assert score("edit_similarity", ["kitten"], ["sitting"]) == pytest.approx(800 / 13)
    assert score("edit_similarity", [""], ["abc"]) == 0
    rng = random.Random(1)
    pairs = [("".join(rng.choice("abc") for _ in range(rng.randint(1, 8))),
              "".join(rng.choice("abc") for _ in range(rng.randint(1, 8)))) for _ in range(300)]
    got = example_scores("edit_similarity", [a for a, _ in pairs], [b for _, b in pairs])
    assert got == pytest.approx([200 * _lcs(a, b) / (len(a) + len(b)) for a, b in pairs])


def test_py150_literals():
    assert py150_literals("x = <NUM_LIT> + len(<STR_LIT>) + <CHAR_LIT>") == "x = 0 + len() + "
    assert py150_literals("f(<STR_LIT:utf-8>, <NUM_LIT:3>, <CHAR_LIT:a>)") == "f(utf-8, 3, a)"
    pytest.importorskip("rapidfuzz")
    assert score("edit_similarity(py150_literals=true)", ["return <NUM_LIT>"], ["return 0"]) == 100
    assert score("edit_similarity", ["return <NUM_LIT>"], ["return 0"]) < 100


# ------------------------------------------------------------------------------------------------ SARI

def test_sari_published_example():
    pytest.importorskip("sacrebleu")
    # the example of HF evaluate's sari metric card (three references)
    sources = ["About 95 species are currently accepted ."]
    predictions = ["About 95 you now get in ."]
    references = [["About 95 species are currently known .", "About 95 species are now accepted .",
                   "95 species are now accepted ."]]
    assert score("sari", predictions, references, sources=sources) == pytest.approx(26.953601953601954, abs=1e-12)


def test_sari_hand_computed():
    pytest.importorskip("sacrebleu")
    # source 'a b c', output 'a b', reference 'a c':
    #   1-grams: keep P = 1/2 (kept a, b; only a is wanted), R = 1/2 (a of wanted a, c) -> F 1/2; deleting c is wrong
    #            -> del P 0; nothing added or to add -> add 1
    #   2-grams: kept 'a b', unwanted -> keep P 0, R 1 (nothing wanted) -> F 0; deleted 'b c' rightly -> del 1;
    #            'a c' should be added and is not -> add F 0
    #   3-grams: keep 1 (nothing kept, nothing wanted), deleted 'a b c' rightly -> del 1, add 1; 4-grams: all 1
    #   keep (1/2 + 0 + 1 + 1) / 4, del (0 + 1 + 1 + 1) / 4, add (1 + 0 + 1 + 1) / 4 -> (5/8 + 3/4 + 3/4) / 3
    assert sari_sentence("a b c", "a b", ["a c"]) == pytest.approx(17 / 24)
    # lower case and 13a tokens: 'A,' is 'a' and ','
    assert sari_sentence("A, B C", "a , b", ["a , c"]) == sari_sentence("a , b c", "a , b", ["a , c"])
    assert score("sari", ["a c"], ["a c"], sources=["a b c"]) == pytest.approx(100)
    # the source is the raw input in standard mode, the prompt in trace_reference mode
    standard = score("sari", ["a b"], ["a c"], sources=["a b c"], prompts=["Simplify.\na b c"])
    trace = score("sari", ["a b"], ["a c"], sources=["a b c"], prompts=["Simplify.\na b c"], mode="trace_reference")
    assert standard == pytest.approx(100 * 17 / 24)
    assert trace == pytest.approx(100 * sari_sentence("Simplify.\na b c", "a b", ["a c"])) and trace != standard


# ------------------------------------------------------------------------------------------------ TRACE reference

def test_pltrdy_rouge_l_hand_computed():
    # hypothesis 'a b. c' (the answer, as TRACE passes it), reference 'a c' (the prediction):
    # LCS words of 'a c' with 'a b' and with 'c': {a, c} -> R = 2/2, P = 2/3 -> F = (4/3) / (5/3 + 1e-8)
    assert pltrdy_rouge_l("a b. c", "a c") == pytest.approx(0.8, abs=1e-8)
    assert pltrdy_rouge_l("a b", "a b") == 2 / (2 + 1e-8)  # its epsilon: never exactly 1
    assert pltrdy_rouge_l("The cat", "the cat") == pytest.approx(0.5)  # case-sensitive
    assert pltrdy_rouge_l("a a b", "a b") == pytest.approx(1.0)  # sets of unique words
    assert pltrdy_rouge_l("...", "a") == 0  # the package raises here
    assert example_scores("rouge_l", ["a b", "", "The cat"], ["a b", "x", "the cat"], mode="trace_reference") == \
        pytest.approx([100, 0, 50])


def test_pltrdy_rouge_l_matches_the_package():
    rouge = pytest.importorskip("rouge")
    scorer = rouge.Rouge(metrics=["rouge-l"])
    rng = random.Random(2)
    words = ("a", "b", "c", "A", "d.", "e", ".")
    for _ in range(400):
        hyp = " ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))
        ref = " ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))
        try:
            expected = scorer.get_scores(hyp, ref, avg=True)["rouge-l"]["f"]
        except ValueError:
            expected = 0.0
        assert pltrdy_rouge_l(hyp, ref) == pytest.approx(expected, abs=1e-12), (hyp, ref)


def test_fuzzywuzzy_ratio_hand_computed():
    # difflib: 'itt' then 'n' -> 2 x 4 / 13 = 61.5 -> 62
    assert fuzzywuzzy_ratio("kitten", "sitting") == 62
    # 100 x 2 / 16 = 12.5: Python's round gives 12 (fuzzywuzzy's int(round(x)))
    assert fuzzywuzzy_ratio("a", "a" + "b" * 14) == 12
    assert fuzzywuzzy_ratio("", "") == 100 and fuzzywuzzy_ratio("", "a") == 0
    # difflib's matching blocks are not an LCS: 'aaaa' / 'abaa' matches the first 'aa' of one with the last 'aa' of
    # the other, nothing is left on either side: 2 x 2 / 8 = 50, where the Indel ratio (LCS 'aaa') is 75
    assert fuzzywuzzy_ratio("aaaa", "abaa") == 50
    assert example_scores("edit_similarity", ["aaaa", "", "<NUM_LIT>"], ["abaa", "a", "0"],
                          mode="trace_reference") == [50, 0, 0]
    assert example_scores("edit_similarity(py150_literals=true)", ["<STR_LIT>", "<NUM_LIT>"], ["x", "0"],
                          mode="trace_reference") == [0, 100]  # '<STR_LIT>' becomes '' and is skipped
    pytest.importorskip("rapidfuzz")
    assert score("edit_similarity", ["aaaa"], ["abaa"]) == pytest.approx(75)


def test_fuzzywuzzy_ratio_matches_the_package():
    if importlib.util.find_spec("Levenshtein") is not None:
        pytest.skip("fuzzywuzzy uses python-Levenshtein here, not difflib as in TRACE's environment")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its warning about the pure-Python matcher
        fuzz = pytest.importorskip("fuzzywuzzy.fuzz")
    rng = random.Random(3)
    for _ in range(400):
        a = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 10)))
        b = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 10)))
        assert fuzzywuzzy_ratio(a, b) == fuzz.ratio(a, b), (a, b)
