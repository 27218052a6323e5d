"""The engine interface's data types and the ScriptedEngine the loop tests rely on."""
import asyncio

import pytest
from PIL import Image

from genevolve_jax.processing.tokenizer import default_tokenizer
from genevolve_jax.rollout.engine import GenerationRequest, GenerationResult, RolloutEngine, SamplingParams
from tests.fixtures.engines import ABORT, ScriptedEngine


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.mark.parametrize("kw, field", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": True}, "max_new_tokens"),
    ({"temperature": -1.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": 0}, "top_k")])
def test_sampling_params_reject_bad_values(kw, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**kw)


def test_sampling_params_as_sglang():
    params = SamplingParams(max_new_tokens=7, temperature=0.0, top_k=5, stop=("</answer>",), stop_token_ids=(2,),
                            seed=3)
    assert params.to_sglang() == {"max_new_tokens": 7, "temperature": 0.0, "top_p": 0.95, "top_k": 5,
                                  "stop": ["</answer>"], "stop_token_ids": [2], "sampling_seed": 3}


def test_result_checks_finish_reason_and_alignment():
    with pytest.raises(ValueError, match="finish_reason"):
        GenerationResult([1], [0.0], "done")
    with pytest.raises(ValueError, match="logprobs"):
        GenerationResult([1, 2], [0.0], "stop")


def test_scripted_engine_replays_texts_ids_and_aborts(tok):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    engine = ScriptedEngine({"a": ["<think>hi</think>", [5, 6, im_end, 7]], "b": [ABORT]}, tok)
    stop = SamplingParams(max_new_tokens=50, stop_token_ids=(im_end,))
    ra, rb = engine.generate([GenerationRequest([1], stop, request_id="a"), GenerationRequest([1], stop, request_id="b")])
    assert ra.finish_reason == "stop" and ra.token_ids[-1] == im_end
    assert tok.decode(ra.token_ids, skip_special_tokens=False) == "<think>hi</think><|im_end|>"
    assert ra.logprobs == [-(0.01 + 0.001 * (t % 97)) for t in ra.token_ids]
    assert rb.finish_reason == "abort" and rb.token_ids == []
    (ra2,) = asyncio.run(engine.agenerate([GenerationRequest([1], stop, request_id="a")]))
    assert ra2.token_ids == [5, 6, im_end] and ra2.finish_reason == "stop"  # cut at the stop token
    (ra3,) = engine.generate([GenerationRequest([1], stop, request_id="a")])
    assert ra3.finish_reason == "abort"  # script exhausted, no default turn


def test_scripted_engine_length_cap_and_shared_script(tok):
    engine = ScriptedEngine(["<think>" + "word " * 50 + "</think>"], tok, default_turn=[9])
    (r,) = engine.generate([GenerationRequest([1], SamplingParams(max_new_tokens=10), request_id="x")])
    assert r.finish_reason == "length" and len(r.token_ids) == 10
    (r,) = engine.generate([GenerationRequest([1], SamplingParams(max_new_tokens=10), request_id="y")])
    assert len(r.token_ids) == 10  # a list script is shared by every request id
    (r,) = engine.generate([GenerationRequest([1], SamplingParams(max_new_tokens=10), request_id="x")])
    assert r.token_ids == [9] and r.finish_reason == "length"


def test_default_image_token_count_follows_qwen3vl_processor(tmp_path):
    class Echo(RolloutEngine):
        def update_weights(self, params, step):
            return {}

        def generate(self, requests):
            return [GenerationResult([], [], "stop") for _ in requests]

    engine = Echo()
    path = tmp_path / "a.png"
    Image.new("RGB", (640, 480)).save(path)
    # 640x480 -> smart_resize(480, 640, 32) = 480x640 -> grid (1, 30, 40) -> 1200 / 4 merged tokens
    assert engine.num_image_tokens(str(path)) == 300 == engine.num_image_tokens(Image.new("RGB", (640, 480)))
    assert asyncio.run(engine.agenerate([GenerationRequest([1])]))[0].finish_reason == "stop"
