"""Model checkpoints (Orbax): the `CheckpointManager` layout shared by import-hf, training and export-hf.

A checkpoint directory holds numbered steps; each step holds named items. This module owns the
two items every consumer needs:

    params        the model's nnx state as a pure nested dict of arrays (StandardSave), restored
                  straight into the target shardings from abstract arrays
    model_config  ModelConfig as JSON, so a checkpoint describes its own architecture

The training loop (lt_jax.train.checkpoint) adds more items to the same steps ("opt_state",
"loader", "run_config", ...); the readers here restore only the two above, so export, sampling and
eval work on training checkpoints too without importing the training stage. Directories may be
local or gs://.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax
import orbax.checkpoint as ocp
from flax import nnx

from lt_jax import storage
from lt_jax.config import from_dict, to_dict
from lt_jax.model import transformer as tfm
from lt_jax.model.config import ModelConfig

PARAMS = "params"
MODEL_CONFIG = "model_config"


def checkpoint_manager(directory: str, *, max_to_keep: Optional[int] = None, read_only: bool = False, **options):
    """A CheckpointManager on `directory` (created unless `read_only`); other `options` go to
    `ocp.CheckpointManagerOptions` (save_interval_steps, enable_async_checkpointing, ...)."""
    # Readers pass create=False rather than Orbax's read_only, which only adds log noise.
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only, **options)
    return ocp.CheckpointManager(_orbax_path(directory), options=opts)


def _orbax_path(directory: str) -> str:
    # Orbax wants absolute local paths; gs:// URLs pass through untouched.
    return str(directory) if storage.is_remote(directory) else os.path.abspath(directory)


def model_items(model) -> dict:
    """The `params` and `model_config` save args of `model`, for a trainer's Composite save."""
    return {
        PARAMS: ocp.args.StandardSave(nnx.state(model, nnx.Param).to_pure_dict()),
        MODEL_CONFIG: ocp.args.JsonSave(to_dict(model.config)),
    }


def save_model_checkpoint(model, directory: str, step: int = 0) -> str:
    """Saves `model` as step `step` of the checkpoint at `directory`; returns the step's path.

    Every process must call this (arrays may be sharded across hosts); it returns when the
    checkpoint is complete on storage.
    """
    manager = checkpoint_manager(directory)
    try:
        if step in manager.all_steps():
            raise FileExistsError(f"{directory}: step {step} already exists; pick another step or directory")
        manager.save(step, args=ocp.args.Composite(**model_items(model)))
        manager.wait_until_finished()
    finally:
        manager.close()
    return storage.join(directory, str(step))


def all_steps(directory: str) -> list[int]:
    """Steps saved under `directory` (empty when it does not exist)."""
    manager = checkpoint_manager(directory, read_only=True)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def resolve_step(manager, directory: str, step: Optional[int]) -> int:
    """`step`, or the latest one; a clear error when the directory has no (such) step."""
    steps = manager.all_steps()
    if not steps:
        raise FileNotFoundError(f"{directory}: no checkpoint steps found (expected numbered step folders)")
    if step is None:
        return max(steps)
    if step not in steps:
        raise FileNotFoundError(f"{directory}: no step {step}; available steps: {sorted(steps)}")
    return step


def load_model_config(directory: str, step: Optional[int] = None) -> ModelConfig:
    """The ModelConfig stored with a checkpoint step (latest by default)."""
    manager = checkpoint_manager(directory, read_only=True)
    try:
        step = resolve_step(manager, directory, step)
        restored = manager.restore(step, args=ocp.args.Composite(**{MODEL_CONFIG: ocp.args.JsonRestore()}))
    finally:
        manager.close()
    return from_dict(ModelConfig, restored[MODEL_CONFIG])


def load_model_checkpoint(directory: str, step: Optional[int] = None, mesh=None, **overrides):
    """A `Transformer` from a checkpoint step (latest by default), restored straight into the
    shardings `mesh` implies. `overrides` replace ModelConfig fields that do not change parameter
    shapes (param_dtype casts on restore, compute_dtype, remat, attention)."""
    config = dataclasses.replace(load_model_config(directory, step), **overrides)
    abstract = tfm.abstract_model(config, mesh)
    target = nnx.state(abstract, nnx.Param).to_pure_dict()
    if mesh is None:
        target = _on_default_device(target)
    manager = checkpoint_manager(directory, read_only=True)
    try:
        step = resolve_step(manager, directory, step)
        restored = manager.restore(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)}))
    finally:
        manager.close()
    flat = {".".join(str(k) for k in path): leaf for path, leaf in _flatten(restored[PARAMS])}
    return tfm.model_from_state(abstract, flat)


def _on_default_device(tree):
    """Abstract leaves without a sharding would make Orbax reuse the saved one; pin them to one device."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, prefix + (key,))
    else:
        yield prefix, tree
