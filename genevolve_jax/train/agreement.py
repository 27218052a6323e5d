"""Boolean agreement across the processes of a multi-host run.

Decisions that change what a process does next (stop for a preemption, skip a checkpoint step
that does not restore) must come out the same on every process, or one saves or restores a step
the others never reach. Each call is a collective: every process must make it, in the same order.
With one process they return the flag unchanged and move nothing.
"""
from __future__ import annotations

import jax
import numpy as np


def _gathered(flag: bool) -> np.ndarray:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(np.asarray([1 if flag else 0], np.int32))).reshape(-1)


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is true on at least one."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(_gathered(flag).max() > 0)


def all_processes(flag: bool) -> bool:
    """True on every process when ``flag`` is true on all of them."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(_gathered(flag).min() > 0)
