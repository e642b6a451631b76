"""`lt-jax serve`: an OpenAI-compatible endpoint over a backend chosen on the command line.

    lt-jax serve --teacher synthetic [--synthetic-config cfg.yaml] [--host 127.0.0.1] [--port 8000]
                 [--api-key-env VAR] [--reasoning-format inline|separate]

Backends: `--teacher synthetic` (the rule-based long-thought teacher of lt_jax.data.synthetic) or a
model checkpoint (`--checkpoint PATH` / `--hf DIR`), served by `lt_jax.sample.model_backend` with
the model flags of `lt-jax sample` (lt_jax.sample.cli).
The actual address is printed as `serving MODEL at URL` once the socket is bound (useful with --port 0).
On several hosts (the same command on each), process 0 serves and the others follow its engine.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from lt_jax import config
from lt_jax.data import synthetic
from lt_jax.sample.backends import SyntheticBackend
from lt_jax.sample.cli import add_model_arguments, load_from_args
from lt_jax.sample.model_backend import ModelBackend
from lt_jax.sample.server import ServerConfig, bind, serve
from lt_jax.train import distributed


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    src = parser.add_argument_group("backend (pick one)")
    choice = src.add_mutually_exclusive_group(required=True)
    choice.add_argument("--teacher", choices=["synthetic"], help="a built-in teacher")
    choice.add_argument("--checkpoint", help="an lt_jax Orbax checkpoint (local or gs://)")
    choice.add_argument("--hf", help="a Hugging Face model folder")
    src.add_argument("--synthetic-config", help="YAML for lt_jax.data.synthetic.SyntheticConfig")
    src.add_argument("--model-name", help="name served in /v1/models (default: the backend's)")
    add_model_arguments(src, with_source=False)  # --tokenizer, --mesh, ... as `lt-jax sample`
    src.add_argument("--max-new-tokens", type=int, default=4096,
                     help="max_tokens of requests that set none (and the cap for those that do)")
    net = parser.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    net.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    net.add_argument("--api-key-env", help="require 'Authorization: Bearer $VAR' on /v1/*")
    net.add_argument("--reasoning-format", choices=["inline", "separate"], default="inline",
                     help="chat: keep <think>...</think> in content (inline) or move it to "
                          "reasoning_content (separate); a request may override with 'reasoning_format'")
    net.add_argument("--max-batch-sequences", type=int, default=64)
    net.add_argument("--batch-window-ms", type=float, default=5.0)
    net.add_argument("--log-level", default="INFO")


def build_backend(args: argparse.Namespace):
    """The backend the flags ask for."""
    if args.teacher == "synthetic":
        cfg = config.load(synthetic.SyntheticConfig, args.synthetic_config) if args.synthetic_config else None
        return SyntheticBackend(cfg, name=args.model_name or "synthetic-teacher")
    lm = load_from_args(args)
    backend = ModelBackend(lm.model, lm.tokenizer, lm.name, eos_ids=lm.eos_ids, mesh=lm.mesh, config=lm.config,
                           max_new_tokens=args.max_new_tokens)
    if args.model_name:
        backend.name = args.model_name
    return backend


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            print(f"error: --api-key-env {args.api_key_env}: that environment variable is unset or empty",
                  file=sys.stderr)
            return 2
    cfg = ServerConfig(host=args.host, port=args.port, api_key=api_key, reasoning_format=args.reasoning_format,
                       max_batch_sequences=args.max_batch_sequences, batch_window_ms=args.batch_window_ms)
    # Several hosts (a pod slice, Slurm, JAX_COORDINATOR_ADDRESS): every host runs this command; the
    # model spans them, process 0 serves and the others follow its engine steps.
    distributed.initialize()
    backend = build_backend(args)
    engine = getattr(backend, "engine", None)
    if engine is not None and engine.lockstep and not distributed.is_primary():
        engine.follow()
        return 0
    sock = bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    print(f"serving {backend.name} at http://{host}:{port}/v1", flush=True)
    return asyncio.run(_serve_until_signal(backend, cfg, sock))


async def _serve_until_signal(backend, cfg, sock) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await serve(backend, cfg, sock, stop)
    return 0
