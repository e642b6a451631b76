"""Selects SFT data from graded responses: DeepDistill rules, length, dedup, decontamination.

`lt-jax select --in graded.jsonl --out sft.jsonl [--config select.yaml] [key=value ...] [--decontam PATH ...]`

Two passes keep memory to one small `Candidate` per response: pass 1 reads every record, and the
pure function `plan` decides for each response either "keep" or the ONE reason it is dropped; pass
2 re-reads the input and writes the kept ones to sft.jsonl in input order. The report (console and
JSON) gives records in, out and dropped per reason, and these always add up.

Rules, in the order a response meets them (its first failing rule is its reason):
 1. bad input rows (counted by the reader), failed generations, superseded duplicates of a pair;
 2. decontamination (problem level): exact match after normalisation or a shared 13-gram with an
    eval item, and with `decontam_embedder` (an encoder folder, e.g. bge-m3) cosine similarity above
    `decontam_cosine` (lt_jax.data.embed_decontam); each hit reported with the item it matched;
 3. exact, then near-duplicate problems (MinHash-LSH, Jaccard >= near_threshold): the first
    problem seen is kept; the prompt template every problem shares is stripped before comparing;
 4. response level: truncated (finish_reason "length", or thinking with no answer after it, as an
    unclosed <think> leaves), length bounds, then DeepDistill's quality filters
    (lt_jax.data.quality): an odd number of turns, no thinking (`require_thinking`), a 20-gram
    repeated more than 20 times (`max_ngram_repeats`), query+answer perplexity above
    `max_perplexity` (read from the `perplexity` field `lt-jax perplexity` adds);
 5. problem statistics over ALL its graded samples: stage I drops problems no sample passes
    ("unsolved"), then the pass-rate band; problems whose CV exceeds their domain's CV threshold
    (`cv_thresholds`, else `cv_threshold`) keep only passing responses; `only_passing` applies that
    to every problem. With `easy_rule: deepdistill` the other problems (CV at or under the
    threshold: "easy") are kept with probability `easy_keep_probability` in `easy_keep_domains`
    (other, multi_turn) and dropped in the rest, the coin drawn per problem from `seed`;
 6. cap per problem (passing responses first, then by sample_index);
 7. stage II (`stage: 2`): among problems whose CV is above their threshold, the `stage2_count` (or
    `stage2_fraction`) highest-CV ones, one passing response each drawn with `seed` (ties: lower
    pass rate, then input order).

A response passes as graded (its `verdict`), unless `pass_thresholds` is set: then its score is
re-judged with `lt_jax.data.verify.passes` and those per-domain thresholds. The report counts
records and problems in, out and dropped per reason for each domain too (`by_domain`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import sys
from collections import Counter, defaultdict
from typing import Any, Iterator, Literal

from lt_jax import config
from lt_jax.config import ConfigError
from lt_jax.data import dedup, formats, jsonl, quality, verify
from lt_jax.data import embed_decontam as ed
from lt_jax.data.grade import problem_key, problem_stats, whitespace_tokens
from lt_jax.data.jsonl import DropLog

GRADE_RULES = ("drop_unsolved", "cv_threshold", "only_passing", "min_pass_rate", "max_pass_rate", "stage")


@dataclasses.dataclass(frozen=True)
class SelectConfig:
    """Selection rules (YAML-able). Lengths count characters or `response_tokens` of the assistant text."""

    drop_unsolved: bool = True
    cv_threshold: float | None = 0.05
    cv_thresholds: dict[str, float] = dataclasses.field(default_factory=dict)  # per domain
    pass_thresholds: dict[str, float] = dataclasses.field(default_factory=dict)  # per domain; "*": all
    easy_rule: Literal["keep", "deepdistill"] = "keep"
    easy_keep_probability: float = 0.5
    easy_keep_domains: tuple[str, ...] = ("other", "multi_turn")
    seed: int = 0
    only_passing: bool = False
    min_pass_rate: float = 0.0
    max_pass_rate: float = 1.0
    stage: int = 1
    stage2_count: int | None = None
    stage2_fraction: float | None = None
    max_per_problem: int | None = None
    drop_truncated: bool = True
    min_chars: int | None = None
    max_chars: int | None = None
    min_tokens: int | None = None
    max_tokens: int | None = None
    max_ngram_repeats: int | None = 20  # drop when some repeat_ngram-gram occurs more often than this
    repeat_ngram: int = 20
    even_turns: bool = True
    require_thinking: bool = False
    max_perplexity: float | None = None
    dedup_exact: bool = True
    dedup_near: bool = True
    near_threshold: float = 0.85
    near_ngram: int = 5
    num_perm: int = 128
    strip_template: bool = True
    decontam: tuple[str, ...] = ()
    decontam_ngram: int = 13
    decontam_boilerplate: int = 3
    decontam_embedder: str | None = None
    decontam_cosine: float = 0.9
    decontam_pooling: Literal["cls", "mean"] = "cls"
    system_prompt: str | None = None
    graded: bool = True
    policy: Literal["skip", "strict"] = "skip"
    layout: str = "auto"
    fields: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_pass_rate <= self.max_pass_rate <= 1.0:
            raise ValueError(f"need 0 <= min_pass_rate <= max_pass_rate <= 1, got {self.min_pass_rate}, {self.max_pass_rate}")
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.stage == 2 and (self.stage2_count is None) == (self.stage2_fraction is None):
            raise ValueError("stage 2 needs exactly one of stage2_count or stage2_fraction")
        if self.stage2_fraction is not None and not 0.0 < self.stage2_fraction <= 1.0:
            raise ValueError(f"stage2_fraction must be in (0, 1], got {self.stage2_fraction}")
        if self.stage2_count is not None and self.stage2_count < 1:
            raise ValueError(f"stage2_count must be >= 1, got {self.stage2_count}")
        if self.max_per_problem is not None and self.max_per_problem < 1:
            raise ValueError(f"max_per_problem must be >= 1, got {self.max_per_problem}")
        if not 0.0 < self.near_threshold <= 1.0:
            raise ValueError(f"near_threshold must be in (0, 1], got {self.near_threshold}")
        if self.cv_threshold is not None and self.cv_threshold < 0:
            raise ValueError(f"cv_threshold must be >= 0 or null, got {self.cv_threshold}")
        if any(not isinstance(v, (int, float)) or v < 0 for v in self.cv_thresholds.values()):
            raise ValueError(f"cv_thresholds values must be numbers >= 0, got {self.cv_thresholds}")
        verify.check_thresholds(self.pass_thresholds, "pass_thresholds")
        if not 0.0 < self.decontam_cosine <= 1.0:
            raise ValueError(f"decontam_cosine must be in (0, 1], got {self.decontam_cosine}")
        if not 0.0 <= self.easy_keep_probability <= 1.0:
            raise ValueError(f"easy_keep_probability must be in [0, 1], got {self.easy_keep_probability}")
        if self.layout != "auto" and self.layout not in formats.LAYOUTS:
            raise ValueError(f"layout must be auto or one of {formats.LAYOUTS}, got {self.layout!r}")


@dataclasses.dataclass
class Candidate:
    """What the planner needs to know about one response."""

    key: tuple[str, int]
    problem: str
    verdict: bool | None = None
    score: float | None = None
    tokens: int = 0
    chars: int = 0
    truncated: bool = False
    failed: bool = False
    domain: str = "math"
    ngram_repeats: int = 0
    turns: int = 2
    has_thinking: bool = True
    perplexity: float | None = None


@dataclasses.dataclass
class Plan:
    """The outcome: a drop reason per dropped key, kept keys, and per-problem details for the report."""

    dropped: dict[tuple[str, int], str] = dataclasses.field(default_factory=dict)
    kept: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    stats: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    contamination: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    duplicates: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def counts(self) -> Counter:
        return Counter(self.dropped.values())


# ---------------------------------------------------------------------------------------------
# Planning (pure)


def plan(cands: list[Candidate], cfg: SelectConfig, decontaminator: dedup.Decontaminator | None = None,
         embedding_hits: dict[str, dict[str, Any]] | None = None) -> Plan:
    """Decides keep / drop-with-reason for every candidate (keys must be unique); `embedding_hits`:
    problem id -> eval item its embedding matched (see lt_jax.data.embed_decontam)."""
    out = Plan()
    live = [c for c in cands if not _drop(out, c, "failed_generation", c.failed)]
    problems = _problem_texts(live, cfg)
    live = _problem_filters(out, live, problems, cfg, decontaminator, embedding_hits or {})
    live = [c for c in live if not _response_filter(out, c, cfg)]
    if cfg.graded:
        if cfg.pass_thresholds:
            cands = [_rejudged(c, cfg) for c in cands]
            live = [_rejudged(c, cfg) for c in live]
        out.stats = _stats(cands)
        live = _grade_filters(out, live, cfg)
    live = _cap(out, live, cfg)
    if cfg.stage == 2:
        live = _stage2(out, live, cfg)
    out.kept = [c.key for c in live]
    assert len(out.kept) + len(out.dropped) == len(cands), "every candidate is kept or dropped with a reason"
    return out


def _drop(out: Plan, c: Candidate, reason: str, cond: bool = True) -> bool:
    if cond:
        out.dropped[c.key] = reason
    return cond


def _problem_texts(cands: list[Candidate], cfg: SelectConfig) -> dict[str, str]:
    texts = {}
    for c in cands:
        texts.setdefault(c.key[0], c.problem)
    pids = list(texts)
    values = dedup.strip_common_affixes([texts[p] for p in pids]) if cfg.strip_template else [texts[p] for p in pids]
    return dict(zip(pids, values))


def _problem_filters(out: Plan, cands: list[Candidate], stripped: dict[str, str], cfg: SelectConfig,
                     decon: dedup.Decontaminator | None, embedded: dict[str, dict[str, Any]]) -> list[Candidate]:
    reason: dict[str, str] = {}
    full = {}
    for c in cands:
        full.setdefault(c.key[0], c.problem)
    seen: dict[str, str] = {}
    near = dedup.NearDuplicates(cfg.near_threshold, cfg.near_ngram, cfg.num_perm) if cfg.dedup_near else None
    for pid, text in stripped.items():
        hit = decon.check(text, full[pid]) if decon is not None else None
        found = hit.to_dict() if hit is not None else embedded.get(pid)
        if found is not None:
            reason[pid] = "contaminated"
            out.contamination.append({"problem_id": pid, **found, "problem": full[pid][:300]})
            continue
        key = dedup.exact_key(text)
        if cfg.dedup_exact and key in seen:
            reason[pid] = "duplicate_problem"
            out.duplicates.append({"problem_id": pid, "duplicate_of": seen[key], "kind": "exact", "similarity": 1.0})
            continue
        seen.setdefault(key, pid)
        match = near.add(pid, text) if near is not None else None
        if match is not None:
            reason[pid] = "near_duplicate_problem"
            out.duplicates.append({"problem_id": pid, "duplicate_of": match[0], "kind": "near", "similarity": round(match[1], 4)})
    return [c for c in cands if not _drop(out, c, reason.get(c.key[0], ""), c.key[0] in reason)]


def _response_filter(out: Plan, c: Candidate, cfg: SelectConfig) -> bool:
    checks = (
        ("truncated", cfg.drop_truncated and c.truncated),
        ("too_short", cfg.min_chars is not None and c.chars < cfg.min_chars),
        ("too_long", cfg.max_chars is not None and c.chars > cfg.max_chars),
        ("too_short", cfg.min_tokens is not None and c.tokens < cfg.min_tokens),
        ("too_long", cfg.max_tokens is not None and c.tokens > cfg.max_tokens),
        ("odd_turns", cfg.even_turns and c.turns % 2 == 1),
        ("no_thinking", cfg.require_thinking and not c.has_thinking),
        ("repeated_ngram", cfg.max_ngram_repeats is not None and c.ngram_repeats > cfg.max_ngram_repeats),
        ("high_perplexity", cfg.max_perplexity is not None and c.perplexity is not None and c.perplexity > cfg.max_perplexity),
    )
    return any(_drop(out, c, r, bool(cond)) for r, cond in checks if cond)


def _rejudged(c: Candidate, cfg: SelectConfig) -> Candidate:
    if c.score is None:
        return c
    return dataclasses.replace(c, verdict=verify.passes(c.score, c.domain, cfg.pass_thresholds))


def _stats(cands: list[Candidate]) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[Candidate]] = defaultdict(list)
    for c in cands:
        if not c.failed:
            groups[c.key[0]].append(c)
    out = {}
    for pid, g in groups.items():
        st = problem_stats([c.score or 0.0 for c in g], [bool(c.verdict) for c in g], [c.tokens for c in g])
        out[pid] = {**st, "domain": g[0].domain}
    return out


def cv_threshold_for(domain: str, cfg: SelectConfig) -> float | None:
    return float(cfg.cv_thresholds[domain]) if domain in cfg.cv_thresholds else cfg.cv_threshold


def coin(seed: int, problem_id: str) -> float:
    """A uniform [0, 1) draw fixed by (seed, problem): the same whatever the input order or size."""
    digest = hashlib.blake2b(f"{seed}/{problem_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def _easy_verdict(pid: str, domain: str, cfg: SelectConfig) -> str | None:
    """DeepDistill stage I for a low-CV problem: None (keep) or the drop reason."""
    if domain in cfg.easy_keep_domains:
        return None if coin(cfg.seed, pid) < cfg.easy_keep_probability else "easy_query_coin"
    return "easy_query"


def _grade_filters(out: Plan, cands: list[Candidate], cfg: SelectConfig) -> list[Candidate]:
    keep = []
    for c in cands:
        st = out.stats[c.key[0]]
        cv_t = cv_threshold_for(c.domain, cfg)
        hard = cv_t is not None and st["cv"] > cv_t
        easy_drop = _easy_verdict(c.key[0], c.domain, cfg) if cfg.easy_rule == "deepdistill" and cv_t is not None and not hard else None
        if cfg.drop_unsolved and st["passes"] == 0:
            _drop(out, c, "unsolved")
        elif st["pass_rate"] < cfg.min_pass_rate:
            _drop(out, c, "pass_rate_below_band")
        elif st["pass_rate"] > cfg.max_pass_rate:
            _drop(out, c, "pass_rate_above_band")
        elif not c.verdict and hard:
            _drop(out, c, "failing_response_high_cv")
        elif easy_drop:
            _drop(out, c, easy_drop)
        elif not c.verdict and cfg.only_passing:
            _drop(out, c, "failing_response")
        else:
            keep.append(c)
    return keep


def _cap(out: Plan, cands: list[Candidate], cfg: SelectConfig) -> list[Candidate]:
    if cfg.max_per_problem is None:
        return cands
    by_problem: dict[str, list[Candidate]] = defaultdict(list)
    for c in cands:
        by_problem[c.key[0]].append(c)
    allowed = set()
    for group in by_problem.values():
        ranked = sorted(group, key=lambda c: (not c.verdict, c.key[1]))
        allowed.update(c.key for c in ranked[: cfg.max_per_problem])
    return [c for c in cands if not _drop(out, c, "over_cap", c.key not in allowed)]


def _stage2(out: Plan, cands: list[Candidate], cfg: SelectConfig) -> list[Candidate]:
    passing: dict[str, list[Candidate]] = defaultdict(list)
    order: dict[str, int] = {}
    for c in cands:
        order.setdefault(c.key[0], len(order))
        cv_t = cv_threshold_for(c.domain, cfg)
        if c.verdict and (cv_t is None or out.stats[c.key[0]]["cv"] > cv_t):
            passing[c.key[0]].append(c)
    ranked = sorted(passing, key=lambda p: (-out.stats[p]["cv"], out.stats[p]["pass_rate"], order[p]))
    n = cfg.stage2_count if cfg.stage2_count is not None else max(1, round(cfg.stage2_fraction * len(order)))
    chosen = set()
    for p in ranked[:n]:  # one random passing response, reproducible per (seed, problem)
        group = sorted(passing[p], key=lambda c: c.key[1])
        chosen.add(random.Random(f"{cfg.seed}/{p}").choice(group).key)
    return [c for c in cands if not _drop(out, c, "not_in_stage2", c.key not in chosen)]


# ---------------------------------------------------------------------------------------------
# Records <-> candidates


def keyed_records(path: str, cfg: SelectConfig, drops: DropLog | None, policy: str) -> Iterator[tuple[tuple[str, int], formats.Record]]:
    """(key, record) in input order; records of other layouts are keyed by problem text like grade does."""
    counters: Counter = Counter()
    for rec in formats.read_records(path, layout=cfg.layout, fields=cfg.fields, policy=policy, drops=drops):
        if rec.raw is not None and "problem_id" in rec.meta and "problem_id" in rec.raw:
            key = (str(rec.meta["problem_id"]), int(rec.meta["sample_index"]))
        else:
            pid = problem_key(rec.problem)
            key = (pid, counters[pid])
            counters[pid] += 1
        yield key, rec


def candidate(key: tuple[str, int], rec: formats.Record, ngram: int = 20) -> Candidate:
    raw = rec.raw or {}
    text = rec.assistant_text()
    ppl = raw.get("perplexity")
    verdict = raw.get("verdict") if isinstance(raw.get("verdict"), bool) else None
    score = raw.get("score")
    return Candidate(
        key=key,
        problem=str(raw.get("problem") or rec.problem),
        verdict=verdict,
        score=float(score) if isinstance(score, (int, float)) else (1.0 if verdict else 0.0 if verdict is not None else None),
        tokens=int(raw.get("response_tokens") or whitespace_tokens(text)),
        chars=len(text),
        truncated=raw.get("finish_reason") == "length" or (rec.thinking is not None and not rec.answer.strip()),
        failed=rec.meta.get("status") == "failed",
        domain=str(raw.get("domain") or "math"),
        ngram_repeats=quality.max_ngram_count(quality.text_tokens(text), ngram),
        turns=quality.turn_count(rec.messages),
        has_thinking=quality.has_thinking_and_answer(rec.thinking, rec.answer),
        perplexity=float(ppl) if isinstance(ppl, (int, float)) else None,
    )


def sft_row(key: tuple[str, int], rec: formats.Record, stats: dict[str, Any] | None, cfg: SelectConfig) -> dict[str, Any]:
    """The sft.jsonl row; the assistant turn carries "<think>\\n...\\n</think>\\n\\n{answer}"."""
    raw = rec.raw or {}
    meta = {"problem_id": key[0], "sample_index": key[1], "source": rec.source, "teacher": raw.get("teacher") or rec.meta.get("teacher")}
    if stats:
        meta.update(pass_rate=stats["pass_rate"], cv=stats["cv"])
    for k in ("score", "verdict", "response_tokens"):
        if k in raw:
            meta[k] = raw[k]
    if rec.reference is not None:
        meta["reference_answer"] = rec.reference
    meta["stage"] = cfg.stage
    row = rec.to_sft()
    row["id"] = f"{key[0]}#{key[1]}"
    row["meta"] = meta
    if cfg.system_prompt and row["messages"][0]["role"] != "system":
        row["messages"].insert(0, {"role": "system", "content": cfg.system_prompt})
    return row


# ---------------------------------------------------------------------------------------------
# Files


def _read_candidates(path: str, cfg: SelectConfig, drops: DropLog) -> tuple[dict[tuple[str, int], Candidate], dict, int, int]:
    """Pass 1: one candidate per key (the last occurrence wins), where it was, superseded and record counts."""
    cands: dict[tuple[str, int], Candidate] = {}
    where: dict[tuple[str, int], tuple[str, int]] = {}
    superseded = n = 0
    for key, rec in keyed_records(path, cfg, drops, cfg.policy):
        n += 1
        if key in cands:
            superseded += 1
        cands[key] = candidate(key, rec, cfg.repeat_ngram)
        where[key] = (rec.file, rec.line)
    return cands, where, superseded, n


def select_file(in_path: str, out_path: str, cfg: SelectConfig, report_path: str | None = None) -> dict[str, Any]:
    """Runs the selection and writes sft.jsonl (atomically) and the JSON report; returns the report."""
    drops = DropLog()
    by_key, where, superseded, n_records = _read_candidates(in_path, cfg, drops)
    cands = list(by_key.values())
    if cfg.graded:
        ungraded = sum(1 for c in cands if c.verdict is None and not c.failed)
        if ungraded:
            raise ConfigError(f"{in_path}: {ungraded} of {len(cands)} records have no verdict; run `lt-jax grade` first, "
                             "or pass graded=false to select without the pass-rate / CV rules")
    if cfg.max_perplexity is not None:
        missing = sum(1 for c in cands if c.perplexity is None and not c.failed)
        if missing:
            raise ConfigError(f"{in_path}: {missing} of {len(cands)} records have no perplexity; run `lt-jax perplexity` "
                              "first, or leave max_perplexity unset")
    decon, embedded = None, None
    if cfg.decontam:
        items = [it for spec in cfg.decontam for it in dedup.load_benchmark(spec)]
        decon = dedup.Decontaminator(items, cfg.decontam_ngram, cfg.decontam_boilerplate)
        if cfg.decontam_embedder:
            embedded = _embedding_hits(cands, items, cfg)
    elif cfg.decontam_embedder:
        raise ConfigError("decontam_embedder needs eval sets to compare with: pass --decontam PATH[:FIELD]")
    result = plan(cands, cfg, decon, embedded)
    kept = set(result.kept)
    rows = (
        sft_row(key, rec, result.stats.get(key[0]), cfg)
        for key, rec in keyed_records(in_path, cfg, None, "skip")
        if key in kept and where[key] == (rec.file, rec.line)
    )
    n_out = jsonl.write_jsonl(out_path, rows)
    report = _report(in_path, out_path, cfg, result, drops, superseded, n_records, n_out, decon)
    report["by_domain"] = by_domain(cands, result)
    jsonl.write_json(report_path or default_report_path(out_path), report)
    return report


def by_domain(cands: list[Candidate], result: Plan) -> dict[str, dict[str, Any]]:
    """Records and problems in / out and drops per reason, for each domain (they add up per domain)."""
    out: dict[str, dict[str, Any]] = {}
    kept = set(result.kept)
    for c in cands:
        d = out.setdefault(c.domain, {"records_in": 0, "records_out": 0, "dropped": Counter(), "problems_in": set(),
                                      "problems_out": set()})
        d["records_in"] += 1
        d["problems_in"].add(c.key[0])
        if c.key in kept:
            d["records_out"] += 1
            d["problems_out"].add(c.key[0])
        else:
            d["dropped"][result.dropped[c.key]] += 1
    return {dom: {**d, "dropped": dict(sorted(d["dropped"].items())), "problems_in": len(d["problems_in"]),
                  "problems_out": len(d["problems_out"])} for dom, d in sorted(out.items())}


def _embedding_hits(cands: list[Candidate], items: list, cfg: SelectConfig) -> dict[str, dict[str, Any]]:
    texts: dict[str, str] = {}
    for c in cands:
        texts.setdefault(c.key[0], c.problem)
    embedder = ed.Embedder(ed.EmbedderConfig(cfg.decontam_embedder, cfg.decontam_pooling))
    return ed.EmbeddingIndex(items, embedder, cfg.decontam_cosine).hits(texts)


def default_report_path(out_path: str) -> str:
    base = out_path[: -len(".jsonl")] if out_path.endswith(".jsonl") else out_path
    return base + ".report.json"


def _report(in_path, out_path, cfg, result: Plan, drops: DropLog, superseded: int, n_records: int, n_out: int, decon) -> dict[str, Any]:
    dropped = Counter(result.counts())
    if superseded:
        dropped["superseded"] = superseded
    for reason, n in drops.counts.items():
        dropped[f"bad_input:{reason}"] = n
    records_in = n_records + drops.total
    if records_in != n_out + sum(dropped.values()):
        raise AssertionError(f"select lost records: in {records_in}, out {n_out}, dropped {sum(dropped.values())}")
    kept_problems = {k[0] for k in result.kept}
    per_bench = Counter(h["benchmark"] for h in result.contamination)
    return {
        "input": in_path, "output": out_path,
        "records_in": records_in, "records_out": n_out,
        "dropped": dict(sorted(dropped.items())), "dropped_total": sum(dropped.values()),
        "problems_in": len({k[0] for k in result.dropped} | kept_problems), "problems_out": len(kept_problems),
        "contamination": {"hits": len(result.contamination), "by_benchmark": dict(per_bench), "items": result.contamination,
                          "benchmark_items": len(decon.items) if decon else 0,
                          "ignored_boilerplate_ngrams": decon.boilerplate_ngrams if decon else 0},
        "duplicates": {"count": len(result.duplicates), "items": result.duplicates[:10000]},
        "bad_input_examples": drops.examples,
        "config": config.to_dict(cfg),
    }


def print_report(report: dict[str, Any], file=None) -> None:
    p = lambda s: print(s, file=file or sys.stdout)  # noqa: E731
    p(f"select: {report['records_in']} records in, {report['records_out']} out, {report['dropped_total']} dropped; "
      f"problems {report['problems_in']} -> {report['problems_out']}")
    for reason, n in report["dropped"].items():
        p(f"  dropped {reason}: {n}")
    for reason, where in sorted(report["bad_input_examples"].items()):
        for w in where[:3]:  # the first few locations; the report lists more
            p(f"    {w}")
    if len(report.get("by_domain", {})) > 1:
        for dom, d in report["by_domain"].items():
            p(f"  {dom}: {d['records_in']} in, {d['records_out']} out, problems {d['problems_in']} -> {d['problems_out']}")
    con = report["contamination"]
    if not con["benchmark_items"]:
        p("  decontamination: none (pass --decontam PATH[:FIELD] to check against eval sets)")
    else:
        p(f"  decontamination against {con['benchmark_items']} eval items: {con['hits']} problems matched {con['by_benchmark']}")
        for hit in con["items"][:10]:
            p(f"    {hit['problem_id']} ~ {hit['benchmark']} item {hit['item']} ({hit['kind']}{': ' + hit['ngram'] if hit.get('ngram') else ''})")
