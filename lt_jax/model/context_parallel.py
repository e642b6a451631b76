"""Context parallelism: attention over rows whose sequence is split over the `context` mesh axis.

With `mesh.context = c`, every activation [batch, seq, ...] holds seq/c tokens per device (the
`act_seq` rule), so everything but attention is per-token and needs no communication. Attention is
the one place a query needs keys from other devices. Two ways to bring them, both inside
`jax.shard_map` over the whole mesh (batch over data/fsdp/dcn_data, heads over tensor, sequence
over context), both taking packed rows (segment ids) and causal masking:

  ring        The query block stays; k/v blocks (with their segment ids and positions) travel round
              the ring with `ppermute`, c steps, and an online softmax (running max, denominator and
              an fp32 accumulator) folds each block in. Logits exist one block at a time
              ([b, h, S/c, S/c]) and each step is rematerialised in the backward pass, so what is
              saved per step is O(S/c): the softmax state and the k/v block, never the logits.
              The XLA path for CPU and GPU.
  all_gather  k/v are all-gathered over context once per layer (under GQA they are Nkv/Nq the
              size of q, e.g. 1/7 for Qwen2.5-7B), then the local queries attend to the whole row.
              With `kernel="splash"` (TPU) the flash kernel is built with `q_seq_shards = c`, so
              each device receives the block-sparsity table of its own query rows and skips the
              fully masked future blocks; with `kernel="xla"` it is dense (a reference).

Causality: the ring and the XLA kernel mask by position (key position <= query position within a
segment), exactly as `attention.xla_attention` does; splash masks by global index, which agrees on
packed rows (positions increase along each segment). The causal work is unbalanced across the ring
(the device holding the row's end does the most); zig-zag reordering is not implemented.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from lt_jax.model import kernels
from lt_jax.model import sharding as shd
from lt_jax.model.kernels import MASK_VALUE, make_mask, xla_attention

Strategy = Literal["ring", "all_gather"]
Kernel = Literal["xla", "splash"]

AXIS = "context"


def choose(impl: str, backend: str, local_len: int) -> tuple[Strategy, Kernel]:
    """(strategy, kernel) for the model's attention impl on `backend` with `local_len` tokens per device.

    TPU: all-gather + splash when the local length fits its 128-token blocks. Elsewhere (and for
    cudnn, whose packed layout cannot express a query block against a gathered row) the XLA ring.
    """
    if impl == "splash" or (impl == "auto" and backend == "tpu"):
        if local_len % 128 == 0:
            return "all_gather", "splash"
        if impl == "splash":
            raise ValueError(
                f"splash context-parallel attention needs seq_len / context divisible by 128, got {local_len}"
            )
    return "ring", "xla"


def context_attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *, mesh,
                      causal: bool = True, scale: float | None = None, strategy: Strategy = "ring",
                      kernel: Kernel = "xla", interpret: bool = False) -> jax.Array:
    """Attention [batch, seq, heads, head_dim] of sequence-sharded q/k/v (shapes as attention.attention).

    `mesh` must have a `context` axis; q_len must equal kv_len (self-attention over whole rows).
    """
    if AXIS not in mesh.axis_names:
        raise ValueError(f"context_attention needs a mesh with a {AXIS!r} axis, got axes {mesh.axis_names}")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"context-parallel attention is self-attention: q_len {q.shape[1]} != kv_len {k.shape[1]}")
    n = int(mesh.shape[AXIS])
    if q.shape[1] % n:
        raise ValueError(f"seq_len {q.shape[1]} is not divisible by the context axis ({n})")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_spec = shd.mesh_spec(("act_batch", "act_seq", "act_heads", "act_head_dim"), mesh)
    kv_spec = shd.mesh_spec(("act_batch", "act_seq", "act_kv_heads", "act_head_dim"), mesh)
    ids_spec = shd.mesh_spec(("act_batch", "act_seq"), mesh)
    if q_spec[1] != AXIS:
        raise ValueError(f"the act_seq rule must map to {AXIS!r} alone on a context mesh, got {q_spec[1]!r}")
    kv_spec, kv_slice = kernels.kv_head_layout(k.shape[2], q_spec, kv_spec, mesh)
    local = functools.partial(
        _local, n=n, causal=causal, scale=scale, strategy=strategy, kernel=kernel, kv_slice=kv_slice
    )
    args = (q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    specs = (q_spec, kv_spec, kv_spec, ids_spec, ids_spec, ids_spec, ids_spec)
    if kernel == "splash":
        heads = q.shape[2] // shd.axes_size(mesh, q_spec[2])
        splash = kernels.splash_kernel(heads, q.shape[1], causal, interpret, shards=n)
        kernel_spec = splash.manual_sharding_spec(
            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, AXIS))
        )
        args, specs = (*args, splash), (*specs, kernel_spec)
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)


def _local(q, k, v, qs, ks, qp, kp, splash=None, *, n, causal, scale, strategy, kernel, kv_slice):
    """One device's block: q [b, S/c, hq, d] and its k/v [b, S/c, hkv, d] (ids [b, S/c])."""
    k, v = kernels.slice_kv_heads(k, v, kv_slice)
    if strategy == "ring":
        if kernel != "xla":
            raise ValueError(f"the ring strategy runs the XLA kernel, got kernel={kernel!r}")
        return _ring(q, k, v, qs, ks, qp, kp, n=n, causal=causal, scale=scale)
    if strategy != "all_gather":
        raise ValueError(f"unknown context-parallel strategy {strategy!r}; use ring or all_gather")
    gather = functools.partial(jax.lax.all_gather, axis_name=AXIS, axis=1, tiled=True)
    k, v, ks, kp = gather(k), gather(v), gather(ks), gather(kp)
    if kernel == "xla":
        return xla_attention(q, k, v, qs, ks, qp, kp, causal, scale)
    if kernel == "splash":
        return kernels.splash_local(splash, q, k, v, qs, ks, scale)
    raise ValueError(f"unknown context-parallel kernel {kernel!r}; use xla or splash")


# ---------------------------------------------------------------------------------------------
# Ring


def _block_stats(stats, q, k, v, qs, ks, qp, kp, *, causal, scale):
    """Folds one k/v block into the online-softmax state (m, l, acc) of the local queries."""
    m, l, acc = stats
    b, s, nq, d = q.shape
    nkv = k.shape[2]
    qg = q.reshape(b, s, nkv, nq // nkv, d)
    logits = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32) * scale
    mask = make_mask(qs, ks, qp, kp, causal)
    logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
    # A block with no visible key leaves m at the mask value and adds junk weighted exp(0); the
    # first visible key (every query sees itself) rescales that junk by exp(mask - real) = 0.
    correction = jnp.exp(m - m_new)
    p = jnp.exp(logits - m_new[..., None])
    l = l * correction + jnp.sum(p, axis=-1)
    pv = jnp.einsum("bkgst,btkd->bkgsd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l, acc * correction[..., None] + pv


def _ring(q, k, v, qs, ks, qp, kp, *, n, causal, scale):
    b, s, nq, d = q.shape
    nkv = k.shape[2]
    g = nq // nkv
    stats = (
        jnp.full((b, nkv, g, s), MASK_VALUE, jnp.float32),
        jnp.zeros((b, nkv, g, s), jnp.float32),
        jnp.zeros((b, nkv, g, s, d), jnp.float32),
    )
    # Rematerialise each block in the backward pass: only (m, l, acc) and the k/v block are saved
    # per step, never the [s, s] logits.
    fold = jax.checkpoint(functools.partial(_block_stats, causal=causal, scale=scale))
    perm = [(i, (i + 1) % n) for i in range(n)]

    def step(carry, _):
        stats, block = carry
        stats = fold(stats, q, *block[:2], qs, block[2], qp, block[3])
        block = tuple(jax.lax.ppermute(x, AXIS, perm) for x in block)
        return (stats, block), None

    (stats, block), _ = jax.lax.scan(step, (stats, (k, v, ks, kp)), None, length=n - 1)
    m, l, acc = fold(stats, q, *block[:2], qs, block[2], qp, block[3])
    out = acc / l[..., None]  # [b, nkv, g, s, d]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, s, nq, d).astype(q.dtype)


__all__ = ["context_attention", "choose", "AXIS"]
