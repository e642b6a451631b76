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
import numpy as np

from lt_jax.model import sharding as shd

Strategy = Literal["ring", "all_gather"]
Kernel = Literal["xla", "splash"]

AXIS = "context"
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # as attention.py: finite, so no NaN


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
    kv_spec, kv_slice = _kv_head_layout(k.shape[2], q_spec, kv_spec, mesh)
    local = functools.partial(
        _local, n=n, causal=causal, scale=scale, strategy=strategy, kernel=kernel, kv_slice=kv_slice
    )
    args = (q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    specs = (q_spec, kv_spec, kv_spec, ids_spec, ids_spec, ids_spec, ids_spec)
    if kernel == "splash":
        splash = _splash_kernel(q.shape[2] // _axes_size(mesh, q_spec[2]), q.shape[1], n, causal, interpret)
        kernel_spec = splash.manual_sharding_spec(
            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, AXIS))
        )
        args, specs = (*args, splash), (*specs, kernel_spec)
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)


def _axes_size(mesh, axes) -> int:
    if axes is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))


def _kv_head_layout(num_kv_heads: int, q_spec, kv_spec, mesh):
    """(kv spec, kv_slice): when kv heads do not divide over the head axis (4 kv heads, tensor 8),
    k/v stay replicated over it and each device slices the one kv head its q heads read."""
    head_axes = q_spec[2]
    shards = _axes_size(mesh, head_axes)
    if num_kv_heads % shards == 0:
        return kv_spec, None
    if shards % num_kv_heads:
        raise ValueError(f"num_kv_heads {num_kv_heads} and the {head_axes} axis ({shards}) must divide one another")
    spec = jax.sharding.PartitionSpec(kv_spec[0], kv_spec[1], None, kv_spec[3])
    return spec, (head_axes, shards // num_kv_heads)


def _local(q, k, v, qs, ks, qp, kp, splash=None, *, n, causal, scale, strategy, kernel, kv_slice):
    """One device's block: q [b, S/c, hq, d] and its k/v [b, S/c, hkv, d] (ids [b, S/c])."""
    if kv_slice is not None:
        axes, shards_per_kv = kv_slice
        idx = jax.lax.axis_index(axes) // shards_per_kv
        k = jax.lax.dynamic_slice_in_dim(k, idx, 1, axis=2)
        v = jax.lax.dynamic_slice_in_dim(v, idx, 1, axis=2)
    if strategy == "ring":
        if kernel != "xla":
            raise ValueError(f"the ring strategy runs the XLA kernel, got kernel={kernel!r}")
        return _ring(q, k, v, qs, ks, qp, kp, n=n, causal=causal, scale=scale)
    if strategy != "all_gather":
        raise ValueError(f"unknown context-parallel strategy {strategy!r}; use ring or all_gather")
    gather = functools.partial(jax.lax.all_gather, axis_name=AXIS, axis=1, tiled=True)
    k, v, ks, kp = gather(k), gather(v), gather(ks), gather(kp)
    if kernel == "xla":
        from lt_jax.model.attention import xla_attention

        return xla_attention(q, k, v, qs, ks, qp, kp, causal, scale)
    if kernel == "splash":
        return _splash_local(splash, q, k, v, qs, ks, scale)
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
    mask = qs[:, :, None] == ks[:, None, :]
    if causal:
        mask &= kp[:, None, :] <= qp[:, :, None]
    logits = jnp.where(mask[:, None, None], logits, _MASK_VALUE)
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
        jnp.full((b, nkv, g, s), _MASK_VALUE, jnp.float32),
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


# ---------------------------------------------------------------------------------------------
# All-gather + splash (TPU)


@functools.lru_cache(maxsize=16)
def _splash_kernel(num_heads: int, seq_len: int, shards: int, causal: bool, interpret: bool):
    """Splash over the whole row, built for `shards` query shards (one per context device)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    one = sm.CausalMask((seq_len, seq_len)) if causal else sm.FullMask((seq_len, seq_len))
    block = min(512, seq_len // shards)
    sizes = sk.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )
    return sk.make_splash_mha(
        sm.MultiHeadMask([one] * num_heads), block_sizes=sizes, head_shards=1, q_seq_shards=shards,
        interpret=interpret,
    )


def _splash_local(kernel, q, k, v, qs, ks, scale):
    """Local queries [b, S/c, hq, d] against the gathered row k/v [b, S, hkv, d]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    def one(q1, k1, v1, s1, t1):
        out = kernel((q1 * scale).swapaxes(0, 1), k1.swapaxes(0, 1), v1.swapaxes(0, 1),
                     segment_ids=sk.SegmentIds(q=s1, kv=t1))
        return out.swapaxes(0, 1)

    return jax.vmap(one)(q, k, v, qs, ks).astype(q.dtype)


__all__ = ["context_attention", "choose", "AXIS"]
