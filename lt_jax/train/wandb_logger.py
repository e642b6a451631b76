"""Weights & Biases as one more metrics sink beside TensorBoard (`logging.wandb: true`).

Every record the `MetricsWriter` writes (train and eval, at its step) is logged to one W&B run per
output folder: the run id is derived from `train.output_dir`, so a resumed run continues the same
W&B run. W&B cannot drop history, so steps re-run after a kill keep their first values there
(metrics.jsonl and TensorBoard are rewritten; see lt_jax.train.metrics). Only process 0 logs.
Install with `pip install 'lt_jax[wandb]'`; `WANDB_MODE=offline` keeps the run on disk under
`<output_dir>/wandb` (or a local staging folder for gs:// outputs) for `wandb sync` later.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any, Optional

from lt_jax import storage


def run_id(output_dir: str) -> str:
    """The W&B run id of a training output folder (stable across restarts)."""
    return "lt-jax-" + hashlib.sha256(output_dir.rstrip("/").encode()).hexdigest()[:16]


class WandbLogger:
    """A W&B run that `MetricsWriter.write` feeds; `close()` finishes it."""

    def __init__(self, output_dir: str, *, project: str, name: Optional[str] = None, entity: Optional[str] = None,
                 config: Optional[dict[str, Any]] = None):
        try:
            import wandb  # optional extra (lt_jax[wandb]): only runs with logging.wandb need it
        except ImportError as e:
            raise ImportError("logging.wandb needs the wandb package: pip install 'lt_jax[wandb]' (or pip install "
                              "wandb), or set logging.wandb=false") from e
        if storage.is_remote(output_dir):
            local = tempfile.mkdtemp(prefix="lt_jax_wandb_")  # W&B writes local files only
        else:
            local = output_dir
            storage.makedirs(local)
        self.run = wandb.init(
            project=project, entity=entity, name=name or os.path.basename(output_dir.rstrip("/")),
            id=run_id(output_dir), resume="allow", dir=local, config=config or {},
        )

    def log(self, step: int, kind: str, metrics: dict[str, float]) -> None:
        self.run.log({f"{kind}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.run.finish()
