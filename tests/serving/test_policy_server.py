"""`genevolve serve`'s app on 127.0.0.1 (random free port), driven by the official `openai` client and
by SGLangEngine, including a weight update through /update_weights_from_disk that changes outputs;
SGLang-form image prompts; and the abuse cases: unknown model, bounds, auth, body size, bombs, full
queue, a tokenizer larger than the vocabulary."""
import asyncio
import base64
import io
import json
import socket
import subprocess
import sys

import httpx
import numpy as np
import pytest

from genevolve_jax.models.hf_io import model_from_state_dict, random_state_dict
from genevolve_jax.processing.tokenizer import default_tokenizer
from genevolve_jax.rollout.engine import GenerationRequest, SamplingParams
from genevolve_jax.rollout.jax_engine import JaxEngine
from genevolve_jax.rollout.sglang_engine import SGLangEngine
from genevolve_jax.serving.policy_schema import ServeLimits
from genevolve_jax.serving.policy_server import create_app
from tests.fixtures.servers import LoopbackServer, bomb_png, free_port, save_tiny_hf_dir, tiny_engine


@pytest.fixture(scope="module")
def served():
    tok = default_tokenizer()
    engine = tiny_engine(tok, seed=21, max_slots=4, max_seq_len=160)
    with LoopbackServer(create_app(engine, tok, model_name="tiny")).running() as url:
        yield url, tok, engine.config, engine
    engine.close()


def test_openai_client_chat_and_models(served):
    openai = pytest.importorskip("openai")
    url, tok, _, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "draw a red circle"}],
                                         max_tokens=7, temperature=0.0)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 7 and out.usage.prompt_tokens > 3
    again = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "draw a red circle"}],
                                           max_tokens=7, temperature=0.0)
    assert again.choices[0].message.content == out.choices[0].message.content


def test_sglang_client_matches_the_engine_and_weight_update_changes_outputs(served, tmp_path):
    url, tok, cfg, engine = served
    rng = np.random.default_rng(0)
    reqs = [GenerationRequest(rng.integers(20, len(tok), n).tolist(),
                              SamplingParams(max_new_tokens=6, temperature=t, seed=3))
            for n, t in ((5, 0.0), (12, 0.8), (9, 0.0))]
    client = SGLangEngine([url], timeout_s=60, retries=1, backoff_s=0.01, model_config=cfg,
                          weights_dir=str(tmp_path / "export"), export_dtype="float32")
    over_http = client.generate(reqs)
    direct = engine.generate(reqs)
    for a, b in zip(over_http, direct):
        assert a.finish_reason == b.finish_reason == "length"
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)  # float32; batch composition differs
    import asyncio
    assert all(asyncio.run(client.health()).values())
    other = model_from_state_dict(cfg, random_state_dict(cfg, seed=22))
    from flax import nnx
    metrics = client.update_weights(nnx.state(other, nnx.Param), 7)
    assert metrics["sglang/weight_version_lag"] == 0.0 and metrics["sglang/servers_behind"] == 0.0
    after = client.generate(reqs[:1])[0]
    assert after.token_ids != over_http[0].token_ids
    fresh = JaxEngine(other, tok, engine.cfg)
    assert fresh.generate(reqs[:1])[0].token_ids == after.token_ids
    fresh.close()
    assert httpx.get(url + "/get_model_info").json()["weight_version"] == "7"
    # A bad reload fails with the reason and keeps the weights.
    r = httpx.post(url + "/update_weights_from_disk", json={"model_path": str(tmp_path / "missing")})
    assert r.status_code == 400 and r.json()["success"] is False
    assert client.generate(reqs[:1])[0].token_ids == after.token_ids


def test_unreachable_server_aborts_with_the_reason():
    client = SGLangEngine([f"http://127.0.0.1:{free_port()}"], timeout_s=2, retries=1, backoff_s=0.01)
    res = client.generate([GenerationRequest([1, 2, 3], SamplingParams(max_new_tokens=2))])[0]
    assert res.finish_reason == "abort" and "ConnectError" in res.error


# --- SGLang-form image prompts ---------------------------------------------------------------------
def _png_uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_sglang_form_image_prompt_is_expanded_and_matches_the_engine(served):
    from PIL import Image

    from genevolve_jax.processing.tokenizer import special_token_ids
    url, tok, cfg, engine = served
    sp = special_token_ids(tok)
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 56), (64, 32))]
    counts = [engine.num_image_tokens(im) for im in images]
    head = rng.integers(20, len(tok), 4).tolist()
    one_pad = [sp["<|vision_start|>"], sp["<|image_pad|>"], sp["<|vision_end|>"]]
    ids = head + one_pad + [30, 31] + one_pad + [32]
    body = {"input_ids": ids, "image_data": [_png_uri(im) for im in images], "return_logprob": True,
            "logprob_start_len": -1, "return_prompt_token_ids": True,
            "sampling_params": {"max_new_tokens": 5, "temperature": 0.0, "stop_token_ids": []}}
    r = httpx.post(url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    expanded = out["prompt_token_ids"]
    assert expanded.count(sp["<|image_pad|>"]) == sum(counts) == out["meta_info"]["image_tokens"]
    assert out["meta_info"]["prompt_tokens"] == len(expanded) == len(ids) - 2 + sum(counts)
    # the engine given the trainer's (pre-expanded) form samples the same tokens and log-probs
    direct = engine.generate([GenerationRequest(expanded, SamplingParams(max_new_tokens=5, temperature=0.0),
                                                images)])[0]
    assert out["output_ids"] == direct.token_ids
    np.testing.assert_allclose([e[0] for e in out["meta_info"]["output_token_logprobs"]], direct.logprobs, atol=1e-5)
    # the trainer's expanded run is what SGLang cannot take: a 400 naming input_ids, never a 500
    r = httpx.post(url + "/generate", json={**body, "input_ids": expanded[:-1] + [32]}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input_ids"
    assert "one pad per image" in r.json()["error"]["message"]
    r = httpx.post(url + "/generate", json={**body, "image_data": body["image_data"][:1]}, timeout=60)
    assert r.status_code == 400 and "2 <|image_pad|> tokens for 1 images" in r.json()["error"]["message"]


# --- SGLang's schema -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling, field, text", [
    ({"max_new_tokens": 2, "no_such_key": 1}, "sampling_params.no_such_key", "unknown field `no_such_key`"),
    ({"max_new_tokens": 2.0}, "sampling_params.max_new_tokens", "invalid type: floating point"),
    ({"max_new_tokens": 10 ** 6}, "sampling_params.max_new_tokens", "<= 4096"),
    ({"max_new_tokens": -1}, "sampling_params.max_new_tokens", ">= 0"),
    ({"temperature": "hot"}, "sampling_params.temperature", "invalid type: string"),
    ({"temperature": -0.5}, "sampling_params.temperature", "non-negative"),
    ({"top_p": 0.0}, "sampling_params.top_p", "(0, 1]"),
    ({"top_k": 0}, "sampling_params.top_k", "-1 (disable) or at least 1"),
    ({"min_p": 0.3}, "sampling_params.min_p", "not supported"),
    ({"n": 2}, "sampling_params.n", "not supported"),
    ({"stop": ["x"] * 40}, "sampling_params.stop", "at most 32"),
])
def test_generate_follows_sglang_schema_with_4xx_naming_the_field(served, sampling, field, text):
    url = served[0]
    r = httpx.post(url + "/generate", json={"input_ids": [20, 21, 22], "sampling_params": sampling}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and text in err["message"] and err["type"] == "invalid_request_error"


def test_generate_accepts_sglang_defaults_and_ignores_unknown_top_level_keys(served):
    url = served[0]
    body = {"text": "draw a red circle", "routing_key": "abc", "priority": 3, "something_new": {"x": 1},
            "sampling_params": {"max_new_tokens": 3, "temperature": 0.0, "top_k": 1 << 30, "min_p": 0.0, "n": 1,
                                "repetition_penalty": 1.0, "ignore_eos": False, "skip_special_tokens": True,
                                "regex": None, "sampling_seed": 2 ** 62}}
    r = httpx.post(url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["meta_info"]["finish_reason"] == {"type": "length", "length": 3}
    zero = httpx.post(url + "/generate", json={"input_ids": [20], "sampling_params": {"max_new_tokens": 0}})
    assert zero.status_code == 200 and zero.json()["output_ids"] == []
    info = httpx.get(url + "/server_info").json()
    assert info["enable_deterministic_inference"] is True and httpx.get(url + "/get_server_info").status_code == 200


@pytest.mark.parametrize("raw", [b"{", b"[1, 2]", b"null", b'{"input_ids": [NaN]}', b"\xff\xfe",
                                 b"[" * 5000 + b"]" * 5000,
                                 b'{"input_ids": [1e999]}', b'{"input_ids": [99999999]}', b'{"text": 7}',
                                 b'{"input_ids": [1], "text": "x"}', b'{"input_ids": [[1, 2]]}',
                                 b'{"input_ids": [1], "image_data": "http://example.com/a.png"}',
                                 b'{"input_ids": [1], "stream": true}'])
def test_malformed_generate_bodies_get_400_json(served, raw):
    r = httpx.post(served[0] + "/generate", content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


# --- OpenAI route abuse --------------------------------------------------------------------------------------
def test_unknown_model_is_404_in_openai_shape(served):
    openai = pytest.importorskip("openai")
    url = served[0]
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2)
    assert err.value.status_code == 404
    body = err.value.body
    assert body["code"] == "model_not_found" and body["param"] == "model" and "no-such-model" in body["message"]
    assert httpx.get(url + "/v1/models/no-such-model").status_code == 404
    assert httpx.get(url + "/v1/models/tiny").json()["id"] == "tiny"


@pytest.mark.parametrize("patch, param", [({"max_tokens": 5000}, "max_tokens"), ({"n": 99}, "n"),
                                          ({"temperature": 3.0}, "temperature"), ({"stop": ["a"] * 5}, "stop"),
                                          ({"stream": True}, "stream"), ({"frobnicate": 1}, "frobnicate"),
                                          ({"messages": []}, "messages"),
                                          ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role")])
def test_chat_bounds_name_the_field(served, patch, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **patch}
    r = httpx.post(served[0] + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_too_many_images_and_decompression_bombs_are_refused_before_decoding(served):
    url = served[0]
    from PIL import Image
    bomb = "data:image/png;base64," + base64.b64encode(bomb_png(60_000, 60_000)).decode()
    real = io.BytesIO()
    Image.new("L", (4200, 4100)).save(real, format="PNG")  # 17.2 M pixels > 4096², a few KB of PNG
    big = "data:image/png;base64," + base64.b64encode(real.getvalue()).decode()
    for uri in (bomb, big):
        r = httpx.post(url + "/generate", json={"input_ids": [3, 5, 4], "image_data": [uri]}, timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "image_data[0]" and "exceeds the limit" in r.json()["error"]["message"]
        chat = {"model": "tiny", "max_tokens": 2, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}]}]}
        r = httpx.post(url + "/v1/chat/completions", json=chat, timeout=60)
        assert r.status_code == 400 and "exceeds the limit" in r.json()["error"]["message"]
    nine = {"input_ids": [3, 5, 4], "image_data": ["data:image/png;base64,AAAA"] * 9}
    r = httpx.post(url + "/generate", json=nine, timeout=60)
    assert r.status_code == 400 and "at most 8" in r.json()["error"]["message"]


# --- a second app with small limits and a bearer token -------------------------------------------------------
@pytest.fixture(scope="module")
def guarded(served):
    _, tok, _, engine = served
    limits = ServeLimits(max_body_bytes=4096, max_in_flight=2, retry_after_s=3)
    app = create_app(engine, tok, model_name="tiny", limits=limits, api_key="s3cret-token")
    with LoopbackServer(app).running() as url:
        yield url


def test_bearer_token_guards_every_route_but_health(guarded):
    url = guarded
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.get(url + "/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/generate"),
                             ("GET", "/get_model_info"), ("POST", "/update_weights_from_disk")):
            r = httpx.request(method, url + path, json=chat, headers=headers)
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    ok = httpx.post(url + "/v1/chat/completions", json=chat, headers={"Authorization": "Bearer s3cret-token"},
                    timeout=60)
    assert ok.status_code == 200, ok.text
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert openai.OpenAI(base_url=url + "/v1", api_key="s3cret-token").models.list().data[0].id == "tiny"


def test_body_size_limit_is_413_declared_or_chunked(guarded):
    auth = {"Authorization": "Bearer s3cret-token", "content-type": "application/json"}
    big = b'{"input_ids": [' + b"1, " * 3000 + b"1]}"
    r = httpx.post(guarded + "/generate", content=big, headers=auth)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunks():  # no Content-Length: the cap counts the bytes as they arrive
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]
    r = httpx.post(guarded + "/generate", content=chunks(), headers=auth)
    assert r.status_code == 413
    assert httpx.get(guarded + "/health").status_code == 200


def test_full_server_answers_503_with_retry_after(guarded):
    auth = {"Authorization": "Bearer s3cret-token"}
    body = {"input_ids": [20, 21, 22], "sampling_params": {"max_new_tokens": 120, "temperature": 0.0}}

    async def burst():
        async with httpx.AsyncClient(timeout=120, headers=auth) as c:
            return await asyncio.gather(*(c.post(guarded + "/generate", json=body) for _ in range(8)))
    replies = asyncio.run(burst())
    codes = sorted(r.status_code for r in replies)
    assert set(codes) == {200, 503} and codes.count(200) >= 2, codes
    busy = next(r for r in replies if r.status_code == 503)
    assert busy.headers["retry-after"] == "3" and busy.json()["error"]["code"] == "overloaded"


# --- a tokenizer that does not fit the vocabulary ------------------------------------------------------------
def test_small_vocab_model_refuses_to_start_naming_both_sizes(tmp_path):
    tok = default_tokenizer()
    engine = tiny_engine(tok, seed=1, max_slots=2, max_seq_len=64, vocab_size=512)
    with pytest.raises(ValueError, match=rf"tokenizer has {len(tok)} tokens but the model's vocabulary has 512"):
        create_app(engine, tok)
    engine.close()
    hf = save_tiny_hf_dir(tmp_path / "hf", vocab_size=512)
    proc = subprocess.run([sys.executable, "-m", "genevolve_jax.cli", "serve", "--hf-dir", hf, "--port",
                           str(free_port()), "--max-slots", "2", "--max-seq-len", "64"],
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                            "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{len(tok)} tokens" in proc.stderr and "vocabulary has 512" in proc.stderr


# --- a client that hangs up ---------------------------------------------------------------------------------
def test_disconnected_client_frees_its_engine_slot():
    import time
    tok = default_tokenizer()
    engine = tiny_engine(tok, seed=3, max_slots=2, max_seq_len=4096)
    body = {"input_ids": [20, 21, 22], "rid": "hang-up", "sampling_params": {"max_new_tokens": 4000,
                                                                             "temperature": 0.0}}
    try:
        with LoopbackServer(create_app(engine, tok, model_name="tiny")).running() as url:
            before = engine.stats["decode_tokens"]
            host, port = url.removeprefix("http://").split(":")
            payload = json.dumps(body).encode()
            sock = socket.create_connection((host, int(port)))  # a raw client that will hang up
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
            deadline = time.monotonic() + 120  # the first decode compiles
            while engine.stats["decode_tokens"] - before < 100 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert engine.num_live == 1  # decoding its 4000 tokens ...
            sock.close()
            deadline = time.monotonic() + 10
            while engine.num_live and time.monotonic() < deadline:
                time.sleep(0.02)
            assert engine.num_live == 0 and engine.num_queued == 0  # ... and its slot is free once it left
            decoded = engine.stats["decode_tokens"] - before
            time.sleep(0.5)
            assert engine.stats["decode_tokens"] - before == decoded < 3990, decoded
            assert httpx.get(url + "/health").json()["cancelled"] == 1
            # the same rid is free again, and the engine serves on
            again = httpx.post(url + "/generate", json={**body, "sampling_params": {"max_new_tokens": 3}}, timeout=60)
            assert again.status_code == 200 and len(again.json()["output_ids"]) == 3
    finally:
        engine.close()


def test_serve_cli_binds_loopback_and_reads_the_key_from_the_environment(monkeypatch, capsys):
    from genevolve_jax import cli
    from genevolve_jax.jobs import serve
    argv = ["serve", "--hf-dir", "/nonexistent", "--api-key-env", "GENEVOLVE_TEST_KEY", "--max-in-flight", "3",
            "--max-image-pixels", "1000"]
    monkeypatch.setattr(sys, "argv", ["genevolve", *argv])  # the parser adds the subcommand's flags it names
    args = cli.build_parser().parse_args(argv)
    assert args.host == "127.0.0.1"
    limits = serve.limits_from_args(args)
    assert limits.max_in_flight == 3 and limits.max_image_pixels == 1000 and limits.max_new_tokens == 4096
    monkeypatch.delenv("GENEVOLVE_TEST_KEY", raising=False)
    assert serve.run(args) == 2  # before any model is loaded
    assert "GENEVOLVE_TEST_KEY is unset or empty" in capsys.readouterr().err
