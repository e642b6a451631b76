"""MoE benchmark: the dropless grouped-matmul expert layer against a dense baseline, side by side.

    python tools/bench_moe.py --tokens 2048 --hidden 256 --moe-intermediate 128 --experts 64 --top-k 8
    python tools/bench_moe.py --compare-torch      # + the tiny Qwen3-MoE model's step against transformers

Layer (forward + backward w.r.t. the tokens and all expert weights, fp32, one jit each):
  grouped  `lt_jax.model.moe.experts_ffn`: each token's k slots sorted by expert, one grouped matmul
           per projection, once per `--impls` entry of `lt_jax.model.grouped_matmul` (tiles is the
           CPU default; ragged_dot is what JAX lowers densely on CPU; megablox is TPU only).
  dense    every expert on every token ([E, T, I] intermediates), the outputs weighted by the
           router's top-k weights scattered to a [T, E] matrix (zero for unchosen experts): E/k
           times the FLOPs, no sorting. Both are checked to agree before timing.
Tokens/s counts the layer's input tokens. Steps alternate between the two (tools/bench.py's
`time_interleaved`) so machine load hits both alike; run it nice'd on a shared CPU.

--compare-torch then runs `tools/bench.py --compare-torch` on a tiny Qwen3-MoE (family qwen3_moe,
one dense layer among sparse ones) with one thread each: transformers' Qwen3MoeForCausalLM and the
lt_jax model loaded from its weights, logits checked equal first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--moe-intermediate", type=int, default=128)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--impls", default="tiles,ragged_dot", help="grouped-matmul implementations to time")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pin-cpus", type=int, default=1, help="pin to the first N allowed CPUs (default 1)")
    p.add_argument("--compare-torch", action="store_true", help="also the tiny model's step against transformers")
    p.add_argument("--model-seq", type=int, default=256, help="--compare-torch: tokens per row (batch 4)")
    return p.parse_args(argv)


def dense_experts(x, weights, experts, w_gate, w_up, w_down):
    """Every expert on every token, masked by the router's top-k weights: the baseline."""
    import jax
    import jax.numpy as jnp

    gate = jnp.zeros((x.shape[0], w_gate.shape[0]), x.dtype)
    gate = gate.at[jnp.arange(x.shape[0])[:, None], experts].add(weights.astype(x.dtype))
    hidden = jax.nn.silu(jnp.einsum("th,ehi->eti", x, w_gate)) * jnp.einsum("th,ehi->eti", x, w_up)
    return jnp.einsum("eti,eih,te->th", hidden, w_down, gate)


def layer_runs(args):
    """{"grouped/IMPL": fn, ..., "dense": fn}: blocking fwd+bwd steps of the layers on the same inputs."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from lt_jax.model import grouped_matmul as gm
    from lt_jax.model import moe

    t, h, i, e = args.tokens, args.hidden, args.moe_intermediate, args.experts
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (t, h), jnp.float32)
    weights, experts = moe.route(jax.random.normal(keys[1], (t, e)), args.top_k, norm_topk_prob=True)
    params = [jax.random.normal(k, s) * 0.05 for k, s in zip(keys[2:], [(e, h, i), (e, h, i), (e, i, h)])]

    def step(ffn, impl=None):
        # routing passed as arguments: as closure constants XLA would constant-fold the sort
        loss = lambda x, r, e, *w: jnp.sum(ffn(x, r, e, *w) ** 2)  # noqa: E731
        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 3, 4, 5)))
        fn = lambda x, *w: grad(x, weights, experts, *w)  # noqa: E731
        if impl is None:
            return fn
        # experts_ffn calls grouped_matmul with impl="auto"; pin the impl while this jit traces
        # (the first call, below), which is the only time moe reads the name.
        def traced(*a):
            saved, moe.grouped_matmul = moe.grouped_matmul, functools.partial(gm.grouped_matmul, impl=impl)
            try:
                return fn(*a)
            finally:
                moe.grouped_matmul = saved
        return traced

    fns = {f"grouped/{impl}": step(moe.experts_ffn, impl) for impl in args.impls.split(",")}
    fns["dense"] = step(dense_experts)
    out = {name: fn(x, *params) for name, fn in fns.items()}
    for name in fns:
        np.testing.assert_allclose(out[name][0], out["dense"][0], rtol=1e-4)
        for g, d in zip(out[name][1], out["dense"][1]):
            np.testing.assert_allclose(g, d, rtol=1e-3, atol=1e-4)
    print(f"{', '.join(fns)} agree (loss and every gradient)")
    return {name: (lambda fn=fn: jax.block_until_ready(fn(x, *params))) for name, fn in fns.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.pin_cpus:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.pin_cpus])
    tools = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.dirname(tools))
    sys.path.insert(0, tools)
    import jax

    from bench import time_interleaved

    cpus = sorted(os.sched_getaffinity(0))
    print(f"device: {jax.devices()[0].device_kind} | jax {jax.__version__} | process CPUs {cpus}")
    print(f"layer: {args.tokens} tokens, hidden {args.hidden}, moe_intermediate {args.moe_intermediate}, "
          f"{args.experts} experts, top-{args.top_k}; fwd+bwd, fp32")
    results = time_interleaved(layer_runs(args), args.steps, args.warmup)
    medians = {}
    for name, (first, times) in results.items():
        medians[name] = statistics.median(times)
        print(f"{name:>8}: first {first:6.2f}s | median {medians[name] * 1e3:9.2f} ms (min {min(times) * 1e3:.2f}) | "
              f"{args.tokens / medians[name]:12,.0f} tok/s")
    for name in medians:
        if name != "dense":
            print(f"ratio: dense / {name} = {medians['dense'] / medians[name]:.2f}x (medians of {args.steps} "
                  f"interleaved steps; >1 means grouped is faster; dense does {args.experts / args.top_k:.0f}x "
                  "the expert FLOPs)")
    if args.compare_torch:
        from bench import main as bench_main

        print("\nfull model: tools/bench.py --compare-torch on a tiny Qwen3-MoE, one thread each")
        return bench_main([
            "family=qwen3_moe", "vocab_size=1024", "hidden_size=128", "intermediate_size=256", "num_layers=2",
            "num_heads=4", "num_kv_heads=2", "head_dim=32", "num_experts=8", "num_experts_per_tok=2",
            "moe_intermediate_size=64", "mlp_only_layers=[0]",
            "--batch", "4", "--seq", str(args.model_seq), "--steps", str(args.steps), "--compare-torch",
            "--torch-threads", "1",
        ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
