"""Evaluation metrics as pure functions over per-sample results.

Conventions used throughout:

- ``correct`` is a (problems, k) 0/1 matrix: sample j of problem i was right. Every problem has the
  same k (the harness guarantees it).
- pass@1 is the mean of ``correct`` over all problems and samples. Its spread treats sample index j
  as one "run" of the whole benchmark: run accuracies a_j = mean_i correct[i, j]; we report their
  sample standard deviation (ddof=1; 0 when k == 1) and the standard error std / sqrt(k).
- pass@k is the unbiased estimator of Chen et al. (2021): per problem with n samples and c correct,
  1 - C(n-c, k) / C(n, k), averaged over problems.
- maj@k votes over the extracted answers (as hashable keys, None = no answer, which abstains). The
  winner is the key with the most votes; a tie goes to the key whose first vote came at the lowest
  sample index. A problem where every sample abstains counts as wrong.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Hashable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i): no huge binomials.
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(correct: np.ndarray, k: int) -> float:
    """pass@k averaged over problems, from a (problems, n) 0/1 matrix."""
    correct = _matrix(correct)
    n = correct.shape[1]
    return float(np.mean([pass_at_k(n, int(c), k) for c in correct.sum(axis=1)]))


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, plus n itself."""
    ks = [k for k in (2**i for i in range(int(math.log2(max(n, 1))) + 1)) if k <= n]
    return ks + ([n] if n not in ks else [])


def pass1_stats(correct: np.ndarray) -> dict[str, float | list[float]]:
    """pass@1 = mean over problems and samples, with its spread across sample-index runs."""
    correct = _matrix(correct)
    runs = correct.mean(axis=0)
    k = len(runs)
    std = float(np.std(runs, ddof=1)) if k > 1 else 0.0
    return {"mean": float(correct.mean()), "std": std, "stderr": std / math.sqrt(k), "runs": runs.tolist()}


def majority_vote(keys: Sequence[Hashable | None]) -> int | None:
    """Index of the sample whose answer wins the vote (first holder of it), or None if all abstain.

    Ties between equally frequent answers go to the one seen first (lowest sample index).
    """
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    first = {}
    for i, k in enumerate(keys):
        if k is not None and k not in first:
            first[k] = i
    winner = min(counts, key=lambda key: (-counts[key], first[key]))
    return first[winner]


def maj_at_k(keys: Sequence[Sequence[Hashable | None]], correct: np.ndarray) -> float:
    """Share of problems whose majority answer is correct (see `majority_vote`)."""
    correct = _matrix(correct)
    if len(keys) != correct.shape[0]:
        raise ValueError(f"maj_at_k: {len(keys)} key rows for {correct.shape[0]} problems")
    wins = []
    for row_keys, row_correct in zip(keys, correct):
        idx = majority_vote(row_keys)
        wins.append(0.0 if idx is None else float(row_correct[idx]))
    return float(np.mean(wins))


def mean_tokens_by_outcome(correct: np.ndarray, num_tokens: np.ndarray) -> dict[str, float | None]:
    """Mean output tokens over correct samples, over incorrect ones, and over all (None if empty)."""
    correct = _matrix(correct).astype(bool)
    num_tokens = np.asarray(num_tokens, dtype=np.float64)
    if num_tokens.shape != correct.shape:
        raise ValueError(f"mean_tokens_by_outcome: shapes {correct.shape} and {num_tokens.shape} differ")

    def mean(mask: np.ndarray) -> float | None:
        return float(num_tokens[mask].mean()) if mask.any() else None

    return {"correct": mean(correct), "incorrect": mean(~correct), "all": mean(np.ones_like(correct))}


def cutoff_share(finish_reasons: Sequence[str | None]) -> float:
    """Share of samples that stopped at the token limit (finish_reason "length")."""
    if not finish_reasons:
        return 0.0
    return sum(r == "length" for r in finish_reasons) / len(finish_reasons)


def label_shares(labels: Sequence[str], allowed: Sequence[str]) -> dict[str, float]:
    """Share of each label in `allowed` plus "unparsed" for anything else (sums to 1)."""
    total = len(labels)
    if total == 0:
        return {name: 0.0 for name in (*allowed, "unparsed")}
    counts = Counter(label if label in allowed else "unparsed" for label in labels)
    return {name: counts.get(name, 0) / total for name in (*allowed, "unparsed")}


def simpleqa_scores(labels: Sequence[str]) -> dict[str, float]:
    """Chinese SimpleQA / SimpleQA metrics from CORRECT / INCORRECT / NOT_ATTEMPTED labels.

    correct_given_attempted = CORRECT / (CORRECT + INCORRECT); f_score is the harmonic mean of the
    overall correct share and correct_given_attempted. Unparsed verdicts count in the denominator
    of the shares (they are neither correct nor attempted-and-judged), so they lower the score.
    """
    shares = label_shares(labels, ("CORRECT", "INCORRECT", "NOT_ATTEMPTED"))
    attempted = shares["CORRECT"] + shares["INCORRECT"]
    cga = shares["CORRECT"] / attempted if attempted else 0.0
    c = shares["CORRECT"]
    f = 2 * c * cga / (c + cga) if c + cga else 0.0
    return {
        "correct": c,
        "incorrect": shares["INCORRECT"],
        "not_attempted": shares["NOT_ATTEMPTED"],
        "unparsed": shares["unparsed"],
        "correct_given_attempted": cga,
        "f_score": f,
    }


def _matrix(correct: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    m = np.asarray(correct, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] == 0:
        raise ValueError(f"expected a non-empty (problems, samples) matrix, got shape {m.shape}")
    return m
