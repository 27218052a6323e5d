"""Service outages longer than the retries: degrade, wait, continue; never train on a wreck.

Each client retries its own calls (the render client, the judge backend, the SGLang engine). When
a service stays down past those retries its samples come back masked with a reason kind (the
``rl.outage.reasons``: ``render_failed``, ``judge_failed``, ``error`` for an engine that no server
answered). This module decides what the trainer does about a step full of them:

1. :meth:`OutagePolicy.assess`: the step is *degraded* when the samples masked for outage reasons
   exceed ``rl.outage.max_masked_fraction`` of the step's samples.
2. :meth:`OutagePolicy.wait_for_recovery`: then poll every :class:`HealthCheck` with exponential
   backoff (``backoff_s`` doubling up to ``max_backoff_s``) until all are healthy or
   ``max_wait_s`` has passed. With ``recollect`` the driver collects the step's rollouts again
   once the services are back (same step, same prompts); otherwise, or when they do not come back,
   it continues with what it has.
3. Whatever happened, a group whose masked fraction exceeds ``max_group_masked_fraction`` does
   not train: the mask stage (train/rl/masking.py, :func:`mask_groups`) masks its remaining samples
   with the reason ``group_mostly_masked``, since one or two survivors of six would set the group's
   advantages alone.

The driver makes one call per step, :meth:`OutagePolicy.collect`, around its collect-and-mask.
Metrics (:meth:`OutagePolicy.step_metrics`): ``outage/degraded`` (this step), ``outage/degraded_steps``
(so far), ``outage/wait_s`` (this step's wait), ``outage/wait_s_total``, ``outage/masked_fraction``,
``outage/masked_samples`` and ``outage/masked/<reason>`` (of the assessed, first attempt),
``outage/recovered`` and ``outage/recollected``; the mask stage adds ``outage/masked_groups``.

The policy does no I/O but the health checks; the driver owns the checkpoints (it saves before
any exit: see the module's section in the README).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Awaitable, Callable, Mapping, Protocol, Sequence, TypeVar, runtime_checkable

import ml_collections


log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_REASONS = ("render_failed", "judge_failed", "error")


def default_outage_config() -> ml_collections.ConfigDict:
    """``rl.outage`` (all ours)."""
    return ml_collections.ConfigDict({
        "enabled": True,
        "reasons": list(DEFAULT_REASONS),   # mask kinds that mean "a service is down"
        "max_masked_fraction": 0.25,        # above this fraction of a step's samples: degraded
        "max_wait_s": 600.0,                # wait at most this long for the services to come back
        "backoff_s": 5.0,                   # first pause between health checks, doubled each time
        "max_backoff_s": 60.0,              # ... up to this
        "health_timeout_s": 10.0,           # per health call
        "recollect": True,                  # services back: collect the step's rollouts again (once)
        "max_group_masked_fraction": 0.5,   # a group masked above this fraction does not train
    })


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_outage(cfg, prefix: str = "rl.outage") -> ml_collections.ConfigDict:
    def require(ok, field, rule, value):
        if not ok:
            raise ValueError(f"{prefix}.{field} must be {rule}, got {value!r}")

    require(isinstance(cfg.enabled, bool), "enabled", "a bool", cfg.enabled)
    require(isinstance(cfg.reasons, (list, tuple)) and all(isinstance(r, str) and r for r in cfg.reasons),
            "reasons", "a list of mask reason kinds", cfg.reasons)
    for name in ("max_masked_fraction", "max_group_masked_fraction"):
        require(_number(cfg[name]) and 0 <= cfg[name] <= 1, name, "in [0, 1]", cfg[name])
    for name in ("max_wait_s", "backoff_s"):
        require(_number(cfg[name]) and cfg[name] >= 0, name, ">= 0", cfg[name])
    require(_number(cfg.max_backoff_s) and cfg.max_backoff_s >= cfg.backoff_s, "max_backoff_s",
            f">= {prefix}.backoff_s ({cfg.backoff_s})", cfg.max_backoff_s)
    require(_number(cfg.health_timeout_s) and cfg.health_timeout_s > 0, "health_timeout_s", "> 0",
            cfg.health_timeout_s)
    require(isinstance(cfg.recollect, bool), "recollect", "a bool", cfg.recollect)
    return cfg


# --- health checks -----------------------------------------------------------------------------------
@runtime_checkable
class HealthCheck(Protocol):
    """A service the rollouts depend on. ``healthy`` answers within its own timeout and never
    raises for a service that is down (it returns False)."""

    name: str

    async def healthy(self) -> bool: ...


class HTTPHealthCheck:
    """Healthy when ``GET <url><path>`` answers 2xx (the render service's and ``genevolve serve``'s
    ``/health``; an OpenAI-compatible judge endpoint answers ``/v1/models``)."""

    def __init__(self, name: str, url: str, path: str = "/health", *, timeout_s: float = 10.0,
                 headers: Mapping[str, str] | None = None, transport=None):
        self.name, self.url = name, url.rstrip("/") + path
        self.timeout_s, self.headers, self.transport = timeout_s, dict(headers or {}), transport

    async def healthy(self) -> bool:
        import httpx
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s, transport=self.transport) as client:
                r = await client.get(self.url, headers=self.headers)
            return 200 <= r.status_code < 300
        except (httpx.HTTPError, OSError):
            return False

    def __repr__(self) -> str:      # never the headers: they may hold a key
        return f"HTTPHealthCheck({self.name!r}, {self.url!r})"


class CallableHealthCheck:
    """Adapts ``fn() -> bool`` or ``async fn() -> bool`` (an engine's own health call); an exception
    counts as unhealthy."""

    def __init__(self, name: str, fn: Callable[[], bool | Awaitable[bool]]):
        self.name, self.fn = name, fn

    async def healthy(self) -> bool:
        try:
            out = self.fn()
            if asyncio.iscoroutine(out) or isinstance(out, asyncio.Future):
                out = await out
            return bool(out)
        except Exception as exc:  # noqa: BLE001 — a failing probe is an unhealthy service
            log.info("health check %s failed: %s", self.name, exc)
            return False


class AnyOfHealthCheck:
    """Healthy when any of ``checks`` is (clients that spread calls over several URLs, where one
    live URL keeps the service up)."""

    def __init__(self, name: str, checks: Sequence[HealthCheck]):
        self.name, self.checks = name, list(checks)

    async def healthy(self) -> bool:
        return any(await asyncio.gather(*(c.healthy() for c in self.checks)))


def health_checks_for_run(cfg, engine=None) -> list[HealthCheck]:
    """The services a `genevolve train` config depends on: the render service(s) (backend "http":
    ``GET /health``), the judge endpoint (judge_kind "vlm": ``GET <base>/v1/models`` with its
    bearer key) and the SGLang policy servers (the engine's own ``/health`` round). In-process
    renderers, judges and engines need none."""
    import os

    timeout = float(cfg.rl.outage.health_timeout_s)
    checks: list[HealthCheck] = []
    if cfg.render.backend == "http" and len(cfg.render.http.urls):
        checks.append(AnyOfHealthCheck("render service", [HTTPHealthCheck(f"render {u}", u, timeout_s=timeout)
                                                          for u in cfg.render.http.urls]))
    if cfg.reward.judge_kind == "vlm":
        e = cfg.reward.endpoint
        base = e.base_url.rstrip("/")
        key = os.environ.get(e.api_key_env, "") if e.api_key_env else ""
        checks.append(HTTPHealthCheck("judge endpoint", base, "/models" if base.endswith("/v1") else "/v1/models",
                                      timeout_s=timeout, headers={"Authorization": f"Bearer {key}"} if key else None))
    if engine is not None and cfg.rl.engine == "sglang":
        async def any_server() -> bool:
            return any((await engine.health()).values())
        checks.append(CallableHealthCheck("policy servers", any_server))
    return checks


# --- the policy ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StepAssessment:
    degraded: bool
    outage_masked: int               # samples masked for an outage reason
    num_samples: int
    counts: Mapping[str, int]        # every mask kind of the step

    @property
    def fraction(self) -> float:
        return self.outage_masked / self.num_samples if self.num_samples else 0.0


@dataclasses.dataclass(frozen=True)
class WaitOutcome:
    recovered: bool
    wait_s: float
    polls: int
    unhealthy: tuple[str, ...] = ()  # the checks still failing at the end

    @classmethod
    def none(cls) -> "WaitOutcome":
        return cls(True, 0.0, 0)


class OutagePolicy:
    """See the module docstring. ``checks``: the services to wait for; ``clock`` and ``sleep`` are
    injectable so that the backoff can be tested without waiting."""

    def __init__(self, cfg, checks: Sequence[HealthCheck] = (), *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        validate_outage(cfg)
        self.cfg = cfg
        self.reasons = frozenset(cfg.reasons)
        self.checks = list(checks)
        for c in self.checks:
            if not isinstance(c, HealthCheck):
                raise TypeError(f"{c!r} is not a HealthCheck (needs .name and async .healthy())")
        self._clock, self._sleep = clock, sleep
        self.degraded_steps = 0
        self.wait_s_total = 0.0

    def assess(self, masked_counts: Mapping[str, int], num_samples: int) -> StepAssessment:
        """Degraded: outage-masked samples above ``max_masked_fraction`` of ``num_samples``."""
        counts = {str(k): int(v) for k, v in masked_counts.items()}
        outage = sum(n for kind, n in counts.items() if kind in self.reasons)
        degraded = bool(self.cfg.enabled and num_samples > 0
                        and outage / num_samples > float(self.cfg.max_masked_fraction))
        return StepAssessment(degraded, outage, int(num_samples), counts)

    async def await_recovery(self) -> WaitOutcome:
        """Poll the checks with backoff until all are healthy or ``max_wait_s`` has passed."""
        start = self._clock()
        limit = float(self.cfg.max_wait_s)
        pause = float(self.cfg.backoff_s)
        polls = 0
        while True:
            polls += 1
            states = await asyncio.gather(*(self._probe(c) for c in self.checks))
            down = tuple(c.name for c, ok in zip(self.checks, states) if not ok)
            waited = self._clock() - start
            if not down:
                return WaitOutcome(True, waited, polls)
            if waited >= limit:
                return WaitOutcome(False, waited, polls, down)
            log.warning("outage: %s still down after %.0f s; next check in %.0f s", ", ".join(down), waited,
                        min(pause, limit - waited))
            await self._sleep(min(pause, max(0.0, limit - waited)))
            pause = min(pause * 2, float(self.cfg.max_backoff_s))

    async def _probe(self, check: HealthCheck) -> bool:
        try:
            return bool(await asyncio.wait_for(check.healthy(), float(self.cfg.health_timeout_s)))
        except Exception:  # noqa: BLE001 — a probe that times out or fails is "down"
            return False

    def wait_for_recovery(self) -> WaitOutcome:
        """:meth:`await_recovery` from synchronous code (the driver; run it on one process and give
        every process its outcome, so that all of them recollect or none)."""
        return asyncio.run(self.await_recovery())

    def record(self, assessment: StepAssessment, wait: WaitOutcome) -> None:
        """Count a degraded step and its wait (call once per step, after any wait)."""
        if assessment.degraded:
            self.degraded_steps += 1
            self.wait_s_total += wait.wait_s
            level = logging.INFO if wait.recovered else logging.WARNING
            log.log(level, "outage: %d of %d samples masked for service failures (%s); waited %.1f s, %s",
                    assessment.outage_masked, assessment.num_samples,
                    ", ".join(f"{k}={v}" for k, v in sorted(assessment.counts.items()) if k in self.reasons),
                    wait.wait_s, "services back" if wait.recovered else f"still down: {', '.join(wait.unhealthy)}")

    def step_metrics(self, assessment: StepAssessment, wait: WaitOutcome, *,
                     recollected: bool = False) -> dict[str, float]:
        out = {"outage/degraded": float(assessment.degraded), "outage/degraded_steps": float(self.degraded_steps),
               "outage/wait_s": float(wait.wait_s) if assessment.degraded else 0.0,
               "outage/wait_s_total": float(self.wait_s_total), "outage/masked_fraction": assessment.fraction,
               "outage/masked_samples": float(assessment.outage_masked),
               "outage/recovered": float(wait.recovered), "outage/recollected": float(recollected)}
        # The assessed attempt's outage masks by reason: after a recollect, masked/<kind> shows the
        # second attempt, so these keep what the outage cost.
        out.update({f"outage/masked/{kind}": float(n) for kind, n in assessment.counts.items()
                    if kind in self.reasons and n})
        return out

    def collect(self, collect_fn: Callable[[], tuple[T, Mapping[str, int], int]],
                on_writer: Callable[[Callable[[], WaitOutcome]], WaitOutcome] = lambda fn: fn(),
                ) -> tuple[T, dict[str, float]]:
        """The driver's one call per step. ``collect_fn() -> (result, masked counts by kind, number
        of samples)`` collects (and masks) the step's rollouts; when that step is degraded, wait
        for the services (``on_writer`` runs the wait on one process and hands every process its
        outcome, so that all recollect or none) and, when they are back and ``recollect`` is on,
        call ``collect_fn`` once more. Returns the result to train on and the step's metrics
        (:meth:`step_metrics`)."""
        result, counts, n = collect_fn()
        assessment = self.assess(counts, n)
        wait, recollected = WaitOutcome.none(), False
        if assessment.degraded:
            wait = on_writer(self.wait_for_recovery)
            if wait.recovered and self.cfg.recollect:
                result, counts, n = collect_fn()
                recollected = True
        self.record(assessment, wait)
        metrics = self.step_metrics(assessment, wait, recollected=recollected)
        if recollected:       # the fraction of the rollouts that train, not of the first attempt
            metrics["outage/masked_fraction"] = self.assess(counts, n).fraction
            metrics["outage/masked_fraction_first"] = assessment.fraction
        return result, metrics

    # Saved with the checkpoint meta so that the totals run on across a resume.
    def state_dict(self) -> dict:
        return {"degraded_steps": self.degraded_steps, "wait_s_total": self.wait_s_total}

    def load_state_dict(self, state: Mapping) -> None:
        self.degraded_steps = int(state.get("degraded_steps", 0))
        self.wait_s_total = float(state.get("wait_s_total", 0.0))
