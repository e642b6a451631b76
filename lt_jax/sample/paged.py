"""Paged KV cache: pages of P tokens, a page table per row, and attention that reads only a row's pages.

Layout. Keys and values live in two arrays [L, Nkv, N, P, D] (layers, KV heads, pages, page
slots, head dim): per layer that is exactly the `k_pages` / `v_pages` layout of JAX's Pallas
paged-attention kernels (`jax.experimental.pallas.ops.tpu.paged_attention` and
`...ops.gpu.paged_attention`: [num_kv_heads, total_num_pages, page_size, head_dim]), so the
kernels drop in behind `paged_attention` without a copy. Row b's token at position t sits in page
`page_table[b, t // P]`, slot `t % P`. Page 0 is never handed out: unused page-table entries and
tokens that must not land anywhere (padding, finished rows) point at it, so a write there is
harmless and a read of it is masked.

Bookkeeping (`PageAllocator`) is pure host Python: pages carry reference counts so the n samples
of a prompt share its full prompt pages (each copies only the last, partial one).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as gpu_kernel
from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as tpu_kernel

from lt_jax.model import sharding as shd
from lt_jax.model import transformer as tfm
from lt_jax.model.attention import xla_attention

NULL_PAGE = 0


class PagedKV(NamedTuple):
    """k, v: [L, Nkv, N, P, D]."""

    k: jax.Array
    v: jax.Array


def init_pages(config, num_pages: int, page_size: int, dtype=None) -> PagedKV:
    """Zeroed pages for every layer (page 0 included, the null page)."""
    dtype = tfm.dtype_of(config.compute_dtype) if dtype is None else dtype
    shape = (config.num_layers, config.num_kv_heads, num_pages, page_size, config.resolved_head_dim)
    return PagedKV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def page_bytes(config, page_size: int, dtype=None) -> int:
    """Bytes one page holds across all layers, keys and values."""
    dtype = tfm.dtype_of(config.compute_dtype) if dtype is None else dtype
    per_token = config.num_kv_heads * config.resolved_head_dim * jnp.dtype(dtype).itemsize
    return 2 * config.num_layers * page_size * per_token


def pages_for(tokens: int, page_size: int) -> int:
    return -(-max(int(tokens), 0) // page_size)


class PageAllocator:
    """Reference-counted pages 1..N-1 (page 0 is the null page). Host-side only."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        self.num_pages = num_pages
        self.refs = np.zeros(num_pages, np.int32)
        # Lowest ids first, so a run's page ids (and so its device writes) are deterministic.
        self._free = list(range(num_pages - 1, 0, -1))

    @property
    def available(self) -> int:
        return len(self._free)

    @property
    def in_use(self) -> int:
        return self.num_pages - 1 - len(self._free)

    def alloc(self, n: int) -> Optional[list[int]]:
        """n fresh pages (refcount 1), or None (nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        pages = [self._free.pop() for _ in range(n)]
        self.refs[pages] = 1
        return pages

    def share(self, pages: Sequence[int]) -> None:
        """One more holder for each page."""
        for p in pages:
            if self.refs[p] < 1:
                raise ValueError(f"page {p} is not allocated")
            self.refs[p] += 1

    def release(self, pages: Sequence[int]) -> None:
        """Drops one holder of each page; a page nobody holds returns to the pool."""
        for p in pages:
            if self.refs[p] < 1:
                raise ValueError(f"page {p} released more often than taken")
            self.refs[p] -= 1
            if self.refs[p] == 0:
                self._free.append(p)
        self._free.sort(reverse=True)


# ---------------------------------------------------------------------------------------------
# Attention over pages


def gather_pages(pages: jax.Array, page_table: jax.Array) -> jax.Array:
    """One layer's pages [Nkv, N, P, D] -> every row's tokens in order [B, W*P, Nkv, D]."""
    nkv, _, p, d = pages.shape
    b, w = page_table.shape
    rows = jnp.take(pages, page_table, axis=1)  # [Nkv, B, W, P, D]
    return rows.transpose(1, 2, 3, 0, 4).reshape(b, w * p, nkv, d)


def paged_attention(q, k_pages, v_pages, page_table, positions, *, impl: str = "auto") -> jax.Array:
    """Causal attention of q [B, S, Nq, D] at `positions` [B, S] over the rows' pages (one layer,
    [Nkv, N, P, D]); keys at positions above a query's are masked. -> [B, S, Nq, D].

    impl: "xla" gathers the row's pages and runs the reference attention (any platform); "pallas"
    runs JAX's paged-attention kernel for single-token decode (TPU or GPU; on a multi-device mesh
    per device through `pallas_decode_on_mesh`); "auto" picks pallas for decode where
    `pallas_decode_fits`, xla otherwise; the platform is the active mesh's (a TPU topology
    under `lt-jax compile`).
    """
    s = q.shape[1]
    if impl == "auto":
        impl = "pallas" if s == 1 and pallas_decode_fits(shd.target_platform(), q.shape[-1]) else "xla"
    if impl == "pallas":
        if s != 1:
            raise ValueError("the Pallas paged-attention kernels decode one token per row")
        mesh = shd.active_mesh()
        if mesh is not None and mesh.size > 1:
            return pallas_decode_on_mesh(q, k_pages, v_pages, page_table, positions[:, 0] + 1, mesh)[:, None]
        return pallas_decode(q, k_pages, v_pages, page_table, positions[:, 0] + 1)[:, None]
    if impl != "xla":
        raise ValueError(f"paged attention impl must be auto, xla or pallas, got {impl!r}")
    k = gather_pages(k_pages, page_table)
    v = gather_pages(v_pages, page_table)
    t = k.shape[1]
    kv_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (q.shape[0], t))
    ones_q, ones_kv = jnp.ones(positions.shape, jnp.int32), jnp.ones(kv_pos.shape, jnp.int32)
    return xla_attention(q, k.astype(q.dtype), v.astype(q.dtype), ones_q, ones_kv, positions, kv_pos, True,
                         q.shape[-1] ** -0.5)


def pallas_decode_fits(platform: str, head_dim: int) -> bool:
    """Whether `auto` may run the Pallas decode kernel: on GPU, and on TPU when head_dim is a
    multiple of 128 (the TPU kernel's blocks take whole 128-lane tiles; at 64, Qwen2.5-0.5B's,
    its lowering fails)."""
    return platform == "gpu" or (platform == "tpu" and head_dim % 128 == 0)


def pallas_decode(q, k_pages, v_pages, page_table, lengths, *, interpret: bool = False,
                  backend: Optional[str] = None) -> jax.Array:
    """One decode token per row through JAX's Pallas paged-attention kernel: q [B, 1, Nq, D] ->
    [B, Nq, D]. The TPU kernel on TPU; the GPU (Triton) kernel elsewhere (on CPU only in interpret
    mode, for tests)."""
    backend = backend or shd.target_platform()
    q1 = q[:, 0] * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)  # the kernels do not scale q
    w = page_table.shape[1]
    if backend == "tpu":
        block = max(b for b in (8, 4, 2, 1) if w % b == 0)
        return tpu_kernel(q1, k_pages, v_pages, lengths, page_table, pages_per_compute_block=block)
    block = max(b for b in (8, 4, 2, 1) if w % b == 0)
    splits = max(s for s in (16, 8, 4, 2, 1) if (w // block) % s == 0)
    return gpu_kernel(q1, k_pages, v_pages, page_table, lengths, pages_per_compute_block=block, k_splits=splits,
                      interpret=interpret)


def pallas_decode_on_mesh(q, k_pages, v_pages, page_table, lengths, mesh, **kernel) -> jax.Array:
    """`pallas_decode` on a multi-device mesh. XLA cannot partition a Mosaic/Triton kernel, so each
    device runs it (shard_map) on its share of the KV heads (the mesh axes `cache_kv_heads` maps to,
    `tensor`) and of the rows (those of `cache_batch`, data/fsdp), each axis only where it divides
    the count (else replicated). Every device keeps the whole page pool of its heads: any row may
    hold any page. The query heads of a KV head stay on its device (contiguous head groups)."""
    heads = _dividing(mesh, shd.mesh_spec(("cache_kv_heads",), mesh)[0], k_pages.shape[0])
    rows = _dividing(mesh, shd.mesh_spec(("cache_batch",), mesh)[0], q.shape[0])
    P = jax.sharding.PartitionSpec
    pages = P(heads, None, None, None)
    run = jax.shard_map(functools.partial(pallas_decode, **kernel), mesh=mesh,
                        in_specs=(P(rows, None, heads, None), pages, pages, P(rows, None), P(rows)),
                        out_specs=P(rows, heads, None), check_vma=False)
    return run(q, k_pages, v_pages, page_table, lengths)


def _dividing(mesh, axes, n: int):
    """`axes` (a PartitionSpec entry) when their total size divides n, else None (replicated)."""
    if axes is None:
        return None
    return axes if n % shd.axes_size(mesh, axes) == 0 else None


# ---------------------------------------------------------------------------------------------
# The model over pages


def write_kv(pages: jax.Array, layer: jax.Array, new: jax.Array, slot_page: jax.Array,
             slot_off: jax.Array) -> jax.Array:
    """pages [L, Nkv, N, P, D] with new [B, S, Nkv, D] written at (slot_page, slot_off) [B, S] of `layer`."""
    return pages.at[layer, :, slot_page, slot_off].set(new.astype(pages.dtype))


def forward(model, tokens, positions, valid, page_table, cache: PagedKV, last: jax.Array, *,
            attn_impl: str = "auto") -> tuple[jax.Array, PagedKV]:
    """Runs tokens [B, S] at positions [B, S] against the rows' pages, writing their k/v first
    (tokens where `valid` is False write into the null page). -> (fp32 logits [B, V] of the token at
    index `last` [B] of each row, the updated pages). Prefill chunks and decode steps alike."""
    cfg = model.config
    page_size = cache.k.shape[3]
    slot = jnp.clip(positions // page_size, 0, page_table.shape[1] - 1)
    slot_page = jnp.where(valid, jnp.take_along_axis(page_table, slot, axis=1), NULL_PAGE)
    slot_off = positions % page_size
    x = model.embed_tokens(tokens)
    cos, sin = tfm.rope_tables(positions, tfm.rope_inv_freq(cfg), tfm.dtype_of(cfg.compute_dtype))

    def body(carry, state, graphdef):
        h, k_all, v_all, i = carry
        block = nnx.merge(graphdef, state)
        q, k, v = block.attn.project(block.input_norm(h), cos, sin)
        k_all = write_kv(k_all, i, k, slot_page, slot_off)
        v_all = write_kv(v_all, i, v, slot_page, slot_off)
        out = paged_attention(q, k_all[i], v_all[i], page_table, positions, impl=attn_impl)
        b, s = tokens.shape
        attn = block.attn.o_proj(out.reshape(b * s, -1)).reshape(h.shape)
        h = h + attn
        h = h + block.mlp(block.post_attn_norm(h))
        return (h, k_all, v_all, i + 1), None

    carry = (x, cache.k, cache.v, jnp.zeros((), jnp.int32))
    for graphdef, layer_state in model.layer_runs():  # one run unless dense and MoE layers mix
        carry, _ = jax.lax.scan(functools.partial(body, graphdef=graphdef), carry, layer_state)
    h, k, v, _ = carry
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)  # the LM head runs on one token per row
    logits = model.head_logits(model.final_norm(h_last))[:, 0]
    return logits, PagedKV(k, v)


@functools.partial(jax.jit, donate_argnames=("cache",))
def copy_pages(cache: PagedKV, src: jax.Array, dst: jax.Array) -> PagedKV:
    """Pages `src` [K] copied into pages `dst` [K] in every layer (samples' own copies of a partial
    prompt page)."""
    return PagedKV(cache.k.at[:, :, dst].set(cache.k[:, :, src]), cache.v.at[:, :, dst].set(cache.v[:, :, src]))
