"""`lt-jax distill`: ask an OpenAI-compatible teacher for n samples per problem, resumably.

    lt-jax distill --input problems.jsonl --output responses.jsonl --base-url URL --model NAME
                   [--n 4 --temperature 0.6 --top-p 0.95 --max-tokens 32768 --seed 0]
                   [--concurrency 16 --rpm 500 --tpm 2000000 --timeout 600 --retry-failed]

Works against OpenAI, DeepSeek (its separate `reasoning_content` is kept), vLLM, SGLang and
`lt-jax serve`. One request per (problem, sample) with n=1: every sample has its own seed and
its own retries, and the resume unit is the sample; servers that batch (vLLM, SGLang, ours)
still see the concurrent requests together and share the prompt's prefix cache.

Client: the official `openai` AsyncOpenAI with `max_retries=0`. It is the reference for the wire
format all these servers test against, maps HTTP failures to typed exceptions (status code,
Retry-After) and keeps provider-specific fields; switching its own retries off leaves the policy
here in force: exponential backoff with jitter on 429, 408/409, 5xx, timeouts and dropped
connections, Retry-After honoured, a hard per-request deadline, and token-bucket limits on
requests/min and tokens/min. A sample that still fails is written with status "failed" and its
error, never lost.

Output (responses.jsonl, the contract `lt-jax grade` reads) is appended and flushed per record. A
rerun skips pairs already present: a torn last line from a kill is cut off first, so there are no
duplicates and no gaps. `--retry-failed` first rewrites the file without its failed records
(atomically: temp file + rename, or one object upload on gs://) and then asks again, so a reader
never sees two records for one pair. gs:// outputs are staged locally and uploaded periodically
and at the end (see lt_jax.data.jsonl.JsonlWriter).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import json
import logging
import os
import random
import time
from typing import Any, Iterator, Literal

from tqdm import tqdm

from lt_jax import config, sampling, storage
from lt_jax.data import formats, jsonl

log = logging.getLogger(__name__)

RECORD_FIELDS = ("problem_id", "sample_index", "problem", "prompt", "system", "response",
                 "reasoning_content", "finish_reason", "usage", "reference_answer", "teacher", "teacher_api",
                 "sampling", "time", "latency_s", "attempts", "status", "error", "error_type")
DEFAULT_TEMPLATE = formats.MATH_PROMPT_FORMAT


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    input: str
    output: str
    base_url: str
    model: str
    api: Literal["chat", "completions"] = "chat"
    api_key_env: str | None = "OPENAI_API_KEY"
    id_field: str = "id"
    problem_field: str = "problem"
    answer_field: str | None = "answer"
    keep_fields: tuple[str, ...] = ()  # input fields copied into each record (e.g. level, source)
    limit: int | None = None  # first N problems only
    # Sampling (None: leave to the teacher's default)
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # sent in the body as `top_k` (vLLM, SGLang, lt-jax serve)
    max_tokens: int | None = None
    max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    stop: tuple[str, ...] = ()
    seed: int | None = None  # base seed: each (problem, sample) gets its own seed derived from it
    prompt_template: str = DEFAULT_TEMPLATE
    system_prompt: str | None = None
    extra_body: dict[str, Any] | None = None
    # Traffic
    concurrency: int = 16
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    timeout_s: float = 600.0
    max_retries: int = 8
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    retry_failed: bool = False
    progress: bool = True

    def __post_init__(self):
        if "{problem}" not in self.prompt_template:
            raise ValueError("prompt_template must contain {problem}")
        try:
            self.prompt_template.format(problem="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"prompt_template is not a valid format string ({e!r}); write literal braces "
                             "doubled, e.g. \\boxed{{}}") from None
        for name in ("n", "concurrency", "timeout_s", "backoff_initial_s", "backoff_max_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name, rule in (("n", "n"), ("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                           ("max_tokens", "max_new_tokens"), ("seed", "seed")):
            sampling.check_field(rule, getattr(self, name), "DistillConfig", name)
        clash = set(self.keep_fields) & set(RECORD_FIELDS)
        if clash:
            raise ValueError(f"keep_fields {sorted(clash)} would overwrite record fields; rename them")
        if self.max_retries < 0 or (self.limit is not None and self.limit < 0):
            raise ValueError("max_retries and limit must be >= 0")
        for name in ("requests_per_minute", "tokens_per_minute"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 (or unset for no limit)")


# ---------------------------------------------------------------------------------------------
# Problems


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    text: str
    answer: str | None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def _rows(path: str) -> Iterator[tuple[int, dict]]:
    """Every row the shared reader gives (JSONL, .gz, JSON, Parquet, BOM); a bad one stops the run."""
    for file in formats.list_files(path):
        yield from formats.read_rows(file, policy="strict")


def read_problems(path: str, id_field: str = "id", problem_field: str = "problem",
                  answer_field: str | None = "answer", keep_fields: tuple[str, ...] = ()) -> list[Problem]:
    """Problems from JSONL or Parquet (local or gs://); bad rows raise DataError naming file, line, field."""
    problems, seen = [], {}
    for line, row in _rows(path):
        pid = row.get(id_field)
        if isinstance(pid, bool) or not isinstance(pid, (str, int)) or pid == "":
            raise jsonl.DataError(path, line, id_field, f"expected a non-empty string or int id, got {pid!r}")
        text = row.get(problem_field)
        if not isinstance(text, str) or not text.strip():
            raise jsonl.DataError(path, line, problem_field, f"expected non-empty text, got {text!r:.80}")
        answer = row.get(answer_field) if answer_field else None
        if answer is not None and not isinstance(answer, str):
            answer = json.dumps(answer) if isinstance(answer, (list, dict)) else str(answer)
        pid = str(pid)
        if pid in seen:
            raise jsonl.DataError(path, line, id_field, f"duplicate id {pid!r} (first at line {seen[pid]})")
        seen[pid] = line
        problems.append(Problem(pid, text, answer, {k: row.get(k) for k in keep_fields}))
    return problems


def sample_seed(base: int, problem_id: str, sample_index: int) -> int:
    """A per-sample seed (31 bits: every server accepts it), stable across runs and processes."""
    return sampling.derive_seed(base, problem_id, sample_index)


# ---------------------------------------------------------------------------------------------
# Traffic policy


class RateLimiter:
    """A token bucket: `per_minute` units refill evenly; at most 10 s worth can burst.

    Callers reserve an estimate up front and settle the difference once they know the real
    cost (tokens), so the bucket tracks what the provider meters.
    """

    def __init__(self, per_minute: float, clock=time.monotonic, sleep=asyncio.sleep):
        self.rate = per_minute / 60.0
        self.capacity = max(self.rate * 10.0, 1.0)
        self.level = self.capacity
        self._clock, self._sleep = clock, sleep  # injectable, so tests run on a fake clock
        self._stamp = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self.level = min(self.capacity, self.level + (now - self._stamp) * self.rate)
        self._stamp = now

    async def acquire(self, amount: float) -> None:
        async with self._lock:  # FIFO: a large request is not starved by small ones
            while True:
                self._refill()
                need = min(amount, self.capacity)  # a request bigger than the bucket waits for a full one
                if self.level >= need - 1e-6:  # float dust must not leave us waiting 1e-16 s forever
                    self.level -= amount
                    return
                await self._sleep((need - self.level) / self.rate)

    def settle(self, extra: float) -> None:
        """Charges `extra` more units (a refund when negative)."""
        self._refill()
        self.level = min(self.capacity, self.level - extra)


def classify(error: BaseException) -> tuple[str, bool]:
    """(error type, retryable) for an exception raised by one request."""
    import openai  # 0.8 s to import; grade reaches this module (its judge) and must start fast

    if isinstance(error, (asyncio.TimeoutError, openai.APITimeoutError)):
        return "timeout", True
    if isinstance(error, openai.APIConnectionError):
        return "connection", True
    if isinstance(error, openai.RateLimitError):
        return "rate_limit", True
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        if status >= 500 or status in (408, 409):
            return "server_error" if status >= 500 else f"http_{status}", True
        return f"http_{status}", False
    if isinstance(error, (BadResponse, openai.APIResponseValidationError, json.JSONDecodeError)):
        return "bad_response", True  # a 200 whose body is not usable JSON is a transient teacher fault
    return "internal", False


class BadResponse(Exception):
    """The teacher answered 200 with a body we cannot use (no choices)."""


def backoff_delay(attempt: int, error: BaseException, cfg: DistillConfig, rng: random.Random) -> float:
    """Exponential backoff with jitter (uniform in [cap/2, cap]); a Retry-After header wins if longer."""
    cap = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2**attempt)
    delay = rng.uniform(cap / 2, cap)
    response = getattr(error, "response", None)
    retry_after = response.headers.get("retry-after") if response is not None else None
    try:
        return max(delay, min(float(retry_after), cfg.backoff_max_s)) if retry_after else delay
    except ValueError:  # an HTTP date: fall back to our own schedule
        return delay


# ---------------------------------------------------------------------------------------------
# One sample


class Teacher:
    """Sends one (problem, sample) request and returns its record, with retries and limits."""

    def __init__(self, cfg: DistillConfig, client: Any):
        self.cfg, self.client = cfg, client
        self.rpm = RateLimiter(cfg.requests_per_minute) if cfg.requests_per_minute else None
        self.tpm = RateLimiter(cfg.tokens_per_minute) if cfg.tokens_per_minute else None
        self.rng = random.Random()
        self.retries = 0
        self._mean_completion = float(cfg.max_tokens or 1024)  # for token reservations

    def sampling(self, problem: Problem, k: int) -> dict[str, Any]:
        c = self.cfg
        params = {"temperature": c.temperature, "top_p": c.top_p, "top_k": c.top_k, "max_tokens": c.max_tokens,
                  "stop": list(c.stop) or None,
                  "seed": None if c.seed is None else sample_seed(c.seed, problem.id, k)}
        return {key: v for key, v in params.items() if v is not None}

    async def _call(self, prompt: str, params: dict[str, Any]) -> dict[str, Any]:
        c = self.cfg
        kwargs: dict[str, Any] = {"model": c.model, "n": 1, "timeout": c.timeout_s}
        extra = dict(c.extra_body or {})
        for key, value in params.items():
            if key == "top_k":
                extra["top_k"] = value
            else:
                kwargs[c.max_tokens_param if key == "max_tokens" else key] = value
        if extra:
            kwargs["extra_body"] = extra
        if c.api == "chat":
            messages = ([{"role": "system", "content": c.system_prompt}] if c.system_prompt else [])
            resp = await self.client.chat.completions.create(
                messages=messages + [{"role": "user", "content": prompt}], **kwargs)
        else:
            full = f"{c.system_prompt}\n\n{prompt}" if c.system_prompt else prompt
            resp = await self.client.completions.create(prompt=full, **kwargs)
        if not getattr(resp, "choices", None):  # no choices, or a body the client could not parse
            raise BadResponse("the response has no choices")
        choice = resp.choices[0]
        if c.api == "chat":
            msg = choice.message
            text = msg.content or ""
            reasoning = getattr(msg, "reasoning_content", None) or getattr(msg, "reasoning", None)
        else:
            text, reasoning = choice.text or "", None
        use = resp.usage.model_dump(exclude_none=True) if resp.usage is not None else None
        return {"response": text, "reasoning_content": reasoning, "finish_reason": choice.finish_reason,
                "usage": use}

    async def _limited_call(self, prompt: str, params: dict[str, Any]) -> dict[str, Any]:
        reserve = len(prompt) / 4 + params.get("max_tokens", self._mean_completion)
        if self.rpm:
            await self.rpm.acquire(1)
        if self.tpm:
            await self.tpm.acquire(reserve)
        try:
            out = await asyncio.wait_for(self._call(prompt, params), self.cfg.timeout_s)
        except BaseException:
            if self.tpm:
                self.tpm.settle(-reserve / 2)  # a failed request is metered less; refund a share
            raise
        used = (out["usage"] or {}).get("total_tokens")
        if used is not None:
            self._mean_completion = 0.9 * self._mean_completion + 0.1 * (out["usage"].get("completion_tokens") or 0)
            if self.tpm:
                self.tpm.settle(used - reserve)
        return out

    async def request(self, prompt: str, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """One prompt under the retry policy and limits: (reply fields, {status, error, error_type, attempts}).

        Also what other clients of an endpoint (the judge verifiers) send their requests through."""
        c = self.cfg
        for attempt in range(c.max_retries + 1):
            try:
                out = await self._limited_call(prompt, params)
                return out, {"attempts": attempt + 1, "status": "ok", "error": None, "error_type": None}
            except Exception as e:  # noqa: BLE001 - every failure is classified and recorded
                err_type, retryable = classify(e)
                if not retryable or attempt == c.max_retries:
                    out = {"response": None, "reasoning_content": None, "finish_reason": None, "usage": None}
                    return out, {"attempts": attempt + 1, "status": "failed", "error": f"{type(e).__name__}: {e}"[:2000],
                                 "error_type": err_type}
                self.retries += 1
                await asyncio.sleep(backoff_delay(attempt, e, c, self.rng))
        raise AssertionError("unreachable")

    async def sample(self, problem: Problem, k: int) -> dict[str, Any]:
        """The record of sample k of `problem`: status "ok", or "failed" with the last error."""
        c = self.cfg
        prompt = c.prompt_template.format(problem=problem.text)
        params = self.sampling(problem, k)
        start = time.monotonic()
        out, outcome = await self.request(prompt, params)
        return {
            "problem_id": problem.id, "sample_index": k, "problem": problem.text, "prompt": prompt,
            "system": c.system_prompt, **out, "reference_answer": problem.answer, "teacher": c.model,
            "teacher_api": {"base_url": c.base_url, "api": c.api}, "sampling": params,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "latency_s": round(time.monotonic() - start, 3), **outcome, **problem.extra,
        }


# ---------------------------------------------------------------------------------------------
# Resume


@dataclasses.dataclass
class Existing:
    """What an earlier run left in the output file."""

    done: set[tuple[str, int]] = dataclasses.field(default_factory=set)
    failed: int = 0
    duplicates: int = 0
    torn_bytes: int = 0
    teachers: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def scan_output(path: str, retry_failed: bool, teacher: str | None = None) -> Existing:
    """Repairs a torn tail, then rewrites the file (atomically) when it holds duplicates, or failed
    records that are to be retried; returns the pairs that remain done. Records of a teacher other
    than `teacher` are refused (mixing teachers in one file is almost always a mistake)."""
    found = Existing()
    if not storage.exists(path):
        return found
    found.torn_bytes = jsonl.repair_tail(path)
    keep: dict[tuple[str, int], tuple[int, bool]] = {}  # pair -> (line to keep, is ok)
    for line, rec in jsonl.read_jsonl(path, policy="strict"):
        try:
            pair = (str(rec["problem_id"]), int(rec["sample_index"]))
        except (KeyError, TypeError, ValueError):
            raise jsonl.DataError(path, line, "problem_id/sample_index", "missing or invalid; is this a "
                                  "responses.jsonl written by lt-jax distill?") from None
        ok = rec.get("status") == "ok"
        found.teachers[rec.get("teacher")] += 1
        if pair in keep:
            found.duplicates += 1
            if keep[pair][1] and not ok:
                continue  # an ok record beats a later failed one
        keep[pair] = (line, ok)
    others = {t: n for t, n in found.teachers.items() if teacher is not None and t != teacher}
    if others:
        raise config.ConfigError(f"{path} already holds responses from teacher(s) {others}, not {teacher!r}; "
                                 "write to a new --output (or distill with the same --model)")
    found.failed = sum(1 for _, ok in keep.values() if not ok)
    if retry_failed:
        keep = {p: v for p, v in keep.items() if v[1]}
    if found.duplicates or (retry_failed and found.failed):
        lines = {line for line, _ in keep.values()}
        jsonl.write_jsonl(path, (rec for line, rec in jsonl.read_jsonl(path, policy="strict") if line in lines))
    found.done = set(keep)
    return found


# ---------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class Tally:
    ok: int = 0
    failed: int = 0
    failed_by_type: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, rec: dict[str, Any]) -> None:
        if rec["status"] == "ok":
            self.ok += 1
        else:
            self.failed += 1
            self.failed_by_type[rec["error_type"]] += 1
        use = rec.get("usage") or {}
        self.prompt_tokens += use.get("prompt_tokens") or 0
        self.completion_tokens += use.get("completion_tokens") or 0


def make_client(cfg: DistillConfig):
    """The teacher endpoint's AsyncOpenAI client (SDK retries off: `Teacher` retries with backoff)."""
    import openai  # 0.8 s to import; grade reaches this module (its judge) and must start fast

    key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    if not key and cfg.api_key_env:
        log.warning("no API key in $%s; sending a placeholder (fine for local servers)", cfg.api_key_env)
    return openai.AsyncOpenAI(base_url=cfg.base_url, api_key=key or "EMPTY", max_retries=0, timeout=cfg.timeout_s)


async def distill_async(cfg: DistillConfig) -> dict[str, Any]:
    """Runs (or resumes) a distillation; returns the summary (also written beside the output)."""
    problems = read_problems(cfg.input, cfg.id_field, cfg.problem_field, cfg.answer_field,
                             cfg.keep_fields)[: cfg.limit]
    existing = scan_output(cfg.output, cfg.retry_failed, cfg.model)
    total = len(problems) * cfg.n
    done = sum(1 for p in problems for k in range(cfg.n) if (p.id, k) in existing.done)
    tally, start = Tally(), time.monotonic()
    bar = tqdm(total=total, initial=done, unit="sample", disable=not cfg.progress, dynamic_ncols=True,
               desc="distill")
    teacher = Teacher(cfg, make_client(cfg))
    work = ((p, k) for p in problems for k in range(cfg.n) if (p.id, k) not in existing.done)

    async def worker(writer: jsonl.JsonlWriter) -> None:
        for problem, k in work:  # one shared iterator: each pair is taken once
            rec = await teacher.sample(problem, k)
            writer.write(rec)
            tally.add(rec)
            rate = tally.completion_tokens / max(time.monotonic() - start, 1e-9)
            bar.set_postfix(ok=tally.ok, failed=tally.failed, tok_in=tally.prompt_tokens,
                            tok_out=tally.completion_tokens, tok_s=f"{rate:.0f}", refresh=False)
            bar.update()

    try:
        with jsonl.JsonlWriter(cfg.output, resume=True) as writer:
            await asyncio.gather(*(worker(writer) for _ in range(min(cfg.concurrency, max(total - done, 1)))))
    finally:
        bar.close()
        await teacher.client.close()
    summary = _summary(cfg, total, done, existing, tally, teacher.retries, time.monotonic() - start)
    jsonl.write_json(summary_path(cfg.output), summary)
    return summary


def summary_path(output: str) -> str:
    base = output[: -len(".jsonl")] if output.endswith(".jsonl") else output
    return base + ".summary.json"


def _summary(cfg, total, done, existing: Existing, tally: Tally, retries: int, elapsed: float) -> dict[str, Any]:
    return {
        "output": cfg.output, "teacher": cfg.model, "pairs": total,
        "already_done": done, "requested": tally.ok + tally.failed,
        "ok": tally.ok, "failed": tally.failed, "failed_by_type": dict(tally.failed_by_type),
        "failed_records_retried": existing.failed if cfg.retry_failed else 0,
        "failed_records_kept": 0 if cfg.retry_failed else existing.failed,
        "retries": retries, "prompt_tokens": tally.prompt_tokens, "completion_tokens": tally.completion_tokens,
        "elapsed_s": round(elapsed, 2),
        "completion_tokens_per_s": round(tally.completion_tokens / max(elapsed, 1e-9), 1),
        "repaired_torn_bytes": existing.torn_bytes, "duplicates_removed": existing.duplicates,
    }


def format_summary(s: dict[str, Any]) -> str:
    failed = ", ".join(f"{k}: {v}" for k, v in sorted(s["failed_by_type"].items())) or "none"
    lines = [
        f"distill: {s['pairs']} (problem, sample) pairs; {s['already_done']} already in {s['output']}",
        f"  this run: {s['ok']} ok, {s['failed']} failed ({failed}); {s['retries']} retries",
        f"  tokens: {s['prompt_tokens']} prompt, {s['completion_tokens']} completion "
        f"({s['completion_tokens_per_s']}/s over {s['elapsed_s']} s)",
    ]
    if s["failed_records_kept"]:
        lines.append(f"  {s['failed_records_kept']} earlier failed records kept; rerun with --retry-failed to retry")
    if s["repaired_torn_bytes"] or s["duplicates_removed"]:
        lines.append(f"  repaired: {s['repaired_torn_bytes']} torn bytes cut, {s['duplicates_removed']} duplicates removed")
    return "\n".join(lines)
