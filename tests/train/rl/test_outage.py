"""Outage policy: which steps are degraded, how long it waits (exponential backoff, capped, up to
the limit) against real HTTP health endpoints that go down and come back. (Which groups never train
because most of their samples were masked: tests/train/rl/test_masking.py.)"""
import asyncio
import http.server
import socket
import threading

import numpy as np
import pytest

from genevolve_jax.train.rl.outage import (CallableHealthCheck, HealthCheck, HTTPHealthCheck, OutagePolicy, WaitOutcome,
                                           default_outage_config, validate_outage)


def _cfg(**kw):
    c = default_outage_config()
    c.update(kw)
    return c


def test_assess_counts_only_outage_reasons():
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    policy = OutagePolicy(_cfg(max_masked_fraction=0.25))
    for _ in range(200):
        n = int(rng.integers(1, 64))
        counts = {k: int(rng.integers(0, n // 3 + 1)) for k in ("render_failed", "judge_failed", "error",
                                                                 "too_long", "repeated")}
        outage = counts["render_failed"] + counts["judge_failed"] + counts["error"]
        a = policy.assess(counts, n)
        assert a.outage_masked == outage and a.degraded == (outage / n > 0.25)
        assert a.fraction == pytest.approx(outage / n)
    assert not policy.assess({"too_long": 10}, 10).degraded          # the policy's own fault, not a service's
    assert not policy.assess({}, 0).degraded
    assert not OutagePolicy(_cfg(enabled=False)).assess({"error": 10}, 10).degraded


class FakeTime:
    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def clock(self):
        return self.now

    async def sleep(self, s):
        self.sleeps.append(s)
        self.now += s


class Flaky:
    """Unhealthy for its first ``bad`` probes, then healthy."""

    def __init__(self, name, bad):
        self.name, self.bad, self.calls = name, bad, 0

    async def healthy(self):
        self.calls += 1
        return self.calls > self.bad


def test_backoff_doubles_up_to_the_cap_and_stops_at_the_limit():
    t = FakeTime()
    policy = OutagePolicy(_cfg(backoff_s=2.0, max_backoff_s=10.0, max_wait_s=1000.0),
                          [Flaky("render", 5), Flaky("judge", 2)], clock=t.clock, sleep=t.sleep)
    out = policy.wait_for_recovery()
    assert out.recovered and out.polls == 6 and out.unhealthy == ()
    assert t.sleeps == [2.0, 4.0, 8.0, 10.0, 10.0] and out.wait_s == sum(t.sleeps)

    t = FakeTime()
    policy = OutagePolicy(_cfg(backoff_s=3.0, max_backoff_s=20.0, max_wait_s=50.0),
                          [Flaky("render", 10 ** 6), Flaky("judge", 0)], clock=t.clock, sleep=t.sleep)
    out = policy.wait_for_recovery()
    assert not out.recovered and out.unhealthy == ("render",)
    assert t.sleeps == [3.0, 6.0, 12.0, 20.0, 9.0] and out.wait_s == 50.0        # never past the limit

    # The metrics of a degraded step, and the totals across steps (kept in the checkpoint meta).
    a = policy.assess({"render_failed": 6, "too_long": 1}, 12)
    policy.record(a, out)
    policy.record(a, WaitOutcome(True, 7.5, 2))
    m = policy.step_metrics(a, WaitOutcome(True, 7.5, 2), recollected=True)
    assert m["outage/degraded"] == 1.0 and m["outage/degraded_steps"] == 2.0 and m["outage/wait_s"] == 7.5
    assert m["outage/wait_s_total"] == 57.5 and m["outage/masked_fraction"] == 0.5 and m["outage/recollected"] == 1.0
    again = OutagePolicy(_cfg())
    again.load_state_dict(policy.state_dict())
    assert again.step_metrics(a, WaitOutcome.none())["outage/wait_s_total"] == 57.5
    clean = policy.assess({"render_failed": 1}, 12)
    assert policy.step_metrics(clean, WaitOutcome.none())["outage/wait_s"] == 0.0


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        ok = self.path == "/health"
        self.send_response(200 if ok else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}' if ok else b"{}")

    def log_message(self, *a):
        pass


class Server:
    """A real HTTP /health server that can be stopped and restarted on the same port."""

    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.httpd = None

    def start(self):
        http.server.ThreadingHTTPServer.allow_reuse_address = True
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), _Health)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class RecordingCheck:
    """Wraps a real health check and records each probe's answer, in order."""

    def __init__(self, check: HealthCheck):
        self.name, self.check, self.answers = check.name, check, []

    async def healthy(self) -> bool:
        ok = await self.check.healthy()
        self.answers.append(ok)
        return ok


class PausesThatRestart(FakeTime):
    """The policy's clock and sleep: each pause is recorded and moves the clock on by its length at
    once; the pause numbered ``restart_after`` (from 1) starts the server again first."""

    def __init__(self, server, restart_after):
        super().__init__()
        self.server, self.restart_after = server, restart_after

    async def sleep(self, s):
        await super().sleep(s)
        if len(self.sleeps) == self.restart_after:
            self.server.start()


def test_real_http_service_down_then_back():
    """A real /health endpoint that refuses, then answers: the policy polls it with backoff while it
    is down, sees it back on the first poll after the restart, and reports the pauses it took as
    its wait; down for good, it gives up at the limit naming the service. The restart happens in
    the policy's own pause, so the order of events is fixed and nothing depends on wall time."""
    server = Server()
    check = HTTPHealthCheck("render", f"http://127.0.0.1:{server.port}", timeout_s=2.0)
    assert isinstance(check, HealthCheck)
    assert not asyncio.run(check.healthy())                       # nothing listens yet
    server.start()
    try:
        assert asyncio.run(check.healthy())
        assert not asyncio.run(HTTPHealthCheck("x", f"http://127.0.0.1:{server.port}", "/nope").healthy())
        server.stop()
        assert not asyncio.run(check.healthy())
        # Refused twice; restarted in the second pause: the third poll finds it up, and the wait ends.
        pauses, probes = PausesThatRestart(server, restart_after=2), RecordingCheck(check)
        out = OutagePolicy(_cfg(backoff_s=0.1, max_backoff_s=0.4, max_wait_s=30.0), [probes],
                           clock=pauses.clock, sleep=pauses.sleep).wait_for_recovery()
        assert probes.answers == [False, False, True]
        assert out.recovered and out.polls == 3 and out.unhealthy == ()
        assert pauses.sleeps == [0.1, 0.2] and out.wait_s == pytest.approx(0.3)
        server.stop()
        # Down for good: every poll refused, the pauses (0.1, 0.2, then capped) stop at the limit.
        pauses, probes = PausesThatRestart(server, restart_after=None), RecordingCheck(check)
        out = OutagePolicy(_cfg(backoff_s=0.1, max_backoff_s=0.2, max_wait_s=0.7), [probes],
                           clock=pauses.clock, sleep=pauses.sleep).wait_for_recovery()
        assert not out.recovered and out.unhealthy == ("render",)
        assert pauses.sleeps == pytest.approx([0.1, 0.2, 0.2, 0.2]) and out.wait_s == pytest.approx(0.7)
        assert probes.answers == [False] * 5 and out.polls == 5
    finally:
        if server.httpd is not None:
            try:
                server.stop()
            except Exception:
                pass


def test_callable_checks_sync_async_and_raising():
    async def up():
        return True

    def boom():
        raise ConnectionError("refused")

    assert asyncio.run(CallableHealthCheck("a", lambda: True).healthy())
    assert asyncio.run(CallableHealthCheck("b", up).healthy())
    assert not asyncio.run(CallableHealthCheck("c", boom).healthy())

    # A probe that never answers is cut off by health_timeout_s: cancelled in its wait (it never
    # reaches its end), it counts as down.
    events = []

    async def hangs():
        events.append("started")
        try:
            await asyncio.sleep(30)      # far past the timeout: reached only if it failed to cut in
        except asyncio.CancelledError:
            events.append("cancelled")
            raise
        events.append("finished")

    out = OutagePolicy(_cfg(health_timeout_s=0.2, max_wait_s=0.0), [CallableHealthCheck("slow", hangs)]).wait_for_recovery()
    assert not out.recovered and out.unhealthy == ("slow",) and out.polls == 1
    assert events == ["started", "cancelled"]
    with pytest.raises(TypeError, match="not a HealthCheck"):
        OutagePolicy(_cfg(), [object()])


@pytest.mark.parametrize("field,value", [("max_masked_fraction", 1.5), ("max_wait_s", -1), ("backoff_s", "5"),
                                         ("max_backoff_s", 0.5), ("reasons", "error"), ("recollect", 1),
                                         ("max_group_masked_fraction", -0.1), ("health_timeout_s", 0)])
def test_validation_names_the_field(field, value):
    import ml_collections
    c = ml_collections.ConfigDict({**_cfg().to_dict(), field: value})   # as a config file could set it
    with pytest.raises(ValueError, match=f"rl.outage.{field}"):
        validate_outage(c)


def test_collect_waits_and_recollects_once_when_degraded():
    t = FakeTime()
    render = Flaky("render", 2)
    policy = OutagePolicy(_cfg(backoff_s=1.0, max_wait_s=100.0, max_masked_fraction=0.25), [render],
                          clock=t.clock, sleep=t.sleep)
    attempts = []

    def collect():        # the first attempt loses 9 of 12 samples to the render service, the second 1
        attempts.append(len(attempts))
        return f"rollouts{len(attempts)}", ({"render_failed": 9, "too_long": 1} if len(attempts) == 1
                                             else {"render_failed": 1}), 12

    on_writer_calls = []
    result, m = policy.collect(collect, lambda fn: on_writer_calls.append(1) or fn())
    assert result == "rollouts2" and len(attempts) == 2 and on_writer_calls == [1]
    assert m["outage/degraded"] == 1.0 and m["outage/recollected"] == 1.0 and m["outage/wait_s"] == 3.0
    assert m["outage/masked_fraction"] == pytest.approx(1 / 12) and m["outage/masked_fraction_first"] == 0.75
    assert m["outage/masked_samples"] == 9 and m["outage/masked/render_failed"] == 9
    assert "outage/masked/too_long" not in m and "outage/masked/judge_failed" not in m
    # A clean step: one attempt, no wait.
    result, m = policy.collect(lambda: ("clean", {"error": 1}, 12))
    assert result == "clean" and m["outage/degraded"] == 0.0 and m["outage/degraded_steps"] == 1.0
    # Services that stay down: the step continues with what it has, once, after the limit.
    t = FakeTime()
    policy = OutagePolicy(_cfg(backoff_s=1.0, max_wait_s=5.0), [Flaky("judge", 10 ** 6)], clock=t.clock,
                          sleep=t.sleep)
    calls = []
    result, m = policy.collect(lambda: (calls.append(1) or "degraded", {"judge_failed": 12}, 12))
    assert result == "degraded" and len(calls) == 1 and m["outage/recovered"] == 0.0
