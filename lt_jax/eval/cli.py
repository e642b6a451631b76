"""`lt-jax eval`: checkpoints or a served model x benchmarks -> generations, summary, table, plot.

    lt-jax eval --checkpoint A [--checkpoint B ...] --tokenizer TOK --benchmarks aime24,math500 --out DIR
    lt-jax eval --hf HF_DIR --benchmarks aime24 --out DIR num_samples=64
    lt-jax eval --base-url http://host:8000/v1 --model M --benchmarks aime24,chinese_simpleqa \\
        --judge-base-url URL --judge-model J --out DIR sampling.max_new_tokens=16384

Settings: `--config eval.yaml` and dotted `key=value` overrides of `EvalConfig` (num_samples,
sampling.temperature, prompt.math_template, judge.model, limit, ...). Benchmarks: shipped names
(`--list`) or files as PATH / NAME=PATH with `--field problem=question,answer=answer,id=id` and
`--kind`. A rerun with the same --out resumes.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lt_jax import config as config_lib
from lt_jax.eval import benchmarks, harness
from lt_jax.eval.generators import EndpointConfig, EndpointError, OpenAIGenerator, SamplerGenerator
from lt_jax.eval.harness import RunSpec
from lt_jax.sample.cli import add_model_arguments, load_from_args

DEFAULT_BENCHMARKS = "aime24,aime25,math500,cn_math_2024"


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    src = parser.add_argument_group("what to evaluate (checkpoints/HF folders, or one served model)")
    src.add_argument("--checkpoint", action="append", default=[], help="training checkpoint dir (local or gs://); repeatable")
    src.add_argument("--hf", action="append", default=[], help="Hugging Face model folder; repeatable")
    add_model_arguments(src, with_source=False)  # --step --tokenizer --dtype --mesh --chunk-size, as `lt-jax sample`
    src.add_argument("--name", action="append", default=[], help="run names, in the order of the models given")
    src.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    src.add_argument("--model", default=None, help="model name at --base-url")
    src.add_argument("--api-key-env", default="OPENAI_API_KEY", help="env var holding the endpoint's key")
    src.add_argument("--concurrency", type=int, default=16, help="parallel requests to --base-url")
    src.add_argument("--max-retries", type=int, default=5, help="retries (with backoff) per request to --base-url")
    parser.add_argument("--benchmarks", default=DEFAULT_BENCHMARKS, help="comma-separated names or [NAME=]PATH files")
    parser.add_argument("--field", default=None, help="field map for file benchmarks: problem=question,answer=answer,id=id")
    parser.add_argument("--kind", default="math", help="scoring of file benchmarks: math|simpleqa|safety|sycophancy|multiple_choice|code")
    parser.add_argument("--out", help="output dir (local or gs://); rerunning resumes")
    parser.add_argument("--config", default=None, help="EvalConfig YAML")
    parser.add_argument("--judge-base-url", default=None, help="judge endpoint (judged benchmarks)")
    parser.add_argument("--judge-model", default=None)
    parser.add_argument("--judge-api-key-env", default=None, help="env var holding the judge's key")
    parser.add_argument("--list", action="store_true", help="list shipped benchmarks and exit")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="EvalConfig overrides")


def _judge_overrides(args: argparse.Namespace) -> list[str]:
    pairs = [("judge.base_url", args.judge_base_url), ("judge.model", args.judge_model),
             ("judge.api_key_env", args.judge_api_key_env)]
    return [f"{k}={v}" for k, v in pairs if v is not None]


def _list_benchmarks() -> int:
    for name in benchmarks.available():
        b = benchmarks.load_benchmark(name)
        print(f"{name:18s} {b.kind:11s} {len(b):4d} items  {b.source}")
    return 0


def _model_runs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(kind, path) of every model to load, in argument order."""
    return [("checkpoint", p) for p in args.checkpoint] + [("hf", p) for p in args.hf]


def _default_name(path: str) -> str:
    parts = [p for p in path.rstrip("/").split("/") if p and not p.endswith(":")]
    if len(parts) >= 2 and parts[-1].isdigit():  # ckpt/1000 -> ckpt-1000
        return f"{parts[-2]}-{parts[-1]}"
    return parts[-1] if parts else "model"


def build_runs(args: argparse.Namespace) -> list:
    """RunSpecs from the arguments; models load lazily, one at a time."""
    models = _model_runs(args)
    if bool(models) == bool(args.base_url):
        raise SystemExit("lt-jax eval: give --checkpoint/--hf PATH (one or more) or --base-url with --model")
    if args.base_url:
        if not args.model:
            raise SystemExit("lt-jax eval: --base-url needs --model")
        endpoint = EndpointConfig(args.base_url, args.model, args.api_key_env, args.concurrency,
                                  max_retries=args.max_retries)
        name = args.name[0] if args.name else args.model.replace("/", "_")
        return [RunSpec(name, lambda: OpenAIGenerator(endpoint, name))]
    if args.name and len(args.name) != len(models):
        raise SystemExit(f"lt-jax eval: {len(args.name)} --name for {len(models)} models")
    names = args.name or [_default_name(p) for _, p in models]
    return [RunSpec(n, _loader(kind, path, n, args)) for n, (kind, path) in zip(names, models)]


def _loader(kind: str, path: str, name: str, args: argparse.Namespace):
    def make():
        lm = load_from_args(argparse.Namespace(**{**vars(args), "checkpoint": None, "hf": None, kind: path}))
        return SamplerGenerator(lm.model, lm.tokenizer, name, eos_ids=lm.eos_ids, mesh=lm.mesh, sampler_config=lm.config)

    return make


def run(args: argparse.Namespace) -> int:
    if args.list:
        return _list_benchmarks()
    if not args.out:
        raise SystemExit("lt-jax eval: --out DIR is required")
    try:
        cfg = config_lib.load(harness.EvalConfig, args.config, [*_judge_overrides(args), *args.overrides])
        benches = harness.load_benchmarks(
            [b.strip() for b in args.benchmarks.split(",") if b.strip()], cfg, fields=args.field, kind=args.kind
        )
    except ValueError as e:  # ConfigError and BenchmarkError are ValueErrors with full messages
        print(f"lt-jax eval: {e}", file=sys.stderr)
        return 2
    runs = build_runs(args)
    try:
        result = harness.evaluate(runs, benches, cfg, args.out, progress=not args.no_progress)
    except harness.ResumeMismatch as e:
        print(f"lt-jax eval: {e}", file=sys.stderr)
        return 2
    except EndpointError as e:
        print(f"lt-jax eval: {e}\nEverything finished so far is saved; rerun the same command to resume.", file=sys.stderr)
        return 1
    _print_table(result)
    print(f"wrote {args.out}/summary.json, results.md, results.png")
    return 0


def _print_table(result: dict[str, Any]) -> None:
    for run_name, per_bench in result["runs"].items():
        for bench, s in per_bench.items():
            h = s["headline"]
            std = f" ± {100 * h['std']:.1f}" if h.get("std") is not None else ""
            print(f"{run_name:24s} {bench:18s} {h['name']:16s} {100 * h['value']:.1f}{std}")
            problems = {"samples rejected by the endpoint": s.get("generation_errors", 0),
                        "judge requests rejected": s.get("judge_errors", 0)}
            for what, count in problems.items():
                if count:
                    print(f"warning: {run_name}/{bench}: {count} {what} (scored as wrong; see the 'error' "
                          "fields in generations.jsonl)", file=sys.stderr)

