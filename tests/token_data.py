"""Tokenized test data: records of the synthetic task (one character per token) or random tokens,
written as real token shards with a manifest, so loaders read them as `lt-jax tokenize` output.

Shared by tests/data (loader, packing) and tests/train; the loss mask is 1 on the response.
"""

from __future__ import annotations

import json

import types

import numpy as np
import pytest

from lt_jax.data import shards as shards_lib
from lt_jax.data import synthetic

VOCAB = 128


def encode(text: str) -> np.ndarray:
    return np.array([min(ord(c), VOCAB - 1) for c in text], dtype=np.int32)


def synthetic_records(n: int, seed: int = 0, levels=(2,), split: str = "train") -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, loss_mask) of `n` synthetic problems with correct step-by-step answers."""
    cfg = synthetic.SyntheticConfig(num_problems=n, num_heldout=n, levels=levels, wrong_rate=(0.0,) * len(levels),
                                    seed=seed, prompt_template="{problem}")
    out = []
    for problem in synthetic.make_problems(cfg, split)[:n]:
        rec = synthetic.response_record(cfg, problem, 0)
        prompt, response = encode(rec["prompt"] + "\n"), encode(rec["response"] + "\x03")
        out.append((np.concatenate([prompt, response]),
                    np.concatenate([np.zeros(len(prompt), np.uint8), np.ones(len(response), np.uint8)])))
    return out


def random_records(n: int, seed: int = 0, low: int = 8, high: int = 60) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n` records of random tokens, lengths in [low, high), loss mask 0 on a random prompt prefix."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(low, high))
        prompt = int(rng.integers(1, max(2, length // 2)))
        mask = np.r_[np.zeros(prompt), np.ones(length - prompt)].astype(np.uint8)
        out.append((rng.integers(1, VOCAB, length).astype(np.int32), mask))
    return out


def write_tokenized(out: str, records, per_shard: int = 50) -> str:
    """A tokenized folder (shards + markers + manifest) holding `records`, local or gs://."""
    from lt_jax import storage

    shards = []
    for i, start in enumerate(range(0, len(records), per_shard)):
        chunk = records[start : start + per_shard]
        shards_lib.write_shard(shards_lib.shard_dir(out, i), [r[0] for r in chunk], [r[1] for r in chunk])
        spec = {"name": shards_lib.shard_name(i), "records": len(chunk), "tokens": int(sum(len(r[0]) for r in chunk)),
                "loss_tokens": int(sum(r[1].sum() for r in chunk))}
        shards_lib.write_marker(out, i, spec)
        shards.append(spec)
    manifest = {"format": shards_lib.FORMAT, "num_records": len(records), "shards": shards,
                "tokenizer": {"vocab_size": VOCAB}}
    storage.write_text(storage.join(out, "manifest.json"), json.dumps(manifest))
    return out


@pytest.fixture(scope="session")
def random_data(tmp_path_factory):
    """A local tokenized folder of 150 short random records (lengths 8-59) in 3 shards, and their arrays."""
    records = random_records(150, seed=7)
    path = write_tokenized(str(tmp_path_factory.mktemp("random_data") / "tok"), records)
    return types.SimpleNamespace(path=path, records=records)
