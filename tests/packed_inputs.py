"""Random attention inputs in packed-row layout, shared by the attention and context-parallel tests."""

from __future__ import annotations

import numpy as np


def packed_qkv(batch: int, seq: int, heads: int, kv_heads: int, dim: int, seed: int = 0, pad_per_row: int = 3):
    """q/k/v plus rows holding several documents and trailing padding (segment 0).

    Row b holds b+1 documents (fewer if too short) and ends with pad_per_row * b padding tokens;
    positions restart at 0 in every document.
    """
    rng = np.random.RandomState(seed)
    q = rng.randn(batch, seq, heads, dim).astype(np.float32)
    k = rng.randn(batch, seq, kv_heads, dim).astype(np.float32)
    v = rng.randn(batch, seq, kv_heads, dim).astype(np.float32)
    seg = np.zeros((batch, seq), np.int32)
    pos = np.zeros((batch, seq), np.int32)
    for b in range(batch):
        end = seq - pad_per_row * b
        cuts = sorted(rng.choice(np.arange(1, end), size=min(b + 1, end - 1), replace=False))
        bounds = [0, *cuts, end]
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg[b, lo:hi] = i + 1
            pos[b, lo:hi] = np.arange(hi - lo)
    return q, k, v, seg, pos
