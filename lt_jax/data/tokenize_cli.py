"""`lt-jax tokenize`: sft.jsonl -> token shards + manifest (see lt_jax.data.tokenize)."""

from __future__ import annotations

import argparse
import sys

from lt_jax.config import ConfigError
from lt_jax.data import shards as shards_lib
from lt_jax.data.tokenize import InputError, TokenizeConfig, tokenize


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--in", dest="inputs", required=True, help="sft.jsonl path(s), comma-separated (local or gs://)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder with tokenizer.json and a chat template")
    parser.add_argument("--out", required=True, help="output folder (local or gs://)")
    parser.add_argument("--max-length", type=int, default=32768)
    parser.add_argument("--overlength", choices=["drop", "truncate"], default="drop")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (default: one per core)")
    parser.add_argument("--records-per-shard", type=int, default=1000, help="input lines per shard")
    parser.add_argument("--mask-method", choices=["auto", "generation", "prefix"], default="auto")
    parser.add_argument("--inner-chunk", type=int, default=shards_lib.DEFAULT_INNER_CHUNK,
                        help="tokens per compressed chunk inside a shard (the unit of a random read)")
    parser.add_argument("--strict", action="store_true", help="fail on the first bad input line")
    parser.add_argument("--overwrite", action="store_true", help="delete --out first instead of resuming")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ConfigError, InputError) as e:  # bad settings or input: say what, without a traceback
        print(f"lt-jax tokenize: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    config = TokenizeConfig(
        inputs=tuple(p for p in args.inputs.split(",") if p),
        tokenizer=args.tokenizer,
        out=args.out,
        max_length=args.max_length,
        overlength=args.overlength,
        workers=args.workers,
        records_per_shard=args.records_per_shard,
        mask_method=args.mask_method,
        strict=args.strict,
        inner_chunk=args.inner_chunk,
    )
    m = tokenize(config, overwrite=args.overwrite, progress=not args.no_progress)
    print(
        f"{m['input_lines']} lines in -> {m['num_records']} records, {m['num_tokens']} tokens "
        f"({m['num_loss_tokens']} trained on) in {len(m['shards'])} shards at {config.out}"
    )
    for reason, n in m["drops"]["by_reason"].items():
        print(f"  dropped {n}: {reason}")
        for where in m["drops"]["examples"].get(reason, [])[:3]:  # all of them: OUT/drops.jsonl
            print(f"    {where}")
    if m["overlength"]["truncated"]:
        print(f"  truncated to {config.max_length}: {m['overlength']['truncated']}")
    return 0
