"""`lt-jax perplexity`: query+answer perplexity under a reference model (see lt_jax.data.perplexity)."""

from __future__ import annotations

import sys

from lt_jax import config
from lt_jax.data.perplexity import PerplexityConfig, score_file


def add_arguments(parser, command: str) -> None:
    parser.add_argument("--in", dest="inp", required=True, help="graded.jsonl (or any layout lt_jax.data.formats reads)")
    parser.add_argument("--out", required=True, help="the input rows plus perplexity (appended; reruns resume)")
    parser.add_argument("--model", required=True, help="reference model: Hugging Face folder, local or gs://")
    parser.add_argument("--config", default=None, help="YAML with PerplexityConfig fields")
    parser.add_argument("overrides", nargs="*", help="PerplexityConfig key=value overrides, e.g. seq_len=2048 mesh.data=4")


def run(args) -> int:
    cfg = config.load(PerplexityConfig, args.config, [f"model={args.model}", *args.overrides])
    summary = score_file(args.inp, args.out, cfg)
    print(f"perplexity: {summary['scored']} scored ({summary['already_scored']} already there), "
          f"{summary['tokens']} tokens at {summary['tokens_per_s']}/s, {summary['bad_input_rows']} bad input rows",
          file=sys.stdout)
    return 0
