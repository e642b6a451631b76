"""Safetensors folders as Hugging Face writes them: a catalog of tensors and slice reads, plus the
shard layout (file names, index) that writers follow.

A folder holds either one `model.safetensors` or several `model-0000k-of-0000n.safetensors` named
by `model.safetensors.index.json`. `SafetensorsFolder` reads only the headers up front and then
serves `tensor[index]` slices, so a caller can build each device's shard without loading the model.
Local files are read with `safetensors.safe_open(...).get_slice` (memory-mapped). For gs:// we read
byte ranges of the remote files through fsspec instead of downloading them: on a pod every host
would otherwise copy the full checkpoint (145 GB for a 72B model in bf16) to a small boot disk,
while ranges let each host fetch only the rows of its own shards, with concurrent requests
(`cat_ranges`) across the layers of a stacked parameter.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Optional, Sequence

import ml_dtypes
import numpy as np
from safetensors import safe_open

from lt_jax import storage

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


class HFFormatError(ValueError):
    """A Hugging Face folder is missing files, has an unsupported config, or mismatched tensors."""


# ---------------------------------------------------------------------------------------------
# Reading: catalog and slice reads


def _np_dtypes() -> dict[str, np.dtype]:
    return {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
            "BF16": np.dtype(ml_dtypes.bfloat16)}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, safetensors dtype code, shape and byte range."""

    file: str  # full path of the .safetensors file holding the tensor
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offsets of the data in `file`
    end: int


class SafetensorsFolder:
    """The tensors of a Hugging Face folder (single file or sharded with an index) and slice reads.

    `source` is the file errors should name for a missing tensor: the index or model.safetensors.
    """

    def __init__(self, path: str):
        self.path = str(path)
        self.remote = storage.is_remote(self.path)
        self._fs = storage.filesystem(self.path)
        self._handles: dict[str, Any] = {}
        self.source, names_by_file = self._layout()
        self.tensors: dict[str, TensorInfo] = {}
        for file, names in names_by_file.items():
            header = self._header(file)
            for name in header if names is None else names:
                if name not in header:
                    raise HFFormatError(f"{file}: tensor {name!r} is listed in {INDEX_FILE} but not stored here")
                self.tensors[name] = header[name]

    def _layout(self) -> tuple[str, dict[str, Optional[list[str]]]]:
        index_path = storage.join(self.path, INDEX_FILE)
        single = storage.join(self.path, SINGLE_FILE)
        if storage.exists(index_path):
            try:
                weight_map = json.loads(storage.read_text(index_path))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise HFFormatError(f"{index_path}: not a safetensors index ({e!r})") from e
            by_file: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                by_file.setdefault(storage.join(self.path, file), []).append(name)
            for file in by_file:
                if not storage.exists(file):
                    raise HFFormatError(f"{index_path}: refers to {file}, which does not exist")
            return index_path, by_file
        if storage.exists(single):
            return single, {single: None}
        raise HFFormatError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE} in this folder")

    def _header(self, file: str) -> dict[str, TensorInfo]:
        """Parses a safetensors header (u64 little-endian length, then JSON) with two range reads."""
        dtypes = _np_dtypes()
        n = int.from_bytes(self._fs.cat_file(file, start=0, end=8), "little")
        try:
            header = json.loads(self._fs.cat_file(file, start=8, end=8 + n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HFFormatError(f"{file}: not a safetensors file ({e})") from e
        out = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if meta["dtype"] not in dtypes:
                raise HFFormatError(
                    f"{file}: tensor {name!r} has dtype {meta['dtype']}; expected one of {', '.join(dtypes)}"
                )
            begin, end = meta["data_offsets"]
            out[name] = TensorInfo(file, meta["dtype"], tuple(meta["shape"]), 8 + n + begin, 8 + n + end)
        return out

    def read(self, requests: Sequence[tuple[str, tuple[slice, ...]]]) -> list[np.ndarray]:
        """`tensor[index]` for each (tensor name, index of one slice per dimension)."""
        if self.remote:
            return self._read_ranges(requests)
        out = []
        for name, index in requests:
            file = self.tensors[name].file
            if file not in self._handles:
                self._handles[file] = safe_open(file, framework="numpy")
            out.append(self._handles[file].get_slice(name)[index])
        return out

    def _read_ranges(self, requests: Sequence[tuple[str, tuple[slice, ...]]]) -> list[np.ndarray]:
        """Fetches only the leading-axis rows each request needs, all requests concurrently."""
        dtypes = _np_dtypes()
        plans = []
        for name, index in requests:
            info = self.tensors[name]
            dtype = dtypes[info.dtype]
            rows = range(info.shape[0])[index[0]] if info.shape else range(1)
            row_bytes = int(np.prod(info.shape[1:], dtype=np.int64)) * dtype.itemsize
            start = info.start + rows.start * row_bytes
            plans.append((info, dtype, rows, start, start + len(rows) * row_bytes, index))
        fetch = [p for p in plans if p[4] > p[3]]
        paths, starts, ends = [p[0].file for p in fetch], [p[3] for p in fetch], [p[4] for p in fetch]
        blobs = iter(self._fs.cat_ranges(paths, starts, ends, on_error="raise") if fetch else [])
        out = []
        for info, dtype, rows, start, end, index in plans:
            data = next(blobs) if end > start else b""
            block = np.frombuffer(data, dtype=dtype).reshape((len(rows),) + info.shape[1:])
            out.append(block[(slice(None),) + tuple(index[1:])] if info.shape else block.reshape(()))
        return out

    def close(self) -> None:
        self._handles.clear()


# ---------------------------------------------------------------------------------------------
# Writing: shard layout


def plan_shards(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy split of (name, bytes) in order; a tensor larger than the limit gets its own shard."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def shard_file_names(count: int) -> list[str]:
    """model.safetensors for one shard, else model-0000k-of-0000n.safetensors (transformers' names)."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]


def remove_weight_files(out_dir: str) -> None:
    """A previous export with another shard count would leave files the new index does not name."""
    if not storage.exists(out_dir) or not storage.isdir(out_dir):
        return
    for name in storage.listdir(out_dir):
        if name == INDEX_FILE or (name.startswith("model") and name.endswith(".safetensors")):
            log.info("removing %s from a previous export", storage.join(out_dir, name))
            storage.remove(storage.join(out_dir, name))


def write_index(out_dir: str, files: Sequence[str], shards: Sequence[Sequence[str]], total_size: int) -> str:
    """Writes model.safetensors.index.json mapping each tensor name to its shard file; returns its name."""
    index = {
        "metadata": {"total_size": int(total_size)},
        "weight_map": {name: file for file, names in zip(files, shards) for name in names},
    }
    storage.write_text(storage.join(out_dir, INDEX_FILE), json.dumps(index, indent=2) + "\n")
    return INDEX_FILE
