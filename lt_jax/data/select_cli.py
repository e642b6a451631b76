"""`lt-jax select`: graded.jsonl -> sft.jsonl with the selection rules and a report (see lt_jax.data.select)."""

from __future__ import annotations

import dataclasses

from lt_jax import config
from lt_jax.data import formats
from lt_jax.data.select import SelectConfig, print_report, select_file


def add_arguments(parser, command: str) -> None:
    parser.add_argument("--in", dest="inp", required=True, help="graded.jsonl (or any layout lt_jax.data.formats reads, with graded=false)")
    parser.add_argument("--out", required=True, help="sft.jsonl (local or gs://)")
    parser.add_argument("--config", default=None, help="YAML with SelectConfig fields")
    parser.add_argument("--decontam", action="append", default=[], metavar="PATH[:FIELD]",
                        help="eval set file or folder to decontaminate against (repeatable)")
    parser.add_argument("--report", default=None, help="report JSON (default: <out>.report.json)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad input row instead of counting it")
    parser.add_argument("--layout", default=None, help=f"force the input layout: {', '.join(formats.LAYOUTS)}")
    parser.add_argument("--field", action="append", default=[], help="remap a field, e.g. --field problem=question")
    parser.add_argument("overrides", nargs="*", help="SelectConfig key=value overrides, e.g. max_per_problem=2")


def run(args) -> int:
    """The CLI shell; lt_jax.cli prints ConfigError / DataError as one `error:` line with status 2."""
    extra = list(args.overrides)
    if args.strict:
        extra.append("policy=strict")
    if args.layout:
        extra.append(f"layout={args.layout}")
    cfg = config.load(SelectConfig, args.config, extra)
    cfg = dataclasses.replace(
        cfg, decontam=tuple(cfg.decontam) + tuple(args.decontam), fields={**cfg.fields, **formats.parse_fields(args.field)}
    )
    report = select_file(args.inp, args.out, cfg, args.report)
    print_report(report)
    return 0
