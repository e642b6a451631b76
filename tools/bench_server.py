"""Completed tokens/s through `lt-jax serve` with 1, 8 and 32 concurrent clients, against calling
the same backend directly with the same batches.

    python tools/bench_server.py                                   # synthetic teacher
    python tools/bench_server.py --serve-args "--checkpoint gs://b/ckpt --tokenizer DIR"   # a model

The server runs as a subprocess (`lt-jax serve <serve-args> --port 0`), so HTTP, JSON and the
batcher cost what they cost in production and do not share a GIL with the clients. Each of C
clients (openai.AsyncOpenAI) sends `--requests` chat requests one after another (closed loop);
throughput = completion tokens reported in `usage` / wall time. The direct baseline builds the
backend in this process with the same flags (lt_jax.sample.serve_cli.build_backend) and times
`backend.generate` on batches of C of the same requests: the ceiling the server can approach.
A warm-up round at each concurrency runs first (compilation, connection setup) and is not timed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lt_jax.sample.backends import GenRequest  # noqa: E402


def prompts(count: int) -> list[str]:
    """Long-trace synthetic problems (4-digit products), so max_tokens is what bounds the answer."""
    return [f"Compute {4000 + 37 * i} * {1200 + 11 * i}.\nPlease reason step by step, and put your final "
            "answer within \\boxed{}." for i in range(count)]


def start_server(serve_args: list[str]) -> tuple[subprocess.Popen, str, str]:
    cmd = [sys.executable, "-m", "lt_jax.cli", "serve", *serve_args, "--port", "0", "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if " at " not in line:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    name, url = line.split("serving ", 1)[1].split(" at ")
    return proc, name, url.strip()


def server_stats(url: str) -> dict:
    with urllib.request.urlopen(url.replace("/v1", "/stats"), timeout=30) as r:
        return json.loads(r.read())


async def client_round(url: str, model: str, texts: list[list[str]], max_tokens: int) -> tuple[int, float]:
    """C clients, each sending its list of prompts sequentially; returns (completion tokens, seconds)."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="-", max_retries=0, timeout=3600)

    async def one_client(c: int, mine: list[str]) -> int:
        tokens = 0
        for i, text in enumerate(mine):
            resp = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                                        max_tokens=max_tokens, seed=1000 * c + i,
                                                        temperature=0.6, top_p=0.95)
            tokens += resp.usage.completion_tokens
        return tokens

    start = time.perf_counter()
    counts = await asyncio.gather(*(one_client(c, mine) for c, mine in enumerate(texts)))
    elapsed = time.perf_counter() - start
    await client.close()
    return sum(counts), elapsed


def direct_round(backend, texts: list[list[str]], max_tokens: int) -> tuple[int, float]:
    """The same requests straight into backend.generate, C at a time (one per client per step)."""
    tokens, start = 0, time.perf_counter()
    for i in range(len(texts[0])):
        batch = [GenRequest(messages=({"role": "user", "content": mine[i]},), max_tokens=max_tokens,
                            seed=1000 * c + i, temperature=0.6, top_p=0.95) for c, mine in enumerate(texts)]
        tokens += sum(ch.completion_tokens for r in backend.generate(batch) for ch in r.choices)
    return tokens, time.perf_counter() - start


def bench(args) -> list[dict]:
    from lt_jax.cli import build_parser
    from lt_jax.sample.serve_cli import build_backend

    serve_args = shlex.split(args.serve_args)
    backend = build_backend(build_parser()[0].parse_args(["serve", *serve_args]))
    proc, model, url = start_server(serve_args)
    rows = []
    try:
        for c in args.concurrency:
            texts = [prompts(args.requests * c)[k * args.requests:(k + 1) * args.requests] for k in range(c)]
            warm = [mine[:1] for mine in texts]
            asyncio.run(client_round(url, model, warm, args.max_tokens))
            direct_round(backend, warm, args.max_tokens)
            before = server_stats(url)
            s_tok, s_time = asyncio.run(client_round(url, model, texts, args.max_tokens))
            after = server_stats(url)
            d_tok, d_time = direct_round(backend, texts, args.max_tokens)
            calls = after["backend_calls"] - before["backend_calls"]
            seqs = after["sequences"] - before["sequences"]
            rows.append({"clients": c, "requests": c * args.requests, "server_tokens": s_tok,
                         "server_tok_s": s_tok / s_time, "direct_tokens": d_tok, "direct_tok_s": d_tok / d_time,
                         "ratio": (s_tok / s_time) / (d_tok / d_time), "mean_server_batch": seqs / max(calls, 1)})
    finally:
        proc.terminate()
        proc.wait(30)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--serve-args", default="--teacher synthetic", help="flags for `lt-jax serve` (quoted)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=8, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    rows = bench(args)
    print(f"{'clients':>7} {'server tok/s':>13} {'direct tok/s':>13} {'ratio':>6} {'mean batch':>10}")
    for r in rows:
        print(f"{r['clients']:>7} {r['server_tok_s']:>13.0f} {r['direct_tok_s']:>13.0f} {r['ratio']:>6.3f} "
              f"{r['mean_server_batch']:>10.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
