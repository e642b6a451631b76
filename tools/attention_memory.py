"""What the cuDNN packed path costs in memory, measured on CPU: the GQA fix options and the segment ceiling.

    python tools/attention_memory.py                       # Qwen2.5-7B layer at 32k (28/4 heads, dim 128)
    python tools/attention_memory.py --seq 8192 --layers 28 --time-seq 4096

The cuDNN kernel itself only compiles on a GPU, so each figure comes from a CPU stand-in that has
the kernel's memory contract: a custom_vjp whose forward returns the output and keeps exactly the
residuals JAX's cuDNN rule keeps (q, k, v, output, fp32 softmax statistics [B*M, Nq, T]; shapes
from JAX's abstract evaluation) and whose backward returns dq/dk/dv. `memory_analysis()` of the
compiled forward+backward on CPU then counts the buffers each option adds.

  softmax stats   residual bytes for M = 1..256 segment slots, per layer and for `--layers` layers
                  when they are kept across the step (remat policy save_attention_out)
  gqa options     (a) k/v offsets pre-scaled so JAX's query-head scaling lands right: counts the
                      segments of real packed rows for which no such offset exists;
                  (b) k/v repeated to the query heads: the bytes of the materialised repeat (the
                      custom call's operands) and CPU time of the repeat and its gradient.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def stand_in(m: int):
    """f(q, k, v) with the cuDNN rule's residuals: q, k, v, out and fp32 stats [B*m, Nq, T]."""
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def f(q, k, v):
        return q + (jnp.mean(k) + jnp.mean(v)).astype(q.dtype)

    def fwd(q, k, v):
        out = f(q, k, v)
        b, t, n, _ = q.shape
        stats = jnp.broadcast_to(q[:, None, :, :, 0].astype(jnp.float32).transpose(0, 1, 3, 2), (b, m, n, t))
        return out, (q, k, v, out, stats.reshape(b * m, n, t))

    def bwd(res, g):
        q, k, v, out, stats = res
        s = jnp.sum(stats).astype(g.dtype) + jnp.sum(out).astype(g.dtype)
        return g + s, jnp.zeros_like(k) + s, jnp.zeros_like(v) + s

    f.defvjp(fwd, bwd)
    return f


def compiled_bytes(fn, *args) -> dict:
    import jax

    mem = jax.jit(fn).lower(*args).compile().memory_analysis()
    return {"temp": mem.temp_size_in_bytes, "out": mem.output_size_in_bytes, "args": mem.argument_size_in_bytes}


def shapes(b, t, nq, nkv, d):
    import jax
    import jax.numpy as jnp

    return (jax.ShapeDtypeStruct((b, t, nq, d), jnp.bfloat16), jax.ShapeDtypeStruct((b, t, nkv, d), jnp.bfloat16),
            jax.ShapeDtypeStruct((b, t, nkv, d), jnp.bfloat16))


def residual_bytes(m: int, q, k, v) -> int:
    """Bytes of what the forward keeps for the backward (the compiled vjp-forward's outputs, less the output)."""
    import jax

    f = stand_in(m)
    out = compiled_bytes(lambda q, k, v: jax.vjp(f, q, k, v)[1], q, k, v)["out"]
    return out


def softmax_stats(args) -> None:
    q, k, v = shapes(1, args.seq, args.heads, args.kv_heads, args.dim)
    base = residual_bytes(1, q, k, v) - 4 * args.seq * args.heads
    print(f"\nsoftmax statistics, B=1, T={args.seq}, Nq={args.heads} (other residuals {base / 2**20:.1f} MiB per layer):")
    print(f"{'M':>5} {'stats/layer':>12} {'x unpacked':>11} {'stats x ' + str(args.layers) + ' layers':>18}")
    for m in (1, 16, 32, 64, 128, 256):
        stats = residual_bytes(m, q, k, v) - base
        print(f"{m:>5} {stats / 2**20:>9.1f} MiB {m:>10}x {stats * args.layers / 2**30:>15.2f} GiB")


def offsets_feasible(args) -> None:
    """(a): the offset x JAX must receive is ((o + b*T) * Nkv / Nq) - b*T; it must be a non-negative
    integer (negative entries are read as padding)."""
    import numpy as np

    rng = np.random.default_rng(0)
    g, bad, total = args.heads // args.kv_heads, 0, 0
    for b in range(8):
        lengths = rng.integers(200, 6000, size=64)
        starts = np.cumsum(np.r_[0, lengths])[:-1]
        starts = starts[starts < args.seq]
        x = (starts + b * args.seq) / g - b * args.seq
        bad += int(np.sum((x < 0) | (x != np.floor(x))))
        total += len(starts)
    print(f"\n(a) pre-scaled k/v offsets: {bad}/{total} segments of 8 packed rows have no valid offset "
          f"(negative or fractional); only row 0 with starts divisible by {g} would work")


def gqa_repeat(args) -> None:
    import jax
    import jax.numpy as jnp

    _, k, v = shapes(1, args.seq, args.heads, args.kv_heads, args.dim)
    g = args.heads // args.kv_heads
    # The custom call takes whole buffers: the repeated k/v are materialised (an output here), and
    # the backward returns dK/dV at the query heads, the same size again, before summing the group.
    rep = compiled_bytes(lambda k, v: (jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)), k, v)
    print(f"\n(b) repeat k/v to {args.heads} heads: k+v {rep['args'] / 2**20:.0f} MiB -> {rep['out'] / 2**20:.0f} MiB "
          f"materialised for the kernel, and the same again for dK/dV in the backward (+{2 * (rep['out'] - rep['args']) / 2**20:.0f} "
          "MiB per layer at most; transient: remat recomputes it and save_attention_out keeps only out + stats)")
    kt = jnp.ones((1, args.time_seq, args.kv_heads, args.dim), jnp.bfloat16)
    rep = jax.jit(jax.grad(lambda k: jnp.sum(jnp.repeat(k, g, axis=2).astype(jnp.float32) ** 2)))
    rep(kt).block_until_ready()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        rep(kt).block_until_ready()
        times.append(time.perf_counter() - t0)
    moved = 2 * (g + 1) * kt.size * 2  # read k, write repeated; read repeated grad, write summed grad (bytes)
    print(f"    repeat + its gradient for one of k/v at T={args.time_seq}: {1e3 * statistics.median(times):.1f} ms on this "
          f"CPU; {2 * moved * args.seq / args.time_seq / 2**30:.2f} GiB of memory traffic per layer for k and v at "
          f"T={args.seq} (about {2 * moved * args.seq / args.time_seq / 3.35e12 * 1e3:.2f} ms at H100's 3.35 TB/s)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--time-seq", type=int, default=4096, help="sequence length of the CPU timing")
    args = p.parse_args(argv)
    import jax

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; one layer, bf16, B=1")
    softmax_stats(args)
    offsets_feasible(args)
    gqa_repeat(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
