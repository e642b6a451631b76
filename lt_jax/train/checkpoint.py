"""Orbax checkpoints: one `CheckpointManager` layout shared by import-hf, training and export-hf.

A checkpoint directory holds numbered steps; each step holds named items. This module owns the
two items every consumer needs:

    params        the model's nnx state as a pure nested dict of arrays (StandardSave), restored
                  straight into the target shardings from abstract arrays
    model_config  ModelConfig as JSON, so a checkpoint describes its own architecture

The training loop adds more items to the same steps ("opt_state", "loader", "train_config", ...);
the readers here restore only the two above, so export and eval work on training checkpoints too.
Directories may be local or gs://.
"""

from __future__ import annotations

from typing import Optional

from lt_jax import storage
from lt_jax.config import from_dict, to_dict
from lt_jax.model.config import ModelConfig

PARAMS = "params"
MODEL_CONFIG = "model_config"


def checkpoint_manager(directory: str, *, max_to_keep: Optional[int] = None, read_only: bool = False, **options):
    """A CheckpointManager on `directory` (created unless `read_only`); other `options` go to
    `ocp.CheckpointManagerOptions` (save_interval_steps, enable_async_checkpointing, ...)."""
    import orbax.checkpoint as ocp

    # Readers pass create=False rather than Orbax's read_only, which only adds log noise.
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only, **options)
    return ocp.CheckpointManager(_orbax_path(directory), options=opts)


def _orbax_path(directory: str) -> str:
    # Orbax wants absolute local paths; gs:// URLs pass through untouched.
    import os

    return str(directory) if storage.is_remote(directory) else os.path.abspath(directory)


def model_items(model) -> dict:
    """The `params` and `model_config` save args of `model`, for a trainer's Composite save."""
    import orbax.checkpoint as ocp
    from flax import nnx

    return {
        PARAMS: ocp.args.StandardSave(nnx.state(model, nnx.Param).to_pure_dict()),
        MODEL_CONFIG: ocp.args.JsonSave(to_dict(model.config)),
    }


def save_model_checkpoint(model, directory: str, step: int = 0) -> str:
    """Saves `model` as step `step` of the checkpoint at `directory`; returns the step's path.

    Every process must call this (arrays may be sharded across hosts); it returns when the
    checkpoint is complete on storage.
    """
    import orbax.checkpoint as ocp

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
    import orbax.checkpoint as ocp

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
    import dataclasses

    import orbax.checkpoint as ocp
    from flax import nnx

    from lt_jax.model import transformer as tfm

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
    import jax

    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, prefix + (key,))
    else:
        yield prefix, tree


# ---------------------------------------------------------------------------------------------
# Training checkpoints: the two model items above plus everything needed to resume exactly.
#
#     opt_state     the Optax state (StandardSave; restored into the moments' shardings)
#     train_state   {"step", "rng"}
#     loader        the data loader's cursor and fingerprint (JSON)
#     run_config    the resolved RunConfig of the run that wrote the step (JSON)
#
# Completeness: Orbax writes a step into `<step>.orbax-checkpoint-tmp-<n>` and renames it when
# done (local), or writes `<step>/commit_success.txt` last (gs://); steps without that are not
# listed by `all_steps()` and are deleted when the next manager opens (cleanup_tmp_directories),
# so a run killed mid-save resumes from the last complete step.

OPT_STATE = "opt_state"
TRAIN_STATE = "train_state"
LOADER = "loader"
RUN_CONFIG = "run_config"


class TrainCheckpointer:
    """Async Orbax saves of the whole training state; every process must make the same calls."""

    def __init__(self, directory: str, *, keep: int = 3, keep_every: Optional[int] = None, async_save: bool = True):
        self.directory = directory
        self.manager = checkpoint_manager(
            directory, max_to_keep=keep, keep_period=keep_every, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )

    def latest_step(self) -> Optional[int]:
        """The newest complete step, or None."""
        return self.manager.latest_step()

    def save(self, state, *, model_config, loader_state: dict, run_config: dict) -> None:
        """Starts saving `state` (a TrainState) as step `state.step`; returns once arrays are copied
        off the devices, the write continues in the background (see `wait`)."""
        import jax
        import orbax.checkpoint as ocp

        step = int(jax.device_get(state.step))
        items = {
            PARAMS: ocp.args.StandardSave(state.params),
            MODEL_CONFIG: ocp.args.JsonSave(to_dict(model_config)),
            OPT_STATE: ocp.args.StandardSave(state.opt_state),
            TRAIN_STATE: ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
            LOADER: ocp.args.JsonSave(loader_state),
            RUN_CONFIG: ocp.args.JsonSave(run_config),
        }
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, target) -> tuple:
        """(TrainState, loader state, run config dict) of `step`; `target` is the abstract TrainState
        (ShapeDtypeStructs with shardings) the arrays are restored into."""
        import orbax.checkpoint as ocp

        args = ocp.args.Composite(**{
            PARAMS: ocp.args.StandardRestore(target.params),
            OPT_STATE: ocp.args.StandardRestore(target.opt_state),
            TRAIN_STATE: ocp.args.StandardRestore({"step": target.step, "rng": target.rng}),
            LOADER: ocp.args.JsonRestore(),
            RUN_CONFIG: ocp.args.JsonRestore(),
        })
        restored = self.manager.restore(step, args=args)
        ts = restored[TRAIN_STATE]
        state = type(target)(ts["step"], restored[PARAMS], restored[OPT_STATE], ts["rng"])
        return state, restored[LOADER], restored[RUN_CONFIG]

    def run_config(self, step: int) -> dict:
        """The run config stored with `step` (read alone, before any array is restored)."""
        import orbax.checkpoint as ocp

        return self.manager.restore(step, args=ocp.args.Composite(**{RUN_CONFIG: ocp.args.JsonRestore()}))[RUN_CONFIG]

    def wait(self) -> None:
        """Blocks until the last save is committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
