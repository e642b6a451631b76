"""Judge verifiers: an LLM behind any OpenAI-compatible endpoint scores what rules cannot.

Domains (DeepDistill's rules; prompts in lt_jax/data/prompts/, our own wording):

- ``science``: similarity of the final answer to the reference, a whole number 0-5 on a line
  ``SCORE: n``; score = n / 5 (passes above 4.99 / 5, i.e. only a 5);
- ``other`` / ``multi_turn``: reward-style ``COHERENCE``, ``CORRECTNESS``, ``HELPFULNESS`` lines, each
  0-4; score = their sum / 12 (passes above 0.7);
- math re-check (``judge.math_recheck: true``): a response math-verify marks wrong is asked about
  again, ``VERDICT: EQUIVALENT`` / ``NOT_EQUIVALENT``; only negatives cost a call.

Replies are parsed strictly (the value on its own line, in range); one that is not is scored 0
with the note "judge reply unparsable", which `lt-jax grade` counts. Requests go through
`lt_jax.data.distill.Teacher.request`, i.e. the same retries, backoff and request / token rate
limits as `lt-jax distill` (limits apply per grading worker). Every call is cached by content
(model, sampling, prompt) in a SQLite file shared by all workers and runs, so a rerun or a
resumed run asks nothing twice. A judge that stays down after the retries stops grading with
`JudgeUnavailable`; what was graded is kept, and the rerun resumes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import re
import sqlite3
import threading
from typing import Any

from lt_jax.config import ConfigError
from lt_jax.data import distill, formats, verify
from lt_jax.data.distill import DistillConfig
from lt_jax.data.verdicts import fill, parse_verdict
from lt_jax.data.verify import Verdict, register_verifier

PROMPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
MATH_LABELS = ("EQUIVALENT", "NOT_EQUIVALENT")
REWARD_AXES = ("COHERENCE", "CORRECTNESS", "HELPFULNESS")
UNPARSABLE = "judge reply unparsable"


class JudgeUnavailable(ValueError):
    """The judge endpoint kept failing after the retries; rerunning the grade resumes."""


@dataclasses.dataclass(frozen=True)
class JudgeVerifyConfig:
    base_url: str | None = None  # e.g. http://127.0.0.1:8000/v1 (vLLM, a hosted API, lt-jax serve)
    model: str | None = None
    api_key_env: str | None = "JUDGE_API_KEY"
    math_recheck: bool = False
    temperature: float = 0.0
    max_tokens: int = 1024
    concurrency: int = 16  # science / other calls asked ahead, at once, per grading process
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    timeout_s: float = 300.0
    max_retries: int = 5
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    cache: str = "~/.cache/lt_jax/judge_cache.sqlite"
    prompt_dir: str | None = None  # a folder with math_recheck.txt / science_similarity.txt / reward.txt

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.temperature < 0 or self.concurrency < 1:
            raise ValueError("judge.max_tokens and judge.concurrency must be >= 1, judge.temperature >= 0")

    @property
    def configured(self) -> bool:
        return bool(self.base_url and self.model)

    def distill_config(self) -> Any:
        """The same traffic policy `lt-jax distill` runs under, pointed at the judge."""
        return DistillConfig(
            input="", output="", base_url=str(self.base_url), model=str(self.model), api_key_env=self.api_key_env,
            concurrency=self.concurrency, requests_per_minute=self.requests_per_minute, tokens_per_minute=self.tokens_per_minute,
            timeout_s=self.timeout_s, max_retries=self.max_retries, backoff_initial_s=self.backoff_initial_s,
            backoff_max_s=self.backoff_max_s, progress=False)


# ---------------------------------------------------------------------------------------------
# Strict reply parsing (pure)


def _body(text: str | None) -> str:
    return formats.split_thinking(text)[1] if isinstance(text, str) else ""


def _last_value(name: str, body: str) -> int | None:
    """The whole number on the last line `NAME: n` (markdown emphasis around it tolerated)."""
    pattern = rf"^[ \t*_`>#-]*{name}[ \t*_`]*[:：][ \t*_`]*(\d+)[ \t*_`.]*$"
    found = re.findall(pattern, body, flags=re.MULTILINE | re.IGNORECASE)
    return int(found[-1]) if found else None


def parse_similarity(text: str | None) -> int | None:
    """0-5 from a `SCORE: n` line, or None (missing, not a whole number, out of range)."""
    v = _last_value("SCORE", _body(text))
    return v if v is not None and 0 <= v <= 5 else None


def parse_reward(text: str | None) -> dict[str, int] | None:
    """{axis: 0-4} for the three reward axes, or None unless all three are present and in range."""
    body = _body(text)
    out = {axis: _last_value(axis, body) for axis in REWARD_AXES}
    if any(v is None or not 0 <= v <= 4 for v in out.values()):
        return None
    return out  # type: ignore[return-value]


def parse_equivalence(text: str | None) -> bool | None:
    label = parse_verdict(text, MATH_LABELS)
    return None if label is None else label == "EQUIVALENT"


# ---------------------------------------------------------------------------------------------
# Cache and client


class JudgeCache:
    """Replies by content key in SQLite (WAL: several grading processes read and write at once)."""

    def __init__(self, path: str):
        path = os.path.expanduser(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.db = sqlite3.connect(path, timeout=120, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, model TEXT, reply TEXT)")
        self.db.commit()
        self.lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self.lock:
            row = self.db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, model: str, reply: str) -> None:
        with self.lock:
            self.db.execute("INSERT OR IGNORE INTO replies VALUES (?, ?, ?)", (key, model, reply))
            self.db.commit()

    def __len__(self) -> int:
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]


def cache_key(cfg: JudgeVerifyConfig, prompt: str) -> str:
    """What determines a judge reply: model, sampling and prompt (not the URL that serves it)."""
    blob = json.dumps([cfg.model, cfg.temperature, cfg.max_tokens, prompt], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeClient:
    """Asks the judge one prompt at a time (cache first), on a private event loop."""

    def __init__(self, cfg: JudgeVerifyConfig):
        self.cfg = cfg
        self.cache = JudgeCache(cfg.cache)
        self.loop = asyncio.new_event_loop()
        self.teacher = distill.Teacher(cfg.distill_config(), distill.make_client(cfg.distill_config()))
        self.calls = self.hits = 0

    def ask(self, prompt: str) -> str:
        cached = self.cache.get(cache_key(self.cfg, prompt))
        if cached is not None:
            self.hits += 1
            return cached
        return self.loop.run_until_complete(self._fetch(prompt))

    def ask_many(self, prompts: list[str]) -> None:
        """Asks the prompts not yet cached, `concurrency` at a time, into the cache."""
        todo = sorted({p for p in prompts if self.cache.get(cache_key(self.cfg, p)) is None})
        if not todo:
            return
        gate = asyncio.Semaphore(self.cfg.concurrency)

        async def one(p: str) -> None:
            async with gate:
                await self._fetch(p)

        async def run_all() -> None:
            tasks = [asyncio.ensure_future(one(p)) for p in todo]
            try:
                await asyncio.gather(*tasks)
            except BaseException:  # an outage: stop the rest now, or a later call on this loop would resume them
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

        self.loop.run_until_complete(run_all())

    async def _fetch(self, prompt: str) -> str:
        params = {"temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens}
        out, outcome = await self.teacher.request(prompt, params)
        if outcome["status"] != "ok":
            raise JudgeUnavailable(f"judge {self.cfg.base_url} ({self.cfg.model}) failed after {outcome['attempts']} "
                                   f"attempts: {outcome['error']}; rerun to resume (answered calls are cached)")
        self.calls += 1
        reply = out["response"] or ""
        self.cache.put(cache_key(self.cfg, prompt), str(self.cfg.model), reply)
        return reply


CONFIG = JudgeVerifyConfig()
_CLIENTS: dict[JudgeVerifyConfig, JudgeClient] = {}


def configure(cfg: JudgeVerifyConfig) -> None:
    """Sets this process's judge (grading calls it in every worker) and the math re-check."""
    global CONFIG
    CONFIG = cfg
    if cfg.math_recheck and not cfg.configured:
        raise ConfigError("judge.math_recheck needs judge.base_url and judge.model")
    register_verifier("math", math_rechecked if cfg.math_recheck else verify.math_verifier, overwrite=True)


def client(cfg: JudgeVerifyConfig | None = None) -> JudgeClient:
    """The process's client for `cfg` (default: the configured judge), made once."""
    cfg = cfg or CONFIG
    if not cfg.configured:
        raise ConfigError("this domain is judged by a model: set judge.base_url and judge.model "
                          "(grade overrides judge.base_url=... judge.model=...)")
    if cfg not in _CLIENTS:
        _CLIENTS[cfg] = JudgeClient(cfg)
    return _CLIENTS[cfg]


def load_prompt(name: str, prompt_dir: str | None = None) -> str:
    with open(os.path.join(prompt_dir or PROMPT_DIR, f"{name}.txt"), encoding="utf-8") as f:
        return f.read()


def judge_prompt(name: str, record: dict[str, Any], reference: str | None, answer: str, prompt_dir: str | None = None) -> str:
    question = str(record.get("problem") or record.get("prompt") or "")
    fields = {"question": question, "reference": reference or "", "response": answer}
    return fill(load_prompt(name, prompt_dir), fields)


# Domains whose one judge call can be asked before grading (the math re-check depends on math-verify).
_PROMPT_OF = {"science": "science_similarity", "other": "reward", "multi_turn": "reward"}


def prefetch(items: list[tuple[str, str, str | None, dict[str, Any]]], cfg: JudgeVerifyConfig) -> None:
    """Asks the judge, `cfg.concurrency` at a time, what grading (domain, answer, reference, record)
    items will ask one by one, so their verifiers find the replies in the (shared) cache."""
    prompts = [judge_prompt(_PROMPT_OF[d], rec, ref, ans, cfg.prompt_dir) for d, ans, ref, rec in items
               if d in _PROMPT_OF and (d != "science" or (ref is not None and str(ref).strip()))]
    if prompts and cfg.configured:
        client(cfg).ask_many(prompts)


# ---------------------------------------------------------------------------------------------
# Verifiers


def _ask(name: str, record: dict[str, Any], reference: str | None, answer: str) -> str:
    return client().ask(judge_prompt(name, record, reference, answer, CONFIG.prompt_dir))


def science_verifier(answer_text: str, reference: str | None, record: dict[str, Any]) -> Verdict:
    if reference is None or not str(reference).strip():
        return Verdict(0.0, None, "no reference answer")
    score = parse_similarity(_ask("science_similarity", record, str(reference), answer_text))
    return Verdict(0.0, None, UNPARSABLE) if score is None else Verdict(score / 5, f"{score}/5")


def reward_verifier(answer_text: str, reference: str | None, record: dict[str, Any]) -> Verdict:
    scores = parse_reward(_ask("reward", record, reference, answer_text))
    if scores is None:
        return Verdict(0.0, None, UNPARSABLE)
    return Verdict(sum(scores.values()) / 12, " ".join(f"{k.lower()}={v}" for k, v in scores.items()))


def math_rechecked(answer_text: str, reference: str | None, record: dict[str, Any]) -> Verdict:
    """math-verify first; a negative with an answer and a reference goes to the judge."""
    v = verify.math_verifier(answer_text, reference, record)
    if v.score >= 1.0 or not answer_text.strip() or reference is None or not str(reference).strip():
        return v
    same = parse_equivalence(_ask("math_recheck", record, str(reference), answer_text))
    if same is None:
        return Verdict(0.0, v.extracted, UNPARSABLE)
    return Verdict(1.0, v.extracted, "judge: equivalent") if same else v


register_verifier("science", science_verifier)
register_verifier("other", reward_verifier)
register_verifier("multi_turn", reward_verifier)
