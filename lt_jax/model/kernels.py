"""Attention kernels and masks shared by single-device and context-parallel attention.

A leaf under `lt_jax.model.attention` (which dispatches) and `lt_jax.model.context_parallel`
(which shards over the sequence): the mask value, the visibility mask, the XLA reference kernel,
the splash kernel builder and its per-device runner, and the kv-head layout used when kv heads do
not divide over the head-sharding axis. It imports nothing above `lt_jax.model.sharding`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from lt_jax.model import sharding as shd

# Finite, so a fully masked row gives a uniform softmax rather than NaN (padding rows).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def make_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal: bool) -> jax.Array:
    """Boolean [batch, q_len, kv_len]: True where the query may attend to the key."""
    mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if causal:
        mask &= kv_positions[:, None, :] <= q_positions[:, :, None]
    return mask


# Causal self-attention over a row runs query block by query block, each block against only the
# keys up to its own end: with 8 blocks the logits, mask, softmax and their gradients shrink to
# 9/16 of the [S, S] square, and each block's tiles are small enough to stay in cache. Measured
# fwd+bwd of one attention on one CPU core (b x s = 8 x 512, 4/2 heads of 16): 103 ms unchunked,
# 41 ms with 8 blocks of 64, 52 ms with 16 blocks of 32, 57 ms with 4 blocks of 128.
QUERY_BLOCKS = 8
MIN_QUERY_BLOCK = 32


def query_block(q_len: int, kv_len: int, causal: bool) -> int:
    """The query block `xla_attention` uses (q_len when it runs unchunked: decode steps, queries
    against a longer KV cache, non-causal attention, rows too short to gain)."""
    block = max(MIN_QUERY_BLOCK, q_len // QUERY_BLOCKS)
    if not causal or q_len != kv_len or q_len < 2 * block or q_len % block:
        return q_len
    return block


def xla_attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal, scale):
    """Reference attention: logits and softmax in fp32, products in the input dtype (as HF eager).

    Causal self-attention (q and k/v the same row, as in training and a prefill from an empty
    cache) runs in query blocks (`query_block`), each against the keys up to its end. That skips
    only keys after the query in the row, which causal masking hides whenever positions rise along
    each segment, as in packed rows and prompts; only padding (segment 0) queries, whose outputs no
    loss or token reads, may then see fewer keys.
    """
    s, t = q.shape[1], k.shape[1]
    block = query_block(s, t, causal)
    if block == s:
        return _attend(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal, scale)
    outs = [
        _attend(q[:, i:i + block], k[:, :i + block], v[:, :i + block], q_segment_ids[:, i:i + block],
                kv_segment_ids[:, :i + block], q_positions[:, i:i + block], kv_positions[:, :i + block],
                causal, scale)
        for i in range(0, s, block)
    ]
    return jnp.concatenate(outs, axis=1)


def _attend(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal, scale):
    """All queries against all keys.

    GQA without repeating k/v: the g = Nq/Nkv query heads that share a kv head are stacked along
    the query axis, so both products are batched matmuls over (batch, kv head) with
    [g*S, D] x [T, D]^T and [g*S, T] x [T, D]. Only q (and the output) move heads ahead of the
    sequence; k and v are read in place, so a decode step never copies the KV cache. With the g
    heads interleaved in the [S, T] products instead, XLA:CPU transposed the logits and their
    gradients, about 1.3x slower fwd+bwd.
    """
    b, s, nq, d = q.shape
    t, nkv = k.shape[1], k.shape[2]
    g = nq // nkv
    qh = q.reshape(b, s, nkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, nkv, g * s, d)
    logits = jnp.einsum("bkqd,btkd->bkqt", qh, k, preferred_element_type=jnp.float32) * scale
    mask = make_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal)
    # The mask is broadcast to the stacked layout rather than the logits reshaped to [b, k, g, s, t]:
    # one shape for the softmax output means backprop keeps one copy of it, not two.
    mask = jnp.broadcast_to(mask[:, None, None], (b, 1, g, s, t)).reshape(b, 1, g * s, t)
    probs = jax.nn.softmax(jnp.where(mask, logits, MASK_VALUE), axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqt,btkd->bkqd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, nkv, g, s, d).transpose(0, 3, 1, 2, 4).reshape(b, s, nq, d).astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# kv heads under head sharding


def kv_head_layout(num_kv_heads: int, q_spec, kv_spec, mesh):
    """(kv spec, kv_slice): when kv heads do not divide over the head axis (4 kv heads, tensor 8),
    k/v stay replicated over it and each device slices the one kv head its q heads read."""
    head_axes = q_spec[2]
    shards = shd.axes_size(mesh, head_axes)
    if num_kv_heads % shards == 0:
        return kv_spec, None
    if shards % num_kv_heads:
        raise ValueError(f"num_kv_heads {num_kv_heads} and the {head_axes} axis ({shards}) must divide one another")
    spec = jax.sharding.PartitionSpec(kv_spec[0], kv_spec[1], None, kv_spec[3])
    return spec, (head_axes, shards // num_kv_heads)


def slice_kv_heads(k, v, kv_slice):
    """Inside shard_map: the kv head this device's q heads read (`kv_slice` from kv_head_layout)."""
    if kv_slice is None:
        return k, v
    axes, shards_per_kv = kv_slice
    idx = jax.lax.axis_index(axes) // shards_per_kv
    return (jax.lax.dynamic_slice_in_dim(k, idx, 1, axis=2), jax.lax.dynamic_slice_in_dim(v, idx, 1, axis=2))


# ---------------------------------------------------------------------------------------------
# Splash (TPU Pallas)


@functools.lru_cache(maxsize=32)
def splash_kernel(num_heads: int, seq_len: int, causal: bool, interpret: bool, shards: int = 1):
    """Splash over a row of `seq_len`, built for `shards` query shards (1 unless context-parallel)."""
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


def splash_local(kernel, q, k, v, q_segment_ids, kv_segment_ids, scale):
    """One device's queries [b, s, hq, d] against k/v [b, t, hkv, d] through a `splash_kernel`."""
    def one(q1, k1, v1, s1, t1):
        out = kernel((q1 * scale).swapaxes(0, 1), k1.swapaxes(0, 1), v1.swapaxes(0, 1),
                     segment_ids=sk.SegmentIds(q=s1, kv=t1))
        return out.swapaxes(0, 1)

    return jax.vmap(one)(q, k, v, q_segment_ids, kv_segment_ids).astype(q.dtype)
