"""`lt-jax import-hf` and `lt-jax export-hf`: Hugging Face folders <-> Orbax checkpoints.

    lt-jax import-hf --hf gs://bucket/Qwen2.5-7B --out gs://bucket/ckpt/qwen7b [--dtype float32]
    lt-jax export-hf --checkpoint gs://bucket/run1/ckpt --out gs://bucket/run1/hf \
        --tokenizer gs://bucket/Qwen2.5-7B [--step 2000] [--dtype bfloat16]

Both shard the model over a mesh of all devices (fsdp by default), so a model larger than one
device's memory converts without ever sitting whole on one device.
"""

from __future__ import annotations

import argparse
import logging

import jax

from lt_jax.model.checkpoint_io import all_steps, load_model_checkpoint, save_model_checkpoint
from lt_jax.model.hf import load_hf, save_hf
from lt_jax.model.sharding import make_mesh, parse_mesh

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "import-hf":
        parser.add_argument("--hf", required=True, help="Hugging Face folder (local or gs://)")
        parser.add_argument("--out", required=True, help="Orbax checkpoint directory to create (local or gs://)")
        parser.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter dtype in the checkpoint")
        parser.add_argument("--step", type=int, default=0, help="step number to save as")
    else:
        parser.add_argument("--checkpoint", required=True, help="Orbax checkpoint directory (local or gs://)")
        parser.add_argument("--out", required=True, help="Hugging Face folder to write (local or gs://)")
        parser.add_argument("--tokenizer", help="folder whose tokenizer files and chat template are copied")
        parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
        parser.add_argument("--dtype", choices=DTYPES, help="safetensors dtype (default: the parameter dtype)")
        parser.add_argument(
            "--max-shard-size", type=parse_size, default="5GB", help="split safetensors above this, e.g. 5GB, 500MB"
        )
    parser.add_argument(
        "--mesh", default="fsdp=-1", help="mesh axis sizes, e.g. data=1,fsdp=-1,tensor=1 (-1: the remaining devices)"
    )
    parser.add_argument(
        "--distributed", action="store_true",
        help="call jax.distributed.initialize() first (multi-host: run the same command on every host)",
    )


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9 bytes, '500MiB' -> 500 * 2**20; a bare number is bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    raw = text.strip().upper()
    number = raw.rstrip("KMGIB")
    unit = raw[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}; use e.g. 5GB, 500MB, 2GiB")
    return int(value * units[unit])


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lt_jax").setLevel(logging.INFO)
    if args.distributed:
        jax.distributed.initialize()
    mesh = make_mesh(parse_mesh(args.mesh))
    if args.command == "import-hf":
        return _import(args, mesh)
    return _export(args, mesh)


def _import(args, mesh) -> int:
    if args.step in all_steps(args.out):  # fail before reading a large model, not after
        raise FileExistsError(f"{args.out}: step {args.step} already exists; pick another --step or --out")
    model = load_hf(args.hf, mesh=mesh, dtype=args.dtype)
    path = save_model_checkpoint(model, args.out, step=args.step)
    c = model.config
    print(f"imported {args.hf} ({c.family}, {c.num_params() / 1e6:.1f}M params, {args.dtype}) -> {path}")
    return 0


def _export(args, mesh) -> int:
    model = load_model_checkpoint(args.checkpoint, step=args.step, mesh=mesh)
    files = save_hf(
        model, args.out, tokenizer_dir=args.tokenizer, max_shard_bytes=args.max_shard_size, dtype=args.dtype
    )
    print(f"exported {args.checkpoint} -> {args.out}: {', '.join(files)}")
    return 0
