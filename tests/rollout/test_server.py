"""`genevolve serve`'s app on 127.0.0.1 (random free port), driven by the official `openai` client and
by SGLangEngine, including a weight update through /update_weights_from_disk that changes outputs."""
import socket

import httpx
import numpy as np
import pytest

from genevolve_jax.models.hf_io import model_from_state_dict, random_state_dict
from genevolve_jax.processing.tokenizer import default_tokenizer
from genevolve_jax.render.service import LoopbackServer
from genevolve_jax.rollout.engine import GenerationRequest, SamplingParams
from genevolve_jax.rollout.jax_engine import JaxEngine, default_engine_config
from genevolve_jax.rollout.server import create_app
from genevolve_jax.rollout.sglang_engine import SGLangEngine



def tiny_config(tok):
    from genevolve_jax.models.qwen3_vl import config as C
    from genevolve_jax.processing.tokenizer import special_token_ids
    sp = special_token_ids(tok)
    return C.tiny(vocab_size=len(tok)).replace(
        image_token_id=sp["<|image_pad|>"], video_token_id=sp["<|video_pad|>"],
        vision_start_token_id=sp["<|vision_start|>"], vision_end_token_id=sp["<|vision_end|>"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    tok = default_tokenizer()
    cfg = tiny_config(tok)
    model = model_from_state_dict(cfg, random_state_dict(cfg, seed=21))
    ecfg = default_engine_config()
    ecfg.max_slots, ecfg.max_seq_len, ecfg.steps_per_sync, ecfg.min_prefill_bucket = 4, 160, 4, 32
    engine = JaxEngine(model, tok, ecfg)
    with LoopbackServer(create_app(engine, tok, model_name="tiny")).running() as url:
        yield url, tok, cfg, engine
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
    client = SGLangEngine([url, url], timeout_s=60, retries=1, backoff_s=0.01)
    over_http = client.generate(reqs)
    direct = engine.generate(reqs)
    for a, b in zip(over_http, direct):
        assert a.finish_reason == b.finish_reason == "length"
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)
    import asyncio
    assert all(asyncio.run(client.health()).values())
    other = model_from_state_dict(cfg, random_state_dict(cfg, seed=22))
    replies = client.update_weights(other, str(tmp_path / "export"), dtype="float32", weight_version="7")
    assert all(r["success"] for r in replies.values())
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
