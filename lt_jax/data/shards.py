"""The on-disk (or gs://) format of tokenized data: shards of zarr v3 arrays written by TensorStore.

Why this format
---------------
A tokenized folder is read by the training loader by random record index, in batches, from a
local disk or straight from a GCS bucket, by many hosts at once. Two candidates were measured
(tools/bench_data.py, numbers in the tokenize report):

* array_record + grain's ArrayRecordDataSource: one serialized blob per record. It reads gs://
  natively but cannot write there (write locally, then upload), every record is one request,
  and knowing the record lengths for packing means either reading every record or keeping a
  second index file.
* zarr v3 through TensorStore (chosen): TensorStore reads *and writes* gs:// natively, so the
  tokenizer streams shards to a bucket with no local staging. Each shard stores its records
  column-wise, the way Levanter's cache does: one flat int32 token array, one flat uint8 loss-mask
  array and one int64 offsets array (record r is ``tokens[offsets[r]:offsets[r+1]]``). Lengths
  come from the offsets alone (a few KB per shard), a run of consecutive records is one range
  read, reads of many records are issued together in a ``ts.Batch`` that TensorStore coalesces
  per object, and any zarr reader (zarr-python, TensorStore in C++) can open the data.
  The token and mask arrays use the ``sharding_indexed`` codec: one storage object per array
  (few objects on GCS, quick uploads) made of independently compressed inner chunks (zstd), so a
  random record costs a byte-range read of the one or two inner chunks that hold it.

Layout::

    OUT/manifest.json                  written last; lists the shards (see tokenize.py)
    OUT/shards/shard-00000/tokens/     zarr3 int32 [num_tokens]
    OUT/shards/shard-00000/loss_mask/  zarr3 uint8 [num_tokens]
    OUT/shards/shard-00000/offsets/    zarr3 int64 [num_records + 1]
    OUT/shards/shard-00000.json        commit marker + shard statistics, written after the arrays

Measured (tools/bench_data.py, 2 busy CPU cores, fake-gcs-server on loopback, random batches of
16 records of ~5k tokens): zarr3 ``read_batch`` 2.6k records/s local and 1.8k records/s from gs://;
array_record through grain 3.9k records/s local and 0.9k records/s from gs://. The local
difference does not matter (either is far above what a train step consumes); the gs:// one and
native gs:// writes do.

A shard counts as written only once its marker exists (a single small object: atomic on GCS, and
written by rename locally), so a run killed mid-shard leaves a folder without a marker that the
next run deletes and rewrites.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

from lt_jax import storage

FORMAT = "lt_jax.tokenized/v1"
SHARDS_DIR = "shards"
TOKENS, LOSS_MASK, OFFSETS = "tokens", "loss_mask", "offsets"
# 16k tokens (64 KiB of int32) per inner chunk: a 4k-32k token record touches 1-3 chunks, and a
# chunk is big enough that GCS latency, not request count, dominates a random read.
DEFAULT_INNER_CHUNK = 16384
# Inner chunks per storage object; 1024 * 16k = 16M tokens, so a typical shard is one object.
_CHUNKS_PER_OBJECT = 1024


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def shard_dir(out: str, index: int) -> str:
    return storage.join(out, SHARDS_DIR, shard_name(index))


def marker_path(out: str, index: int) -> str:
    return storage.join(out, SHARDS_DIR, shard_name(index) + ".json")


def kvstore(path: str) -> dict[str, Any]:
    """TensorStore kvstore spec for a local folder or a gs://bucket/prefix (trailing '/' added)."""
    path = str(path).rstrip("/") + "/"
    if path.startswith("gs://"):
        bucket, _, prefix = path[len("gs://") :].partition("/")
        return {"driver": "gcs", "bucket": bucket, "path": prefix}
    if storage.is_remote(path):
        raise ValueError(f"{path}: only local paths and gs:// are supported for token shards")
    return {"driver": "file", "path": os.path.abspath(path) + "/"}


def _array_spec(path: str, dtype: str, length: int, inner_chunk: int | None) -> dict[str, Any]:
    codecs: list[dict[str, Any]] = [
        {"name": "bytes", "configuration": {"endian": "little"}},
        {"name": "zstd", "configuration": {"level": 3}},
    ]
    chunk = max(length, 1)
    if inner_chunk is not None:
        chunk = inner_chunk * _CHUNKS_PER_OBJECT
        codecs = [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": [inner_chunk],
                    "codecs": codecs,
                    "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                },
            }
        ]
    metadata = {
        "shape": [length],
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk]}},
        "codecs": codecs,
    }
    return {"driver": "zarr3", "kvstore": kvstore(path), "metadata": metadata, "create": True, "delete_existing": True}


def write_shard(
    path: str,
    input_ids: Sequence[np.ndarray],
    loss_masks: Sequence[np.ndarray],
    *,
    inner_chunk: int = DEFAULT_INNER_CHUNK,
) -> None:
    """Writes one shard's three arrays under `path` (local or gs://), replacing what was there."""
    if len(input_ids) != len(loss_masks):
        raise ValueError(f"{path}: {len(input_ids)} token rows but {len(loss_masks)} mask rows")
    lengths = np.array([len(x) for x in input_ids], dtype=np.int64)
    if any(len(m) != n for m, n in zip(loss_masks, lengths)):
        raise ValueError(f"{path}: a loss mask differs in length from its tokens")
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate(input_ids).astype(np.int32) if len(input_ids) else np.zeros(0, np.int32)
    mask = np.concatenate(loss_masks).astype(np.uint8) if len(loss_masks) else np.zeros(0, np.uint8)
    storage.remove(path, recursive=True)
    arrays = [
        (TOKENS, "int32", tokens, inner_chunk),
        (LOSS_MASK, "uint8", mask, inner_chunk),
        (OFFSETS, "int64", offsets, None),
    ]
    opened = [ts.open(_array_spec(storage.join(path, name), dt, len(data), chunk)) for name, dt, data, chunk in arrays]
    writes = [store.result().write(data) for store, (_, _, data, _) in zip(opened, arrays)]
    for w in writes:
        w.result()


def write_marker(out: str, index: int, meta: dict[str, Any]) -> None:
    """Commits shard `index`: one small JSON object, renamed into place locally."""
    path = marker_path(out, index)
    text = json.dumps(meta, sort_keys=True, indent=1) + "\n"
    if storage.is_remote(path):
        storage.write_text(path, text)  # a GCS object appears whole or not at all
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    storage.write_text(tmp, text)
    os.replace(tmp, path)


def read_marker(out: str, index: int) -> dict[str, Any] | None:
    """A shard's committed metadata, or None when the shard is missing or its marker unreadable."""
    path = marker_path(out, index)
    try:
        return json.loads(storage.read_text(path))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def committed_shards(out: str) -> set[int]:
    """Indices of shards whose commit marker exists (one listing of OUT/shards)."""
    folder = storage.join(out, SHARDS_DIR)
    if not storage.exists(folder):
        return set()
    found = set()
    for name in storage.listdir(folder):
        if name.startswith("shard-") and name.endswith(".json") and name[6:-5].isdigit():
            found.add(int(name[6:-5]))
    return found


def _open_specs(paths: Sequence[str], name: str, context: Any) -> list[Any]:
    spec = lambda p: {"driver": "zarr3", "kvstore": kvstore(storage.join(p, name)), "open": True}  # noqa: E731
    futures = [ts.open(spec(p), context=context, read=True) for p in paths]
    return [f.result() for f in futures]


def read_offsets(paths: Sequence[str], context: Any = None) -> list[np.ndarray]:
    """Every shard's record offsets, fetched concurrently (two small reads per shard)."""
    stores = _open_specs(paths, OFFSETS, context or ts.Context())
    reads = [s.read() for s in stores]
    return [np.asarray(r.result(), dtype=np.int64) for r in reads]


def open_arrays(paths: Sequence[str], context: Any = None) -> list[tuple[Any, Any]]:
    """(tokens, loss_mask) TensorStore handles for each shard, opened concurrently."""
    context = context or ts.Context()
    return list(zip(_open_specs(paths, TOKENS, context), _open_specs(paths, LOSS_MASK, context)))


def read_spans(arrays: dict[int, tuple[Any, Any]], spans: Sequence[tuple[int, int, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Reads token spans [(shard, start, stop), ...] in one TensorStore batch; returns (ids, mask) each.

    `arrays` maps a shard index to its (tokens, loss_mask) handles. TensorStore coalesces the
    byte ranges that a batch needs from one storage object.
    """
    with ts.Batch() as batch:
        futures = [(arrays[s][0][a:b].read(batch=batch), arrays[s][1][a:b].read(batch=batch)) for s, a, b in spans]
    return [(np.asarray(t.result()), np.asarray(m.result())) for t, m in futures]
