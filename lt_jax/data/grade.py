"""Grades teacher responses and computes per-problem pass rate and CV (DeepDistill's statistics).

`lt-jax grade --in responses.jsonl --out graded.jsonl [--stats stats.jsonl]`

For every response: split the thinking off (inline <think>, `reasoning_content`, OpenThoughts
markers), give only the text AFTER the thinking to the domain's verifier (so an answer that
appears only inside the thinking scores 0), and append the response record plus
{"verdict", "score", "extracted_answer", "domain", "response_tokens"} to graded.jsonl.

- Failed generations (status "failed") are counted and skipped. When a (problem_id, sample_index)
  pair occurs more than once (a retried request appended after its failure), the last one wins and
  the earlier ones are counted as "superseded".
- Resumable: graded.jsonl is appended and flushed per record; a rerun cuts a torn last line, skips
  pairs already graded and appends the rest, so kill + rerun gives no duplicates and no gaps.
- Any input layout lt_jax.data.formats reads can be graded; rows that are not responses.jsonl get
  problem_id = a hash of the normalised problem text, so samples of one problem group together
  (a multi-turn chat is graded on its last turn; its earlier turns are not carried over).
- `response_tokens` counts the assistant text as trained ("<think>..</think>" + answer) with the
  given tokenizer, or whitespace-separated words when none is given.
- Stats per problem (written after grading, from the whole graded file): n, passes,
  pass_rate = passes / n, mean_score, cv = sample std (n - 1 in the denominator, as DeepDistill's
  worked example [.9, .1, .7, .3, .5] -> 0.63 implies) / mean of the scores, with cv := 0.0 for a
  single sample or when the mean score is 0 (no sample scored; such problems carry no signal and stage I drops
  them), and mean_response_tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing as mp
import statistics
import sys
import time
from collections import Counter, defaultdict
from typing import Any, Iterable, Iterator, Literal

from tqdm import tqdm

from lt_jax import storage
from lt_jax.data import code_verify, formats, jsonl, judge_verify, verify
from lt_jax.data.code_verify import CodeVerifyConfig
from lt_jax.data.jsonl import DropLog
from lt_jax.data.judge_verify import JudgeVerifyConfig

GRADE_FIELDS = ("verdict", "extracted_answer", "score", "domain", "response_tokens")


@dataclasses.dataclass(frozen=True)
class GradeConfig:
    """How to grade. A response passes when its score is above its domain's threshold
    (`lt_jax.data.verify.passes`: DeepDistill's per-domain values unless `pass_thresholds` or
    `pass_threshold`, which applies to every domain, say otherwise). `code` and `judge` configure
    the code sandbox and the judge endpoint for the domains that use them."""

    domain: str = "math"
    pass_threshold: float | None = None
    pass_thresholds: dict[str, float] = dataclasses.field(default_factory=dict)
    code: CodeVerifyConfig = CodeVerifyConfig()
    judge: JudgeVerifyConfig = JudgeVerifyConfig()
    tokenizer: str | None = None
    workers: int = 1
    policy: Literal["skip", "strict"] = "skip"
    layout: str = "auto"
    fields: dict[str, str] = dataclasses.field(default_factory=dict)
    parse_timeout_s: int = 5
    verify_timeout_s: int = 5

    def __post_init__(self) -> None:
        verify.check_thresholds(self.thresholds(), "pass_thresholds")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.layout != "auto" and self.layout not in formats.LAYOUTS:
            raise ValueError(f"layout must be auto or one of {formats.LAYOUTS}, got {self.layout!r}")

    def thresholds(self) -> dict[str, float]:
        """Per-domain overrides for `verify.passes` ("*": every domain)."""
        return ({} if self.pass_threshold is None else {"*": self.pass_threshold}) | dict(self.pass_thresholds)


# ---------------------------------------------------------------------------------------------
# Pure statistics


def problem_stats(scores: list[float], verdicts: list[bool], tokens: list[int] | None = None) -> dict[str, Any]:
    """n, passes, pass_rate, mean_score, cv, mean_response_tokens for one problem's samples.

    cv = sample std / mean of `scores` (DeepDistill: [.9, .1, .7, .3, .5] -> 0.632); 0.0 when the
    mean is 0 or there is one sample.
    """
    n = len(scores)
    if n == 0:
        raise ValueError("problem_stats needs at least one sample")
    mean = sum(scores) / n
    cv = statistics.stdev(scores) / mean if mean > 0 and n > 1 else 0.0
    passes = sum(bool(v) for v in verdicts)
    out = {"n": n, "passes": passes, "pass_rate": passes / n, "mean_score": mean, "cv": cv}
    out["mean_response_tokens"] = (sum(tokens) / len(tokens)) if tokens else None
    return out


def stats_by_problem(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Groups graded rows by problem_id (first-seen order) and computes `problem_stats` for each."""
    groups: dict[str, dict[str, list]] = defaultdict(lambda: {"s": [], "v": [], "t": []})
    for row in rows:
        g = groups[str(row["problem_id"])]
        g["s"].append(float(row["score"]))
        g["v"].append(bool(row["verdict"]))
        g["t"].append(int(row.get("response_tokens") or 0))
    return {pid: {"problem_id": pid, **problem_stats(g["s"], g["v"], g["t"])} for pid, g in groups.items()}


def whitespace_tokens(text: str) -> int:
    return len(text.split())


def problem_key(text: str) -> str:
    """A stable id for a problem text (whitespace and case folded)."""
    norm = " ".join(text.lower().split())
    return "p" + hashlib.sha1(norm.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# One record


@dataclasses.dataclass
class _Work:
    base: dict[str, Any]
    answer: str
    thinking: str | None
    reference: str | None
    domain: str


_TOKENIZER: Any = None


def _load_tokenizer(path: str | None) -> Any:
    from lt_jax.data.tokenizers import load_tokenizer  # transformers: only when response lengths are counted in tokens

    return None if path is None else load_tokenizer(path)


def _init_worker(tokenizer_path: str | None, parse_timeout_s: int, verify_timeout_s: int,
                 code: CodeVerifyConfig = CodeVerifyConfig(), judge: JudgeVerifyConfig = JudgeVerifyConfig()) -> None:
    global _TOKENIZER
    verify.MATH_OPTIONS = verify.MathVerifyOptions(parse_timeout_s, verify_timeout_s)
    code_verify.CODE_OPTIONS = code
    judge_verify.configure(judge)
    _TOKENIZER = _load_tokenizer(tokenizer_path)


def _count_tokens(text: str) -> int:
    if _TOKENIZER is None:
        return whitespace_tokens(text)
    return len(_TOKENIZER(text, add_special_tokens=False)["input_ids"])


def grade_work(work: _Work, thresholds: dict[str, float]) -> dict[str, Any]:
    """Verifies one response (answer part only) and returns its graded row."""
    verdict = verify.get_verifier(work.domain)(work.answer, work.reference, work.base)
    row = dict(work.base)
    row.update(
        verdict=verify.passes(verdict.score, work.domain, thresholds),
        extracted_answer=verdict.extracted,
        score=float(verdict.score),
        domain=work.domain,
        response_tokens=_count_tokens(formats.join_thinking(work.thinking, work.answer)),
    )
    if verdict.note:
        row["grade_note"] = verdict.note
    return row


def _grade_star(args: tuple[_Work, dict[str, float]]) -> dict[str, Any]:
    return grade_work(*args)


def response_row(rec: formats.Record, sample_index: int) -> dict[str, Any]:
    """A responses.jsonl-shaped row for a record read from another layout."""
    system = next((m["content"] for m in rec.messages if m["role"] == "system"), None)
    row = {
        "problem_id": problem_key(rec.problem), "sample_index": sample_index, "prompt": rec.problem,
        "response": rec.assistant_text(), "reasoning_content": None, "reference_answer": rec.reference,
        "finish_reason": None, "status": "ok", "error": None, "teacher": rec.meta.get("teacher"),
        "source": rec.source, "source_id": rec.id,
    }
    if system is not None:
        row["system"] = system
    return row


# ---------------------------------------------------------------------------------------------
# Files


@dataclasses.dataclass
class GradeSummary:
    records_in: int = 0
    graded: int = 0
    resumed: int = 0
    failed_generation: int = 0
    superseded: int = 0
    passed: int = 0
    notes: Counter = dataclasses.field(default_factory=Counter)
    drops: DropLog = dataclasses.field(default_factory=DropLog)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("records_in", "graded", "resumed", "failed_generation", "superseded", "passed")}
        d["pass_rate"] = self.passed / self.graded if self.graded else None
        d["notes"] = dict(self.notes)
        d["dropped_input"] = self.drops.to_dict()
        d["seconds"] = round(self.seconds, 3)
        return d


def _record_key(rec: formats.Record) -> tuple[str, int] | None:
    if "problem_id" in rec.meta and rec.raw is not None and "problem_id" in rec.raw:
        return str(rec.meta["problem_id"]), int(rec.meta["sample_index"])
    return None


def _last_occurrence(path: str, cfg: GradeConfig) -> dict[tuple[str, int], tuple[str, int]]:
    """(problem_id, sample_index) -> (file, line) of its last occurrence (pass 1, drops not counted)."""
    last: dict[tuple[str, int], tuple[str, int]] = {}
    for rec in formats.read_records(path, layout=cfg.layout, fields=cfg.fields, policy="skip"):
        key = _record_key(rec)
        if key is not None:
            last[key] = (rec.file, rec.line)
    return last


def done_keys(path: str) -> set[tuple[str, int]]:
    """Pairs already present in a (possibly partial) graded file."""
    if not storage.exists(path):
        return set()
    jsonl.repair_tail(path)
    return {(str(r["problem_id"]), int(r["sample_index"])) for _, r in jsonl.read_jsonl(path) if "problem_id" in r and "sample_index" in r}


def _work_items(path: str, cfg: GradeConfig, summary: GradeSummary, done: set) -> Iterator[_Work]:
    last = _last_occurrence(path, cfg)
    counters: Counter = Counter()
    for rec in formats.read_records(path, layout=cfg.layout, fields=cfg.fields, policy=cfg.policy, drops=summary.drops):
        summary.records_in += 1
        key = _record_key(rec)
        if key is None:  # another layout: problems keyed by text, samples numbered in file order
            base = response_row(rec, 0)
            key = (base["problem_id"], counters[base["problem_id"]])
            counters[base["problem_id"]] += 1
            base["sample_index"] = key[1]
        else:
            if last.get(key) != (rec.file, rec.line):
                summary.superseded += 1
                continue
            base = {k: v for k, v in rec.raw.items() if k not in GRADE_FIELDS and k != "grade_note"}
        if rec.meta.get("status", "ok") == "failed" or base.get("status") == "failed":
            summary.failed_generation += 1
            continue
        if key in done:
            summary.resumed += 1
            continue
        domain = str(rec.meta.get("domain") or cfg.domain)
        yield _Work(base, rec.answer, rec.thinking, rec.reference, domain)


def grade_file(in_path: str, out_path: str, cfg: GradeConfig, stats_path: str | None = None, progress: bool = False) -> GradeSummary:
    """Grades `in_path` into `out_path` (resuming), then writes per-problem stats."""
    verify.get_verifier(cfg.domain)  # fail fast on an unknown default domain
    if not storage.exists(in_path):  # before the writer creates an empty output
        raise FileNotFoundError(f"{in_path}: input not found")
    start = time.time()
    summary = GradeSummary()
    done = done_keys(out_path)
    items = ((w, cfg.thresholds()) for w in _prefetched(_work_items(in_path, cfg, summary, done), cfg.judge))
    init = (cfg.tokenizer, cfg.parse_timeout_s, cfg.verify_timeout_s, cfg.code, cfg.judge)
    with jsonl.JsonlWriter(out_path, resume=True) as writer:
        for row in _run(items, cfg.workers, init, progress):
            writer.write(row)
            summary.graded += 1
            summary.passed += bool(row["verdict"])
            if row.get("grade_note"):
                summary.notes[row["grade_note"]] += 1
    write_stats(out_path, stats_path or default_stats_path(out_path))
    summary.seconds = time.time() - start
    return summary


def _prefetched(works: Iterator[_Work], judge: JudgeVerifyConfig) -> Iterator[_Work]:
    """The works unchanged; chunk by chunk, their judge calls are first asked concurrently into the cache."""
    if not judge.configured:
        yield from works
        return
    chunk: list[_Work] = []
    for w in works:
        chunk.append(w)
        if len(chunk) == 8 * judge.concurrency:
            judge_verify.prefetch([(c.domain, c.answer, c.reference, c.base) for c in chunk], judge)
            yield from chunk
            chunk = []
    judge_verify.prefetch([(c.domain, c.answer, c.reference, c.base) for c in chunk], judge)
    yield from chunk


def _run(items: Iterator[tuple[_Work, dict[str, float]]], workers: int, init: tuple, progress: bool) -> Iterator[dict[str, Any]]:
    bar = tqdm(desc="grade", unit="resp", disable=not progress, file=sys.stderr)
    if workers == 1:
        _init_worker(*init)
        try:
            for item in items:
                bar.update()
                yield _grade_star(item)
        finally:  # this process's verifiers back to their defaults (the math re-check unregistered)
            _init_worker(None, 5, 5)
    else:
        # spawn: fork would copy gcsfs / tokenizer threads mid-state.
        with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=init) as pool:
            for row in pool.imap(_grade_star, items, chunksize=8):
                bar.update()
                yield row
    bar.close()


def default_stats_path(out_path: str) -> str:
    base = out_path[: -len(".jsonl")] if out_path.endswith(".jsonl") else out_path
    return base + ".stats.jsonl"


def write_stats(graded_path: str, stats_path: str) -> int:
    """Per-problem stats of a whole graded file, written atomically; returns the problem count."""
    rows = (r for _, r in jsonl.read_jsonl(graded_path) if "score" in r and "problem_id" in r)
    return jsonl.write_jsonl(stats_path, stats_by_problem(rows).values())
