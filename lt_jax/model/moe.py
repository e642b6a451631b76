"""Mixture-of-experts math: top-k routing, dropless grouped expert FFNs, the load-balancing loss.

Pure functions of arrays (the NNX layer that owns the weights is `MoEBlock` in
`lt_jax.model.transformer`):

- `route`: softmax over experts in fp32, top-k, optional renormalisation of the k weights
  (transformers' Qwen3MoeTopKRouter). Ties go to the lower expert index (`jax.lax.top_k`, same as
  torch.topk on CPU).
- `experts_ffn`: each token's k slots sorted by expert, one grouped matmul per projection
  (`lt_jax.model.grouped_matmul`, ragged rows per expert), unsorted and combined with the router
  weights. Dropless by default: every slot is computed whatever the load. With
  `capacity_factor`, an expert takes at most ceil(factor * slots / E) slots (earlier tokens first)
  and the rest contribute nothing (their token keeps only the residual); `dropped_slots` counts them.
- `router_stats` / `load_balancing_loss`: transformers' `load_balancing_loss_func` as sums over
  real tokens, so it can be summed over layers, micro-batches and devices before the product.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from lt_jax.model.grouped_matmul import grouped_matmul


def route(router_logits: jax.Array, top_k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
    """(weights [T, k] in the logits' dtype, experts [T, k] int32) from router logits [T, E].

    Softmax runs in fp32; with `norm_topk_prob` the k chosen probabilities are rescaled to sum to 1.
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(router_logits.dtype), experts.astype(jnp.int32)


def capacity(num_slots: int, num_experts: int, capacity_factor: float) -> int:
    """Slots one expert takes in capacity mode: ceil(factor * slots / experts)."""
    return max(1, math.ceil(capacity_factor * num_slots / num_experts))


def _kept_slots(flat_experts: jax.Array, num_experts: int, capacity_factor: Optional[float],
                valid: Optional[jax.Array]) -> jax.Array:
    """bool [T*k]: the slots computed. All of them (dropless) except invalid tokens' slots; with a
    capacity factor, only each expert's first `capacity` slots in token order."""
    kept = jnp.ones(flat_experts.shape, bool) if valid is None else valid
    if capacity_factor is None:
        return kept
    onehot = jax.nn.one_hot(jnp.where(kept, flat_experts, num_experts), num_experts, dtype=jnp.int32)
    rank = jnp.cumsum(onehot, axis=0) - onehot  # slots of the same expert before this one
    rank = jnp.take_along_axis(rank, jnp.clip(flat_experts, 0, num_experts - 1)[:, None], axis=1)[:, 0]
    return kept & (rank < capacity(flat_experts.shape[0], num_experts, capacity_factor))


def experts_ffn(
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    capacity_factor: Optional[float] = None,
    valid: Optional[jax.Array] = None,
) -> jax.Array:
    """sum_j weights[t, j] * FFN_{experts[t, j]}(x[t]) -> [T, H], with FFN_e(x) = down(silu(gate x) * up x).

    x [T, H]; weights, experts [T, k]; w_gate, w_up [E, H, I]; w_down [E, I, H]. Dropless unless
    `capacity_factor` is given (see module doc). `valid` [T] (optional): tokens whose slots are
    skipped when False (padding), so they take no capacity; their output is zero.
    """
    t, k = experts.shape
    num_experts = w_gate.shape[0]
    flat = experts.reshape(-1)
    slot_valid = None if valid is None else jnp.repeat(valid.astype(bool), k)
    kept = _kept_slots(flat, num_experts, capacity_factor, slot_valid)
    key = jnp.where(kept, flat, num_experts)  # dropped slots sort past every group: zero rows
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.bincount(key, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    rows = jnp.take(x, order // k, axis=0)
    hidden = jax.nn.silu(grouped_matmul(rows, w_gate, group_sizes)) * grouped_matmul(rows, w_up, group_sizes)
    out = grouped_matmul(hidden.astype(w_down.dtype), w_down, group_sizes)
    slots = jnp.zeros_like(out).at[order].set(out, unique_indices=True)  # back to token order
    combined = jnp.einsum("tkh,tk->th", slots.reshape(t, k, -1), weights.astype(out.dtype))
    return combined.astype(x.dtype)


def dropped_slots(experts: jax.Array, num_experts: int, capacity_factor: Optional[float],
                  valid: Optional[jax.Array] = None) -> jax.Array:
    """int32: how many (valid) slots `experts_ffn` with this `capacity_factor` leaves out (0 dropless)."""
    k = experts.shape[1]
    flat = experts.reshape(-1)
    slot_valid = jnp.ones(flat.shape, bool) if valid is None else jnp.repeat(valid.astype(bool), k)
    kept = _kept_slots(flat, num_experts, capacity_factor, slot_valid)
    return jnp.sum(slot_valid & ~kept).astype(jnp.int32)


class RouterStats(NamedTuple):
    """Sums over real tokens of one or more MoE layers (add them to combine layers or batches).

    slots [E]: routed slots per expert (k per token); probs [E]: router probabilities summed;
    tokens: (layer, token) rows counted; dropped: slots left out by the capacity limit.
    """

    slots: jax.Array
    probs: jax.Array
    tokens: jax.Array
    dropped: jax.Array


def router_stats(router_logits: jax.Array, experts: jax.Array, valid: jax.Array,
                 dropped: Optional[jax.Array] = None) -> RouterStats:
    """RouterStats of one layer: router_logits [T, E], its top-k `experts` [T, k], `valid` [T]."""
    num_experts = router_logits.shape[-1]
    mask = valid.astype(jnp.float32)
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    slots = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32) * mask[:, None, None], axis=(0, 1))
    return RouterStats(
        jax.lax.stop_gradient(slots), jnp.sum(probs * mask[:, None], axis=0), jnp.sum(mask),
        jnp.zeros((), jnp.float32) if dropped is None else dropped.astype(jnp.float32),
    )


def load_balancing_loss(stats: RouterStats) -> jax.Array:
    """E * sum_e f_e * P_e with f_e = slots_e / rows, P_e = probs_e / rows (transformers'
    `load_balancing_loss_func` over every sparse layer's real tokens); 0 when no rows."""
    rows = jnp.maximum(stats.tokens, 1.0)
    return stats.slots.shape[-1] * jnp.sum((stats.slots / rows) * (stats.probs / rows))


def expert_load(stats: RouterStats) -> jax.Array:
    """Fraction of routed slots each expert received [E] (sums to 1; uniform is 1/E)."""
    return stats.slots / jnp.maximum(jnp.sum(stats.slots), 1.0)


__all__ = ["route", "capacity", "experts_ffn", "dropped_slots", "RouterStats", "router_stats",
           "load_balancing_loss", "expert_load"]
