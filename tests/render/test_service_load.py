"""Load on `genevolve render-server --tiny` over loopback: the server in a subprocess (so the RSS we
sample is the server's), CLIENTS concurrent clients for DURATION_S with a small queue, so some are
refused. Every request is answered or refused with 503 + Retry-After; none gets a 5xx; the server's
RSS does not grow by 10% in the second half; p50/p99 latency are printed (run with -s)."""
import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.fixtures.servers import ServerProcess, drive_load

DURATION_S = 60
CLIENTS = 8
QUEUE_SIZE = 4


@pytest.mark.slow  # ~90 s: server start (~20 s) + DURATION_S
def test_concurrent_clients_against_the_tiny_render_service():
    argv = ["render-server", "--tiny", "--devices", "cpu", "--steps", "1", "--long-side", "32",
            "--queue-size", str(QUEUE_SIZE)]
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    ref = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    with ServerProcess(argv) as server:
        async def main():
            async with httpx.AsyncClient(timeout=120) as http:
                async def send_one(k: int, i: int):
                    body = {"prompt": f"a cat number {k}.{i}", "seed": 1000 * k + i, "num_inference_steps": 1,
                            "width": 32, "height": 32, "true_cfg_scale": 4.0, "negative_prompt": " "}
                    if i % 2:
                        body["image_urls"] = [ref]
                    r = await http.post(server.url + "/generate", json=body)
                    if r.status_code == 200:
                        assert r.json()["success"] is True and r.json()["width"] == 32
                    return r
                await send_one(0, 0)  # first call loads the pipelines' lazy parts
                return await drive_load(send_one, clients=CLIENTS, duration_s=DURATION_S, rss_of=server.rss_bytes)

        report = asyncio.run(main())
        print("\n" + report.summary(f"render-server --tiny, {CLIENTS} clients"))
        assert server.alive()
        health = httpx.get(server.url + "/health").json()
        assert health["status"] == "ok" and health["failed"] == 0
    assert not report.errors, report.errors[:3]
    assert set(report.codes) <= {200, 503}, report.codes
    assert report.codes.get(200, 0) > 0
    _, _, growth = report.rss_growth_second_half()
    assert growth < 0.10, report.summary("render")
