"""Judge replies and prompts as text: filling a prompt template, reading the verdict label back.

Shared by grading (lt_jax.data.judge_verify) and the judged evals (lt_jax.eval.judge).
"""

from __future__ import annotations

import re
from typing import Sequence

from lt_jax.data import formats


def _label_pattern(label: str) -> str:
    # NOT_ATTEMPTED also matches "NOT ATTEMPTED" / "not-attempted"; letters around a label block it,
    # so SAFE never matches inside UNSAFE nor CORRECT inside INCORRECT.
    body = r"[\s_\-]*".join(map(re.escape, label.split("_")))
    return rf"(?<![A-Z0-9_]){body}(?![A-Z0-9_])"


def _strip_thinking(text: str) -> str:
    return formats.split_thinking(text)[1]


def parse_verdict(text: str | None, labels: Sequence[str]) -> str | None:
    """The label a judge reply gives, or None when it is malformed or ambiguous.

    Order: the last ``VERDICT: LABEL`` line (colon ASCII or full-width, markdown emphasis allowed);
    else the one label the reply mentions (a longer label like NOT_SYCOPHANTIC hides the shorter
    one inside it), unless it is negated ("not safe") or several labels appear. A judge's own
    <think> block is ignored.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    upper = _strip_thinking(text).upper()
    ordered = sorted(labels, key=len, reverse=True)
    alternatives = "|".join(f"({_label_pattern(lab)})" for lab in ordered)
    verdicts = list(re.finditer(rf"VERDICT\W{{0,4}}[:：]?[\s*_`\"'\[(]*(?:{alternatives})", upper))
    if verdicts:
        last = verdicts[-1]
        return next(lab for lab, g in zip(ordered, last.groups()) if g)
    found: set[str] = set()
    masked = upper
    for lab in ordered:  # longest first, blanking each hit so shorter labels cannot re-match it
        for m in re.finditer(_label_pattern(lab), masked):
            if re.search(r"(NOT|N'T|NEITHER|NOR)\s+$", masked[: m.start()]):
                return None  # "not safe" outside a verdict line: too loose to trust
            found.add(lab)
        masked = re.sub(_label_pattern(lab), lambda m: " " * len(m.group()), masked)
    return found.pop() if len(found) == 1 else None


def fill(template: str, fields: dict[str, str]) -> str:
    """Replaces {name} placeholders literally (LaTeX and code braces in values are left alone)."""
    out = template
    for name, value in fields.items():
        out = out.replace("{" + name + "}", value)
    return out
