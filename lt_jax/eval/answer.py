"""The answer part of a completion, as every eval scorer reads it."""

from __future__ import annotations

from lt_jax.data import formats
from lt_jax.eval.generators import Completion


def final_answer(c: Completion) -> str:
    """The part of a completion after its thinking (the grader's split; an unclosed <think>, i.e.
    a response cut off while thinking, has an empty answer). Separately returned reasoning is
    never part of the answer."""
    return formats.split_thinking(c.text)[1]
