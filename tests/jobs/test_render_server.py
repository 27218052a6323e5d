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
