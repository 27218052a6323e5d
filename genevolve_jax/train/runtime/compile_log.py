"""The compiles a run pays for, measured as they happen.

Batches come in a few stable shapes (the evolve batch: rows of ``rl.max_tokens_per_row`` tokens, or
k/n of it with ``rl.row_length_buckets`` = n, and a row count ``grad_accum × batch-mesh size × 2^j``,
train/rl/batch_assembly.py), and each jitted stage (the train step, the π_old / reference forward)
compiles once per shape. :class:`CompileLog` records what compiling costs as it happens,
from JAX's own monitoring events, so that a step that compiled is visible in the metrics.
"""
from __future__ import annotations

import threading

import jax

# JAX's duration events of one compile (jax._src.dispatch / pxla): tracing, lowering, XLA.
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


class CompileLog:
    """Seconds this process has spent compiling (every jitted function, the engine's included),
    summed from JAX's monitoring events. One listener serves the process: listeners cannot be
    removed, so it is registered once and instances read its running total."""

    _lock = threading.Lock()
    _total = 0.0
    _registered = False

    def __init__(self):
        with CompileLog._lock:
            if not CompileLog._registered:
                jax.monitoring.register_event_duration_secs_listener(CompileLog._on_event)
                CompileLog._registered = True
        self._seen = CompileLog._total

    @staticmethod
    def _on_event(event: str, duration: float, **_) -> None:
        if event in _COMPILE_EVENTS:
            with CompileLog._lock:
                CompileLog._total += float(duration)

    def take(self) -> float:
        """Compile seconds since the last call (or since this log was made)."""
        now = CompileLog._total
        out, self._seen = now - self._seen, now
        return out
