"""Training checkpoints: the model items of `lt_jax.model.checkpoint_io` plus the training state.

The model-checkpoint readers and writers live in lt_jax.model.checkpoint_io (below every stage)
and are re-exported here for callers that already import them from this module.
"""

from __future__ import annotations

from typing import Optional

import jax
import orbax.checkpoint as ocp

from lt_jax.config import to_dict
from lt_jax.model.checkpoint_io import (  # noqa: F401  (re-exported)
    MODEL_CONFIG,
    PARAMS,
    all_steps,
    checkpoint_manager,
    load_model_checkpoint,
    load_model_config,
    model_items,
    resolve_step,
    save_model_checkpoint,
)

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
        return self.manager.restore(step, args=ocp.args.Composite(**{RUN_CONFIG: ocp.args.JsonRestore()}))[RUN_CONFIG]

    def wait(self) -> None:
        """Blocks until the last save is committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
