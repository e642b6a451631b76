"""The shard format: zarr3 arrays through TensorStore, locally and on the GCS emulator, and commit markers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lt_jax import storage
from lt_jax.data import shards


def random_records(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 3000, n)
    ids = [rng.integers(0, 152_000, k).astype(np.int32) for k in lengths]
    masks = [(rng.random(k) < 0.7).astype(np.uint8) for k in lengths]
    return ids, masks


def check_round_trip(path: str, ids: list, masks: list) -> None:
    (offsets,) = shards.read_offsets([path])
    ((tokens, loss_mask),) = shards.open_arrays([path])
    lengths = np.array([len(x) for x in ids])
    assert offsets.tolist() == [0] + np.cumsum(lengths).tolist()
    assert tokens.dtype.numpy_dtype == np.int32 and loss_mask.dtype.numpy_dtype == np.uint8
    pick = [3, 0, 7, 7, len(ids) - 1]
    spans = [(5, int(offsets[r]), int(offsets[r + 1])) for r in pick]
    spans.append((5, int(offsets[2]), int(offsets[5])))  # three records as one span
    got = shards.read_spans({5: (tokens, loss_mask)}, spans)
    for (tok, mask), r in zip(got, pick):
        np.testing.assert_array_equal(tok, ids[r])
        np.testing.assert_array_equal(mask, masks[r])
    np.testing.assert_array_equal(got[-1][0], np.concatenate(ids[2:5]))


def test_local_round_trip_spans_chunk_boundaries(tmp_path):
    ids, masks = random_records(40)
    path = str(tmp_path / "shard-00000")
    # Small inner chunks so that records straddle chunk and storage-object boundaries.
    shards.write_shard(path, ids, masks, inner_chunk=512)
    check_round_trip(path, ids, masks)
    meta = json.load(open(os.path.join(path, "tokens", "zarr.json")))
    assert meta["data_type"] == "int32" and meta["codecs"][0]["name"] == "sharding_indexed"
    # Rewriting replaces what was there (a resumed shard after a crash).
    ids2, masks2 = random_records(8, seed=1)
    shards.write_shard(path, ids2, masks2, inner_chunk=512)
    check_round_trip(path, ids2, masks2)


def test_gcs_round_trip(gcs_bucket):
    ids, masks = random_records(30, seed=2)
    path = storage.join(gcs_bucket, "tok", "shards", "shard-00003")
    shards.write_shard(path, ids, masks, inner_chunk=1024)
    assert storage.exists(storage.join(path, "tokens", "zarr.json"))
    check_round_trip(path, ids, masks)


def test_empty_shard(tmp_path):
    path = str(tmp_path / "empty")
    shards.write_shard(path, [], [])
    assert [o.tolist() for o in shards.read_offsets([path])] == [[0]]
    assert shards.open_arrays([path])[0][0].shape == (0,)


def test_mismatched_rows_are_refused(tmp_path):
    ids, masks = random_records(3)
    with pytest.raises(ValueError, match="differs in length"):
        shards.write_shard(str(tmp_path / "x"), ids, masks[:2] + [masks[2][:-1]])
    with pytest.raises(ValueError, match="token rows"):
        shards.write_shard(str(tmp_path / "x"), ids, masks[:2])


@pytest.mark.parametrize("remote", [False, True], ids=["local", "gcs"])
def test_markers_commit_and_listing(tmp_path, request, remote):
    out = request.getfixturevalue("gcs_bucket") + "/run" if remote else str(tmp_path / "run")
    assert shards.committed_shards(out) == set()
    assert shards.read_marker(out, 0) is None
    shards.write_marker(out, 0, {"records": 3})
    shards.write_marker(out, 12, {"records": 1})
    storage.write_text(shards.marker_path(out, 4), '{"records": ')  # torn marker
    storage.write_text(storage.join(out, "shards", "notes.json"), "{}")
    assert shards.committed_shards(out) == {0, 4, 12}
    assert shards.read_marker(out, 0) == {"records": 3}
    assert shards.read_marker(out, 4) is None  # unreadable counts as not committed
    if not remote:
        assert not [n for n in os.listdir(os.path.join(out, "shards")) if ".tmp-" in n]


def test_kvstore_specs(tmp_path):
    assert shards.kvstore("gs://b/p/q") == {"driver": "gcs", "bucket": "b", "path": "p/q/"}
    assert shards.kvstore(str(tmp_path)) == {"driver": "file", "path": str(tmp_path) + "/"}
    with pytest.raises(ValueError, match="only local paths and gs://"):
        shards.kvstore("s3://bucket/x")
