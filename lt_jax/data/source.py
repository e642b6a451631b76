"""A Grain random-access source over a tokenized folder (local or gs://).

Record ``i`` is ``{"input_ids": int32[n], "loss_mask": uint8[n]}`` in manifest order (shard 0's
records, then shard 1's, ...). Opening reads the manifest and every shard's offsets, concurrently,
and never tokens, so ``lengths`` is there at once for the packer.

Batched reads: grain 0.2.18 calls ``_getitems(indices)`` on a source that has it (its
``SupportsBatchedReadRandomAccessDataSource`` protocol, used when ``MapDataset`` pushes a batch
down to the source) and ``__getitem__`` otherwise (its DataLoader and ``MapDataset.batch`` read
one index at a time in this version). ``read_batch`` (also bound as ``_getitems`` and as PyTorch's
``__getitems__``) groups indices by shard, merges runs of consecutive records into one span each
and issues every span in one TensorStore batch, so a batch costs a few coalesced range requests
rather than one request per record; a loader that wants that should call ``read_batch``.

Pickling keeps the offsets and drops the TensorStore handles, which each process reopens lazily
for the shards it touches, so the source works in grain workers started by spawn.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

from lt_jax import storage
from lt_jax.data import shards as shards_lib

_OPEN_LOCK = threading.Lock()  # grain may read from several threads of one process


class TokenizedSource:
    """Random access to the records of a tokenized folder written by `lt-jax tokenize`."""

    def __init__(self, path: str, *, cache_bytes: int = 0):
        """`cache_bytes` sizes TensorStore's decoded-chunk cache per process (0: no cache)."""
        self.path = str(path).rstrip("/")
        self.cache_bytes = int(cache_bytes)
        manifest_path = storage.join(self.path, "manifest.json")
        if not storage.exists(manifest_path):
            raise FileNotFoundError(f"{manifest_path}: not found; is {self.path} a finished `lt-jax tokenize` output?")
        self.manifest = json.loads(storage.read_text(manifest_path))
        if self.manifest.get("format") != shards_lib.FORMAT:
            raise ValueError(f"{manifest_path}: format {self.manifest.get('format')!r}, expected {shards_lib.FORMAT!r}")
        shard_specs = self.manifest["shards"]
        self._shard_paths = [storage.join(self.path, shards_lib.SHARDS_DIR, s["name"]) for s in shard_specs]
        self._context: Any = None
        self._arrays: dict[int, tuple[Any, Any]] = {}
        self._offsets = shards_lib.read_offsets(self._shard_paths, self._ts_context())
        for spec, offsets in zip(shard_specs, self._offsets):
            if len(offsets) - 1 != spec["records"] or offsets[-1] != spec["tokens"]:
                raise ValueError(f"{self.path}: shard {spec['name']} does not match the manifest's record/token counts")
        counts = np.array([len(o) - 1 for o in self._offsets], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.lengths = np.concatenate([np.diff(o) for o in self._offsets]) if shard_specs else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __repr__(self) -> str:  # grain keys checkpoints on it
        return f"TokenizedSource(path={self.path!r}, records={len(self)})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_context"], state["_arrays"] = None, {}  # handles stay in the process that opened them
        return state

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, record within shard) of global record `index`."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range [0, {len(self)}) of {self.path}")
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        return shard, index - int(self._starts[shard])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.read_batch([index])[0]

    def read_batch(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """Records for `indices` (any order, repeats allowed): one coalesced TensorStore batch."""
        located = [self.locate(i) for i in indices]
        spans, span_of = group_spans(located)
        arrays = self._handles({s for s, _, _ in spans})
        token_spans = [(s, int(self._offsets[s][a]), int(self._offsets[s][b])) for s, a, b in spans]
        data = shards_lib.read_spans(arrays, token_spans)
        out = []
        for shard, record in located:
            k = span_of[(shard, record)]
            offsets = self._offsets[shard]
            base = offsets[spans[k][1]]
            ids, mask = data[k]
            a, b = offsets[record] - base, offsets[record + 1] - base
            out.append({"input_ids": ids[a:b].astype(np.int32, copy=False), "loss_mask": mask[a:b]})
        return out

    _getitems = read_batch  # grain's batched-read protocol
    __getitems__ = read_batch  # PyTorch's

    def _ts_context(self) -> Any:
        if self._context is None:
            self._context = ts.Context({"cache_pool": {"total_bytes_limit": self.cache_bytes}} if self.cache_bytes else {})
        return self._context

    def _handles(self, shards: set[int]) -> dict[int, tuple[Any, Any]]:
        with _OPEN_LOCK:
            missing = sorted(shards - set(self._arrays))
            if missing:
                opened = shards_lib.open_arrays([self._shard_paths[s] for s in missing], self._ts_context())
                self._arrays.update(zip(missing, opened))
            return self._arrays


def group_spans(located: Sequence[tuple[int, int]]) -> tuple[list[tuple[int, int, int]], dict[tuple[int, int], int]]:
    """Merges (shard, record) pairs into runs of consecutive records.

    Returns the runs as sorted (shard, first_record, end_record) triples and a map from each
    distinct pair to the index of its run.
    """
    spans: list[tuple[int, int, int]] = []
    span_of: dict[tuple[int, int], int] = {}
    for shard, record in sorted(set(located)):
        if spans and spans[-1][0] == shard and spans[-1][2] == record:
            spans[-1] = (shard, spans[-1][1], record + 1)
        else:
            spans.append((shard, record, record + 1))
        span_of[(shard, record)] = len(spans) - 1
    return spans, span_of


__all__ = ["TokenizedSource", "group_spans"]
