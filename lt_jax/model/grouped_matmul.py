"""Grouped matmul for mixture-of-experts layers: rows sorted by group, one weight matrix per group.

`grouped_matmul(lhs [M, K], rhs [G, K, N], group_sizes [G]) -> [M, N]`: rows
`sum(group_sizes[:g])` to `sum(group_sizes[:g+1])` of lhs are multiplied by rhs[g]; rows past
`sum(group_sizes)` give zeros (and zero gradients). Two implementations behind one switch, as for
attention:

  ragged_dot  `jax.lax.ragged_dot`: XLA's grouped matmul, every platform (CPU, GPU, TPU). On CPU JAX
              lowers it densely (each group's mask over all M rows, then one batched dot: G x the
              FLOPs), which made an MoE layer of 64 experts 5x slower than running every expert
              on every token (tools/bench_moe.py), hence:
  tiles       pure JAX for CPU: each group's rows are padded to a multiple of a 64-row tile, and
              every tile is multiplied by its group's matrix in one batched einsum (the weights
              gathered per tile). FLOPs: (M + G x 64) x K x N at most, so it stays grouped.
  megablox    the TPU Pallas kernel `jax.experimental.pallas.ops.tpu.megablox` (`gmm`, with its
              `tgmm` backward): it visits only the row tiles that hold a group's rows, so rows
              past `sum(group_sizes)` cost nothing. Its constraints, handled here: M must be a
              multiple of the row tile (rows are padded up to it and cut off after), K and N are
              tiled with the largest of 512/256/128 that divides them (else a partial last tile,
              which the kernel masks, or one whole-dimension tile when the dimension is smaller
              than 128), inputs are bf16 or fp32 (both cast to their common type, which is also the
              output type, like ragged_dot). It leaves rows past the last group uninitialised (NaN
              in interpret mode), in the output and in the lhs gradient, so both are masked.
              A Mosaic kernel cannot be partitioned by XLA: under a sharded mesh it must run inside
              `jax.shard_map` (lt_jax/model/expert_parallel.py does).
  auto        megablox when the target is a TPU, tiles on CPU, ragged_dot on GPU. The target is the active
              mesh's device platform when a mesh is set (so `lt-jax compile --topology v5p:...` on a
              CPU host picks megablox, as attention picks splash), else JAX's default backend.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox import ops

from lt_jax.model import sharding as shd

Impl = Literal["auto", "ragged_dot", "megablox", "tiles"]

# Row tile of the megablox kernel: MaxText's default; every group boundary inside a tile costs one
# extra tile visit, so larger tiles waste more with many small groups.
ROW_TILE = 512
_FEATURE_TILES = (512, 256, 128)
CPU_TILE = 64  # rows per tile of the `tiles` implementation
_DEFAULT = {"tpu": "megablox", "cpu": "tiles"}


target_platform = shd.target_platform


def resolve_impl(impl: Impl = "auto", platform: str | None = None) -> str:
    """The implementation `impl` means on `platform` (default: `target_platform()`)."""
    if impl == "auto":
        return _DEFAULT.get(platform or target_platform(), "ragged_dot")
    if impl not in ("ragged_dot", "megablox", "tiles"):
        raise ValueError(f"unknown grouped matmul impl {impl!r}; use auto, ragged_dot, megablox or tiles")
    return impl


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, impl: Impl = "auto",
                   *, interpret: bool = False) -> jax.Array:
    """[M, K] x [G, K, N] with rows grouped by `group_sizes` (int [G], summing to at most M).

    `interpret` runs the megablox kernel in Pallas interpret mode (any backend; for tests).
    """
    chosen = resolve_impl(impl)
    if chosen == "ragged_dot":
        return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32))
    if chosen == "tiles":
        return tiled_matmul(lhs, rhs, group_sizes)
    return megablox_matmul(lhs, rhs, group_sizes, interpret=interpret)


def megablox_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """(row tile, K tile, N tile) for the megablox kernel (see the module doc); M is padded to the row tile."""
    return min(ROW_TILE, _round_up(max(m, 1), 128)), _feature_tile(k), _feature_tile(n)


def _feature_tile(size: int) -> int:
    if size < 128:
        return size  # one block spanning the whole dimension: allowed whatever its size
    return next((t for t in _FEATURE_TILES if size % t == 0), 128)


def _round_up(x: int, to: int) -> int:
    return -(-x // to) * to


def megablox_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, interpret: bool = False) -> jax.Array:
    """The megablox path of `grouped_matmul` (its forward and its custom backward)."""
    dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
    if dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"the megablox grouped matmul takes bfloat16 or float32, got {dtype}; use impl='ragged_dot'")
    m, k = lhs.shape
    tiling = megablox_tiling(m, k, rhs.shape[2])
    group_sizes = group_sizes.astype(jnp.int32)
    real = (jnp.arange(m) < jnp.sum(group_sizes))[:, None]
    # Masking the input zeroes the kernel's uninitialised lhs gradient for rows past the groups.
    lhs = jnp.where(real, lhs.astype(dtype), 0)
    lhs = jnp.pad(lhs, ((0, _round_up(m, tiling[0]) - m), (0, 0)))
    out = _gmm(lhs, rhs.astype(dtype), group_sizes, dtype, tiling, interpret)
    return jnp.where(real, out[:m], 0)


def _gmm(lhs, rhs, group_sizes, dtype, tiling, interpret):
    return ops.gmm(lhs, rhs, group_sizes, dtype, tiling, interpret=interpret)


def tiled_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, tile: int = CPU_TILE) -> jax.Array:
    """The `tiles` path of `grouped_matmul`: rows moved to group-aligned tiles, one batched einsum."""
    (m, k), (g, _, n) = lhs.shape, rhs.shape
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    padded = -(-sizes // tile) * tile
    padded_ends = jnp.cumsum(padded)
    num_tiles = -(-m // tile) + g  # sum of ceil(size / tile) over the groups is at most this
    row = jnp.arange(m)
    group = jnp.minimum(jnp.searchsorted(ends, row, side="right"), g - 1)
    # Row r of group j goes to padded_start[j] + (r - start[j]); rows past the groups are dropped.
    dest = jnp.where(row < ends[-1], padded_ends[group] - padded[group] + row - (ends[group] - sizes[group]),
                     num_tiles * tile)
    tiles = jnp.zeros((num_tiles * tile, k), lhs.dtype).at[dest].set(lhs, mode="drop")
    tile_group = jnp.minimum(jnp.searchsorted(padded_ends, jnp.arange(num_tiles) * tile, side="right"), g - 1)
    out = jnp.einsum("tbk,tkn->tbn", tiles.reshape(num_tiles, tile, k), jnp.take(rhs, tile_group, axis=0))
    return jnp.take(out.reshape(num_tiles * tile, n), dest, axis=0, mode="fill", fill_value=0)
