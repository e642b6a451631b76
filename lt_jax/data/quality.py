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

from collections import Counter
from typing import Hashable, Sequence


def max_ngram_count(tokens: Sequence[Hashable], n: int = 20) -> int:
    """How often the most frequent n-gram of `tokens` occurs (0 when there are fewer than n tokens)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if len(tokens) < n:
        return 0
    # Hash each window once: a 32k-token response has 32k windows of 20 tokens.
    counts = Counter(hash(tuple(tokens[i : i + n])) for i in range(len(tokens) - n + 1))
    return max(counts.values())


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
