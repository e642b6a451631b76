"""The engine's jitted device calls: a prefill chunk, a decode chunk, and the first-token draw.

The scheduling (which rows run, which pages they hold) is `engine.Engine`'s; these functions take
its decisions as arrays: tokens, positions, a page table per row, per-row sampling parameters
(`rows.RowParams`, `rows.Limits`) and optional penalty state (`penalties.Penalties`). Static
arguments (sampling mode, top-N width, whether min_tokens / min_p are traced) pick a compile;
the engine keeps their number small. `abstract_calls` gives their largest shapes for
ahead-of-time compiles (`lt-jax compile --sampler`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lt_jax.sample import paged, penalties
from lt_jax.sample import rows as rw
from lt_jax.sample import sampler as smp
from lt_jax.sample.engine_config import STOP_WIDTH, EngineConfig, cache_dtype


def constrained(specs) -> bool:
    """Whether any row sets min_tokens or min_p (the draw then masks logits; one compile each way)."""
    return any(s.min_tokens or s.min_p for s in specs)


def sample(logits, rows: rw.RowParams, count, limits: rw.Limits, mode: str, top_n: int, constrained: bool,
           pen=None):
    """(tokens, logprobs...): the draw under the penalties (`pen`; None: off) and min_tokens / min_p (traced
    when a row sets them: `constrained`); logprobs of the raw distribution after temperature."""
    allowed = logits if pen is None else penalties.apply(logits, pen)
    if constrained:
        allowed = smp.constrain_logits(allowed, count, rows.temperature, rows.stop_ids, limits.min_tokens,
                                       limits.min_p)
    tok = smp.sample_from_logits(allowed, smp.step_keys(rows.seed, count), rows.temperature, rows.top_p, rows.top_k,
                                 mode=mode)
    return (tok,) + smp.token_logprobs(logits, rows.temperature, tok, top_n)


@functools.partial(jax.jit, static_argnames=("mode", "top_n", "constrained"))
def draw(logits, rows: rw.RowParams, counts, limits: rw.Limits, pen=None, *, mode, top_n, constrained):
    """The first token of freshly admitted samples from their prompts' last logits."""
    return sample(logits, rows, counts, limits, mode, top_n, constrained, pen)


@functools.partial(jax.jit, static_argnames=("graphdef", "attn_impl"), donate_argnames=("cache",))
def prefill(graphdef, params, cache, tokens, positions, valid, table, last, *, attn_impl: str):
    """One prefill chunk of one prompt -> (pages, logits [1, V] of its last valid token)."""
    model = nnx.merge(graphdef, params)
    impl = "xla" if attn_impl == "pallas" else attn_impl  # the kernels decode one token per row
    logits, cache = paged.forward(model, tokens, positions, valid, table, cache, last, attn_impl=impl)
    return cache, logits


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "mode", "attn_impl", "top_n", "constrained"),
                   donate_argnames=("cache",))
def decode(graphdef, params, cache, token, position, count, done, table, rows: rw.RowParams,
           limits: rw.Limits, pen=None, *, steps: int, mode: str, attn_impl: str, top_n: int = 0,
           constrained: bool = False):
    """Up to `steps` decode steps of every slot -> (pages, (tokens [slots, steps]; NO_TOKEN once a slot
    is done, their logprobs [slots, steps], top-N ids and logprobs [slots, steps, top_n]), penalty
    state after the drawn tokens (None when `pen` is None))."""
    n = token.shape[0]
    out = (jnp.full((n, steps), rw.NO_TOKEN, jnp.int32), jnp.zeros((n, steps)),
           jnp.zeros((n, steps, top_n), jnp.int32), jnp.zeros((n, steps, top_n)))
    last = jnp.zeros(token.shape, jnp.int32)

    def cond(carry):
        i, _, _, _, _, done, _, _ = carry
        return (i < steps) & ~jnp.all(done)

    def body(carry):
        i, cache, token, position, count, done, out, pen = carry
        model = nnx.merge(graphdef, params)
        logits, cache = paged.forward(model, token[:, None], position[:, None], ~done[:, None], table, cache, last,
                                      attn_impl=attn_impl)
        nxt, *lps = sample(logits, rows, count, limits, mode, top_n, constrained, pen)
        nxt = jnp.where(done, rw.NO_TOKEN, nxt)
        new = (nxt, *lps)
        out = tuple(jax.lax.dynamic_update_slice_in_dim(o, x[:, None], i, axis=1) for o, x in zip(out, new))
        live = (~done).astype(jnp.int32)
        pen = None if pen is None else penalties.record(pen, nxt, ~done)
        count = count + live
        new_done = done | rw.finished(nxt, count, rows)
        return i + 1, cache, jnp.where(done, token, nxt), position + live, count, new_done, out, pen

    carry = (jnp.int32(0), cache, token, position, count, done, out, pen)
    _, cache, _, _, _, _, out, pen = jax.lax.while_loop(cond, body, carry)
    return cache, out, pen


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compiles


def abstract_calls(model_config, config: EngineConfig, graphdef, params, array) -> dict[str, tuple]:
    """The engine's largest device calls as (jitted function, abstract args, static kwargs), for
    ahead-of-time compiles (`lt-jax compile --sampler`): a full prefill chunk and a decode chunk over
    every slot at the full page-table width, in the costliest sampling mode. `array(shape, dtype)`
    makes an abstract argument. The shapes come from the same config the engine resolves."""
    cfg = config.resolve(model_config)
    width = paged.pages_for(cfg.max_len, cfg.page_size)
    dtype = cache_dtype(cfg.cache_dtype)
    cache = jax.eval_shape(lambda: paged.init_pages(model_config, cfg.num_pages, cfg.page_size, dtype))
    cache = jax.tree.map(lambda a: array(a.shape, a.dtype), cache)
    c, n = cfg.prefill_chunk, cfg.num_slots
    i32 = jnp.int32
    prefill_args = (graphdef, params, cache, array((1, c), i32), array((1, c), i32), array((1, c), jnp.bool_),
                    array((1, width), i32), array((1,), i32))
    specs = [smp.RowSpec(0, temperature=0.6, top_p=0.95)] * n
    rows = jax.tree.map(lambda a: array(a.shape, a.dtype), rw.row_params(specs, n, STOP_WIDTH))
    limits = jax.tree.map(lambda a: array(a.shape, a.dtype), rw.row_limits(specs, n))
    decode_args = (graphdef, params, cache, array((n,), i32), array((n,), i32), array((n,), i32),
                   array((n,), jnp.bool_), array((n, width), i32), rows, limits)
    return {
        "prefill": (prefill, prefill_args, dict(attn_impl=cfg.attn_impl)),
        "decode": (decode, decode_args, dict(steps=cfg.decode_steps, mode=smp.sampling_mode(specs),
                                             attn_impl=cfg.attn_impl)),
    }
