"""`lt-jax distill`: problems -> responses.jsonl from an OpenAI-compatible teacher (see lt_jax.data.distill)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any

from lt_jax import config
from lt_jax.data import jsonl
from lt_jax.data.distill import DistillConfig, distill_async, format_summary

_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("input", dict(help="problems: JSONL (.gz) or Parquet, local or gs://")),
    ("output", dict(help="responses.jsonl (local or gs://); appended, resumable")),
    ("base_url", dict(help="teacher endpoint, e.g. http://127.0.0.1:8000/v1")),
    ("model", dict(help="teacher model name")),
    ("api", dict(choices=["chat", "completions"])),
    ("api_key_env", dict(help="environment variable holding the API key (default OPENAI_API_KEY)")),
    ("id_field", {}), ("problem_field", {}), ("answer_field", {}), ("limit", dict(type=int)),
    ("keep_fields", dict(nargs="+", help="input fields copied into each record")),
    ("n", dict(type=int, help="samples per problem")), ("temperature", dict(type=float)),
    ("top_p", dict(type=float)), ("top_k", dict(type=int)), ("max_tokens", dict(type=int)),
    ("max_tokens_param", dict(choices=["max_tokens", "max_completion_tokens"])),
    ("stop", dict(action="append", help="stop string (repeatable)")), ("seed", dict(type=int)),
    ("prompt_template", dict(help="format string with {problem}; literal braces doubled")),
    ("system_prompt", {}), ("extra_body", dict(type=json.loads, help="JSON object merged into each request")),
    ("concurrency", dict(type=int)), ("requests_per_minute", dict(type=float)),
    ("tokens_per_minute", dict(type=float)), ("timeout_s", dict(type=float, help="per-request deadline")),
    ("max_retries", dict(type=int)), ("backoff_initial_s", dict(type=float)), ("backoff_max_s", dict(type=float)),
]
_ALIASES = {"requests_per_minute": ["--rpm"], "tokens_per_minute": ["--tpm"], "timeout_s": ["--timeout"]}


def add_arguments(parser, command: str) -> None:
    parser.add_argument("--config", help="YAML with DistillConfig fields; flags override it")
    for name, kw in _FLAGS:
        parser.add_argument(f"--{name.replace('_', '-')}", *_ALIASES.get(name, []), dest=name, default=None, **kw)
    parser.add_argument("--retry-failed", action="store_true", default=None, help="ask again for failed samples")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None)


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "openai"):  # one INFO line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    data = config.load_yaml(args.config) if args.config else {}
    for name in [n for n, _ in _FLAGS] + ["retry_failed", "progress"]:
        if getattr(args, name) is not None:
            data[name] = getattr(args, name)
    try:
        cfg = config.from_dict(DistillConfig, data)
        summary = asyncio.run(distill_async(cfg))
    except (config.ConfigError, jsonl.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0
