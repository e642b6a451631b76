"""Presence, frequency and repetition penalties in the engine: per-slot token counts on the device.

Definitions (those of vLLM / OpenAI / Hugging Face; see lt_jax.sampling.SamplingParams), applied to
the raw logits before temperature, min_p, top-k and top-p, in vLLM's order:

    repetition r:  a token seen in the prompt or the output so far: logit / r if logit > 0 else logit * r
    frequency f, presence p:  logit[t] -= f * c[t] + p * (c[t] > 0),  c[t] = times t was generated

The engine's slot counts stay on the device between decode calls (`SlotCounts`): each decode call
adds the tokens it draws, and the host rebuilds and uploads only the rows whose sample changed (a
freshly admitted or resumed sample), not [slots, vocab] every call. The first-token draw at
admission builds its few rows on the host (`build`). Nothing is built or traced when no running
sample sets a penalty (`None`: one compile each way).
Logprobs stay those of the unpenalised distribution (vLLM's default "raw" logprobs).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
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


def _scalars(seqs: Sequence[Optional[object]], rows: int):
    presence, frequency = np.zeros(rows, np.float32), np.zeros(rows, np.float32)
    repetition = np.ones(rows, np.float32)
    for i, s in enumerate(seqs):
        if s is not None and penalized(s.spec):
            presence[i], frequency[i], repetition[i] = (s.spec.presence_penalty, s.spec.frequency_penalty,
                                                        s.spec.repetition_penalty)
    return presence, frequency, repetition


def _row_counts(seq, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """One sample's output-token counts [V] and seen mask [V] (prompt or output)."""
    counts = np.bincount(np.asarray(seq.result.tokens, np.int64), minlength=vocab)[:vocab].astype(np.int32)
    seen = counts > 0
    seen[np.asarray(seq.prompt, np.int64)] = True
    return counts, seen


def build(seqs: Sequence[Optional[object]], rows: int, vocab: int) -> Optional[Penalties]:
    """Host arrays for `rows` rows from engine sequences (None: an empty row); None when no
    sequence sets a penalty."""
    if not any(s is not None and penalized(s.spec) for s in seqs):
        return None
    counts, seen = np.zeros((rows, vocab), np.int32), np.zeros((rows, vocab), bool)
    for i, s in enumerate(seqs):
        if s is not None and penalized(s.spec):
            counts[i], seen[i] = _row_counts(s, vocab)
    return Penalties(*_scalars(seqs, rows), counts, seen)


class SlotCounts:
    """The engine slots' counts, kept on the device between decode calls.

    `for_call` gives a decode call its penalties: the device rows as the previous call left them,
    with the rows whose sample is not the one (at the token count) they were synced for rebuilt on
    the host and scattered in. `after_call` keeps the call's updated rows."""

    def __init__(self, rows: int, vocab: int):
        self.rows, self.vocab = rows, vocab
        self.counts = self.seen = None  # [rows, vocab] on device, or None (no penalised sample runs)
        self.synced: list = [None] * rows  # per row: (sample, tokens counted) the device row holds
        self.uploaded_rows = 0  # rows rebuilt on the host (stats)

    def for_call(self, seqs: Sequence[Optional[object]]) -> Optional[Penalties]:
        if not any(s is not None and penalized(s.spec) for s in seqs):
            self.counts = self.seen = None
            return None
        stale = [i for i, s in enumerate(seqs) if s is not None and penalized(s.spec) and not self._holds(i, s)]
        if self.counts is None:
            full = build(seqs, self.rows, self.vocab)
            self.counts, self.seen = full.counts, full.seen  # host arrays: uploaded by the call
            self.uploaded_rows += len(stale)
        elif stale:
            idx = stale + stale[-1:] * ((1 << (len(stale) - 1).bit_length()) - len(stale))  # few compiles
            counts, seen = zip(*(_row_counts(seqs[i], self.vocab) for i in idx))
            self.counts, self.seen = _set_rows(self.counts, self.seen, np.asarray(idx, np.int32),
                                               np.stack(counts), np.stack(seen))
            self.uploaded_rows += len(stale)
        return Penalties(*_scalars(seqs, self.rows), self.counts, self.seen)

    def _holds(self, row: int, seq) -> bool:
        synced = self.synced[row]
        return synced is not None and synced[0] is seq and synced[1] == len(seq.result.tokens)

    def after_call(self, pen: Optional[Penalties], seqs: Sequence[Optional[object]]) -> None:
        """The call's counts (its drawn tokens added); `seqs`: the slots once its tokens were taken."""
        if pen is None:
            return
        self.counts, self.seen = pen.counts, pen.seen
        self.synced = [None if s is None else (s, len(s.result.tokens)) for s in seqs]


@jax.jit
def _set_rows(counts, seen, idx, new_counts, new_seen):
    return counts.at[idx].set(new_counts), seen.at[idx].set(new_seen)


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
