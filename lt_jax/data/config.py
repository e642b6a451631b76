"""The data loader's config section (`data:` of a run YAML): owned by the data stage.

`lt_jax.train.config.RunConfig` holds it as its `data` section; `lt_jax.data.loader.LoaderOptions`
is built from it. Plain dataclass, no heavy imports, so reading a config stays cheap.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The Grain loader: what to read and how to pack it (see lt_jax/data/loader.py)."""

    train: str = ""  # folder written by `lt-jax tokenize` (local or gs://)
    eval: Optional[str] = None  # held-out tokenized folder; None: no eval loss
    seq_len: int = 512
    packing: Literal["best_fit", "first_fit"] = "best_fit"
    pack_window: int = 1024  # examples considered together when filling rows
    overlength: Literal["drop", "truncate"] = "drop"  # examples longer than seq_len
    shuffle: bool = True
    seed: int = 0
    pad_id: int = 0
    worker_count: int = 0  # grain worker processes per host (0: read in the training process)
    read_threads: int = 4  # threads per reader assembling batches
    prefetch: int = 2  # batches buffered ahead per reader
    eval_batches: Optional[int] = None  # None: the whole eval set

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        for name in ("pack_window", "read_threads", "prefetch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.worker_count < 0:
            raise ValueError(f"worker_count must be >= 0, got {self.worker_count}")
        if self.eval_batches is not None and self.eval_batches < 1:
            raise ValueError(f"eval_batches must be >= 1 or null (all), got {self.eval_batches}")
