"""Preemption: SIGTERM (how SLURM, Kubernetes and TPU maintenance ask a job to leave) and SIGINT
become a clean stop at a step boundary, agreed by every process.

:class:`PreemptionGuard` installs handlers that only record the request: nothing runs inside the
handler, so a signal that lands in the middle of a jitted step, an orbax save or an HTTP call
interrupts none of them. Between steps the driver asks :meth:`PreemptionGuard.should_stop`; the
answer is agreed across processes (any process that saw a signal stops them all, at the same
step), so no host saves a step another did not reach. The driver then saves the last completed
step, waits for the save, flushes its metrics and exits 0 saying where it saved.

A second signal while the first is pending is not swallowed: the handlers that were installed
before (Python's KeyboardInterrupt for SIGINT, the default termination for SIGTERM) take it, so
a user who presses Ctrl-C twice gets the immediate stop they ask for.

Why not jax's own preemption sync (``multihost_utils.reached_preemption_sync_point``, which orbax's
``reached_preemption`` wraps): it exists only under ``jax.distributed`` with the preemption
service, answers at "the largest step any host reached + 1" (one more step than needed), and
does nothing for a one-process run, which is where most preemptions of this trainer happen. One
boolean all-gather per step (``Collective.any_process``) is cheap next to a train step.

:meth:`PreemptionGuard.abandonable` marks a stretch of work that may be dropped on a signal (a
rollout phase: it changes no trainer state): inside it a signal raises :class:`StepAbandoned` at
once instead of waiting for the step to end. One process only: on several, a process that
abandons would leave the others waiting in a collective.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Callable, Iterator, Sequence

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StepAbandoned(Exception):
    """A signal arrived inside :meth:`PreemptionGuard.abandonable`: the step is dropped."""


class PreemptionGuard:
    """Records SIGTERM/SIGINT and answers :meth:`should_stop` with every process agreeing.

    ``agree(flag) -> bool`` combines the flags of all processes (default: true when any process
    saw a signal; a collective each call, so every process must call :meth:`should_stop` at the
    same steps). Use as a context manager, or :meth:`install` / :meth:`uninstall`; handlers can only
    be installed from the main thread."""

    def __init__(self, signals: Sequence[int] = DEFAULT_SIGNALS, *,
                 agree: Callable[[bool], bool] | None = None):
        self.signals = tuple(signals)
        if agree is None:   # the run's processes, through their Collective (sharding/collective.py)
            from genevolve_jax.sharding.collective import make_collective
            agree = make_collective().any_process
        self._agree = agree
        self._previous: dict[int, object] = {}
        self._received: int | None = None
        self._abandonable = False
        self.stop_step: int | None = None

    # -- handlers ----------------------------------------------------------------------------------
    def install(self) -> "PreemptionGuard":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard.install must run on the main thread (Python delivers signals there)")
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            # None: a handler installed outside Python (e.g. by a C++ library); it cannot be put
            # back from Python, so the default action returns instead.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def __enter__(self) -> "PreemptionGuard":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame) -> None:
        if self._received is not None:            # the second signal: the previous handler takes it
            previous = self._previous.get(signum, signal.SIG_DFL)
            self.uninstall()
            if callable(previous):
                previous(signum, frame)
            else:
                # The default action (termination), also where the signal was ignored before the
                # guard (a child of a process that ignores SIGINT inherits SIG_IGN): the first
                # signal was acted on, so the second keeps the promise of stopping at once.
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        self._received = signum
        # A log call inside a handler may deadlock if the signal interrupted the logging lock's
        # owner; os.write to stderr is async-signal-safe.
        os.write(2, f"genevolve: received {signal.Signals(signum).name}; stopping after the current step "
                    f"(send it again to stop at once)\n".encode())
        if self._abandonable:
            raise StepAbandoned(signal.Signals(signum).name)

    # -- queries -------------------------------------------------------------------------------------
    @property
    def requested(self) -> bool:
        """This process received a signal (not agreed: see :meth:`should_stop`)."""
        return self._received is not None

    @property
    def signal_name(self) -> str | None:
        return None if self._received is None else signal.Signals(self._received).name

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Record a stop request as if ``signum`` had arrived (a maintenance notice polled from
        elsewhere, or a test)."""
        if self._received is None:
            self._received = int(signum)

    def should_stop(self, step: int) -> bool:
        """After step ``step`` completed: stop now? The same answer on every process."""
        stop = bool(self._agree(self.requested))
        if stop and self.stop_step is None:
            self.stop_step = int(step)
            log.warning("preemption: stopping after step %d (%s)", step, self.signal_name or "another process")
        return stop

    @contextlib.contextmanager
    def abandonable(self) -> Iterator[None]:
        """Inside, a signal raises :class:`StepAbandoned` (one process only; see the module doc).
        A signal that arrived before entering raises at once."""
        if self._received is not None:
            raise StepAbandoned(self.signal_name or "stop requested")
        self._abandonable = True
        try:
            yield
        finally:
            self._abandonable = False


class RunStopped(Exception):
    """A run that stopped early on purpose after saving its checkpoint: preempted (exit code 0,
    resume with the same command) or stopped by repeated non-finite steps (exit code 3). The CLI
    prints :attr:`message` and exits with :attr:`exit_code`."""

    PREEMPTED, NON_FINITE = 0, 3

    def __init__(self, message: str, *, exit_code: int, step: int, checkpoint_dir: str):
        super().__init__(message)
        self.message, self.exit_code = message, exit_code
        self.step, self.checkpoint_dir = step, checkpoint_dir
