"""Stand-in generators and rule-based server backends for the eval tests (imported by name).

A "model" that answers from a lookup or at random, and a "judge" that reads the filled judge
prompt; tests/eval/conftest.py serves them on the project's real server.
"""

from __future__ import annotations

import random
import re
from typing import Callable, Sequence

from lt_jax.eval.generators import Completion, SamplingConfig


def user_turn(messages) -> str:
    return [m["content"] for m in messages if m["role"] == "user"][-1]


class LookupGenerator:
    """Answers each prompt from a {user turn: text} table; `fail_after` calls raise (a killed eval)."""

    def __init__(self, answers: dict[str, str], name: str = "lookup", fail_after: int | None = None):
        self.answers, self.name, self.fail_after, self.calls = answers, name, fail_after, 0

    def generate(self, prompts, n: int, params: SamplingConfig, seeds=None):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        return [[Completion(self.answers[user_turn(p)], 5 + j, "stop") for j in range(n)] for p in prompts]


class CoinGenerator:
    """Right or wrong at random, from the per-problem seed the harness passes (resume must reproduce it)."""

    def __init__(self, answers: dict[str, str], name: str = "coin", fail_after: int | None = None):
        self.answers, self.name, self.fail_after, self.calls = answers, name, fail_after, 0

    def generate(self, prompts, n: int, params: SamplingConfig, seeds=None):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        out = []
        for p, seed in zip(prompts, seeds):
            rng = random.Random(seed)
            row = []
            for _ in range(n):
                ans = self.answers[user_turn(p)] if rng.random() < 0.5 else "-12345"
                length = rng.randint(10, 200)
                finish = "length" if length > 180 else "stop"
                row.append(Completion(f"<think>try</think>\\boxed{{{ans}}}", length, finish))
            out.append(row)
        return out


def reference_answers(bench, prompt_cfg=None, shuffle_seed: int | None = None) -> dict[str, str]:
    """{user turn: "... \\boxed{reference}"} for a math benchmark (answers shuffled if asked)."""
    from lt_jax.eval import harness

    prompt_cfg = prompt_cfg or harness.PromptConfig()
    turns = [user_turn(harness.build_messages(it, bench.kind, prompt_cfg)) for it in bench.items]
    answers = [it.answer for it in bench.items]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(answers)
    return {t: f"<think>\nLet me think. Maybe \\boxed{{0}}?\n</think>\n\nThe answer is \\boxed{{{a}}}." for t, a in zip(turns, answers)}


# ---------------------------------------------------------------------------------------------
# Stub endpoints on the project's server


class RuleBackend:
    """A server backend whose every choice is `respond(last user turn, choice index)`."""

    def __init__(self, respond: Callable[[str, int], str], name: str):
        self.respond, self.name = respond, name
        self.requests = 0

    def generate(self, requests: Sequence):
        from lt_jax.sample.backends import Choice, GenResult

        out = []
        for r in requests:
            self.requests += 1
            text_in = r.prompt if r.prompt is not None else user_turn(r.messages)
            choices = tuple(Choice(t, "stop", len(t.split())) for t in (self.respond(text_in, i) for i in range(r.n)))
            out.append(GenResult(choices, len(text_in.split())))
        return out


def judge_reply(prompt: str, choice: int) -> str:
    """A rule-based judge reading our own judge prompts; some replies are deliberately malformed."""
    reply = prompt.rsplit("<<<", 1)[1].rsplit(">>>", 1)[0].strip()
    if "GARBLE" in reply:
        return "I am not able to grade this one, sorry."
    if "Reference answer:" in prompt:  # simpleqa
        ref = re.search(r"Reference answer: (.*)", prompt).group(1).strip()
        if ref in reply:
            return "It names the reference.\nVERDICT: CORRECT"
        if "不知道" in reply:
            return "The reply declines.\n**Verdict:** not attempted"
        return "<think>compare</think>It contradicts the reference.\nVERDICT: INCORRECT"
    if "false claim" in prompt:  # sycophancy
        premise = re.search(r'the answer is "(.*)"', prompt).group(1)
        return "VERDICT: SYCOPHANTIC" if premise in reply else "Verdict - NOT SYCOPHANTIC"
    return "VERDICT：UNSAFE" if "HARMFUL" in reply else "The reply is fine. VERDICT: SAFE"
