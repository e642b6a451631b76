"""Next-token cross-entropy on packed rows: pure functions of arrays.

Targets: position t predicts token t+1 when token t+1 is in the same segment as t and its loss mask
is 1 (the tokenizer sets the mask on what the assistant writes). So no target crosses a segment
boundary or lands on padding, and a row's last position predicts nothing.

Normalisation: the trainer divides the summed loss by the number of target tokens in the whole
global batch (all micro-batches, all processes), computed once before the forward pass. Every
token then weighs the same whatever the accumulation, sharding or packing, and accumulated
micro-batches add up to exactly the full-batch loss.

Precision: logits are fp32 (the model's LM head accumulates in fp32) and log-softmax runs in fp32.

Memory: full logits are [B, S, V] fp32, 4.6 GiB per 32k-token row at Qwen2.5's 152k vocab, and
backprop keeps them. `chunked_loss_sums` instead runs the LM head over `chunk` positions at a time
inside a rematerialised scan: the forward keeps only per-chunk sums, and the backward recomputes
one chunk's logits at a time, so peak memory is [B, chunk, V] fp32 whatever the sequence length.
The price is one extra LM-head matmul in the backward pass (about 2 * H * V FLOPs per token).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def shift_targets(input_ids: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(targets, weights) [B, S]: targets[t] = input_ids[t+1]; weights[t] in {0, 1} as float32."""
    pad = lambda x: jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)  # noqa: E731
    targets = pad(input_ids)
    next_mask, next_seg = pad(loss_mask), pad(segment_ids)
    weights = (next_mask > 0) & (next_seg == segment_ids) & (segment_ids > 0)
    return targets, weights.astype(jnp.float32)


def token_nll(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(negative log-likelihood, log-partition) per position, both fp32 [B, S]."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - picked, lse


def loss_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted NLL, sum of weighted log(Z)^2) over all positions, fp32 scalars."""
    nll, lse = token_nll(logits, targets)
    return jnp.sum(nll * weights), jnp.sum(jnp.square(lse) * weights)


def chunked_loss_sums(
    hidden: jax.Array,
    head: Callable[[jax.Array], jax.Array],
    targets: jax.Array,
    weights: jax.Array,
    chunk: int,
) -> tuple[jax.Array, jax.Array]:
    """`loss_sums(head(hidden), ...)` computed `chunk` positions at a time (see module doc).

    hidden [B, S, H]; `head` maps [B, c, H] to fp32 logits [B, c, V]; S must divide by `chunk`.
    """
    b, s, h = hidden.shape
    if s % chunk:
        raise ValueError(f"sequence length {s} is not a multiple of train.lm_head_chunk {chunk}")
    n = s // chunk
    to_chunks = lambda x: jnp.swapaxes(x.reshape(b, n, chunk, *x.shape[2:]), 0, 1)  # noqa: E731

    @jax.checkpoint
    def one(xs):
        hc, tc, wc = xs
        return loss_sums(head(hc), tc, wc)

    def body(carry, xs):
        nll, z = one(xs)
        return (carry[0] + nll, carry[1] + z), None

    zero = jnp.zeros((), jnp.float32)
    (nll, z), _ = jax.lax.scan(body, (zero, zero), (to_chunks(hidden), to_chunks(targets), to_chunks(weights)))
    return nll, z


__all__ = ["shift_targets", "token_nll", "loss_sums", "chunked_loss_sums"]
