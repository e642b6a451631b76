"""The training loader: tokenized shards -> shuffled, packed, per-process batches -> global jax.Arrays.

Story of one epoch:
  1. Shuffle: a permutation of all records seeded by (seed, epoch), identical on every process.
  2. Plan: pack records into rows of `seq_len` from their lengths alone (lt_jax.data.packing), then
     shuffle the rows (so long and short rows mix across batches). Rows past the last full global
     batch are dropped and counted.
  3. Read: global batch b is plan rows [b*G, (b+1)*G). Each process reads only the rows its devices
     hold under the batch sharding; a Grain MapDataset over batch numbers does the reading (one
     coalesced TensorStore read per batch), on `read_threads` threads and optionally in
     `worker_count` spawned worker processes (the source and plan pickle cheaply).
  4. Assemble: `jax.make_array_from_process_local_data` turns each process's rows into global
     arrays [G, seq_len] sharded over the mesh's batch axes.

State is a cursor, {"epoch", "batch"} of the next batch the trainer will receive, plus a
fingerprint of everything that shapes the stream (records, lengths, seed, seq_len, batch, ...).
Prefetched-but-unconsumed batches are not part of it, so restoring the cursor yields exactly the
batches that would have come next, whatever the worker count. Restoring against different data or
settings is an error that names what changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any, Iterator, Optional, Sequence

import grain
import jax
import numpy as np
from absl import flags

from lt_jax.data import packing
from lt_jax.data.config import DataConfig
from lt_jax.data.source import TokenizedSource
from lt_jax.model import sharding as shd

log = logging.getLogger(__name__)

BATCH_KEYS = ("input_ids", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class LoaderOptions:
    """What shapes the batch stream (everything here is in the resume fingerprint but worker counts)."""

    seq_len: int
    global_batch: int
    seed: int = 0
    shuffle: bool = True
    packing: packing.Method = "best_fit"
    pack_window: int = 1024
    overlength: packing.Overlength = "drop"
    pad_id: int = 0
    epochs: Optional[int] = None  # None: forever; the trainer usually stops by step count
    drop_remainder: bool = True  # False: pad the last batch with empty rows (eval)
    worker_count: int = 0
    read_threads: int = 4
    prefetch: int = 2
    max_segments: Optional[int] = None  # the model's cuDNN segment ceiling: rows hold at most this - 1 documents

    @classmethod
    def from_data_config(cls, data: DataConfig, global_batch: int, **kw) -> "LoaderOptions":
        """Options for the `data:` section of a run config; `kw` sets the fields it does not hold."""
        return cls(
            seq_len=data.seq_len, global_batch=global_batch, seed=data.seed, shuffle=data.shuffle,
            packing=data.packing, pack_window=data.pack_window, overlength=data.overlength,
            pad_id=data.pad_id, worker_count=data.worker_count, read_threads=data.read_threads,
            prefetch=data.prefetch, **kw,
        )


def epoch_plan(lengths: np.ndarray, options: LoaderOptions, epoch: int) -> tuple[packing.PackPlan, int]:
    """(the packed rows of `epoch` in batch order, rows dropped to keep whole global batches)."""
    n = len(lengths)
    if options.shuffle:
        order = np.random.default_rng([options.seed, epoch, 0]).permutation(n)
    else:
        order = np.arange(n)
    plan = packing.plan_packing(
        lengths, order, options.seq_len, window=options.pack_window, method=options.packing,
        overlength=options.overlength,
        max_docs=None if options.max_segments is None else options.max_segments - 1,  # one run for padding
    )
    rows = np.arange(plan.num_rows)
    if options.shuffle:
        rows = np.random.default_rng([options.seed, epoch, 1]).permutation(plan.num_rows)
    remainder = len(rows) % options.global_batch if options.drop_remainder else 0
    return plan.take_rows(rows[: len(rows) - remainder], lengths), remainder


def num_batches(plan: packing.PackPlan, options: LoaderOptions) -> int:
    return -(-plan.num_rows // options.global_batch)  # a partial batch only exists when padding


def process_rows(sharding, global_batch: int, seq_len: int) -> np.ndarray:
    """The global-batch rows this process must supply under `sharding`, in the order that
    `jax.make_array_from_process_local_data` expects them (sorted, each addressed slice once)."""
    index_map = sharding.addressable_devices_indices_map((global_batch, seq_len))
    slices = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop) for s in index_map.values()})
    return np.concatenate([np.arange(a, b) for a, b in slices]).astype(np.int64)


class _BatchReader:
    """Grain source: local batch b (this process's rows of global batch `start + b`) of one epoch's plan."""

    def __init__(self, source, plan: packing.PackPlan, options: LoaderOptions, rows: np.ndarray, start: int):
        self.source, self.plan, self.options, self.rows, self.start = source, plan, options, rows, start
        self._len = num_batches(plan, options) - start

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, b: int) -> dict[str, np.ndarray]:
        g = self.options.global_batch
        wanted = (self.start + int(b)) * g + self.rows
        row_ids = [self.plan.row(int(r)) if r < self.plan.num_rows else np.zeros(0, np.int64) for r in wanted]
        flat = [int(i) for ids in row_ids for i in ids]
        records = iter(self.source.read_batch(flat)) if flat else iter(())
        examples = [[next(records) for _ in ids] for ids in row_ids]
        batch = packing.pack_rows(examples, self.options.seq_len, self.options.pad_id)
        if self.options.max_segments is not None:  # once per batch, here, not in every attention layer
            where = f"{getattr(self.source, 'path', 'data')}: batch {self.start + int(b)}"
            packing.check_segment_count(batch["segment_ids"], self.options.max_segments, where)
        return batch


class Loader:
    """Iterates global batches {input_ids, loss_mask, segment_ids, positions} as jax.Arrays [G, S].

    `sharding` is the batch sharding (rows over the mesh's batch axes); None gives numpy arrays of
    this process's rows (for tests and benchmarks). `state` continues a stream from a checkpoint.
    """

    def __init__(self, source, options: LoaderOptions, sharding=None, state: Optional[dict] = None):
        self.source, self.options, self.sharding = source, options, sharding
        self.lengths = np.asarray(source.lengths, dtype=np.int64)
        if sharding is None:
            self.rows = np.arange(options.global_batch, dtype=np.int64)
        else:
            self.rows = process_rows(sharding, options.global_batch, options.seq_len)
        self.epoch, self.batch = 0, 0
        self._plans: dict[int, tuple[packing.PackPlan, int]] = {}
        self._it: Optional[Iterator] = None
        if state is not None:
            self.set_state(state)

    # -- state -------------------------------------------------------------------------------

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a saved cursor to mean the same batches."""
        o = self.options
        return {
            "records": int(len(self.lengths)),
            "lengths_sha256": hashlib.sha256(self.lengths.tobytes()).hexdigest()[:16],
            "seq_len": o.seq_len, "global_batch": o.global_batch, "seed": o.seed, "shuffle": o.shuffle,
            "packing": o.packing, "pack_window": o.pack_window, "overlength": o.overlength,
            "max_segments": o.max_segments,
        }

    def get_state(self) -> dict[str, Any]:
        """The cursor of the next batch `__next__` returns (JSON-able)."""
        return {"epoch": self.epoch, "batch": self.batch, "fingerprint": self.fingerprint()}

    def set_state(self, state: dict[str, Any]) -> None:
        saved, now = state.get("fingerprint", {}), self.fingerprint()
        changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items() if saved.get(k) != v]
        if changed:
            raise ValueError(
                "the saved loader state belongs to other data or settings; changed: " + ", ".join(changed)
                + " (restore with the original data/seq_len/batch settings, or start a new output_dir)"
            )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self._close()

    # -- plans -------------------------------------------------------------------------------

    def plan(self, epoch: int) -> packing.PackPlan:
        if epoch not in self._plans:
            plan, remainder = epoch_plan(self.lengths, self.options, epoch)
            if plan.num_rows == 0:
                raise ValueError(
                    f"{getattr(self.source, 'path', 'the data')}: {len(self.lengths)} records pack into "
                    f"{remainder} rows of {self.options.seq_len} tokens, fewer than one global batch of "
                    f"{self.options.global_batch} rows (over-length dropped: {plan.dropped}); "
                    "lower train.global_batch or add data"
                )
            self._plans = {epoch: (plan, remainder)}  # one epoch at a time: plans can be large
            log.info(
                "epoch %d: %d examples -> %d rows of %d (fill %.3f); dropped %d over-length, truncated %d, "
                "skipped %d empty, %d rows past the last full batch, %d rows closed at max_segments",
                epoch, plan.num_examples, plan.num_rows, plan.seq_len, plan.fill, plan.dropped, plan.truncated,
                plan.empty, remainder, plan.capped_rows,
            )
        return self._plans[epoch][0]

    def batches_in_epoch(self, epoch: int = 0) -> int:
        return num_batches(self.plan(epoch), self.options)

    def stats(self, epoch: int = 0) -> dict[str, Any]:
        """Packing statistics of an epoch (counts of what was dropped and why)."""
        plan = self.plan(epoch)
        return {
            "examples": plan.num_examples, "rows": plan.num_rows, "batches": self.batches_in_epoch(epoch),
            "fill": plan.fill, "dropped_overlength": plan.dropped, "truncated": plan.truncated,
            "skipped_empty": plan.empty, "rows_past_last_batch": self._plans[epoch][1],
            "packed_tokens": plan.packed_tokens, "rows_capped_at_max_segments": plan.capped_rows,
        }

    # -- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> dict[str, Any]:
        while True:
            if self.options.epochs is not None and self.epoch >= self.options.epochs:
                raise StopIteration
            if self.batch < self.batches_in_epoch(self.epoch):
                break
            self.epoch, self.batch = self.epoch + 1, 0
            self._close()
        if self._it is None:
            self._it = iter(self._dataset(self.epoch, self.batch))
        local = next(self._it)
        self.batch += 1
        return local if self.sharding is None else self.to_global(local)

    def to_global(self, local: dict[str, np.ndarray]) -> dict[str, Any]:
        shape = (self.options.global_batch, self.options.seq_len)
        return {k: jax.make_array_from_process_local_data(self.sharding, local[k], shape) for k in BATCH_KEYS}

    def _dataset(self, epoch: int, start: int):
        reader = _BatchReader(self.source, self.plan(epoch), self.options, self.rows, start)
        ds = grain.MapDataset.source(reader).to_iter_dataset(
            # grain wants the buffer at least as deep as the thread count.
            grain.ReadOptions(num_threads=self.options.read_threads,
                              prefetch_buffer_size=max(self.options.prefetch, self.options.read_threads))
        )
        if self.options.worker_count > 0:
            _absl_flags_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.options.worker_count))
        return ds

    def _close(self) -> None:
        it, self._it = self._it, None
        close = getattr(it, "close", None)
        if close is not None:
            close()

    def close(self) -> None:
        self._close()

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _absl_flags_parsed() -> None:
    # grain's worker start-up reads absl flags; outside an absl app nobody has parsed them.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def batch_sharding(mesh):
    """Rows over the mesh's batch axes, sequence unsharded (the model's act_batch / act_seq rules)."""
    return shd.logical_to_sharding(("act_batch", "act_seq"), mesh)


def open_loader(path: str, options: LoaderOptions, mesh=None, state: Optional[dict] = None) -> Loader:
    """A Loader over the tokenized folder at `path` (local or gs://)."""
    return Loader(TokenizedSource(path), options, None if mesh is None else batch_sharding(mesh), state)


__all__: Sequence[str] = [
    "LoaderOptions", "Loader", "epoch_plan", "process_rows", "batch_sharding", "open_loader", "BATCH_KEYS",
]
