"""`lt-jax grade`: responses.jsonl -> graded.jsonl + per-problem pass rate / CV (see lt_jax.data.grade)."""

from __future__ import annotations

import dataclasses
import math

from lt_jax import config
from lt_jax.data import formats, jsonl
from lt_jax.data.grade import GradeConfig, GradeSummary, default_stats_path, grade_file


def add_arguments(parser, command: str) -> None:
    parser.add_argument("--in", dest="inp", required=True, help="responses.jsonl (or any layout lt_jax.data.formats reads)")
    parser.add_argument("--out", required=True, help="graded.jsonl (appended; reruns resume)")
    parser.add_argument("--stats", default=None, help="per-problem stats (default: <out>.stats.jsonl)")
    parser.add_argument("--report", default=None, help="summary JSON (default: <out>.report.json)")
    parser.add_argument("--config", default=None, help="YAML with GradeConfig fields")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for response_tokens (default: whitespace words)")
    parser.add_argument("--workers", type=int, default=None, help="grading processes (default: config, 1)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad input line instead of counting it")
    parser.add_argument("--layout", default=None, help=f"force the input layout: {', '.join(formats.LAYOUTS)}")
    parser.add_argument("--field", action="append", default=[], help="remap a field, e.g. --field problem=question")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="GradeConfig key=value overrides")


def run(args) -> int:
    """The CLI shell; lt_jax.cli prints ConfigError / DataError as one `error:` line with status 2."""
    extra = list(args.overrides)
    if args.tokenizer:
        extra.append(f"tokenizer={args.tokenizer}")
    if args.workers:
        extra.append(f"workers={args.workers}")
    if args.strict:
        extra.append("policy=strict")
    if args.layout:
        extra.append(f"layout={args.layout}")
    cfg = config.load(GradeConfig, args.config, extra)
    if args.field:
        cfg = dataclasses.replace(cfg, fields={**cfg.fields, **formats.parse_fields(args.field)})
    summary = grade_file(args.inp, args.out, cfg, args.stats, progress=args.progress)
    report = summary.to_dict()
    report.update(input=args.inp, output=args.out, stats=args.stats or default_stats_path(args.out), config=config.to_dict(cfg))
    base = args.out[: -len(".jsonl")] if args.out.endswith(".jsonl") else args.out
    jsonl.write_json(args.report or base + ".report.json", report)
    _print_summary(summary)
    return 0


def _print_summary(s: GradeSummary) -> None:
    rate = f"{s.passed / s.graded:.1%}" if s.graded else "n/a"
    print(f"grade: {s.records_in} read, {s.graded} graded ({s.passed} passed, {rate}), {s.resumed} already graded, "
          f"{s.failed_generation} failed generations skipped, {s.superseded} superseded, {s.drops.total} bad input rows dropped")
    for reason, n in sorted(s.drops.counts.items()):
        print(f"  dropped {reason}: {n}  e.g. {s.drops.examples.get(reason, [''])[0]}")
    for note, n in s.notes.most_common():
        print(f"  note {note}: {n}")
    if math.isfinite(s.seconds):
        print(f"  {s.seconds:.1f}s")
