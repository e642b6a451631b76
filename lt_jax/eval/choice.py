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

import dataclasses
import random
import re
import string
from typing import Any, Sequence

from lt_jax.eval.benchmarks import Benchmark, BenchmarkError, Item

GPQA_WRONG = ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
PROMPT = ("Answer the multiple-choice question below. Think it through, then finish with a line of the form "
          "\"Answer: X\", where X is the letter of the one correct option ({letters}).\n\n{question}\n\n{options}")


def correct_index(answer: Any, choices: Sequence[str], where: str) -> int:
    """Which of `choices` the answer names: its text, a 0-based index, or a letter."""
    text = str(answer).strip()
    if text in choices:
        return list(choices).index(text)
    if text.isdigit() and int(text) < len(choices):
        return int(text)
    if len(text) == 1 and text.upper() in string.ascii_uppercase[: len(choices)]:
        return string.ascii_uppercase.index(text.upper())
    raise BenchmarkError(f"{where}: answer {text[:60]!r} is none of the {len(choices)} choices (text, index or letter)")


def shuffled(bench: Benchmark, seed: int = 0) -> Benchmark:
    """The benchmark with every item's choices shuffled (seed, item id), lettered, and put in the prompt."""
    items = []
    for it in bench.items:
        choices = it.meta.get("choices")
        wrong = [it.meta[k] for k in GPQA_WRONG if it.meta.get(k) not in (None, "")]
        if choices is None and wrong:
            choices = [it.answer, *wrong]
        where = f"{bench.source}: item {it.id}"
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, (str, int, float)) for c in choices):
            raise BenchmarkError(f"{where}: field 'choices' must be a list of at least two options")
        if len(choices) > 26:
            raise BenchmarkError(f"{where}: {len(choices)} choices; at most 26 can be lettered")
        choices = [str(c) for c in choices]
        right = correct_index(it.answer, choices, where)
        order = list(range(len(choices)))
        random.Random(f"{seed}/{it.id}").shuffle(order)
        letters = string.ascii_uppercase[: len(choices)]
        options = "\n".join(f"{letters[k]}) {choices[j]}" for k, j in enumerate(order))
        problem = PROMPT.format(letters=", ".join(letters), question=it.problem, options=options)
        meta = {k: v for k, v in it.meta.items() if k not in GPQA_WRONG}
        meta |= {"choices": [choices[j] for j in order], "question": it.problem}
        items.append(Item(it.id, problem, letters[order.index(right)], meta))
    return dataclasses.replace(bench, items=tuple(items))


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
        from lt_jax.data import verify
        from lt_jax.eval.harness import final_answer

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
