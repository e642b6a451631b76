"""One engine over several hosts: process 0 takes the requests, every process makes the same decisions.

A model that spans hosts runs the same program on each of them, and every device call must be
entered by all processes with the same arguments. The engine's decisions (admission, prefill,
preemption, finishing) are host-side functions of its request operations and of the tokens the
device returns, so they are identical everywhere when

  - every process sees the device's outputs in full (`to_host` gathers the rows other hosts hold);
  - every process applies the same request operations (submit, cancel, forget) in the same order
    at the same step: they enter at process 0 (the server runs there), which records them as it
    applies them (`Inbox.record`), and at the start of each step broadcasts what it recorded
    since the previous one (`Inbox.exchange`), which the other processes then replay;
  - the resolved configuration is process 0's (`agree`: the default page budget depends on the
    free memory of each host's accelerator).

Results come back to process 0 like to every other process: each one runs the whole host loop.
With one process nothing here communicates.
"""

from __future__ import annotations

import pickle
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def several() -> bool:
    """Whether more than one process runs this program (the engine then steps in lockstep)."""
    return jax.process_count() > 1


def primary() -> bool:
    return jax.process_index() == 0


def broadcast_object(obj: Any) -> Any:
    """Process 0's `obj` (any picklable value) on every process; the others pass anything.

    Sent as its byte count and then the bytes in a power-of-two buffer, so the collective compiles
    once per size octave rather than once per message."""
    if not several():
        return obj
    data = pickle.dumps(obj) if primary() else b""
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    buf = np.zeros(1 << max(size - 1, 0).bit_length(), np.uint8)
    buf[: len(data)] = np.frombuffer(data, np.uint8)
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return pickle.loads(buf[:size].tobytes())


def agree(value: Any) -> Any:
    """Process 0's value of something each process computed itself (a resolved config)."""
    return broadcast_object(value)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole array on this host; on several hosts every process gathers every row (each runs
    the same host loop, so all of them decide the same stops)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Inbox:
    """Request operations made on process 0 since the last step, replayed by the other processes.

    Process 0 applies each operation at once (so it behaves exactly as a single process) and
    records it; `exchange` (called by every process at the start of a step) returns, on the other
    processes, process 0's operations in order, and on process 0 nothing (already applied)."""

    def __init__(self):
        self.ops: list[tuple] = []
        self.primary = primary()

    def record(self, *op) -> None:
        if self.primary:
            self.ops.append(op)

    def exchange(self) -> list[tuple]:
        ops = broadcast_object(self.ops if self.primary else None)
        self.ops = []
        return [] if self.primary else ops
