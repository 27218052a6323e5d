"""Hypothesis fuzz of both servers' request bodies over real loopback HTTP: `genevolve serve`'s
/generate (SGLang schema) and /v1/chat/completions, and the render service's /generate. Bodies mix
well-formed fields, hostile values (huge ints, wrong types, vision tokens in odd places, bombs, bad
base64, paths, URLs) and raw bytes. Never a 5xx, every 4xx is JSON naming what was wrong, and the
server answers /health afterwards."""
import base64
import io

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from genevolve_jax.processing.tokenizer import default_tokenizer, special_token_ids
from genevolve_jax.serving.policy_schema import SGLANG_SAMPLING_KEYS, ServeLimits
from genevolve_jax.serving.policy_server import create_app
from genevolve_jax.serving.render_service import RenderLimits
from genevolve_jax.serving.render_service import create_app as render_app
from tests.fixtures.servers import LoopbackServer, bomb_png, tiny_engine

MAX_EXAMPLES = 200
# Over HTTP, each valid example runs the engine or the renderer (half the fuzz's time went to new
# prompt and image shapes compiling): hypothesis's default count, 100, a fresh draw on every run.
SERVER_EXAMPLES = 100
FUZZ = settings(max_examples=SERVER_EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
SEEN = {"serve": 0, "render": 0}
CODES: dict = {}


def _uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


IMAGES = [_uri(_png(28, 28)), _uri(_png(40, 60)), _uri(bomb_png(70_000, 70_000)), "AAAA", "data:image/png;base64,@@",
          "data:text/plain,hello", "/etc/passwd", "/nonexistent.png", "http://example.com/a.png", "", {"url": "x"},
          {"url": _uri(_png(28, 28)), "max_pixels": 10}, {"bogus": 1}]

leaf = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.integers(-3, 40),
                 st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_value = st.recursive(leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                          max_leaves=10)


@pytest.fixture(scope="module")
def serve_url():
    tok = default_tokenizer()
    engine = tiny_engine(tok, seed=4, max_slots=4, max_seq_len=128, min_bucket=128)
    limits = ServeLimits(max_new_tokens=6, max_images=2, max_image_pixels=64 * 64, max_body_bytes=1 << 20)
    with LoopbackServer(create_app(engine, tok, model_name="tiny", limits=limits)).running() as url:
        yield url, tok
    engine.close()


def _ids(tok):
    sp = special_token_ids(tok)
    special = st.sampled_from([sp["<|image_pad|>"], sp["<|vision_start|>"], sp["<|vision_end|>"], sp["<|video_pad|>"],
                               len(tok), len(tok) - 1, -1, 0])
    return st.lists(st.integers(20, 60) | special, max_size=12)


_SAMPLING_FIELDS = {
    "max_new_tokens": st.integers(-2, 10), "temperature": st.floats(-1, 3), "top_p": st.floats(-0.5, 1.5),
    "top_k": st.integers(-3, 2 ** 40), "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=3),
    "stop_token_ids": st.lists(st.integers(-5, 3000), max_size=3), "sampling_seed": st.integers(-2 ** 64, 2 ** 64),
    "min_p": st.floats(0, 1), "n": st.integers(0, 3), "skip_special_tokens": st.booleans(), "bogus": st.integers()}


def _sampling():
    sensible = st.fixed_dictionaries({}, optional=_SAMPLING_FIELDS)
    wild = st.dictionaries(st.sampled_from(SGLANG_SAMPLING_KEYS + ("bogus", "max_tokens")), json_value, max_size=4)
    return sensible | wild | json_value


def _mutated(data, base: dict, fields: dict) -> dict:
    """``base`` (a well-formed body) with 0-3 of its fields replaced by drawn (often hostile) values,
    so most examples get past the first check and reach the deeper ones."""
    n = data.draw(st.integers(0, 3))
    keys = data.draw(st.lists(st.sampled_from(sorted(fields)), min_size=n, max_size=n, unique=True))
    body = dict(base)
    for k in keys:
        value = data.draw(fields[k] | st.just(None) | json_value)
        if value is None and data.draw(st.booleans()):
            body.pop(k, None)
        else:
            body[k] = value
    return body


@pytest.mark.slow  # ~25 s on 2 cores: valid examples compile new prompt buckets and image shapes
@FUZZ
@given(data=st.data())
def test_fuzz_serve_generate_and_chat(serve_url, data):
    url, tok = serve_url
    sp = special_token_ids(tok)
    one_pad = [sp["<|vision_start|>"], sp["<|image_pad|>"], sp["<|vision_end|>"]]
    route = data.draw(st.sampled_from(["/generate", "/generate", "/v1/chat/completions", "raw"]))
    content = None
    if route == "/generate":
        base = data.draw(st.sampled_from([
            {"input_ids": [20, 21, 22], "sampling_params": {"max_new_tokens": 3, "temperature": 0.0}},
            {"text": "a red circle", "sampling_params": {"max_new_tokens": 2}, "return_logprob": True},
            {"input_ids": [20, *one_pad, 21], "image_data": [IMAGES[0]], "return_prompt_token_ids": True,
             "sampling_params": {"max_new_tokens": 2, "temperature": 0.5, "top_p": 0.9, "sampling_seed": 1}}]))
        body = _mutated(data, base, {
            "input_ids": _ids(tok), "text": st.text(max_size=20), "sampling_params": _sampling(),
            "image_data": st.lists(st.sampled_from(IMAGES), max_size=3) | st.sampled_from(IMAGES),
            "return_logprob": st.booleans(), "return_prompt_token_ids": st.booleans(), "rid": st.text(max_size=8),
            "stream": st.booleans(), "logprob_start_len": st.integers(-2, 5), "return_text_in_logprobs": st.booleans(),
            "extra": json_value})
        if data.draw(st.booleans()) and isinstance(body.get("sampling_params"), dict):
            sampling = _mutated(data, body["sampling_params"], _SAMPLING_FIELDS)
            body["sampling_params"] = sampling
    elif route == "/v1/chat/completions":
        part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "video", 3])},
                                     optional={"text": st.text(max_size=10) | json_value,
                                               "image_url": st.fixed_dictionaries({"url": st.sampled_from(IMAGES)})
                                               | json_value})
        message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", 1])},
                                        optional={"content": st.text(max_size=20) | st.lists(part, max_size=3)
                                                  | json_value})
        base = {"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": IMAGES[0]}}]}], "max_tokens": 2}
        body = _mutated(data, base, {
            "messages": st.lists(message, max_size=3), "model": st.sampled_from(["tiny", "no-such-model"]),
            "max_tokens": st.integers(-1, 8), "temperature": st.floats(-1, 3), "n": st.integers(0, 3),
            "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5),
            "seed": st.integers(-2 ** 64, 2 ** 64),
            "top_p": st.floats(-1, 2), "stream": st.booleans(), "logprobs": st.booleans(), "user": st.text(max_size=5)})
    else:
        route = data.draw(st.sampled_from(["/generate", "/v1/chat/completions", "/update_weights_from_disk",
                                           "/abort_request"]))
        body, content = None, data.draw(st.binary(max_size=120))
    r = httpx.post(url + route, json=body, content=content, timeout=120,
                   headers={"content-type": "application/json"} if content is not None else None)
    SEEN["serve"] += 1
    CODES[("serve", r.status_code)] = CODES.get(("serve", r.status_code), 0) + 1
    assert r.status_code < 500, (route, body, content, r.text)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"]


@pytest.fixture(scope="module")
def render_url():
    from genevolve_jax.render.tiny import tiny_renderer
    limits = RenderLimits(max_side=48, max_pixels=48 * 48, max_steps=2, max_images=2, max_refs=2,
                          max_ref_pixels=64 * 64, max_body_bytes=1 << 20)
    app = render_app([tiny_renderer(seed=0, long_side=32)], queue_size=8, limits=limits)
    with LoopbackServer(app).running() as url:
        yield url


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_fuzz_render_generate(render_url, data):
    base = {"prompt": "a cat", "image_urls": [IMAGES[0]], "seed": 3, "num_inference_steps": 1, "width": 32,
            "height": 16, "true_cfg_scale": 4.0, "negative_prompt": " "}
    body = _mutated(data, base, {
        "prompt": st.text(max_size=12), "image_urls": st.lists(st.sampled_from(IMAGES), max_size=3),
        "seed": st.integers(-1, 2 ** 65), "true_cfg_scale": st.floats(-1, 200), "negative_prompt": st.text(max_size=5),
        "num_inference_steps": st.integers(-1, 3), "guidance_scale": st.floats(-1, 200),
        "num_images_per_prompt": st.integers(-1, 3), "width": st.integers(0, 64), "height": st.integers(0, 64)})
    raw = data.draw(st.none() | st.none() | st.binary(max_size=80))
    r = httpx.post(render_url + "/generate", json=None if raw is not None else body, content=raw, timeout=120,
                   headers={"content-type": "application/json"})
    SEEN["render"] += 1
    CODES[("render", r.status_code)] = CODES.get(("render", r.status_code), 0) + 1
    assert r.status_code < 500, (body, raw, r.text)
    out = r.json()
    assert out["success"] is (r.status_code == 200)
    if r.status_code >= 400:
        assert isinstance(out["error"], str) and out["error"]


def test_servers_answer_health_after_the_fuzz(serve_url, render_url):
    assert httpx.get(serve_url[0] + "/health").json()["status"] == "ok"
    assert httpx.get(render_url + "/health").json()["status"] == "ok"
    print(f"fuzz examples: serve {SEEN['serve']}, render {SEEN['render']}; status counts {sorted(CODES.items())}")


# --- against SGLang's own schema code --------------------------------------------------------------------
def _sglang_api_types():
    """sglang 0.5.23's generated request decoder (sglang/api/v1/api_types.py), loaded from its file: the
    package's __init__ pulls CUDA-era imports, the module itself needs only msgspec."""
    import importlib.util
    import pathlib
    pytest.importorskip("msgspec")
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("sglang is not installed")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "api" / "v1" / "api_types.py"
    module_spec = importlib.util.spec_from_file_location("sglang_api_types_0523", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@settings(max_examples=MAX_EXAMPLES, deadline=None)
@given(sampling=st.dictionaries(st.sampled_from(SGLANG_SAMPLING_KEYS + ("bogus", "max_tokens", "seed")),
                                leaf | st.lists(st.text(max_size=3), max_size=2), max_size=4))
@example(sampling={"stop_token_ids": False})   # once taken for "no ids" (falsy), SGLang refuses it
def test_sampling_params_never_accept_what_sglang_refuses(sampling):
    """Whatever SGLang's contract refuses, `genevolve serve` refuses; what it admits, we either admit or
    refuse for a stated reason (a feature we do not implement, or SGLang's own verify() range)."""
    from genevolve_jax.serving.guards import RequestError
    from genevolve_jax.serving.policy_schema import parse_sglang_sampling
    api = _sglang_api_types()
    try:
        api.decode_SamplingParams(sampling)
        sglang_ok = True
    except api.JsonContractError:
        sglang_ok = False
    try:
        parse_sglang_sampling(sampling, ServeLimits(), 16)
        ours = None
    except RequestError as e:
        ours = e.message
    if not sglang_ok:
        assert ours is not None, sampling
    elif ours is not None:
        assert any(w in ours for w in ("not supported", "must be", "at most", "must have")), (sampling, ours)
