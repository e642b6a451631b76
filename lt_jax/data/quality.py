"""DeepDistill's rule-based quality checks on one response, as pure functions (select applies them).

- repetition: any n-gram (20 tokens) occurring more than `max_count` (20) times in the response
  (thinking + answer) marks a degenerate, looping generation;
- turns: a conversation must hold an even number of turns (user/assistant pairs; system turns
  not counted), else it is cut or malformed;
- format: a response must hold both thinking and a final answer.

Tokens are whitespace-separated words by default (select has no tokenizer); pass token ids from
a tokenizer to count model tokens instead. The query+answer perplexity filter needs a model and
lives in lt_jax.data.perplexity.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import numpy as np


_P = 0x9E3779B97F4A7C15  # odd, so invertible modulo 2**64
_Q = pow(_P, -1, 2**64)


def max_ngram_count(tokens: Sequence[Hashable], n: int = 20) -> int:
    """How often the most frequent n-gram of `tokens` occurs (0 when there are fewer than n tokens).

    Windows are compared by a 64-bit polynomial hash computed for all of them at once (numpy,
    wrapping uint64 arithmetic): a 32k-token response takes about a millisecond, where hashing
    32k tuples of 20 took tens. A false match needs a 64-bit collision.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    count = len(tokens)
    if count < n:
        return 0
    ids = np.fromiter((hash(t) for t in tokens), dtype=np.int64, count=count).view(np.uint64)
    with np.errstate(over="ignore"):
        q_pow = np.cumprod(np.full(count, _Q, np.uint64)) * np.uint64(_P)  # Q**i (starts at Q**0 = 1)
        p_pow = np.cumprod(np.full(count, _P, np.uint64)) * np.uint64(_Q)  # P**i
        prefix = np.concatenate([np.zeros(1, np.uint64), np.cumsum(ids * q_pow, dtype=np.uint64)])
        # sum_k t_k Q**k over a window, times P**(its last index): sum_j t_(i+j) P**(n-1-j), whatever i is
        windows = (prefix[n:] - prefix[:-n]) * p_pow[n - 1 :]
    return int(np.unique(windows, return_counts=True)[1].max())


def text_tokens(text: str) -> list[str]:
    return text.split()


def repeated_ngram(text: str, n: int = 20, max_count: int = 20) -> bool:
    """True when some n-gram of `text` occurs more than `max_count` times."""
    return max_ngram_count(text_tokens(text), n) > max_count


def turn_count(messages: Sequence[dict]) -> int:
    """Conversation turns, system messages not counted."""
    return sum(1 for m in messages if m.get("role") != "system")


def even_turns(messages: Sequence[dict]) -> bool:
    return turn_count(messages) % 2 == 0


def has_thinking_and_answer(thinking: str | None, answer: str) -> bool:
    return bool(thinking and thinking.strip()) and bool(answer and answer.strip())
