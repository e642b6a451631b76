"""Multiple-choice benchmarks (GPQA-style): choices shuffled by seed, the letter read after the thinking.

A file row holds the question (`problem`, or the field map's), its `choices` (a list of strings) and
the `answer`: the correct choice's text, its 0-based index, or its letter in the listed order. GPQA's
own rows work as they are: `--field "problem=Question,answer=Correct Answer"`, and the choices are
the answer plus the "Incorrect Answer 1-3" columns. When
the benchmark is loaded, each item's choices are shuffled with a generator seeded by (seed, item id)
(as simple-evals does for GPQA, so the correct option is not always first), lettered A, B, C, ...,
and the question becomes the prompt below; the reference is the correct option's new letter.

Scoring reads the final answer (after the thinking): the last "Answer: X" line, else a \\boxed{X},
else a reply that is just the letter. Any other letter, or none, is wrong (and counted as no answer).
"""

from __future__ import annotations

import re
import string
from typing import Any, Sequence

from lt_jax.data import verify

from lt_jax.eval.answer import final_answer
from lt_jax.eval.benchmarks import GPQA_WRONG, PROMPT, Item, correct_index, shuffled  # noqa: F401  (re-exported)

_ANSWER = re.compile(r"(?i)answer\s*(?:is)?\s*[:：]\s*[*_`(\[]*\s*([A-Z])\b")
_BOXED = re.compile(r"\\boxed\{\s*(?:\\text\{)?\s*([A-Z])\s*\}")
_BARE = re.compile(r"^\W*([A-Z])\W*$")


def extract_letter(answer_text: str, num_choices: int) -> str | None:
    """The letter the final answer commits to, or None."""
    allowed = string.ascii_uppercase[:num_choices]
    for pattern in (_ANSWER, _BOXED):
        found = [m.upper() for m in pattern.findall(answer_text)]
        found = [f for f in found if f in allowed]
        if found:
            return found[-1]
    m = _BARE.match(answer_text.strip())
    return m.group(1) if m and m.group(1) in allowed else None


class ChoiceScorer:
    """Per sample: extracted letter, correct (`verify.passes` on the 0/1 score, domain multiple_choice)."""

    def score(self, items: Sequence[Item], completions: Sequence[Sequence[Any]]) -> list[list[dict]]:
        out = []
        for item, comps in zip(items, completions):
            n = len(item.meta.get("choices") or [])
            row = []
            for c in comps:
                letter = extract_letter(final_answer(c), n)
                score = float(letter is not None and letter == item.answer)
                row.append({"correct": verify.passes(score, "multiple_choice"), "score": score, "extracted": letter,
                            "vote_key": letter})
            out.append(row)
        return out
