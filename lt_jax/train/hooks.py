"""Periodic work of the training loop as hooks with a cadence (logging, eval, checkpoint, preemption).

A `Hook` runs `fn(run, step)` after every `every`-th optimizer step, and optionally after the first
step of this process (`at_start`) or the last step of the run (`at_end`). Hooks run in list order;
time spent in a `paused` hook is not step time (eval, the blocking part of a save). A hook that
returns an int stops the loop with that exit status (preemption). `Run.add_hook(fn, every=N)`
adds one, after the built-in ones and before the preemption check.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from lt_jax.train.trainer import Run

HookFn = Callable[["Run", int], Optional[int]]


@dataclasses.dataclass(frozen=True)
class Hook:
    """`fn(run, step)` every `every` steps (0: not on a cadence), at the first and/or last step."""

    name: str
    fn: HookFn
    every: int = 1
    at_start: bool = False  # also after this process's first step (which compiles)
    at_end: bool = False  # also after the run's last step
    paused: bool = True  # its time is excluded from the step-time and tokens/s measurements

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"hook {self.name!r}: every must be >= 0, got {self.every}")

    def due(self, step: int, start_step: int, total_steps: int) -> bool:
        return bool(
            (self.every and step % self.every == 0)
            or (self.at_start and step == start_step + 1)
            or (self.at_end and step == total_steps)
        )
