"""What a resumed run may change: the config stored with the checkpoint against the one given now.

A resumed run that silently takes a new learning rate, length or weight decay is a different
experiment under the old name, so changes are refused, each changed key named, unless the user
passes `--accept-config-changes`. Keys that only say how the run executes (logging, how many
checkpoints to keep, the mesh, accumulation, loader threads, remat) may change freely: they do not
change what is computed, or not beyond float rounding. So may the folders' paths (a run or its data
copied elsewhere): the loader's own fingerprint refuses data whose content changed. `data.seq_len` and `train.global_batch` are
refused even with the flag: the data stream's cursor cannot be carried over to another row shape.
"""

from __future__ import annotations

import json
from typing import Any

from lt_jax.config import ConfigError, to_dict

SHAPE_KEYS = ("data.seq_len", "train.global_batch")
FREE = (
    "logging.", "mesh.", "checkpoint.keep", "checkpoint.keep_every", "checkpoint.async_save", "checkpoint.every",
    "data.worker_count", "data.read_threads", "data.prefetch", "data.eval_batches", "train.grad_accum",
    "train.lm_head_chunk", "train.eval_every", "model.remat", "model.attention", "model.compute_dtype",
    "train.output_dir", "checkpoint.dir", "data.train", "data.eval",
)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": value} for nested dicts; lists and scalars are leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def changes(stored: dict, now: dict) -> list[tuple[str, Any, Any]]:
    """(key, stored value, value now) for every key whose value differs, sorted by key."""
    a, b = flatten(stored), flatten(now)
    missing = object()
    diff = [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]
    return [(k, None if x is missing else x, None if y is missing else y) for k, x, y in diff]


def _free(key: str) -> bool:
    return any(key == f or (f.endswith(".") and key.startswith(f)) for f in FREE)


def check_resume(stored_run: dict, cfg, *, accept: bool, where: str) -> list[str]:
    """Raises ConfigError for refused changes; returns "key: old -> new" lines of accepted ones."""
    now = json.loads(json.dumps(to_dict(cfg)))  # as stored: tuples become lists
    diff = [(k, old, new) for k, old, new in changes(stored_run, now) if not _free(k)]
    lines = [f"{k}: {old!r} -> {new!r}" for k, old, new in diff]
    shape = [line for (k, _, _), line in zip(diff, lines) if k in SHAPE_KEYS]
    if shape:
        raise ConfigError(f"{where}: cannot resume with a new {'; '.join(shape)}: the packed data stream depends on it; "
                          "restore the old value or start a new train.output_dir")
    if lines and not accept:
        raise ConfigError(f"{where}: the config changed since the checkpoint ({'; '.join(lines)}); restore these keys, "
                          "or pass --accept-config-changes to resume with them")
    return lines
