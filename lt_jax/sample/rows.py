"""Per-row sampling parameters on device, shared by the lockstep sampler and the engine.

A batch of rows (lockstep batch rows or engine slots) carries its sampling parameters as small
arrays (`RowParams`, `Limits`) built on the host from each row's `RowSpec`; the device decides
that a row is done (`finished`) from them, and marks the steps after that with `NO_TOKEN`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

NO_TOKEN = -1  # device output of a step a row did not take (it was already done)


class RowParams(NamedTuple):
    """Per-row sampling parameters as device arrays (fixed while a row runs)."""

    seed: jax.Array  # [R] uint32
    temperature: jax.Array  # [R] f32
    top_p: jax.Array  # [R] f32
    top_k: jax.Array  # [R] i32
    budget: jax.Array  # [R] i32: max new tokens
    stop_ids: jax.Array  # [R, S] i32, NO_TOKEN padded


class Limits(NamedTuple):
    """Per-row constraints on the draw: min_tokens [R] i32, min_p [R] f32."""

    min_tokens: jax.Array
    min_p: jax.Array


def row_params(specs: Sequence[Optional[object]], n: int, min_stop_width: int = 1) -> RowParams:
    """`RowParams` of n rows from `specs` (`sampler.RowSpec`; None or missing: an empty row, greedy
    with budget 0). The stop-id width is a power of two >= min_stop_width (fewer compiles)."""
    width = max([min_stop_width] + [len(s.stop_token_ids) for s in specs if s is not None])
    width = 1 << (width - 1).bit_length()
    stop_ids = np.full((n, width), NO_TOKEN, np.int32)
    seed, budget = np.zeros(n, np.uint32), np.zeros(n, np.int32)
    temperature, top_p, top_k = np.zeros(n, np.float32), np.ones(n, np.float32), np.zeros(n, np.int32)
    for i, s in enumerate(specs):
        if s is None:
            continue
        stop_ids[i, : len(s.stop_token_ids)] = s.stop_token_ids
        seed[i], budget[i] = s.seed & 0xFFFFFFFF, s.max_new_tokens
        temperature[i], top_p[i], top_k[i] = s.temperature, s.top_p, s.top_k
    return RowParams(seed, temperature, top_p, top_k, budget, stop_ids)


def row_limits(specs: Sequence[Optional[object]], n: int) -> Limits:
    """Per-row min_tokens / min_p of `specs` (None: an empty row) as arrays of n rows."""
    min_tokens, min_p = np.zeros(n, np.int32), np.zeros(n, np.float32)
    for i, s in enumerate(specs):
        if s is not None:
            min_tokens[i], min_p[i] = s.min_tokens, s.min_p
    return Limits(min_tokens, min_p)


def finished(token, count, rows: RowParams):
    """[R] bool: the row drew one of its stop ids, or `count` reached its budget."""
    hit = jnp.any(token[:, None] == rows.stop_ids, axis=-1)
    return hit | (count >= rows.budget)
