"""Metrics against hand-computed cases."""

import math

import numpy as np
import pytest

from lt_jax.eval import metrics


def test_pass_at_k_hand_cases():
    assert metrics.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert metrics.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert metrics.pass_at_k(4, 0, 1) == 0.0
    assert metrics.pass_at_k(4, 4, 2) == 1.0
    assert metrics.pass_at_k(4, 1, 4) == 1.0  # fewer wrong samples than k: some draw must be right
    assert metrics.pass_at_k(16, 1, 8) == pytest.approx(0.5)  # 1 - C(15,8)/C(16,8) = 1 - 8/16


def test_pass_at_k_matches_binomials_and_rejects_bad_input():
    for n in (1, 5, 16, 64):
        for c in range(n + 1):
            for k in {1, max(1, n // 2), n}:
                exact = 1 - (math.comb(n - c, k) / math.comb(n, k))
                assert metrics.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    with pytest.raises(ValueError):
        metrics.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        metrics.pass_at_k(4, 1, 5)


def test_mean_pass_at_k_and_default_ks():
    correct = [[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]]
    assert metrics.mean_pass_at_k(correct, 2) == pytest.approx((5 / 6 + 0 + 1) / 3)
    assert metrics.mean_pass_at_k(correct, 1) == pytest.approx(np.mean(correct))
    assert metrics.default_ks(16) == [1, 2, 4, 8, 16]
    assert metrics.default_ks(6) == [1, 2, 4, 6]
    assert metrics.default_ks(1) == [1]


def test_pass1_spread_across_sample_index_runs():
    # run 0 (first sample of each problem) gets 3/4 right, run 1 gets 1/4
    stats = metrics.pass1_stats([[1, 0], [1, 1], [0, 0], [1, 0]])
    assert stats["mean"] == pytest.approx(0.5)
    assert stats["runs"] == pytest.approx([0.75, 0.25])
    assert stats["std"] == pytest.approx(math.sqrt(2 * 0.25**2))  # ddof=1 over the two runs
    assert stats["stderr"] == pytest.approx(stats["std"] / math.sqrt(2))
    assert metrics.pass1_stats([[1], [0]])["std"] == 0.0  # one run: no spread


def test_majority_vote_ties_and_abstentions():
    assert metrics.majority_vote(["a", "b", "b", "a", None]) == 0  # 2-2 tie: "a" was seen first
    assert metrics.majority_vote([None, "b", "a", "a"]) == 2  # "a" wins; its first holder is index 2
    assert metrics.majority_vote([None, None]) is None
    assert metrics.majority_vote(["7", None, "7", "3", "3", "3"]) == 3


def test_maj_at_k():
    keys = [["5", "7", "7"], ["1", "2", None], [None, None, None], ["4", "4", "9"]]
    correct = [[1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 1]]
    # 7 beats the right 5; 1-2 tie goes to the right 1; all abstain; 4 beats the right 9
    assert metrics.maj_at_k(keys, correct) == pytest.approx(1 / 4)


def test_tokens_by_outcome_and_cutoff_share():
    out = metrics.mean_tokens_by_outcome([[1, 0], [0, 1]], [[10, 100], [300, 40]])
    assert out == {"correct": 25.0, "incorrect": 200.0, "all": 112.5}
    assert metrics.mean_tokens_by_outcome([[0, 0]], [[3, 5]])["correct"] is None
    assert metrics.cutoff_share(["stop", "length", "length", "stop"]) == 0.5
    assert metrics.cutoff_share([]) == 0.0


def test_simpleqa_scores():
    s = metrics.simpleqa_scores(["CORRECT", "CORRECT", "INCORRECT", "NOT_ATTEMPTED", "unparsed"])
    assert s["correct"] == pytest.approx(0.4)
    assert s["incorrect"] == pytest.approx(0.2)
    assert s["not_attempted"] == pytest.approx(0.2)
    assert s["unparsed"] == pytest.approx(0.2)
    assert s["correct_given_attempted"] == pytest.approx(2 / 3)
    assert s["f_score"] == pytest.approx(2 * 0.4 * (2 / 3) / (0.4 + 2 / 3))
