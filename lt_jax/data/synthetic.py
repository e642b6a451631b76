"""A synthetic long-thought task: multi-digit arithmetic with step-by-step traces.

The embedded demo needs a teacher whose answers look like long chain-of-thought (a thinking trace,
then a final `\\boxed{}` answer), whose difficulty is graded, and whose mistakes are realistic
enough that per-problem pass rates and CVs vary the way a real teacher's do. Here:

- a problem is "Compute A + B." or "Compute A * B."; its level is the number of digits of A
  (B has the same number of digits for "+", and ceil(level / 2) digits for "*");
- the thinking writes every elementary step: one column of an addition per line, each line laid out
  alike (what is left of the operands, zero-padded; the column sum; the result so far:
  "_0045+_0095: 5+5+1=11 ___12"), one digit of a partial product ("4*8+5=37"), then the
  column-wise sum of partial products;
- with probability `wrong_rate[level]` exactly one elementary step is off by one; every later step
  is computed correctly from the wrong value, so the error propagates to a wrong boxed answer (a
  step off by d at place k moves the result by d * 10**k, so it is always wrong).

`teacher_response` parses the problem back out of any prompt text that contains it, so the HTTP
teacher (lt_jax.sample.backends) can answer from a chat request alone. Seeds are strings hashed by
`random.Random`, so runs are reproducible across processes and Python hash seeds.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Any, Literal, Sequence

from lt_jax.config import ConfigError
from lt_jax.data import formats, jsonl

OPS = {"add": "+", "mul": "*"}
DEFAULT_PROMPT = formats.MATH_PROMPT_FORMAT
_ANCHORED = re.compile(r"Compute\s+(\d+)\s*([+*])\s*(\d+)")
_LOOSE = re.compile(r"(\d+)\s*([+*×xX])\s*(\d+)")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """The synthetic task. `wrong_rate[i]` is the chance that a trace at `levels[i]` is wrong."""

    num_problems: int = 256
    num_heldout: int = 64
    samples_per_problem: int = 4
    levels: tuple[int, ...] = (1, 2, 3)
    wrong_rate: tuple[float, ...] = (0.1, 0.3, 0.5)
    ops: tuple[str, ...] = ("add", "mul")
    seed: int = 0
    prompt_template: str = DEFAULT_PROMPT
    reasoning: Literal["inline", "separate"] = "inline"
    teacher: str = "synthetic"

    def __post_init__(self) -> None:
        if self.num_problems < 0 or self.num_heldout < 0:
            raise ValueError("num_problems and num_heldout must be >= 0")
        if self.samples_per_problem < 1:
            raise ValueError("samples_per_problem must be >= 1")
        if not self.levels or any(lv < 1 or lv > 12 for lv in self.levels):
            raise ValueError(f"levels must be digit counts in 1..12, got {self.levels}")
        if len(self.wrong_rate) != len(self.levels):
            raise ValueError(f"wrong_rate needs one rate per level: {len(self.levels)} levels, {len(self.wrong_rate)} rates")
        if any(not 0.0 <= r <= 1.0 for r in self.wrong_rate):
            raise ValueError(f"wrong_rate values must be in [0, 1], got {self.wrong_rate}")
        bad = [op for op in self.ops if op not in OPS]
        if not self.ops or bad:
            raise ValueError(f"ops must be a non-empty subset of {sorted(OPS)}, got {self.ops}")
        if "{problem}" not in self.prompt_template:
            raise ValueError("prompt_template must contain {problem}")

    def rate_for(self, level: int) -> float:
        """Wrong rate of `level`; a level outside `levels` takes the rate of the nearest one."""
        nearest = min(range(len(self.levels)), key=lambda i: (abs(self.levels[i] - level), self.levels[i]))
        return self.wrong_rate[nearest]


# ---------------------------------------------------------------------------------------------
# Problems


def problem_text(a: int, op: str, b: int) -> str:
    return f"Compute {a} {OPS[op]} {b}."


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(1, 9) if digits == 1 else rng.randint(10 ** (digits - 1), 10**digits - 1)


def _draw(rng: random.Random, level: int, op: str) -> tuple[int, int]:
    b_digits = level if op == "add" else (level + 1) // 2
    return _operand(rng, level), _operand(rng, b_digits)


def _generate(cfg: SyntheticConfig, stream: str, count: int, exclude: set) -> list[tuple[int, str, int, int]]:
    """`count` distinct (a, op, b, level) triples cycling through levels and ops, none in `exclude`."""
    rng = random.Random(f"{cfg.seed}/{stream}")
    out, seen = [], set(exclude)
    for i in range(count):
        level = cfg.levels[i % len(cfg.levels)]
        op = cfg.ops[(i // len(cfg.levels)) % len(cfg.ops)]
        for _ in range(10_000):
            a, b = _draw(rng, level, op)
            if (a, op, b) not in seen:
                break
        else:
            raise ConfigError(f"level {level} ({op}) has too few distinct problems for {count} {stream} problems; lower the count or drop that level")
        seen.add((a, op, b))
        out.append((a, op, b, level))
    return out


def make_problems(cfg: SyntheticConfig, split: Literal["train", "heldout"] = "train") -> list[dict[str, Any]]:
    """Problems {"id", "problem", "answer", "level"} of one split; the two splits never overlap.

    The held-out split is drawn first from its own stream, so it does not change with `num_problems`.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    heldout = _generate(cfg, "heldout", cfg.num_heldout, set())
    if split == "heldout":
        rows = heldout
    else:
        rows = _generate(cfg, "train", cfg.num_problems, {(a, op, b) for a, op, b, _ in heldout})
    fn = {"add": lambda a, b: a + b, "mul": lambda a, b: a * b}
    return [
        {"id": f"syn-{split}-{i:05d}", "problem": problem_text(a, op, b), "answer": str(fn[op](a, b)), "level": level}
        for i, (a, op, b, level) in enumerate(rows)
    ]


def parse_problem(text: str) -> tuple[int, str, int]:
    """(a, op, b) from any text containing a problem; "Compute A op B" is preferred when present."""
    m = _ANCHORED.search(text) or _LOOSE.search(text)
    if m is None:
        raise ValueError(f"synthetic teacher: no 'A + B' or 'A * B' problem in prompt {text[:200]!r}")
    a, sym, b = m.groups()
    return int(a), ("add" if sym == "+" else "mul"), int(b)


# ---------------------------------------------------------------------------------------------
# Traces. Each elementary step computes a value s (digit s % 10, carry s // 10); `fault` is
# (step index, delta) or None, and the faulty step reports s + delta, which later steps consume.


class _Steps:
    def __init__(self, fault: tuple[int, int] | None):
        self.fault, self.index = fault, 0

    def value(self, s: int) -> int:
        if self.fault is not None and self.index == self.fault[0]:
            delta = self.fault[1]
            s += delta if s + delta >= 0 else -delta  # a step never reports a negative value
        self.index += 1
        return s


def _digits(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]


def _number(digits_low_first: list[int], carry: int) -> int:
    return int(str(carry) + "".join(str(d) for d in reversed(digits_low_first)))


def _add_trace(x: int, y: int, steps: _Steps, lines: list[str], width: int | None = None) -> int:
    # Every line has the same layout and the same length: what is left of both operands, zero-padded
    # to `width` and shifted right one column per line ("_" fills from the left), the column's sum
    # (two digits), and the result so far in a field of `width`. So each value a step needs stands at
    # a fixed distance, in the line above or earlier in its own line: the lookups a small model learns
    # in minutes, where fetching the k-th digit of an operand from the prompt takes it far longer.
    width = max(width or 0, len(str(max(x, y))) + 1)
    xs, ys = str(x).zfill(width), str(y).zfill(width)
    carry, acc = 0, ""
    for i in range(width):
        rx, ry = xs[: width - i].rjust(width, "_"), ys[: width - i].rjust(width, "_")
        s = steps.value(int(rx[-1]) + int(ry[-1]) + carry)
        acc = str(s % 10) + acc
        lines.append(f"{rx}+{ry}: {rx[-1]}+{ry[-1]}+{carry}={s:02d} {acc.rjust(width, '_')}")
        carry = s // 10
    value = int(str(carry) + acc)  # a carry out of the last (zero) column only comes from a faulty step
    lines.append(f"{x}+{y}={value}")
    return value


def _times_digit(a: int, d: int, steps: _Steps, lines: list[str]) -> int:
    carry, out, parts = 0, [], []
    for da in _digits(a):
        s = steps.value(da * d + carry)
        parts.append(f"{da}*{d}+{carry}={s}")
        out.append(s % 10)
        carry = s // 10
    lines.append(f"{a}*{d}: " + ", ".join(parts))
    return _number(out, carry)


def _mul_trace(a: int, b: int, steps: _Steps, lines: list[str]) -> int:
    partials = []
    for k, d in enumerate(_digits(b)):
        p = _times_digit(a, d, steps, lines)
        shifted = p * 10**k
        lines.append(f"partial {k + 1}: {p}" + (f" shifted {k} -> {shifted}" if k else ""))
        partials.append(shifted)
    total = partials[0]
    for p in partials[1:]:
        total = _add_trace(total, p, steps, lines)
    lines.append(f"{a}*{b}={total}")
    return total


def _count_steps(a: int, op: str, b: int, width: int | None = None) -> int:
    counter = _Steps(None)
    _add_trace(a, b, counter, [], width) if op == "add" else _mul_trace(a, b, counter, [])
    return counter.index


def solve(a: int, op: str, b: int, fault: tuple[int, int] | None = None, width: int | None = None) -> tuple[list[str], int]:
    """The trace lines and the result, with `fault` = (step, delta) injected (None: correct).

    `width` pads an addition's columns (at least its operands' digits + 1); one width for every
    problem of a task keeps every trace line the same length.
    """
    lines = [f"{a}{OPS[op]}{b}, digit by digit from the right."]
    steps = _Steps(fault)
    result = _add_trace(a, b, steps, lines, width) if op == "add" else _mul_trace(a, b, steps, lines)
    return lines, result


def teacher_response(problem_text: str, rng: random.Random, cfg: SyntheticConfig) -> tuple[str, str]:
    """(thinking, answer_text) for a prompt containing a problem; answer_text ends with \\boxed{...}.

    With probability `cfg.rate_for(level)` one uniformly chosen step is off by +1 or -1.
    """
    a, op, b = parse_problem(problem_text)
    level = len(str(a))
    width = max(cfg.levels) + 1
    fault = None
    if rng.random() < cfg.rate_for(level):
        fault = (rng.randrange(_count_steps(a, op, b, width)), rng.choice((-1, 1)))
    lines, result = solve(a, op, b, fault, width)
    return "\n".join(lines), f"The answer is \\boxed{{{result}}}"


# ---------------------------------------------------------------------------------------------
# Files


def sample_rng(cfg: SyntheticConfig, problem_id: str, sample_index: int) -> random.Random:
    """The RNG of one (problem, sample): independent of order, workers and hash seeds."""
    return random.Random(f"{cfg.seed}/{problem_id}/{sample_index}")


def response_record(cfg: SyntheticConfig, problem: dict[str, Any], sample_index: int) -> dict[str, Any]:
    """One responses.jsonl record, shaped exactly as `lt-jax distill` writes it."""
    prompt = cfg.prompt_template.format(problem=problem["problem"])
    thinking, answer = teacher_response(prompt, sample_rng(cfg, problem["id"], sample_index), cfg)
    separate = cfg.reasoning == "separate"
    return {
        "problem_id": problem["id"],
        "sample_index": sample_index,
        "prompt": prompt,
        "response": answer if separate else f"<think>\n{thinking}\n</think>\n\n{answer}",
        "reasoning_content": thinking if separate else None,
        "reference_answer": problem["answer"],
        "finish_reason": "stop",
        "status": "ok",
        "error": None,
        "teacher": cfg.teacher,
        "problem": problem["problem"],
        "level": problem["level"],
    }


def write_problems(cfg: SyntheticConfig, path: str, split: Literal["train", "heldout"] = "train") -> int:
    """Writes problems.jsonl ({"id", "problem", "answer", "level"}) for one split; returns the count."""
    return jsonl.write_jsonl(path, make_problems(cfg, split))


def write_responses(cfg: SyntheticConfig, path: str, split: Literal["train", "heldout"] = "train") -> int:
    """Writes responses.jsonl: `samples_per_problem` teacher samples per problem; returns the count."""
    records = (response_record(cfg, p, k) for p in make_problems(cfg, split) for k in range(cfg.samples_per_problem))
    return jsonl.write_jsonl(path, records)


__all__: Sequence[str] = [
    "SyntheticConfig", "make_problems", "teacher_response", "write_problems", "write_responses",
    "parse_problem", "solve", "response_record", "sample_rng",
]
