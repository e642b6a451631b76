"""Judge-based generalization evals (after O1-Journey): factuality, safety and sycophancy.

A judge is any OpenAI-compatible chat endpoint (base URL, model, key from an env var). Each kind
of benchmark has a prompt in lt_jax/eval/prompts/ and a closed set of labels:

- ``simpleqa`` (Chinese SimpleQA): CORRECT / INCORRECT / NOT_ATTEMPTED against the reference;
- ``safety`` (Flames, DiaSafety prompts): SAFE / UNSAFE;
- ``sycophancy`` (false-premise probe): SYCOPHANTIC / NOT_SYCOPHANTIC.

The judge sees the evaluated model's final answer only (its thinking is cut off first) unless
`include_thinking` is set. Judge replies are parsed by `parse_verdict`; one that names no label
unambiguously is recorded as unparsed (label None) and counted, never raised.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from lt_jax import storage

from lt_jax.data.verdicts import _strip_thinking, fill, parse_verdict  # noqa: F401  (parse_verdict, fill re-exported)
from lt_jax.eval import metrics
from lt_jax.eval.benchmarks import Item
from lt_jax.eval.generators import Completion, EndpointConfig, OpenAIChat, SamplingConfig

LABELS: dict[str, tuple[str, ...]] = {
    "simpleqa": ("CORRECT", "INCORRECT", "NOT_ATTEMPTED"),
    "safety": ("SAFE", "UNSAFE"),
    "sycophancy": ("SYCOPHANTIC", "NOT_SYCOPHANTIC"),
}
# The label whose share is the benchmark's headline number (higher is better for all three).
HEADLINE: dict[str, tuple[str, str]] = {
    "simpleqa": ("correct", "CORRECT"),
    "safety": ("safe", "SAFE"),
    "sycophancy": ("not_sycophantic", "NOT_SYCOPHANTIC"),
}
PROMPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    base_url: str | None = None  # e.g. http://127.0.0.1:8000/v1; required for judged benchmarks
    model: str | None = None
    api_key_env: str = "JUDGE_API_KEY"  # name of the env var that holds the judge's key
    temperature: float = 0.0
    max_tokens: int = 2048
    concurrency: int = 8
    timeout_s: float = 300.0
    max_retries: int = 5
    include_thinking: bool = False  # show the judge the model's thinking too
    prompt_dir: str | None = None  # a folder with simpleqa.txt / safety.txt / sycophancy.txt to override ours

    def __post_init__(self):
        if self.max_tokens < 1 or self.concurrency < 1:
            raise ValueError("judge.max_tokens and judge.concurrency must be >= 1")

    @property
    def configured(self) -> bool:
        return bool(self.base_url and self.model)

    def endpoint(self) -> EndpointConfig:
        if not self.configured:
            raise ValueError(
                "judged benchmarks need a judge: set judge.base_url and judge.model "
                "(or --judge-base-url / --judge-model); its key is read from the env var judge.api_key_env"
            )
        return EndpointConfig(
            self.base_url, self.model, self.api_key_env, self.concurrency, self.timeout_s, self.max_retries
        )


# ---------------------------------------------------------------------------------------------
# Verdict parsing


# parse_verdict and its helpers live in lt_jax.data.verdicts: grading (lt_jax.data.judge_verify)
# parses judge replies too, and the data stage sits below eval.


# ---------------------------------------------------------------------------------------------
# Judging


def load_prompt(kind: str, prompt_dir: str | None = None) -> str:
    if kind not in LABELS:
        raise ValueError(f"no judge prompt for benchmark kind {kind!r}; judged kinds: {', '.join(LABELS)}")
    return storage.read_text(storage.join(prompt_dir or PROMPT_DIR, f"{kind}.txt"))


def response_for_judge(c: Completion, include_thinking: bool) -> str:
    """What the judge sees of a completion: the final answer after the thinking, by default."""
    if include_thinking:
        thinking = f"<think>\n{c.reasoning}\n</think>\n\n" if c.reasoning else ""
        return thinking + c.text
    return _strip_thinking(c.text).strip()


def judge_fields(kind: str, item: Item, response: str) -> dict[str, str]:
    if kind == "safety":
        return {"prompt": item.problem, "response": response}
    if kind == "sycophancy":
        return {
            "question": str(item.meta.get("question", item.problem)),
            "premise": str(item.meta.get("premise", "")),
            "reference": item.answer or "",
            "response": response,
        }
    return {"question": item.problem, "reference": item.answer or "", "response": response}


class JudgeScorer:
    """Scores completions of judged benchmarks by asking the judge endpoint, one request each."""

    def __init__(self, kind: str, cfg: JudgeConfig, chat: OpenAIChat | None = None):
        self.kind, self.cfg = kind, cfg
        self.labels = LABELS[kind]
        self.template = load_prompt(kind, cfg.prompt_dir)
        self.chat = chat or OpenAIChat(cfg.endpoint())
        # Greedy judging; top_p 1 so the judge is not truncated.
        self.params = SamplingConfig(temperature=cfg.temperature, top_p=1.0, max_new_tokens=cfg.max_tokens)

    def score(self, items: Sequence[Item], completions: Sequence[Sequence[Completion]]) -> list[list[dict]]:
        """Per item, per sample: {"label", "judge_text", "judge_error"}."""
        jobs = [(i, j) for i, comps in enumerate(completions) for j in range(len(comps))]

        def one(job: tuple[int, int]) -> dict[str, Any]:
            i, j = job
            c = completions[i][j]
            prompt = fill(self.template, judge_fields(self.kind, items[i], response_for_judge(c, self.cfg.include_thinking)))
            reply = self.chat.complete([{"role": "user", "content": prompt}], self.params, seed=0)
            return {"label": parse_verdict(reply.text, self.labels), "judge_text": reply.text, "judge_error": reply.error}

        flat = self.chat.map(one, jobs)
        out: list[list[dict]] = [[] for _ in completions]
        for (i, _), res in zip(jobs, flat):
            out[i].append(res)
        return out


def summarize_judged(records: Sequence[dict], kind: str) -> dict[str, Any]:
    """Label shares (unparsed counted, in the denominator), headline metric, lengths, cut-offs."""
    labels = [s.get("label") or "unparsed" for r in records for s in r["samples"]]
    counts = {lab: labels.count(lab) for lab in (*LABELS[kind], "unparsed")}
    tokens = np.array([s["num_tokens"] for r in records for s in r["samples"]], dtype=np.float64)
    out: dict[str, Any] = {
        "kind": kind,
        "num_items": len(records),
        "samples_per_item": len(records[0]["samples"]) if records else 0,
        "label_counts": counts,
        "judge_errors": sum(bool(s.get("judge_error")) for r in records for s in r["samples"]),
        "generation_errors": sum(s.get("finish_reason") == "error" for r in records for s in r["samples"]),
        "cutoff_share": metrics.cutoff_share([s["finish_reason"] for r in records for s in r["samples"]]),
        "mean_tokens": float(tokens.mean()) if tokens.size else None,
    }
    if kind == "simpleqa":
        out["scores"] = metrics.simpleqa_scores(labels)
    else:
        shares = metrics.label_shares(labels, LABELS[kind])
        out["scores"] = {lab.lower(): v for lab, v in shares.items()}
    name, _ = HEADLINE[kind]
    out["headline"] = {"name": name, "value": out["scores"][name]}
    return out
