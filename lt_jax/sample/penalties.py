"""Presence, frequency and repetition penalties in the engine: per-slot token counts on the device.

Definitions (those of vLLM / OpenAI / Hugging Face; see lt_jax.sampling.SamplingParams), applied to
the raw logits before temperature, min_p, top-k and top-p, in vLLM's order:

    repetition r:  a token seen in the prompt or the output so far: logit / r if logit > 0 else logit * r
    frequency f, presence p:  logit[t] -= f * c[t] + p * (c[t] > 0),  c[t] = times t was generated

The host builds the counts of the slots of a device call from their tokens (a preempted or freshly
admitted sample starts right); inside a multi-step decode call the device adds each drawn token.
Nothing is built or traced when no running sample sets a penalty (`None`: one compile each way).
Logprobs stay those of the unpenalised distribution (vLLM's default "raw" logprobs).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax.numpy as jnp
import numpy as np


class Penalties(NamedTuple):
    presence: object  # [R] f32
    frequency: object  # [R] f32
    repetition: object  # [R] f32
    counts: object  # [R, V] i32: output tokens so far
    seen: object  # [R, V] bool: in the prompt or the output


def penalized(spec) -> bool:
    return bool(spec.presence_penalty or spec.frequency_penalty or spec.repetition_penalty != 1)


def build(seqs: Sequence[Optional[object]], rows: int, vocab: int) -> Optional[Penalties]:
    """Host arrays for `rows` rows from engine sequences (None: an empty row); None when no
    sequence sets a penalty."""
    if not any(s is not None and penalized(s.spec) for s in seqs):
        return None
    presence, frequency = np.zeros(rows, np.float32), np.zeros(rows, np.float32)
    repetition = np.ones(rows, np.float32)
    counts, seen = np.zeros((rows, vocab), np.int32), np.zeros((rows, vocab), bool)
    for i, s in enumerate(seqs):
        if s is None or not penalized(s.spec):
            continue
        presence[i], frequency[i], repetition[i] = (s.spec.presence_penalty, s.spec.frequency_penalty,
                                                    s.spec.repetition_penalty)
        counts[i] = np.bincount(np.asarray(s.result.tokens, np.int64), minlength=vocab)[:vocab]
        seen[i, np.asarray(s.prompt, np.int64)] = True
        seen[i] |= counts[i] > 0
    return Penalties(presence, frequency, repetition, counts, seen)


def apply(logits, pen: Penalties):
    """Penalised logits [R, V] (float32)."""
    logits = logits.astype(jnp.float32)
    rep = pen.repetition[:, None]
    logits = jnp.where(pen.seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - pen.frequency[:, None] * pen.counts - pen.presence[:, None] * (pen.counts > 0)


def record(pen: Penalties, token, live) -> Penalties:
    """The penalties after each live row drew `token` [R]."""
    rows = jnp.arange(token.shape[0])
    tok = jnp.clip(token, 0, pen.counts.shape[1] - 1)
    counts = pen.counts.at[rows, tok].add(live.astype(jnp.int32))
    seen = pen.seen.at[rows, tok].max(live)
    return pen._replace(counts=counts, seen=seen)
