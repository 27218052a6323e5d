"""Asynchronous rollouts (``rl.max_staleness = N ≥ 1``): the rollouts of the coming steps are
generated, rendered and judged while the trainer updates on this one (the one-step-off /
bounded-staleness design of verl, NeMo-RL and PipelineRL). ``N = 0`` never builds any of this: the
trainer collects each step's rollouts itself, after the previous step's weight sync (the paper's
synchronous step).

- One worker thread (:class:`RolloutProducer`) runs the rollout phase for one step's prompts at a
  time, in step order. The trainer thread submits the jobs (it alone reads the prompt source, so
  the data order is the synchronous run's) at most N steps ahead of the step it trains.
- Policy versions: the policy after step v is version v. The job of step t needs version
  t − 1 − N at least; the worker waits for it, then takes the newest weights the trainer has
  published, between two jobs (the JaxEngine's scheduler is idle then: requests in flight always
  finish on the weights they started with). An engine that reloads from an export (SGLang) is
  synced by the trainer thread as in the synchronous step; its servers take the new weights
  between requests (a /generate holds the reader side of the server's model-update lock, the
  reload the writer side), and the job records the version synced when it began, the oldest its
  tokens can come from.
- The trainer hands each job's samples to every process through the Collective
  (``gather_rollouts``, on the trainer thread: the worker never runs a collective), then drops a
  group whose policy is more than N versions behind the one it would train (:func:`drop_stale`,
  counted in ``rollout/dropped_stale``). The version gate keeps that from happening with an engine
  that takes every published weight; it is the guard for one that falls behind.
- Checkpoints save the prompt source's position before the first job not yet trained; a resume
  regenerates those jobs from there, so every prompt of the data order trains exactly once.
- A failed job (an exception in the rollout phase) is raised by the trainer's :meth:`take`; the
  trainer stops the worker before it returns or raises (:meth:`RolloutProducer.close`), and the
  worker is never left behind: it is joined before the engine is closed.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any, Callable, Sequence

from genevolve_jax.train.rl.records import RolloutSample, StepRollouts


@dataclasses.dataclass(frozen=True)
class RolloutJob:
    """One step's prompts to roll out (this host's shard)."""
    step: int                  # the step that trains on them
    prompts: tuple[Any, ...]
    data_state: dict           # the prompt source's state before these prompts (a resume restarts here)
    min_version: int           # the oldest policy version it may be generated with: step − 1 − N


@dataclasses.dataclass(frozen=True)
class CollectedJob:
    """A job's rollouts as the rollout phase returned them, with the policy version that made them."""
    job: RolloutJob
    samples: tuple[RolloutSample, ...]
    info: dict
    version: int


class ProducerStopped(RuntimeError):
    """The producer was closed while the trainer waited for a job."""


class RolloutProducer:
    """A worker thread that runs ``collect(job) -> (samples, info)`` for submitted jobs, in order,
    with the newest published weights that satisfy each job's version."""

    def __init__(self, collect: Callable[[RolloutJob], tuple[Sequence[RolloutSample], dict]], version: int):
        self._collect = collect
        self._cond = threading.Condition()
        self._jobs: collections.deque[RolloutJob] = collections.deque()
        self._done: dict[int, CollectedJob | BaseException] = {}
        self._published = self._applied = int(version)   # newest version the trainer published / the engine holds
        self._push: Callable[[], Any] | None = None       # the newest published weights not yet taken
        self._running: RolloutJob | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)
        self._thread.start()

    # -- the trainer's side ------------------------------------------------------------------------
    def submit(self, job: RolloutJob, first: bool = False) -> None:
        """Queue ``job`` (``first``: before the others, e.g. a step collected again after an outage)."""
        with self._cond:
            (self._jobs.appendleft if first else self._jobs.append)(job)
            self._cond.notify_all()

    def publish(self, version: int, push: Callable[[], Any] | None) -> None:
        """The policy of ``version`` exists; ``push()`` gives it to the engine (None: the engine
        holds it already, or the weights did not change). Replaces an older push not yet taken."""
        with self._cond:
            self._published = int(version)
            if push is not None:
                self._push = push
            self._cond.notify_all()

    def wait_collected(self, step: int, timeout_s: float | None = None) -> bool:
        """Wait until ``step``'s job is collected (or failed), or the producer stops; True when
        it is there to take."""
        with self._cond:
            self._cond.wait_for(lambda: step in self._done or self._stopping or not self._thread.is_alive(),
                                timeout_s)
            return step in self._done

    def take(self, step: int) -> CollectedJob:
        """The rollouts of ``step``'s job, waiting for them; re-raises the job's error."""
        self.wait_collected(step)
        with self._cond:
            if step not in self._done:
                raise ProducerStopped(f"the rollout producer stopped before step {step}'s rollouts")
            got = self._done.pop(step)
        if isinstance(got, BaseException):
            raise got
        return got

    @property
    def depth(self) -> int:
        """Jobs collected and waiting for the trainer."""
        with self._cond:
            return len(self._done)

    def pending(self) -> list[RolloutJob]:
        """Jobs submitted and not yet taken (queued, running or collected), in step order."""
        with self._cond:
            return sorted(list(self._jobs) + [d.job for d in self._done.values() if isinstance(d, CollectedJob)]
                          + ([self._running] if self._running is not None else []), key=lambda j: j.step)

    def close(self, timeout_s: float | None = None) -> bool:
        """Stop after the job in progress (queued jobs are not run); True once the thread is gone."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # -- the worker --------------------------------------------------------------------------------
    def _next(self) -> tuple[RolloutJob, Callable[[], Any] | None, int] | None:
        """The next job once its version is published, with the weights to push first (None: stop)."""
        with self._cond:
            self._cond.wait_for(lambda: self._stopping or (
                self._jobs and self._published >= self._jobs[0].min_version))
            if self._stopping:
                return None
            job, push, self._push = self._jobs.popleft(), self._push, None
            self._running = job
            return job, push, self._published

    def _run(self) -> None:
        while (got := self._next()) is not None:
            job, push, version = got
            try:
                if push is not None:     # between jobs: nothing of this producer is in flight
                    push()
                    self._applied = version
                samples, info = self._collect(job)
                out: CollectedJob | BaseException = CollectedJob(job, tuple(samples), dict(info), self._applied)
            except BaseException as exc:   # handed to the trainer, which raises it and stops the run
                out = exc
            with self._cond:
                self._done[job.step] = out
                self._running = None
                self._cond.notify_all()
            if isinstance(out, BaseException):
                return


def drop_stale(rollouts: StepRollouts, group_size: int, trainer_version: int,
               max_staleness: int) -> tuple[StepRollouts, int, list[int]]:
    """``rollouts`` without the groups whose policy version is more than ``max_staleness`` behind
    ``trainer_version`` (a group's version is its oldest sample's). Returns (kept rollouts, groups
    dropped, staleness of each kept group). Pure: every process drops the same groups."""
    samples, prompts, kept_staleness, dropped = [], [], [], 0
    for g, prompt in enumerate(rollouts.prompts):
        members = rollouts.samples[g * group_size:(g + 1) * group_size]
        lag = trainer_version - min(s.policy_version for s in members)
        if lag > max_staleness:
            dropped += 1
            continue
        samples.extend(members)
        prompts.append(prompt)
        kept_staleness.append(lag)
    return StepRollouts(tuple(samples), tuple(prompts), rollouts.info), dropped, kept_staleness


def with_policy_version(samples: Sequence[RolloutSample], version: int) -> list[RolloutSample]:
    return [dataclasses.replace(s, policy_version=int(version)) for s in samples]


def staleness_metrics(kept: Sequence[int], dropped: int, dropped_total: int, depth: int, wait_s: float) -> dict:
    return {"rollout/staleness_mean": sum(kept) / len(kept) if kept else 0.0,
            "rollout/staleness_max": float(max(kept, default=0)), "rollout/dropped_stale": float(dropped),
            "rollout/dropped_stale_total": float(dropped_total), "rollout/queue_depth": float(depth),
            "time/rollout_wait_s": wait_s}
