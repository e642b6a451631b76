"""Packing variable-length examples into fixed-length rows: pure functions over lengths and arrays.

Packing is planned from record lengths alone (the tokenized source knows them without reading a
token), so a whole epoch's rows are fixed before any data is read. That makes the loader's state a
single cursor, lets every process compute the same plan independently, and keeps the packing
deterministic whatever the worker count.

Rules:
  * An example is never split across rows.
  * An example longer than `seq_len` is either dropped (`overlength="drop"`, the default: a long
    chain of thought cut short teaches the model to stop mid-thought) or truncated to its first
    `seq_len` tokens (`"truncate"`); either way it is counted in the plan.
  * Rows are filled over a window of `window` consecutive examples (in the shuffled order), so
    the shuffle stays local-ish and planning is O(n log window):
      - "best_fit": the window is sorted longest first and each example goes to the open row with
        the least room that still fits it (best-fit decreasing, the usual near-optimal heuristic);
      - "first_fit": examples keep their order and go to the first open row that fits.
    Rows still open at the end of a window are closed, so windows are independent.
  * `max_docs` caps the examples per row (the cuDNN attention's segment ceiling: a row may hold
    ModelConfig.max_segments contiguous runs, one of them trailing padding). A row that reaches
    the cap is closed even with room left; the plan counts those rows (`capped_rows`).

A packed row holds, per position: input_ids, loss_mask, segment_ids (1..k for the k examples in the
row, 0 for padding) and positions (restarting at 0 for each example, 0 on padding).
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Literal, Optional, Sequence

import numpy as np

Method = Literal["best_fit", "first_fit"]
Overlength = Literal["drop", "truncate"]


@dataclasses.dataclass(frozen=True)
class PackPlan:
    """Rows as runs of record indices: row r holds `indices[row_splits[r]:row_splits[r + 1]]`."""

    row_splits: np.ndarray  # int64 [num_rows + 1]
    indices: np.ndarray  # int64 record ids, row after row
    seq_len: int
    num_examples: int  # examples offered to the packer
    dropped: int  # longer than seq_len under overlength="drop"
    truncated: int  # longer than seq_len under overlength="truncate"
    empty: int  # zero-length records, skipped
    packed_tokens: int  # tokens placed in rows (after truncation)
    capped_rows: int = 0  # rows closed with room left because they reached `max_docs` examples

    @property
    def num_rows(self) -> int:
        return len(self.row_splits) - 1

    def row(self, r: int) -> np.ndarray:
        return self.indices[self.row_splits[r] : self.row_splits[r + 1]]

    @property
    def fill(self) -> float:
        """Fraction of row positions holding real tokens (1.0 = no padding)."""
        return self.packed_tokens / max(1, self.num_rows * self.seq_len)

    def take_rows(self, rows: np.ndarray, lengths: np.ndarray) -> "PackPlan":
        """The same plan with its rows reordered / subset to `rows` (`lengths`: the records' lengths)."""
        rows = np.asarray(rows, dtype=np.int64)
        sizes = np.diff(self.row_splits)[rows]
        parts = [self.row(int(r)) for r in rows]
        indices = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        splits = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        tokens = int(np.minimum(np.asarray(lengths)[indices], self.seq_len).sum())
        return dataclasses.replace(self, row_splits=splits, indices=indices, packed_tokens=tokens)


def plan_packing(
    lengths: np.ndarray,
    order: np.ndarray,
    seq_len: int,
    *,
    window: int = 1024,
    method: Method = "best_fit",
    overlength: Overlength = "drop",
    max_docs: Optional[int] = None,
) -> PackPlan:
    """Packs the records `order` (indices into `lengths`) into rows of at most `seq_len` tokens
    and at most `max_docs` records (None: no cap)."""
    if seq_len < 1 or window < 1:
        raise ValueError(f"seq_len and window must be >= 1, got seq_len={seq_len}, window={window}")
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs must be >= 1 (or None for no cap), got {max_docs}")
    if method not in ("best_fit", "first_fit"):
        raise ValueError(f"packing method {method!r}; allowed: 'best_fit', 'first_fit'")
    if overlength not in ("drop", "truncate"):
        raise ValueError(f"overlength {overlength!r}; allowed: 'drop', 'truncate'")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.asarray(order, dtype=np.int64)
    sizes = lengths[order]
    too_long = sizes > seq_len
    empty = sizes == 0
    keep = ~empty & (~too_long if overlength == "drop" else True)
    kept, sizes = order[keep], np.minimum(sizes[keep], seq_len)
    fill = _best_fit if method == "best_fit" else _first_fit
    cap = max_docs if max_docs is not None else len(kept) + 1
    rows: list[list[int]] = []
    capped = 0
    for start in range(0, len(kept), window):
        window_rows, window_capped = fill(kept[start : start + window], sizes[start : start + window], seq_len, cap)
        rows.extend(window_rows)
        capped += window_capped
    splits = np.concatenate([[0], np.cumsum([len(r) for r in rows], dtype=np.int64)]).astype(np.int64)
    indices = np.fromiter((i for r in rows for i in r), dtype=np.int64, count=int(splits[-1]))
    return PackPlan(
        row_splits=splits,
        indices=indices,
        seq_len=seq_len,
        num_examples=len(order),
        dropped=int(too_long.sum()) if overlength == "drop" else 0,
        truncated=int(too_long.sum()) if overlength == "truncate" else 0,
        empty=int(empty.sum()),
        packed_tokens=int(sizes.sum()),
        capped_rows=capped,
    )


def _best_fit(ids: np.ndarray, sizes: np.ndarray, seq_len: int, cap: int) -> tuple[list[list[int]], int]:
    # Longest first (stable, so ties keep the shuffled order); `room` is kept sorted as
    # (free space, row number) so the tightest row that fits is one bisect away. A row that
    # reaches `cap` examples leaves `room` (closed).
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []
    capped = 0
    for k in np.argsort(-sizes, kind="stable"):
        size = int(sizes[k])
        at = bisect.bisect_left(room, (size, -1))
        if at == len(room):
            rows.append([int(ids[k])])
            free, r = seq_len - size, len(rows) - 1
        else:
            free, r = room.pop(at)
            rows[r].append(int(ids[k]))
            free -= size
        if len(rows[r]) < cap:
            bisect.insort(room, (free, r))
        elif free > 0:
            capped += 1
    return rows, capped


def _first_fit(ids: np.ndarray, sizes: np.ndarray, seq_len: int, cap: int) -> tuple[list[list[int]], int]:
    rows: list[list[int]] = []
    free: list[int] = []  # -1: closed at the cap
    capped = 0
    for i, size in zip(ids.tolist(), sizes.tolist()):
        for r, f in enumerate(free):
            if f >= size:
                break
        else:
            rows.append([])
            free.append(seq_len)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= size
        if len(rows[r]) >= cap:
            capped += free[r] > 0
            free[r] = -1
    return rows, capped


def count_runs(segment_ids: np.ndarray) -> np.ndarray:
    """Contiguous runs per row of `segment_ids` [rows, seq] (padding counts as a run): what the
    cuDNN packed layout needs a segment slot for."""
    seg = np.asarray(segment_ids)
    return 1 + np.count_nonzero(seg[:, 1:] != seg[:, :-1], axis=1)


def check_segment_count(segment_ids: np.ndarray, max_segments: int, where: str = "batch") -> None:
    """Raises if a row holds more runs than the attention's `max_segments` (ModelConfig)."""
    runs = count_runs(segment_ids)
    over = np.nonzero(runs > max_segments)[0]
    if len(over):
        raise ValueError(
            f"{where}: row {int(over[0])} holds {int(runs[over[0]])} segments (documents plus padding) but "
            f"model.max_segments is {max_segments} ({len(over)} rows over); raise model.max_segments "
            "or pack fewer documents per row"
        )


def pack_row(examples: Sequence[dict[str, np.ndarray]], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """One packed row from examples {"input_ids", "loss_mask"} (each cut to `seq_len` tokens).

    Raises if the (cut) examples together exceed `seq_len`: the plan, not this function, decides
    what fits.
    """
    ids = np.full(seq_len, pad_id, np.int32)
    mask = np.zeros(seq_len, np.int32)
    seg = np.zeros(seq_len, np.int32)
    pos = np.zeros(seq_len, np.int32)
    at = 0
    for k, ex in enumerate(examples, start=1):
        n = min(len(ex["input_ids"]), seq_len)
        if at + n > seq_len:
            raise ValueError(f"examples of {[len(e['input_ids']) for e in examples]} tokens exceed seq_len {seq_len}")
        ids[at : at + n] = ex["input_ids"][:n]
        mask[at : at + n] = ex["loss_mask"][:n]
        seg[at : at + n] = k
        pos[at : at + n] = np.arange(n, dtype=np.int32)
        at += n
    return {"input_ids": ids, "loss_mask": mask, "segment_ids": seg, "positions": pos}


def pack_rows(examples: Sequence[Sequence[dict[str, np.ndarray]]], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """A batch [len(examples), seq_len] of packed rows; an empty row is all padding."""
    rows = [pack_row(row, seq_len, pad_id) for row in examples]
    return {k: np.stack([r[k] for r in rows]) for k in ("input_ids", "loss_mask", "segment_ids", "positions")}


__all__ = ["PackPlan", "plan_packing", "pack_row", "pack_rows", "count_runs", "check_segment_count"]
