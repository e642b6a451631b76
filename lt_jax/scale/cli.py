"""`lt-jax compile`: the command line of the ahead-of-time fit check (see lt_jax.scale.compile).

    lt-jax compile --config configs/qwen2.5-7b-32k.yaml --topology v5p:4x4x4 [--slices 2]
    lt-jax compile --config run.yaml --gpu h100x8            (on a GPU node: its attached GPUs)

Exit status: 0 fits with at least `--min-headroom`, 3 does not, 1 on errors.
`python -m lt_jax.cli compile ...` is the same as `lt-jax compile ...`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from lt_jax import storage
from lt_jax.scale import topology
from lt_jax.scale.compile import NOT_FIT_EXIT_CODE, SampleShape, check, format_report, load_config


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--config", required=True, help="run YAML (as for lt-jax train); local or gs://")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. mesh.context=4 data.seq_len=131072")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--topology", help="TPU slice GENERATION:CHIPS, e.g. v5p:2x2x1, v5p:8x8x4, v6e:16x16")
    where.add_argument("--gpu", help="GPU node KINDxCOUNT, e.g. h100x8 (compiles on the attached GPUs)")
    parser.add_argument("--slices", type=int, default=1, help="TPU slices over DCN (mesh.dcn_data follows)")
    parser.add_argument("--nodes", type=int, default=1, help="GPU nodes")
    parser.add_argument("--mem-fraction", type=float, default=0.9,
                        help="GPU: share of HBM the JAX allocator may use (XLA_PYTHON_CLIENT_MEM_FRACTION)")
    parser.add_argument("--sampler", action="store_true", help="also compile the sampler's prefill and decode")
    parser.add_argument("--no-train", action="store_true", help="skip the train step (with --sampler)")
    parser.add_argument("--sample-batch", type=int, default=SampleShape.batch)
    parser.add_argument("--prompt-len", type=int, default=SampleShape.prompt_len)
    parser.add_argument("--max-new-tokens", type=int, default=SampleShape.max_new_tokens)
    parser.add_argument("--min-headroom", type=float, default=0.10, help="fraction of HBM to leave free (0.10)")
    parser.add_argument("--out", help="write the report as JSON here (local or gs://)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    if args.topology:
        target = topology.parse_tpu(args.topology, args.slices)
    else:
        target = topology.parse_gpu(args.gpu, args.nodes, args.mem_fraction)
    cfg = load_config(args.config, args.overrides)
    sampler = SampleShape(args.sample_batch, args.prompt_len, args.max_new_tokens) if args.sampler else None
    if args.no_train and sampler is None:
        print("lt-jax compile: --no-train needs --sampler", file=sys.stderr)
        return 1
    try:
        report = check(cfg, target, sampler=sampler, train=not args.no_train, min_headroom=args.min_headroom)
    except (RuntimeError, ValueError) as e:
        print(f"lt-jax compile: {e}", file=sys.stderr)
        return 1
    report["config"] = args.config
    report["overrides"] = list(args.overrides)
    print(format_report(report))
    if args.out:
        storage.write_text(args.out, json.dumps(report, indent=2, default=str) + "\n")
        print(f"report: {args.out}")
    return 0 if report["fits"] else NOT_FIT_EXIT_CODE
