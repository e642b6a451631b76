"""Pluggable answer verifiers, one per domain; "math" uses Hugging Face math-verify.

A verifier sees only the final answer text (the part after the thinking, split by the caller), the
reference answer and the whole record, and returns a `Verdict` with a score in [0, 1]. Register new
domains (code execution, a judge model) with `register_verifier("code", fn)`; grading looks the
verifier up by each record's domain and never changes.

math-verify bounds parsing and comparison with SIGALRM timeouts, which only work in a process's
main thread; off the main thread the timeouts are disabled (grading runs verifiers in the main
thread of each worker process, so that is the normal path).
"""

from __future__ import annotations

import dataclasses
import importlib
import threading
from typing import Any, Callable

Verifier = Callable[[str, "str | None", dict], "Verdict"]
_REGISTRY: dict[str, Verifier] = {}


@dataclasses.dataclass(frozen=True)
class Verdict:
    """score in [0, 1]; extracted: the answer the verifier read from the response (None: nothing)."""

    score: float
    extracted: str | None = None
    note: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"verifier score must be in [0, 1], got {self.score}")


def register_verifier(domain: str, fn: Verifier, *, overwrite: bool = False) -> None:
    """Makes `fn(answer_text, reference, record) -> Verdict` the verifier of `domain`."""
    if domain in _REGISTRY and not overwrite and _REGISTRY[domain] is not fn:
        raise ValueError(f"a verifier for domain {domain!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[domain] = fn


# Domains whose verifier lives in its own module, imported (and so registered) on first use.
_MODULES = {"code": "lt_jax.data.code_verify", "science": "lt_jax.data.judge_verify", "other": "lt_jax.data.judge_verify",
            "multi_turn": "lt_jax.data.judge_verify", "instruction_following": "lt_jax.data.ifeval"}


def get_verifier(domain: str) -> Verifier:
    if domain not in _REGISTRY and domain in _MODULES:
        importlib.import_module(_MODULES[domain])
    try:
        return _REGISTRY[domain]
    except KeyError:
        raise KeyError(f"no verifier for domain {domain!r}; registered: {', '.join(sorted(_REGISTRY))}") from None


# A response passes when its score is ABOVE its domain's threshold (DeepDistill's rule, scores
# scaled to [0, 1]: science's similarity 0-5 must exceed 4.99, i.e. 4.99 / 5 here).
PASS_THRESHOLDS: dict[str, float] = {
    "math": 0.99, "code": 0.99, "science": 4.99 / 5, "instruction_following": 0.99, "other": 0.7, "multi_turn": 0.7,
}
DEFAULT_PASS_THRESHOLD = 0.99  # domains not listed (your own verifiers)


def pass_threshold(domain: str, overrides: dict[str, float] | None = None) -> float:
    """The score a response of `domain` must exceed; `overrides` (per domain, or "*" for all) win."""
    overrides = overrides or {}
    if domain in overrides:
        return float(overrides[domain])
    if "*" in overrides:
        return float(overrides["*"])
    return PASS_THRESHOLDS.get(domain, DEFAULT_PASS_THRESHOLD)


def passes(score: float, domain: str, overrides: dict[str, float] | None = None) -> bool:
    """THE pass rule, shared by grade, select and eval: score > the domain's threshold."""
    return score > pass_threshold(domain, overrides)


def check_thresholds(thresholds: dict[str, float], what: str) -> None:
    """Config validation: thresholds are scores in [0, 1)."""
    for domain, t in thresholds.items():
        if not isinstance(t, (int, float)) or not 0.0 <= t < 1.0:
            raise ValueError(f"{what}[{domain!r}] must be in [0, 1) (a response passes when its score is above it), got {t!r}")


def domains() -> list[str]:
    return sorted(set(_REGISTRY) | set(_MODULES))


# ---------------------------------------------------------------------------------------------
# math


@dataclasses.dataclass(frozen=True)
class MathVerifyOptions:
    """math-verify settings: per-call timeouts (seconds) and numeric tolerance."""

    parse_timeout_s: int = 5
    verify_timeout_s: int = 5
    float_rounding: int = 6


MATH_OPTIONS = MathVerifyOptions()


def _timeouts() -> tuple[int | None, int | None]:
    if threading.current_thread() is threading.main_thread():
        return MATH_OPTIONS.parse_timeout_s, MATH_OPTIONS.verify_timeout_s
    return None, None  # SIGALRM cannot be armed off the main thread


def parse_gold(reference: str) -> list:
    """Parses a gold answer; bare LaTeX or numbers are wrapped in \\boxed{} so both parse the same."""
    from math_verify import parse  # 0.4 s (sympy); grade's --help and non-math domains skip it

    text = reference.strip()
    if "\\boxed" not in text and not text.startswith("$"):
        text = f"\\boxed{{{text}}}"
    return parse(text, parsing_timeout=_timeouts()[0])


def math_verifier(answer_text: str, reference: str | None, record: dict[str, Any]) -> Verdict:
    """1.0 when math-verify finds the reference in the answer text, else 0.0.

    As math-verify prescribes, the gold answer is parsed first, then the prediction, and
    `verify(gold, prediction)` compares them (the order matters: verify is not symmetric).
    """
    from math_verify import parse, verify  # as in parse_gold

    parse_t, verify_t = _timeouts()
    has_reference = reference is not None and bool(str(reference).strip())
    try:
        gold = parse_gold(str(reference)) if has_reference else []
        pred = parse(answer_text, parsing_timeout=parse_t) if answer_text and answer_text.strip() else []
    except Exception as e:  # math-verify swallows its own errors, but sympy may still leak one
        return Verdict(0.0, None, f"parse error: {type(e).__name__}")
    extracted = str(pred[-1]) if pred else None
    if not has_reference:
        return Verdict(0.0, extracted, "no reference answer")
    if not gold:
        return Verdict(0.0, extracted, "reference did not parse")
    if not pred:
        return Verdict(0.0, None, "no answer found")
    try:
        ok = verify(gold, pred, float_rounding=MATH_OPTIONS.float_rounding, timeout_seconds=verify_t)
    except Exception as e:
        return Verdict(0.0, extracted, f"verify error: {type(e).__name__}")
    return Verdict(1.0 if ok else 0.0, extracted)


register_verifier("math", math_verifier)
