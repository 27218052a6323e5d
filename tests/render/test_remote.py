"""Content hashes, the on-disk cache, throttling, retries, data URIs, output sizes and config checks."""
import asyncio
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from genevolve_jax.render import config as render_config
from genevolve_jax.render.base import RenderRequest, output_size
from genevolve_jax.render.factory import CachedRenderer
from genevolve_jax.render.remote import (ContentCache, PermanentError, RetriesExhausted, RetryableError, Throttle,
                                         canonical_json, content_hash, decode_image_payload, image_to_data_uri,
                                         retry_async)


def test_content_hash_is_sha256_of_canonical_json_and_blobs():
    a = {"b": [1, 2.5, "é"], "a": None}
    b = {"a": None, "b": [1, 2.5, "é"]}
    assert canonical_json(a) == canonical_json(b) == '{"a":null,"b":[1,2.5,"é"]}'
    expected = hashlib.sha256(canonical_json(a).encode() + (3).to_bytes(8, "little") + b"xyz").hexdigest()
    assert content_hash(a, [b"xyz"]) == content_hash(b, [b"xyz"]) == expected
    assert content_hash(a, [b"xy", b"z"]) != content_hash(a, [b"x", b"yz"])


@pytest.mark.parametrize("w,h,long_side,expected", [
    (300, 400, 1024, (768, 1024)), (1920, 1080, 1024, (1024, 576)), (1000, 1000, 1024, (1024, 1024)),
    (1000, 333, 1024, (1024, 336)), (5000, 10, 1024, (1024, 16)), (60, 40, 32, (32, 16))])
def test_output_size_long_side_follows_aspect_in_multiples_of_16(w, h, long_side, expected):
    assert output_size(w, h, long_side, 16) == expected


def test_render_cache_key_depends_on_bytes_not_paths(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    p1, p2 = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(arr).save(p1)
    Image.fromarray(arr).save(p2)
    k1 = RenderRequest("x", (str(p1),), seed=1).cache_key("r")
    assert RenderRequest("x", (str(p2),), seed=1).cache_key("r") == k1
    assert RenderRequest("x", (str(p1),), seed=2).cache_key("r") != k1
    assert RenderRequest("x", (str(p1),), seed=1).cache_key("other") != k1
    Image.fromarray(255 - arr).save(p1)
    assert RenderRequest("x", (str(p1),), seed=1).cache_key("r") != k1


class CountingRenderer:
    renderer_id = "counting"

    def __init__(self):
        self.calls = 0

    async def render(self, request):
        self.calls += 1
        return Image.new("RGB", (8, 8), (request.seed, 3, 5))


def test_cached_renderer_hits_on_second_call_and_survives_restart(tmp_path):
    inner = CountingRenderer()
    cache = ContentCache(tmp_path / "cache")
    r = CachedRenderer(inner, cache)
    first = asyncio.run(r.render(RenderRequest("p", (), seed=7)))
    second = asyncio.run(r.render(RenderRequest("p", (), seed=7)))
    assert (first.cached, second.cached, inner.calls) == (False, True, 1)
    assert second.image.getpixel((0, 0)) == (7, 3, 5) and second.path == first.path
    rerun = CachedRenderer(inner, ContentCache(tmp_path / "cache"))  # a new process, same cache dir
    assert asyncio.run(rerun.render(RenderRequest("p", (), seed=7))).cached and inner.calls == 1
    assert not asyncio.run(rerun.render(RenderRequest("p", (), seed=8))).cached and inner.calls == 2


def test_content_cache_json_roundtrip_and_damaged_entry(tmp_path):
    c = ContentCache(tmp_path)
    assert c.get_json("ns", "ab" * 32) is None
    c.put_json("ns", "ab" * 32, {"v": [1, 2]})
    assert c.get_json("ns", "ab" * 32) == {"v": [1, 2]}
    c.path("ns", "cd" * 32, ".json").parent.mkdir(parents=True, exist_ok=True)
    c.path("ns", "cd" * 32, ".json").write_text("{not json")
    assert c.get_json("ns", "cd" * 32) is None
    assert not list(tmp_path.rglob("*.tmp"))
    assert ContentCache(None).get_json("ns", "x") is None and ContentCache(None).put_json("ns", "x", 1) is None


def test_throttle_bounds_concurrency_and_spaces_starts():
    async def run(throttle, n):
        async def job():
            async with throttle:
                await asyncio.sleep(0.01)
        await asyncio.gather(*(job() for _ in range(n)))

    t = Throttle(max_concurrency=3)
    asyncio.run(run(t, 10))
    assert t.peak_in_flight == 3 and t.in_flight == 0
    # The next event loop (a trainer runs each step's rollout phase in its own) waits for slots too.
    asyncio.run(run(t, 10))
    assert t.peak_in_flight == 3 and t.in_flight == 0
    # A clock that stands still: every start after the first waits one more interval (0.1 s at
    # 600 rpm), whatever the machine's speed.
    waits = []

    async def record(seconds):
        waits.append(seconds)
    rpm = Throttle(max_concurrency=10, requests_per_minute=600, clock=lambda: 100.0, sleep=record)
    asyncio.run(run(rpm, 4))
    assert waits == pytest.approx([0.1, 0.2, 0.3]) and rpm.in_flight == 0
    with pytest.raises(ValueError, match="max_concurrency"):
        Throttle(0)


def test_retry_async_retries_retryable_and_stops_on_permanent():
    calls = {"n": 0}

    async def flaky():
        calls["n"] += 1
        if calls["n"] < 3:
            raise RetryableError("HTTP 503")
        return "ok"
    assert asyncio.run(retry_async(flaky, tries=3, backoff_s=0.001)) == "ok" and calls["n"] == 3

    async def timeout():
        raise asyncio.TimeoutError()
    with pytest.raises(RetriesExhausted, match="TimeoutError after 2 tries"):
        asyncio.run(retry_async(timeout, tries=2, backoff_s=0))

    perm = {"n": 0}

    async def bad():
        perm["n"] += 1
        raise PermanentError("HTTP 400: bad model")
    with pytest.raises(RetriesExhausted, match="HTTP 400: bad model after 1 tries"):
        asyncio.run(retry_async(bad, tries=5, backoff_s=0))
    assert perm["n"] == 1


def test_data_uri_roundtrip_and_bad_payloads():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8))
    uri = image_to_data_uri(img, "PNG")
    assert uri.startswith("data:image/png;base64,")
    np.testing.assert_array_equal(np.asarray(decode_image_payload(uri)), np.asarray(img))
    np.testing.assert_array_equal(np.asarray(decode_image_payload(uri.split(",", 1)[1])), np.asarray(img))
    for bad in ["", "data:image/png,notbase64", "data:image/png;base64,AAAA"]:
        with pytest.raises(ValueError):
            decode_image_payload(bad)


def test_render_config_defaults_and_validation():
    cfg = render_config.get_config()
    render_config.validate(cfg)
    s = cfg.sampling
    assert (s.num_inference_steps, s.true_cfg_scale, s.guidance_scale, s.negative_prompt, s.long_side,
            s.multiple_of) == (40, 4.0, 1.0, " ", 1024, 16)
    assert cfg.diffusers.dtype == "bfloat16"
    for field, value, msg in [("sampling.num_inference_steps", 0, "render.sampling.num_inference_steps"),
                              ("sampling.long_side", 1000, "render.sampling.long_side"),
                              ("backend", "dalle", "render.backend"),
                              ("http.max_retries", 0, "render.http.max_retries"),
                              ("throughput.requests_per_minute", -1.0, "render.throughput.requests_per_minute")]:
        bad = render_config.get_config()
        sec, _, key = field.rpartition(".")
        (bad[sec] if sec else bad)[key] = value
        with pytest.raises(ValueError, match=msg):
            render_config.validate(bad)
    diff = render_config.get_config()
    diff.backend = "diffusers"
    with pytest.raises(ValueError, match="render.diffusers.edit_model_path"):
        render_config.validate(diff)
    json.dumps(cfg.to_dict())  # plain data, loggable


def test_build_renderer_per_backend(monkeypatch):
    from genevolve_jax.render.base import RenderError
    from genevolve_jax.render.client import HTTPRenderer
    from genevolve_jax.render.factory import build_renderer

    cfg = render_config.get_config()
    cfg.backend = "http"
    cfg.http.urls = ["http://127.0.0.1:8101", "http://127.0.0.1:8102/"]
    r = build_renderer(cfg)
    assert isinstance(r, HTTPRenderer) and r.urls == ["http://127.0.0.1:8101", "http://127.0.0.1:8102"]
    assert r.params.num_inference_steps == 40 and r.timeout_s == 600.0
    cfg.backend = "gemini"
    cfg.gemini.api_key_env = "GENEVOLVE_TEST_NO_KEY"
    monkeypatch.delenv("GENEVOLVE_TEST_NO_KEY", raising=False)
    with pytest.raises(RenderError, match="GENEVOLVE_TEST_NO_KEY"):
        build_renderer(cfg)
    cfg.backend = "tiny"
    tiny = build_renderer(cfg)
    assert tiny.params.long_side == 32 and tiny.renderer_id.startswith("tiny-qwen-image-edit:0")
