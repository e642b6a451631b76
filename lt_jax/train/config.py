"""The training run's config: one section per component, each handed only its own section.

A run YAML has the sections below (`lt-jax train --config run.yaml a.b=value ...`). Sections that
belong to other stages of the pipeline (synthetic, distill, grade, select, tokenize, eval, ...)
may share the file; `load_run_config` skips the names in `OTHER_STAGE_SECTIONS` and rejects any
other unknown top-level key, so a typo still fails loudly.

    model       ModelConfig fields. From scratch: the architecture. With `train.init_from`: the
                architecture comes from the checkpoint, fields given here must agree with it,
                except the runtime ones (dtypes, remat, attention, max_segments), which override it.
    mesh        MeshConfig: data / fsdp / tensor axis sizes (-1: the rest of the devices).
    data        DataConfig: tokenized folders, sequence length, packing, shuffling, workers.
    optim       OptimConfig: AdamW, clipping, the learning-rate schedule.
    train       TrainConfig: output folder, batch, accumulation, length, loss options, init.
    checkpoint  CheckpointConfig: where, how often, how many to keep.
    logging     LoggingConfig: console / JSONL / TensorBoard cadence, peak FLOPs for MFU.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional, Sequence

from lt_jax import config as config_lib
from lt_jax import storage
from lt_jax.config import ConfigError
from lt_jax.data.config import DataConfig  # noqa: F401  (re-exported: the data stage owns it)
from lt_jax.model.config import ModelConfig
from lt_jax.model.sharding import MeshConfig

# Top-level YAML sections owned by other stages; `lt-jax train` ignores them.
OTHER_STAGE_SECTIONS = config_lib.OTHER_STAGE_SECTIONS

# ModelConfig fields that do not change parameter shapes: a run may override them on an imported model.
RUNTIME_MODEL_FIELDS: tuple[str, ...] = ("param_dtype", "compute_dtype", "remat", "attention", "max_segments")

DType = Literal["float32", "bfloat16"]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with global-norm clipping and one learning-rate schedule (see lt_jax/train/optim.py)."""

    lr: float = 8e-5  # peak learning rate
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    warmup_steps: int = 0
    warmup_fraction: float = 0.0  # of the run's steps; give this or warmup_steps, not both
    min_lr_ratio: float = 0.0  # floor of the decay, as a fraction of lr
    decay_fraction: float = 0.1  # wsd: the final fraction of steps spent decaying
    weight_decay: float = 0.0
    decay_embeddings: bool = True  # norms and biases are never decayed
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: Optional[float] = 1.0  # None: no clipping
    mu_dtype: Optional[DType] = None  # first-moment dtype; None: the parameter dtype

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError("warmup_steps must be >= 0 and warmup_fraction in [0, 1)")
        if self.warmup_steps and self.warmup_fraction:
            raise ValueError("give warmup_steps or warmup_fraction, not both")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"clip_norm must be > 0 or null, got {self.clip_norm}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop: output folder, batch geometry, length, loss options and initial weights."""

    output_dir: str = "runs/train"  # checkpoints/, metrics.jsonl, tensorboard/ (local or gs://)
    global_batch: int = 8  # packed rows per optimizer step, over all processes
    grad_accum: int = 1  # micro-batches per step (global_batch / grad_accum rows each)
    epochs: int = 1
    steps: Optional[int] = None  # None: `epochs` passes over the data
    init_from: Optional[str] = None  # checkpoint folder (e.g. `lt-jax import-hf` output); None: random init
    seed: int = 0  # parameter init and the run's RNG
    z_loss: float = 0.0  # weight of log(Z)^2 per token
    lm_head_chunk: int = 0  # tokens per LM-head chunk in the loss; 0: whole sequence at once
    eval_every: int = 0  # steps; 0: only at the end (when data.eval is set)

    def __post_init__(self):
        if self.global_batch < 1 or self.grad_accum < 1:
            raise ValueError("global_batch and grad_accum must be >= 1")
        if self.global_batch % self.grad_accum:
            raise ValueError(
                f"global_batch ({self.global_batch}) must be a multiple of grad_accum ({self.grad_accum})"
            )
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1 or null, got {self.steps}")
        if self.z_loss < 0 or self.lm_head_chunk < 0 or self.eval_every < 0:
            raise ValueError("z_loss, lm_head_chunk and eval_every must be >= 0")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints of the whole training state (see lt_jax/train/checkpoint.py)."""

    dir: Optional[str] = None  # None: {train.output_dir}/checkpoints
    every: int = 500  # steps between saves (a final save always happens)
    keep: int = 3  # most recent checkpoints kept
    keep_every: Optional[int] = None  # also keep every step divisible by this
    async_save: bool = True

    def __post_init__(self):
        if self.every < 1 or self.keep < 1:
            raise ValueError("every and keep must be >= 1")
        if self.keep_every is not None and self.keep_every < 1:
            raise ValueError("keep_every must be >= 1 or null")


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """Metrics every `every` steps to the console, metrics.jsonl, TensorBoard and optionally W&B (process 0 only)."""

    every: int = 10
    jsonl: bool = True
    tensorboard: bool = True
    peak_flops_per_device: Optional[float] = None  # None: look the device kind up (no MFU on CPU)
    wandb: bool = False  # also log to Weights & Biases (pip install 'lt_jax[wandb]'; see lt_jax/train/wandb_logger.py)
    wandb_project: str = "lt_jax"
    wandb_entity: Optional[str] = None  # None: the account's default
    wandb_name: Optional[str] = None  # None: the output folder's name

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything `lt-jax train` needs; each component gets only its own section."""

    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def __post_init__(self):
        unknown = sorted(set(self.model) - {f.name for f in dataclasses.fields(ModelConfig)})
        if unknown:
            allowed = ", ".join(f.name for f in dataclasses.fields(ModelConfig))
            raise ConfigError(f"model.{unknown[0]}: unknown key; allowed: {allowed}")
        # Checks types and values now, so a bad model section fails before any device work.
        config_lib.from_dict(ModelConfig, self.model, prefix="model")
        if not self.data.train:
            raise ConfigError("data.train: required: the folder written by `lt-jax tokenize`")

    def model_config(self, base: Optional[ModelConfig] = None, source: str = "the checkpoint") -> ModelConfig:
        """The model section as a ModelConfig; over `base` (the config stored in checkpoint `source`).

        On a base, architecture fields given in the section must equal the base's; runtime fields
        (dtypes, remat, attention, max_segments) replace them.
        """
        if base is None:
            return config_lib.from_dict(ModelConfig, self.model, prefix="model")
        given = config_lib.from_dict(ModelConfig, self.model, prefix="model")
        clashes = [
            f"model.{k}: {getattr(given, k)!r} here but {getattr(base, k)!r} in {source}"
            for k in self.model
            if k not in RUNTIME_MODEL_FIELDS and getattr(given, k) != getattr(base, k)
        ]
        if clashes:
            raise ConfigError("; ".join(clashes) + " (drop these keys or fix them to match the checkpoint)")
        return dataclasses.replace(base, **{k: getattr(given, k) for k in self.model if k in RUNTIME_MODEL_FIELDS})

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or storage.join(self.train.output_dir, "checkpoints")


def load_run_config(path: Optional[str], overrides: Sequence[str] = ()) -> RunConfig:
    """A RunConfig from a YAML file plus dotted overrides; other stages' sections are skipped."""
    data = config_lib.load_yaml(path) if path else {}
    data = config_lib.merge(data, config_lib.parse_overrides(overrides))
    data = {k: v for k, v in data.items() if k not in OTHER_STAGE_SECTIONS}
    try:
        return config_lib.from_dict(RunConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


__all__ = [
    "DataConfig", "OptimConfig", "TrainConfig", "CheckpointConfig", "LoggingConfig", "RunConfig",
    "load_run_config", "OTHER_STAGE_SECTIONS", "RUNTIME_MODEL_FIELDS",
]
