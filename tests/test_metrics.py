"""Metric arithmetic on hand-computed accuracy matrices, including missing (None) entries."""

import pytest

from nlora.eval.continual import (
    accuracy,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    forward_transfer,
    normalize_answer,
    summarize,
)

# After task 0: 90 on task 0 (and 20 on future task 1, 10 on task 2);
# after task 1: 70, 80, 30; after task 2: 60, 85, 95.
R = [[90.0, 20.0, 10.0],
     [70.0, 80.0, 30.0],
     [60.0, 85.0, 95.0]]
BASE = [25.0, 25.0, 20.0]


def test_normalize_and_accuracy():
    assert normalize_answer("  Sports \n News ") == "sports news"
    # as the reference's metric: lower case, no punctuation, whitespace collapsed (hand-derived)
    assert normalize_answer("Science or Technology.") == "science or technology"
    assert normalize_answer(" True! ") == normalize_answer("true") == "true"
    assert normalize_answer("very\tnegative") == "very negative" and normalize_answer("n't") == "nt"
    assert normalize_answer("A: the cat") == "a the cat"  # articles stay (unlike SQuAD's own)
    assert normalize_answer("...") == "" and normalize_answer("café") == "café"  # non-ASCII stays
    assert accuracy(["World", "sports ", "x"], ["world", "Sports", "y"]) == pytest.approx(200 / 3)
    # MNLI's '-' (no gold label) normalises to "": an empty or punctuation-only prediction matches it, as in the
    # reference's metric
    assert accuracy(["", " . ", "neutral"], ["-", "-", "-"]) == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        accuracy(["a", "b"], ["a"])


def test_hand_computed_matrix():
    assert average_accuracy(R) == pytest.approx((60 + 85 + 95) / 3)
    # BWT: ((60 - 90) + (85 - 80)) / 2 = -12.5
    assert backward_transfer(R) == pytest.approx(-12.5)
    # FWT: ((R[0][1] - b1) + (R[1][2] - b2)) / 2 = ((20 - 25) + (30 - 20)) / 2 = 2.5
    assert forward_transfer(R, BASE) == pytest.approx(2.5)
    # Forgetting: task 0: max(90, 70) - 60 = 30; task 1: max(80, 85) - 85 = 0 → 15
    assert average_forgetting(R) == pytest.approx(15.0)
    assert summarize(R, BASE) == {"average_accuracy": pytest.approx(80.0), "bwt": -12.5, "fwt": 2.5,
                                  "forgetting": 15.0}


def test_forgetting_ignores_accuracy_before_training():
    # Task 1 scored 99 before it was trained (row 0): that is not knowledge it later lost.
    M = [[50.0, 99.0], [40.0, 70.0]]
    assert average_forgetting(M) == pytest.approx(10.0)


def test_forgetting_takes_the_best_earlier_accuracy_not_the_first():
    # task 0 improves after task 1 (backward transfer) before it drops: its best, 80, is the reference
    M = [[60.0, None, None], [80.0, 50.0, None], [50.0, 40.0, 90.0]]
    # task 0: 80 - 50 = 30 (not 60 - 50 = 10); task 1: 50 - 40 = 10
    assert average_forgetting(M) == pytest.approx(20.0)
    assert summarize(M)["forgetting"] == pytest.approx(20.0)


def test_average_accuracy_skips_an_unevaluated_entry_of_the_last_row():
    M = [[70.0, None, None], [None, None, None], [60.0, None, 90.0]]  # task 1 not evaluated after task 3
    assert average_accuracy(M) == pytest.approx(75.0)  # not (60 + 0 + 90) / 3
    assert summarize(M)["average_accuracy"] == pytest.approx(75.0)


def test_missing_entries():
    # Without eval_future the upper triangle is None; FWT needs it.
    M = [[90.0, None, None], [70.0, 80.0, None], [60.0, 85.0, 95.0]]
    assert forward_transfer(M, BASE) is None
    assert forward_transfer(M, None) is None
    assert backward_transfer(M) == pytest.approx(-12.5)
    # Multi-task bound: only the last row exists → no BWT, no forgetting, AP from the last row.
    mtl = [[None, None], [80.0, 90.0]]
    assert summarize(mtl) == {"average_accuracy": 85.0, "bwt": None, "fwt": None, "forgetting": None}
    # A pair with a missing diagonal entry is skipped, not counted as zero.
    partial = [[None, None, None], [None, 50.0, None], [10.0, 40.0, 60.0]]
    assert backward_transfer(partial) == pytest.approx(-10.0)


def test_single_task_and_shapes():
    assert summarize([[77.0]]) == {"average_accuracy": 77.0, "bwt": None, "fwt": None, "forgetting": None}
    with pytest.raises(ValueError, match="square"):
        average_accuracy([[1.0, 2.0]])
    with pytest.raises(ValueError, match="3 reference scores for 2 tasks"):
        forward_transfer([[1.0, 2.0], [3.0, 4.0]], [1.0, 2.0, 3.0])


def test_bwt_denominator_t():
    # TRACE / SAPT: ((60 - 90) + (85 - 80) + (95 - 95)) / 3, against -12.5 over T-1 = 2
    assert backward_transfer(R, "t") == pytest.approx(-25 / 3)
    assert backward_transfer(R) == backward_transfer(R, "t-1") == pytest.approx(-12.5)
    assert summarize(R, BASE, bwt_denominator="t")["bwt"] == pytest.approx(-25 / 3)
    assert summarize(R, BASE)["bwt"] == pytest.approx(-12.5)
    # (T-1)/T x the usual value whenever every entry exists
    M = [[70.0, None, None, None], [65.0, 80.0, None, None], [60.0, 70.0, 90.0, None], [50.0, 75.0, 88.0, 91.0]]
    assert backward_transfer(M, "t") == pytest.approx(backward_transfer(M) * 3 / 4)
    # one task: nothing to forget under T-1; a single zero term under T
    assert backward_transfer([[77.0]]) is None and backward_transfer([[77.0]], "t") == 0.0
    # a pair with a missing entry is skipped under both
    partial = [[None, None, None], [None, 50.0, None], [10.0, 40.0, 60.0]]
    assert backward_transfer(partial, "t") == pytest.approx(-5.0)
    with pytest.raises(ValueError, match="BWT denominator 'T' is not one of t-1, t"):
        backward_transfer(R, "T")
