"""The `genevolve render-server` subcommand: arguments, device resolution, one worker per device."""
import sys

import httpx
import pytest

from genevolve_jax import cli
from genevolve_jax.jobs import render_server
from genevolve_jax.serving.render_service import create_app
from tests.fixtures.servers import LoopbackServer


def _parse(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["genevolve", "render-server", *argv])
    return cli.build_parser().parse_args(["render-server", *argv])


def test_cli_defaults_bind_loopback(monkeypatch):
    args = _parse(monkeypatch)
    assert args.host == "127.0.0.1" and args.port == 8100 and args.steps == 40 and args.true_cfg_scale == 4.0
    assert args.dtype == "bfloat16" and args.devices == "auto"


def test_device_resolution():
    assert render_server.resolve_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    assert render_server.resolve_devices("auto")  # cpu at least
    with pytest.raises(ValueError, match="--devices"):
        render_server.resolve_devices(" , ")


def test_one_tiny_worker_per_device_serves_health(monkeypatch):
    with pytest.raises(SystemExit, match="--model"):
        render_server.build_workers(_parse(monkeypatch, "--devices", "cpu"))
    workers = render_server.build_workers(_parse(monkeypatch, "--tiny", "--devices", "cpu,cpu"))
    assert len(workers) == 2 and workers[0] is not workers[1]
    with LoopbackServer(create_app(workers)).running() as url:
        assert httpx.get(f"{url}/health").json()["workers"] == 2


def test_limits_and_api_key_env_flags(monkeypatch, capsys):
    args = _parse(monkeypatch, "--tiny", "--max-side", "512", "--max-steps", "8", "--api-key-env", "GENEVOLVE_TEST_KEY")
    limits = render_server.limits_from_args(args)
    assert limits.max_side == 512 and limits.max_steps == 8 and limits.max_images == 4
    monkeypatch.delenv("GENEVOLVE_TEST_KEY", raising=False)
    assert render_server.run(args) == 2  # refused before any worker loads
    assert "GENEVOLVE_TEST_KEY" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_steps"):
        render_server.limits_from_args(_parse(monkeypatch, "--tiny", "--max-steps", "0"))


def test_latency_slots_wait_together_and_render_one_at_a_time(monkeypatch):
    """--slots N --latency S: N workers over the device's one renderer. Their waits overlap (a
    barrier of N parties passes only if all N wait at once: no wall clock involved) while the
    renders themselves take the renderer's lock one at a time."""
    import threading

    workers = render_server.build_workers(_parse(monkeypatch, "--tiny", "--devices", "cpu", "--slots", "4",
                                                 "--latency", "0.5"))
    assert len(workers) == 4 and len({id(w.inner) for w in workers}) == 1 and len({id(w.lock) for w in workers}) == 1
    assert all(w.latency_s == 0.5 for w in workers)

    class Recording:
        def __init__(self):
            self.inside, self.most = 0, 0

        def render_images(self, request, refs):
            self.inside += 1
            self.most = max(self.most, self.inside)
            threading.Event().wait(0.01)          # gives another thread the chance to enter
            self.inside -= 1
            return request

    inner, lock, barrier = Recording(), threading.Lock(), threading.Barrier(4, timeout=60)
    monkeypatch.setattr(render_server.time, "sleep", lambda s: barrier.wait())
    slots = [render_server.SimulatedLatencyWorker(inner, 8.0, lock) for _ in range(4)]
    out = [None] * 4
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, slots[i].render_images(i, []))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [0, 1, 2, 3] and inner.most == 1 and not barrier.broken
    with pytest.raises(SystemExit, match="--latency"):
        render_server.build_workers(_parse(monkeypatch, "--tiny", "--devices", "cpu", "--latency", "-1"))
