"""Grouped matmul for mixture-of-experts layers: rows sorted by group, one weight matrix per group.

`grouped_matmul(lhs [M, K], rhs [G, K, N], group_sizes [G]) -> [M, N]`: rows
`sum(group_sizes[:g])` to `sum(group_sizes[:g+1])` of lhs are multiplied by rhs[g]; rows past
`sum(group_sizes)` give zeros. `jax.lax.ragged_dot` on every platform for now; the TPU Megablox
kernel goes behind the same switch (issue 13).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """[M, K] x [G, K, N] with rows grouped by `group_sizes` (int32 [G], summing to at most M)."""
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32))
