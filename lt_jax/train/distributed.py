"""Multi-host start-up: `jax.distributed.initialize` from flags or from the cluster's environment.

Call `initialize` before anything touches a JAX device. Sources, first match wins:
  1. explicit flags: --coordinator HOST:PORT --num-processes N --process-id I (any launcher);
  2. a multi-process environment JAX knows how to read: a Cloud TPU pod slice (TPU_WORKER_HOSTNAMES
     lists several workers, or Multislice's MEGASCALE_* variables), Slurm with more than one task
     (srun), Open MPI (mpirun), or JAX_COORDINATOR_ADDRESS set by hand. JAX's own cluster detection
     then fills in the coordinator, process count and id;
  3. otherwise one process: nothing to initialise.
On CPU, cross-process collectives need gloo; it is selected whenever several processes are used
(the setting only affects the CPU backend).
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import jax

log = logging.getLogger(__name__)


def multiprocess_environment(env: Optional[dict] = None) -> Optional[str]:
    """The name of the multi-process environment we run in, or None for a single process."""
    env = os.environ if env is None else env
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "tpu-pod"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu-multislice"
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_JOB_ID"):
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "openmpi"
    return None


def initialize(
    coordinator: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    timeout_s: int = 300,
) -> bool:
    """Starts JAX's distributed runtime when there is more than one process; True if it did."""
    explicit = coordinator is not None or num_processes is not None or process_id is not None
    detected = None if explicit else multiprocess_environment()
    if not explicit and detected is None:
        return False
    if explicit and (coordinator is None or num_processes is None or process_id is None):
        raise ValueError("give all of --coordinator, --num-processes and --process-id, or none of them")
    if explicit and num_processes == 1:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=timeout_s)
    else:
        jax.distributed.initialize(initialization_timeout=timeout_s)
    log.info(
        "distributed: process %d of %d (%s), %d local / %d global devices", jax.process_index(),
        jax.process_count(), "flags" if explicit else detected, jax.local_device_count(), jax.device_count(),
    )
    return True


def is_primary() -> bool:
    return jax.process_index() == 0


__all__ = ["initialize", "multiprocess_environment", "is_primary"]
