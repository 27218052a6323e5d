"""render-server and the HTTP client renderer on 127.0.0.1: the original JSON contract, health,
round-robin, and a worker failure that the client retries."""
import asyncio
import base64
import io
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from genevolve_jax.render.base import RenderError, RenderRequest, SamplingParams
from genevolve_jax.render.client import HTTPRenderer, generate_payload
from genevolve_jax.render.remote import image_to_data_uri
from genevolve_jax.serving.render_service import RenderLimits, create_app
from tests.fixtures.servers import LoopbackServer


class SeedColourWorker:
    """A fake device worker: a solid image whose colour encodes the seed and the reference count."""

    def __init__(self, fail_first: int = 0):
        self.fail_first = fail_first
        self.calls = 0
        self.requests = []
        self._lock = threading.Lock()

    def render_images(self, request: RenderRequest, refs):
        with self._lock:
            self.calls += 1
            self.requests.append((request, [r.size for r in refs]))
            if self.calls <= self.fail_first:
                raise RenderError("CUDA out of memory (simulated)")
        w, h = (request.width or 32), (request.height or 32)
        return Image.new("RGB", (w, h), (request.seed % 256, len(refs), 7))


@pytest.fixture()
def ref_file(tmp_path):
    rng = np.random.default_rng(3)
    p = tmp_path / "ref.png"
    Image.fromarray(rng.integers(0, 256, (30, 60, 3), dtype=np.uint8)).save(p)
    return str(p)


def test_contract_health_and_tiny_pipeline_end_to_end(ref_file):
    from genevolve_jax.render.tiny import tiny_renderer

    worker = tiny_renderer(seed=0, long_side=32)
    with LoopbackServer(create_app([worker])).running() as url:
        assert url.startswith("http://127.0.0.1:")
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok" and health["workers"] == 1
        # an original-service client: data-URI JPEGs and every contract field
        body = {"image_urls": [image_to_data_uri(Image.open(ref_file), "JPEG")], "prompt": "a cat on a roof",
                "seed": 5, "true_cfg_scale": 4.0, "negative_prompt": " ", "num_inference_steps": 2,
                "guidance_scale": 1.0, "num_images_per_prompt": 1, "width": 32, "height": 16}
        r = httpx.post(f"{url}/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["success"] is True
        img = Image.open(io.BytesIO(base64.b64decode(out["image"])))
        assert img.size == (32, 16)
        # the service renders what the in-process renderer renders for the same decoded inputs
        direct = worker.render_images(RenderRequest("a cat on a roof", seed=5, num_inference_steps=2,
                                                    width=32, height=16),
                                      [Image.open(io.BytesIO(base64.b64decode(body["image_urls"][0].split(",")[1])))
                                       .convert("RGB")])
        np.testing.assert_array_equal(np.asarray(img.convert("RGB")), np.asarray(direct))
        assert httpx.get(f"{url}/health").json()["served"] == 1


def test_worker_failure_is_retried_by_client(ref_file):
    flaky = SeedColourWorker(fail_first=1)
    with LoopbackServer(create_app([flaky])).running() as url:
        client = HTTPRenderer([url], SamplingParams(long_side=64), timeout_s=30, max_retries=3, backoff_s=0.01)
        img = asyncio.run(client.render(RenderRequest("a fox", (ref_file,), seed=9)))
        assert flaky.calls == 2  # the first try hit the failing worker, the retry succeeded
        assert img.getpixel((0, 0)) == (9, 1, 7)
        assert img.size == (64, 32)  # long side 64 following the 2:1 reference
        req, ref_sizes = flaky.requests[-1]
        assert req.num_inference_steps == 40 and req.true_cfg_scale == 4.0 and req.negative_prompt == " "
        assert ref_sizes == [(60, 30)]
        health = httpx.get(f"{url}/health").json()
        assert health["failed"] == 1 and health["served"] == 1


def test_round_robin_over_urls_and_failure_after_retries(ref_file):
    bad, good = SeedColourWorker(fail_first=10**6), SeedColourWorker()
    with LoopbackServer(create_app([bad])).running() as bad_url, \
            LoopbackServer(create_app([good])).running() as good_url:
        client = HTTPRenderer([bad_url, good_url], timeout_s=30, max_retries=2, backoff_s=0.0)
        img = asyncio.run(client.render(RenderRequest("a fox", (ref_file,), seed=4)))
        assert img.getpixel((0, 0)) == (4, 1, 7)
        assert client.attempts_per_url == {bad_url: 1, good_url: 1}
        only_bad = HTTPRenderer([bad_url], timeout_s=30, max_retries=2, backoff_s=0.0)
        with pytest.raises(RenderError, match=r"HTTP 500.*after 2 tries"):
            asyncio.run(only_bad.render(RenderRequest("a fox", (ref_file,), seed=4)))


def test_bad_requests_are_rejected_naming_the_field_and_not_retried():
    worker = SeedColourWorker()
    with LoopbackServer(create_app([worker])).running() as url:
        cases = [({"prompt": ""}, "prompt"), ({"prompt": "x", "image_urls": ["data:image/png;base64,AAAA"]},
                                              "image_urls[0]"),
                 ({"prompt": "x", "seed": "seven"}, "seed"), ({"prompt": "x", "seed": 1.5}, "seed must be an integer"),
                 ({"prompt": "x", "negative_prompt": 3}, "negative_prompt must be a string"),
                 ({"prompt": "x", "width": 32}, "width and height"),
                 ({"prompt": "x", "num_images_per_prompt": 9}, "num_images_per_prompt")]
        for body, field in cases:
            r = httpx.post(f"{url}/generate", json=body)
            assert r.status_code == 400 and field in r.json()["error"] and r.json()["success"] is False
        assert worker.calls == 0
        calls = {"n": 0}

        def count(request):
            calls["n"] += 1
            return httpx.Response(400, json={"success": False, "error": "prompt must be a non-empty string"})

        client = HTTPRenderer([url], max_retries=3, backoff_s=0.0, transport=httpx.MockTransport(count))
        with pytest.raises(RenderError, match="after 1 tries"):
            asyncio.run(client.render(RenderRequest("x", (), seed=0)))
        assert calls["n"] == 1


def test_two_workers_share_one_queue_and_several_images_per_prompt():
    workers = [SeedColourWorker(), SeedColourWorker()]
    with LoopbackServer(create_app(workers)).running() as url:
        async def burst():
            async with httpx.AsyncClient(timeout=30) as c:
                return await asyncio.gather(*(c.post(f"{url}/generate", json={"prompt": "p", "seed": s})
                                              for s in range(8)))
        outs = asyncio.run(burst())
        assert all(o.json()["success"] for o in outs)
        assert workers[0].calls + workers[1].calls == 8 and min(w.calls for w in workers) >= 1
        r = httpx.post(f"{url}/generate", json={"prompt": "p", "seed": 20, "num_images_per_prompt": 3}).json()
        seeds = [Image.open(io.BytesIO(base64.b64decode(b))).getpixel((0, 0))[0] for b in r["images"]]
        assert seeds == [20, 21, 22]


def test_payload_sizes_follow_first_reference(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (300, 400)).save(a)  # portrait 3:4
    Image.new("RGB", (500, 100)).save(b)
    refs = [Image.open(a), Image.open(b)]
    p = generate_payload(RenderRequest("x", (str(a), str(b)), seed=1), refs, SamplingParams())
    assert (p["width"], p["height"]) == (768, 1024)
    assert len(p["image_urls"]) == 2 and all(u.startswith("data:image/jpeg;base64,") for u in p["image_urls"])
    assert p["num_inference_steps"] == 40 and p["true_cfg_scale"] == 4.0 and p["guidance_scale"] == 1.0


# --- bounds, bombs, auth, a full queue, a client that hangs up ----------------------------------------------
@pytest.mark.parametrize("patch, field", [({"width": 4096, "height": 32}, "width"),
                                          ({"width": 32, "height": 8}, "height"),
                                          ({"num_inference_steps": 1000}, "num_inference_steps"),
                                          ({"num_inference_steps": 0}, "num_inference_steps"),
                                          ({"true_cfg_scale": 1e9}, "true_cfg_scale"),
                                          ({"guidance_scale": -1}, "guidance_scale"),
                                          ({"seed": 2 ** 64}, "seed"), ({"seed": -1}, "seed"),
                                          ({"prompt": "x" * 9000}, "prompt"),
                                          ({"image_urls": ["data:image/png;base64,AAAA"] * 5}, "image_urls")])
def test_numeric_fields_are_bounded(patch, field):
    worker = SeedColourWorker()
    with LoopbackServer(create_app([worker])).running() as url:
        r = httpx.post(f"{url}/generate", json={"prompt": "p", **patch})
        assert r.status_code == 400, r.text
        assert r.json()["param"] == field and r.json()["success"] is False
        assert worker.calls == 0


def test_decompression_bomb_and_body_size_are_refused():
    from tests.fixtures.servers import bomb_png
    worker = SeedColourWorker()
    limits = RenderLimits(max_body_bytes=200_000, max_ref_pixels=1000 * 1000)
    with LoopbackServer(create_app([worker], limits=limits)).running() as url:
        bomb = "data:image/png;base64," + base64.b64encode(bomb_png(50_000, 50_000)).decode()
        r = httpx.post(f"{url}/generate", json={"prompt": "p", "image_urls": [bomb]})
        assert r.status_code == 400 and r.json()["param"] == "image_urls[0]" and "exceeds" in r.json()["error"]
        buf = io.BytesIO()
        Image.new("L", (1100, 1000)).save(buf, format="PNG")  # 1.1 M pixels in ~2 KB
        big = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        r = httpx.post(f"{url}/generate", json={"prompt": "p", "image_urls": [big]})
        assert r.status_code == 400 and "1100x1000" in r.json()["error"]
        r = httpx.post(f"{url}/generate", json={"prompt": "p" * 300_000})
        assert r.status_code == 413 and r.json()["success"] is False
        assert worker.calls == 0 and httpx.get(f"{url}/health").status_code == 200


def test_bearer_token_and_open_health(monkeypatch):
    worker = SeedColourWorker()
    with LoopbackServer(create_app([worker], api_key="render-key")).running() as url:
        assert httpx.get(f"{url}/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer nope"}):
            r = httpx.post(f"{url}/generate", json={"prompt": "p"}, headers=headers)
            assert r.status_code == 401 and r.json()["success"] is False and r.json()["code"] == "invalid_api_key"
        r = httpx.post(f"{url}/generate", json={"prompt": "p"}, headers={"Authorization": "Bearer render-key"})
        assert r.status_code == 200 and worker.calls == 1
        client = HTTPRenderer([url], timeout_s=30, max_retries=1, backoff_s=0.0, api_key="render-key")
        assert asyncio.run(client.render(RenderRequest("a fox", (), seed=6))).getpixel((0, 0)) == (6, 0, 7)
        anonymous = HTTPRenderer([url], timeout_s=30, max_retries=3, backoff_s=0.0)
        with pytest.raises(RenderError, match="HTTP 401.*after 1 tries"):  # final, not retried
            asyncio.run(anonymous.render(RenderRequest("a fox", (), seed=6)))

    # The trainer's renderer (render.http.api_key_env) reads the key from the environment.
    from genevolve_jax.render import config as render_config
    from genevolve_jax.render.factory import build_renderer
    cfg = render_config.get_config()
    cfg.backend, cfg.http.max_retries, cfg.http.backoff_s = "http", 1, 0.0
    cfg.http.api_key_env = "GENEVOLVE_TEST_RENDER_KEY"
    monkeypatch.delenv("GENEVOLVE_TEST_RENDER_KEY", raising=False)
    with pytest.raises(RenderError, match="GENEVOLVE_TEST_RENDER_KEY.*not set"):
        build_renderer(cfg)
    with pytest.raises(ValueError, match=r"render.http.api_key_env must be the name") as err:
        render_config.validate(_pasted_key(cfg))
    assert "sk-" not in str(err.value)
    monkeypatch.setenv("GENEVOLVE_TEST_RENDER_KEY", "render-key")
    with LoopbackServer(create_app([worker], api_key="render-key")).running() as url:
        cfg.http.urls = [url]
        trainer_renderer = build_renderer(cfg)
        assert asyncio.run(trainer_renderer.render(RenderRequest("a fox", (), seed=9))).getpixel((0, 0)) == (9, 0, 7)


def _pasted_key(cfg):
    bad = cfg.copy_and_resolve_references()
    bad.http.api_key_env = "sk-live-0123456789"
    return bad


class SlowWorker(SeedColourWorker):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def render_images(self, request, refs):
        import time
        time.sleep(self.seconds)
        return super().render_images(request, refs)


def test_full_queue_is_503_with_retry_after_and_a_gone_client_frees_its_queue_place():
    worker = SlowWorker(0.5)
    with LoopbackServer(create_app([worker], queue_size=2, limits=RenderLimits(retry_after_s=2))).running() as url:
        async def burst():
            async with httpx.AsyncClient(timeout=60) as c:
                return await asyncio.gather(*(c.post(f"{url}/generate", json={"prompt": "p", "seed": s})
                                              for s in range(6)))
        replies = asyncio.run(burst())
        codes = sorted(r.status_code for r in replies)
        assert set(codes) == {200, 503}, codes
        busy = next(r for r in replies if r.status_code == 503)
        assert busy.headers["retry-after"] == "2" and busy.json()["code"] == "overloaded"
        # a client that hangs up while its 3 images wait: they are never drawn
        calls = worker.calls
        httpx.post(f"{url}/generate", json={"prompt": "p"}, timeout=60)  # occupies the worker for 0.5 s
        with pytest.raises(httpx.ReadTimeout):
            with httpx.Client(timeout=httpx.Timeout(60, read=0.2)) as c:
                c.post(f"{url}/generate", json={"prompt": "q", "num_images_per_prompt": 2})
        import time
        time.sleep(1.5)
        health = httpx.get(f"{url}/health").json()
        assert health["cancelled"] == 1 and health["queue_depth"] == 0
        assert worker.calls - calls <= 2  # the first request, plus at most the image already on the worker
