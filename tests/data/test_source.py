"""The Grain source over tokenized folders: local and gs://, batched reads, lengths, worker processes."""

from __future__ import annotations

import json
import os
import pickle

import grain
import numpy as np
import pytest
from transformers import AutoTokenizer

from lt_jax import storage
from lt_jax.data import shards as shards_lib
from lt_jax.data import source as source_lib
from lt_jax.data import tokenize as tk
from lt_jax.data.source import TokenizedSource


def conversations(n: int) -> list[dict]:
    out = []
    for i in range(n):
        steps = " ".join(f"{i} times {k} is {i * k}." for k in range(2 + (i * 13) % 50))
        msgs = [{"role": "user", "content": f"Compute {i} squared."},
                {"role": "assistant", "content": f"<think>\n{steps}\n</think>\n\n\\boxed{{{i * i}}}"}]
        if i % 3 == 0:
            msgs += [{"role": "user", "content": "And cubed?"}, {"role": "assistant", "content": f"\\boxed{{{i ** 3}}}"}]
        out.append({"id": f"c{i}", "messages": msgs})
    return out


def write_jsonl(path: str, records: list[dict]) -> str:
    storage.write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def local_out(tmp_path_factory, qwen_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("src")
    path = write_jsonl(str(tmp / "sft.jsonl"), conversations(23))
    cfg = tk.TokenizeConfig(inputs=(path,), tokenizer=qwen_tokenizer_dir, out=str(tmp / "out"), records_per_shard=5, workers=1)
    tk.tokenize(cfg, progress=False)
    return cfg.out


def test_records_equal_the_tokenizers_own_encoding(local_out, qwen_tokenizer_dir):
    src = TokenizedSource(local_out)
    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    assert len(src) == 23 and len(src.manifest["shards"]) == 5
    for i, rec in enumerate(conversations(23)):
        got = src[i]
        text = tok.apply_chat_template(rec["messages"], tokenize=False)
        assert got["input_ids"].dtype == np.int32 and got["loss_mask"].dtype == np.uint8
        assert got["input_ids"].tolist() == tok(text, add_special_tokens=False)["input_ids"]
        expected = tok.apply_chat_template(rec["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert got["loss_mask"].tolist() == expected["assistant_masks"]
    assert src.lengths.tolist() == [len(src[i]["input_ids"]) for i in range(len(src))]


def test_read_batch_groups_reads_by_shard(local_out, monkeypatch):
    src = TokenizedSource(local_out)
    singles = [src[i] for i in range(len(src))]
    calls = []
    real = shards_lib.read_spans

    def spy(opened, spans):
        calls.append(list(spans))
        return real(opened, spans)

    monkeypatch.setattr(shards_lib, "read_spans", spy)
    fresh = TokenizedSource(local_out)
    fresh.read_batch([8])
    assert sorted(fresh._arrays) == [1]  # only the shards read from are opened
    calls.clear()
    order = [7, 6, 5, 0, 22, 6, 1, 12]
    batch = src.read_batch(order)
    for i, got in zip(order, batch):
        np.testing.assert_array_equal(got["input_ids"], singles[i]["input_ids"])
        np.testing.assert_array_equal(got["loss_mask"], singles[i]["loss_mask"])
    # One batched call; records 5-7 (shard 1) and 0-1 (shard 0) are one span each.
    assert len(calls) == 1
    offsets = src._offsets
    assert calls[0] == [
        (0, 0, int(offsets[0][2])), (1, 0, int(offsets[1][3])), (2, int(offsets[2][2]), int(offsets[2][3])),
        (4, int(offsets[4][2]), int(offsets[4][3])),
    ]
    # grain's batched-read protocol (MapDataset._getitems) reaches the same path: one more call, not two.
    got = grain.MapDataset.source(src)._getitems([3, 4])
    assert len(calls) == 2
    assert [g["input_ids"].tolist() for g in got] == [singles[i]["input_ids"].tolist() for i in (3, 4)]


def test_group_spans():
    spans, span_of = source_lib.group_spans([(1, 4), (0, 2), (1, 3), (0, 2), (0, 9), (1, 5)])
    assert spans == [(0, 2, 3), (0, 9, 10), (1, 3, 6)]
    assert span_of == {(0, 2): 0, (0, 9): 1, (1, 3): 2, (1, 4): 2, (1, 5): 2}


def test_errors_and_pickling(local_out, tmp_path):
    src = TokenizedSource(local_out)
    with pytest.raises(IndexError, match="out of range"):
        src[len(src)]
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        TokenizedSource(str(tmp_path))
    clone = pickle.loads(pickle.dumps(src))
    assert clone._arrays == {} and len(clone) == len(src)
    np.testing.assert_array_equal(clone[17]["input_ids"], src[17]["input_ids"])


def test_gcs_end_to_end_with_grain_workers(gcs_bucket, local_out, qwen_tokenizer_dir):
    """Input, tokenizer and output all on gs://, read back in grain worker processes (spawn)."""
    tok_remote = storage.join(gcs_bucket, "tokenizers", "qwen2.5")
    storage.copy_local_to(qwen_tokenizer_dir, tok_remote)
    path = write_jsonl(storage.join(gcs_bucket, "data", "sft.jsonl"), conversations(23))
    out = storage.join(gcs_bucket, "tokenized")
    cfg = tk.TokenizeConfig(inputs=(path,), tokenizer=tok_remote, out=out, records_per_shard=5, workers=2)
    manifest = tk.tokenize(cfg, progress=False)
    local_manifest = json.loads(storage.read_text(os.path.join(local_out, "manifest.json")))
    assert manifest["shards"] == local_manifest["shards"]
    assert manifest["tokenizer"]["sha256"] == local_manifest["tokenizer"]["sha256"]

    remote, local = TokenizedSource(out), TokenizedSource(local_out)
    assert remote.lengths.tolist() == local.lengths.tolist()
    for a, b in zip(remote.read_batch(range(len(remote))), local.read_batch(range(len(local)))):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["loss_mask"], b["loss_mask"])

    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    sampler = grain.samplers.IndexSampler(len(remote), shuffle=True, seed=3, num_epochs=1)
    loader = grain.DataLoader(data_source=remote, sampler=sampler, worker_count=2)
    seen = [r["input_ids"].tobytes() for r in loader]
    assert sorted(seen) == sorted(local[i]["input_ids"].tobytes() for i in range(len(local)))
