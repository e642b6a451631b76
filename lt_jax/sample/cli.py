"""`lt-jax sample`: generate from a checkpoint or HF folder (the command line of lt_jax.sample.generate).

    lt-jax sample --hf DIR | --checkpoint DIR [--step S] [--tokenizer DIR] --prompt TEXT [--prompt ...]
                  [--n 4 --temperature 0.6 --top-p 0.95 --top-k 0 --seed 0 --max-new-tokens 1024]
                  [--presence-penalty 0 --frequency-penalty 0 --repetition-penalty 1]
                  [--stop STR ...] [--raw] [--system TEXT] [--mesh data=1,fsdp=-1,tensor=1] [--out FILE]
                  [--slots 16 --page-size 16 --num-pages N --max-len N --chunk-size 16]

`add_model_arguments` and `load_from_args` are the model flags `lt-jax serve --checkpoint/--hf` and
`lt-jax eval` share.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Any

from lt_jax import storage
from lt_jax.model.sharding import make_mesh, parse_mesh
from lt_jax.sample.engine import EngineConfig
from lt_jax.sample.generate import Prompt, eos_token_ids, generate, generation_config_eos, load_model, load_tokenizer
from lt_jax.sampling import SamplingParams


def add_model_arguments(parser, *, with_source: bool = True) -> None:
    """Flags shared by `lt-jax sample` and `lt-jax serve --checkpoint/--hf`."""
    if with_source:
        src = parser.add_mutually_exclusive_group(required=True)
        src.add_argument("--checkpoint", help="lt_jax Orbax checkpoint directory (local or gs://)")
        src.add_argument("--hf", help="Hugging Face model folder (local or gs://)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the --hf folder; required with --checkpoint)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="parameter/compute dtype")
    parser.add_argument("--mesh", default="fsdp=-1", help="mesh axis sizes, e.g. data=1,fsdp=-1,tensor=1")
    parser.add_argument("--chunk-size", type=int, default=16, help="decode steps per device call")
    parser.add_argument("--slots", type=int, default=16, help="decode slots (sequences decoded together)")
    parser.add_argument("--page-size", type=int, default=16, help="KV cache page size in tokens")
    parser.add_argument("--num-pages", type=int, help="KV cache pages (default: every slot can reach the "
                        "context, capped at half the free accelerator memory)")
    parser.add_argument("--max-len", type=int, help="prompt + new tokens per sequence (default: the context)")


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompt-file", help="a file with one prompt per line (JSON string or chat message list)")
    parser.add_argument("--raw", action="store_true", help="tokenize prompts as is (no chat template)")
    parser.add_argument("--system", help="system message for chat prompts")
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--logprobs", type=int, help="with --out: per token logprob and this many alternatives")
    for name, default in (("presence", 0.0), ("frequency", 0.0), ("repetition", 1.0)):
        parser.add_argument(f"--{name}-penalty", type=float, default=default, help="see lt_jax.sampling")
    parser.add_argument("--out", help="write results as JSONL here (local or gs://) instead of printing texts")


@dataclasses.dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    eos_ids: tuple[int, ...]  # tokenizer + model config + generation_config.json
    config: Any  # EngineConfig
    mesh: Any
    name: str


def load_from_args(args) -> LoadedModel:
    """The model, tokenizer and sampling setup the shared model flags describe."""
    if args.checkpoint and not args.tokenizer:
        raise SystemExit("--checkpoint needs --tokenizer DIR (checkpoints hold no tokenizer)")
    mesh = make_mesh(parse_mesh(args.mesh))
    model = load_model(args.checkpoint, args.hf, step=args.step, mesh=mesh, dtype=args.dtype)
    tokenizer = load_tokenizer(args.tokenizer or args.hf)
    eos = eos_token_ids(model, tokenizer) + (generation_config_eos(args.hf) if args.hf else ())
    name = (args.hf or args.checkpoint).rstrip("/").rsplit("/", 1)[-1]
    config = EngineConfig(num_slots=args.slots, page_size=args.page_size, num_pages=args.num_pages,
                          max_len=args.max_len, decode_steps=args.chunk_size)
    return LoadedModel(model, tokenizer, tuple(dict.fromkeys(eos)), config, mesh, name)


def read_prompts(args) -> list[Prompt]:
    """--prompt values and --prompt-file lines, as chat conversations unless --raw."""
    texts: list[Any] = list(args.prompt)
    if args.prompt_file:
        for n, line in enumerate(storage.read_text(args.prompt_file).splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"{args.prompt_file}:{n}: expected a JSON string or message list: {e}")
    if not texts:
        raise SystemExit("lt-jax sample: give --prompt TEXT or --prompt-file FILE")
    out: list[Prompt] = []
    for t in texts:
        if isinstance(t, list) or args.raw:
            out.append(t)
        else:
            system = [{"role": "system", "content": args.system}] if args.system else []
            out.append(system + [{"role": "user", "content": str(t)}])
    return out


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prompts = read_prompts(args)
    try:
        params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                seed=args.seed, max_new_tokens=args.max_new_tokens, stop=tuple(args.stop),
                                logprobs=args.logprobs, presence_penalty=args.presence_penalty,
                                frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty)
    except ValueError as e:
        raise SystemExit(f"lt-jax sample: {e}") from None
    lm = load_from_args(args)
    results = generate(lm.model, lm.tokenizer, prompts, params, eos_ids=lm.eos_ids, mesh=lm.mesh, config=lm.config)
    if args.out:
        lines = [json.dumps({"prompt": r.prompt, "prompt_tokens": len(r.prompt_token_ids), "samples": [
            {"text": s.text, "num_tokens": s.num_tokens, "finish_reason": s.finish_reason,
             **({"logprobs": s.logprobs} if s.logprobs is not None else {})} for s in r.samples
        ]}, ensure_ascii=False) for r in results]
        storage.write_text(args.out, "\n".join(lines) + "\n")
        print(f"wrote {len(results)} results to {args.out}", file=sys.stderr)
        return 0
    for i, r in enumerate(results):
        for j, s in enumerate(r.samples):
            print(f"=== prompt {i} sample {j} ({s.num_tokens} tokens, {s.finish_reason}) ===")
            print(s.text)
    return 0
