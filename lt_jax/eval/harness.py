"""Runs a generator over benchmarks, scores every sample, and writes resumable outputs.

Layout under the output dir (local or gs://), one folder per run (checkpoint / served model):

    OUT/<run>/<benchmark>/run.json           what produced it (config fingerprint; checked on resume)
    OUT/<run>/<benchmark>/generations.jsonl  one line per problem with all its samples, appended
    OUT/<run>/<benchmark>/items.jsonl        per-problem results
    OUT/<run>/<benchmark>/summary.json       metrics
    OUT/summary.json, OUT/results.md, OUT/results.png   all runs x benchmarks (see report.py)

Resume: a killed eval restarts from generations.jsonl, skipping problems already written (a torn
last line is cut off first), so reruns never duplicate a problem. Each problem's seed derives from
(sampling.seed, problem id), not from its batch, so a resumed run samples what a fresh one would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Callable, Iterator, Protocol, Sequence

from tqdm.auto import tqdm

from lt_jax import config as config_lib
from lt_jax import storage
from lt_jax.data import formats, jsonl
from lt_jax.data import verify
from lt_jax.eval import choice, code_eval, report
from lt_jax.eval.answer import final_answer  # noqa: F401  (re-exported)
from lt_jax.eval.benchmarks import Benchmark, Item, load_benchmark
from lt_jax.eval.generators import Completion, Generator, Message, SamplingConfig, seed_for
from lt_jax.eval.judge import LABELS, JudgeConfig, JudgeScorer, summarize_judged

log = logging.getLogger(__name__)

MATH_INSTRUCTION = formats.MATH_PROMPT
# Kinds scored per sample with a right/wrong outcome (pass@1 over num_samples), not by a judge.
SAMPLED_KINDS = ("math", "multiple_choice", "code")


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """How a benchmark item becomes the user turn; the model's chat template is applied after."""

    math_template: str = MATH_INSTRUCTION
    judged_template: str = "{problem}"  # generalization sets: the question as it is
    choice_template: str = "{problem}"  # multiple choice: the item already holds the lettered prompt
    code_template: str = code_eval.PROMPT
    system: str | None = None

    def __post_init__(self):
        for name in ("math_template", "judged_template", "choice_template", "code_template"):
            if "{problem}" not in getattr(self, name):
                raise ValueError(f"{name} must contain the placeholder {{problem}}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The whole eval protocol. Defaults follow the long-CoT papers: chat template + "reason step
    by step, answer in \\boxed{}", temperature 0.6, top-p 0.95, 32k new tokens, 16 samples per
    problem (DeepDistill uses 16-64; 16 keeps AIME's pass@1 std low at a quarter of 64's cost)."""

    num_samples: int = 16  # per problem, math benchmarks
    judged_samples: int = 1  # per item, judged benchmarks
    sampling: SamplingConfig = SamplingConfig()
    prompt: PromptConfig = PromptConfig()
    judge: JudgeConfig = JudgeConfig()
    batch_size: int = 8  # problems per generator call (endpoints; the engine takes all problems as one stream)
    limit: int | None = None  # first N items of each benchmark (smoke runs)
    sycophancy_seed: int = 0
    choice_seed: int = 0  # multiple choice: the options' order per item
    sync_every_s: float = 60.0  # gs:// outputs: how often the generations file is uploaded

    def __post_init__(self):
        if self.num_samples < 1 or self.judged_samples < 1:
            raise ValueError("num_samples and judged_samples must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {self.limit}")


class Scorer(Protocol):
    def score(self, items: Sequence[Item], completions: Sequence[Sequence[Completion]]) -> list[list[dict]]:
        """Per item, per sample: fields merged into the sample record."""
        ...


class ResumeMismatch(config_lib.ConfigError):
    """The output dir holds generations made with different settings."""


# ---------------------------------------------------------------------------------------------
# Math scoring through the grader (task C): thinking excluded, math-verify on the final answer.


def vote_key(extracted: str | None) -> str | None:
    """Majority-vote key: the printed sympy form of math-verify's parse of the extracted answer, so
    equal numbers agree (0.5 and \\frac{1}{2}; 025 and 25; spacing and \\left/\\right variants) while
    different forms stay separate votes (x=3 and 3). Falls back to the text without whitespace."""
    if extracted is None or not extracted.strip():
        return None
    try:
        parsed = verify.parse_gold(extracted)
    except Exception:  # math-verify / sympy on odd input: fall back to text
        parsed = []
    return str(parsed[0]) if parsed else "".join(extracted.split())


class MathScorer:
    def __init__(self, domain: str = "math"):
        self.verifier = verify.get_verifier(domain)

    def score(self, items: Sequence[Item], completions: Sequence[Sequence[Completion]]) -> list[list[dict]]:
        out = []
        for item, comps in zip(items, completions):
            row = []
            for c in comps:
                v = self.verifier(final_answer(c), item.answer, {"id": item.id})
                row.append({"correct": verify.passes(v.score, "math"), "score": v.score, "extracted": v.extracted,
                            "vote_key": vote_key(v.extracted), "verify_note": v.note})
            out.append(row)
        return out


def make_scorer(kind: str, cfg: EvalConfig) -> Scorer:
    if kind == "math":
        return MathScorer()
    if kind == "multiple_choice":
        return choice.ChoiceScorer()
    if kind == "code":
        return code_eval.CodeScorer()
    if kind in LABELS:
        return JudgeScorer(kind, cfg.judge)
    raise ValueError(f"no scorer for benchmark kind {kind!r}")


# ---------------------------------------------------------------------------------------------
# One benchmark


def build_messages(item: Item, kind: str, prompt: PromptConfig) -> list[Message]:
    template = {"math": prompt.math_template, "multiple_choice": prompt.choice_template,
                "code": prompt.code_template}.get(kind, prompt.judged_template)
    messages = [{"role": "system", "content": prompt.system}] if prompt.system else []
    return messages + [{"role": "user", "content": template.replace("{problem}", item.problem)}]


def samples_per_item(kind: str, cfg: EvalConfig) -> int:
    return cfg.num_samples if kind in SAMPLED_KINDS else cfg.judged_samples


def fingerprint(generator_name: str, bench: Benchmark, cfg: EvalConfig) -> dict[str, Any]:
    """Settings that change what the generations are; a resume must match them."""
    fp = {
        "generator": generator_name,
        "benchmark": bench.name,
        "kind": bench.kind,
        "samples_per_item": samples_per_item(bench.kind, cfg),
        "sampling": config_lib.to_dict(cfg.sampling),
        "prompt": config_lib.to_dict(cfg.prompt),
    }
    if bench.kind in LABELS:
        fp["judge"] = {"model": cfg.judge.model, "include_thinking": cfg.judge.include_thinking,
                       "prompt_dir": cfg.judge.prompt_dir}
    if bench.kind == "sycophancy":
        fp["sycophancy_seed"] = cfg.sycophancy_seed
    if bench.kind == "multiple_choice":
        fp["choice_seed"] = cfg.choice_seed
    return fp


def _check_run_meta(run_dir: str, fp: dict[str, Any]) -> None:
    path = storage.join(run_dir, "run.json")
    if storage.exists(path):
        old = json.loads(storage.read_text(path))
        diffs = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
        if diffs:
            detail = "; ".join(f"{k}: was {old.get(k)!r}, now {fp.get(k)!r}" for k in diffs)
            raise ResumeMismatch(
                f"{run_dir} holds generations made with other settings ({detail}). "
                "Use a new --out (or delete that folder) to evaluate with the new settings."
            )
        return
    jsonl.write_json(path, fp)


_BULKY = ("text", "reasoning", "judge_text")


def slim(record: dict) -> dict:
    """A record without the sample texts: what summaries need, at a fraction of the memory
    (500 problems x 16 samples x 32k tokens of text would be gigabytes)."""
    samples = [{k: v for k, v in s.items() if k not in _BULKY} for s in record["samples"]]
    return {**record, "samples": samples}


def read_done(path: str, bench: Benchmark) -> dict[str, dict]:
    """Slim records already written, by problem id (first copy wins; ids outside the set are ignored)."""
    jsonl.repair_tail(path)
    if not storage.exists(path):
        return {}
    wanted = {it.id for it in bench.items}
    done: dict[str, dict] = {}
    for _, rec in jsonl.read_jsonl(path, policy="strict"):
        rid = str(rec.get("id"))
        if rid in wanted and rid not in done:
            done[rid] = slim(rec)
    return done


def _record(bench: Benchmark, item: Item, messages: list[Message], comps: list[Completion], scores: list[dict]) -> dict:
    samples = []
    for j, (c, s) in enumerate(zip(comps, scores)):
        samples.append({"index": j, "text": c.text, "reasoning": c.reasoning, "num_tokens": c.num_tokens,
                        "finish_reason": c.finish_reason, "error": c.error, **s})
    rec = {"id": item.id, "benchmark": bench.name, "kind": bench.kind, "prompt": messages,
           "reference": item.answer, "meta": item.meta, "samples": samples}
    if bench.kind in SAMPLED_KINDS:
        rec["num_correct"] = sum(bool(s["correct"]) for s in samples)
    return rec


def evaluate_benchmark(
    generator: Generator,
    bench: Benchmark,
    cfg: EvalConfig,
    run_dir: str,
    *,
    scorer: Scorer | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generates, scores and summarizes one benchmark into `run_dir`; resumes what is there."""
    return run_benchmark(generator, bench, cfg, run_dir, scorer=scorer, progress=progress)[0]


def run_benchmark(
    generator: Generator,
    bench: Benchmark,
    cfg: EvalConfig,
    run_dir: str,
    *,
    scorer: Scorer | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], list[dict]]:
    """`evaluate_benchmark` that also returns the per-problem records (slim: without texts)."""
    bench = bench.head(cfg.limit)
    n = samples_per_item(bench.kind, cfg)
    _check_run_meta(run_dir, fingerprint(generator.name, bench, cfg))
    path = storage.join(run_dir, "generations.jsonl")
    done = read_done(path, bench)
    todo = [it for it in bench.items if it.id not in done]
    if done:
        log.info("%s: resuming, %d of %d problems already done", run_dir, len(done), len(bench))
    if todo:
        scorer = scorer or make_scorer(bench.kind, cfg)
        desc = f"{generator.name} {bench.name}"
        with jsonl.JsonlWriter(path, resume=True, sync_every_s=cfg.sync_every_s) as writer, tqdm(
            total=len(bench), initial=len(done), desc=desc, unit="problem", disable=not progress
        ) as bar:
            for batch, prompts, comps in _generated(generator, todo, bench.kind, n, cfg):
                scores = scorer.score(batch, comps)
                for item, messages, cs, sc in zip(batch, prompts, comps, scores):
                    rec = _record(bench, item, messages, list(cs), sc)
                    writer.write(rec)
                    done[item.id] = slim(rec)
                    bar.update(1)
    records = [done[it.id] for it in bench.items]
    summary = summarize(records, bench, n)
    summary["generator"] = generator.name
    jsonl.write_jsonl(storage.join(run_dir, "items.jsonl"), report.item_rows(records, bench.kind))
    jsonl.write_json(storage.join(run_dir, "summary.json"), summary)
    return summary, records


def _generated(generator: Generator, todo: Sequence[Item], kind: str, n: int, cfg: EvalConfig
               ) -> Iterator[tuple[list[Item], list[list[Message]], Sequence[Sequence[Completion]]]]:
    """(items, their prompts, their completions) as they are generated. A generator with
    `generate_stream` (the engine) gets every problem x n samples as one stream of requests and
    hands back each problem as its last sample finishes; others get `batch_size` problems a call."""
    prompts = [build_messages(it, kind, cfg.prompt) for it in todo]
    seeds = [seed_for(cfg.sampling.seed, it.id) for it in todo]
    stream = getattr(generator, "generate_stream", None)
    if stream is not None:
        for i, comps in stream(prompts, n, cfg.sampling, seeds=seeds):
            _check_shape([comps], 1, n, generator.name)
            yield [todo[i]], [prompts[i]], [comps]
        return
    for start in range(0, len(todo), cfg.batch_size):
        end = start + cfg.batch_size
        comps = generator.generate(prompts[start:end], n, cfg.sampling, seeds=seeds[start:end])
        _check_shape(comps, len(todo[start:end]), n, generator.name)
        yield list(todo[start:end]), prompts[start:end], comps


def _check_shape(comps: Any, num_prompts: int, n: int, name: str) -> None:
    if len(comps) != num_prompts or any(len(c) != n for c in comps):
        shape = [len(c) for c in comps]
        raise RuntimeError(f"generator {name!r} returned {shape} completions for {num_prompts} prompts x {n}")


def summarize(records: Sequence[dict], bench: Benchmark, n: int) -> dict[str, Any]:
    base = {"benchmark": bench.name, "source": bench.source}
    if bench.kind in SAMPLED_KINDS:
        out = base | report.summarize_math(records, n) | {"kind": bench.kind}
        if bench.kind == "code":  # no answers to vote on
            out.pop(f"maj@{n}", None)
            out.pop("no_answer_share", None)
        return out
    return base | summarize_judged(records, bench.kind)


# ---------------------------------------------------------------------------------------------
# Several runs x several benchmarks


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """A model to evaluate; `make` builds its generator when its turn comes (one loaded at a time)."""

    name: str
    make: Callable[[], Generator]


def load_benchmarks(specs: Sequence[str], cfg: EvalConfig, fields: str | None = None, kind: str = "math") -> list[Benchmark]:
    benches = [load_benchmark(s, fields=fields, kind=kind, sycophancy_seed=cfg.sycophancy_seed, choice_seed=cfg.choice_seed)
               for s in specs]
    names = [b.name for b in benches]
    if len(set(names)) != len(names):
        raise ValueError(f"benchmark names repeat: {names}; name files as NAME=PATH")
    judged = [b.name for b in benches if b.kind in LABELS]
    if judged and not cfg.judge.configured:
        raise config_lib.ConfigError(
            f"{', '.join(judged)}: judged benchmarks need a judge endpoint; set judge.base_url and "
            "judge.model (--judge-base-url / --judge-model), with its key in the env var judge.api_key_env"
        )
    return benches


def evaluate(
    runs: Sequence[RunSpec], benches: Sequence[Benchmark], cfg: EvalConfig, out_dir: str, *, progress: bool = True
) -> dict[str, Any]:
    """Evaluates every run on every benchmark and writes the comparison reports into `out_dir`."""
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names repeat: {names}; give each --checkpoint a distinct --name")
    summaries: dict[str, dict[str, Any]] = {}
    lengths: dict[str, list[int]] = {}
    for run in runs:
        generator = run.make()
        summaries[run.name] = {}
        for bench in benches:
            run_dir = storage.join(out_dir, run.name, bench.name)
            summary, records = run_benchmark(generator, bench, cfg, run_dir, progress=progress)
            summaries[run.name][bench.name] = summary
            if bench.kind in SAMPLED_KINDS:
                lengths.setdefault(run.name, []).extend(s["num_tokens"] for r in records for s in r["samples"])
        del generator  # free the model before the next run loads
    result = {"config": config_lib.to_dict(cfg), "runs": summaries}
    report.write_reports(out_dir, result, lengths)
    return result
