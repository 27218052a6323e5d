"""SGLangEngine's wire format checked against the released sglang 0.5.23's own code, on CPU.

- Every /generate body the client sends (text and image prompts, seeds, stops, retries) passes
  SGLang's schema gate (api_contract.generate_contract_error over sglang/api/v1 GenerateRequest),
  builds its io_struct.GenerateReqInput and survives its normalisation, and its sampling_params build
  SGLang's SamplingParams and pass verify(); the schema does refuse a wrong key, so the check can fail.
- The judge's chat request validates as SGLang's OpenAI ChatCompletionRequest.
- SGLang's multimodal input-id expansion (base_processor.process_and_combine_mm_data around
  transformers' Qwen3VLProcessor, the path 0.5.23 takes for token-id prompts; and the older
  build_input_ids) turns our SGLang-form image prompts into exactly the trainer's sequence; a
  pre-expanded prompt is what it refuses; a server whose processor uses other max_pixels is caught
  by the engine's check.
- The recorded response shapes (tests/fixtures/sglang_responses.py, which the fake server and these
  tests parse) equal what the wheel's finish-reason classes, logprob formatting, weight-reload
  request/response classes produce, and go through the same parse_response as live bodies.

The SGLang modules are imported with stand-ins for triton and torchvision (tests/fixtures/sglang_cpu.py
says why). Not instantiated: qwen_vl.QwenVLImageProcessor and BaseMultimodalProcessor's constructor,
which read a running server's global context (get_mm(), get_serving()) and start executors; the
processing methods run on an instance that carries what the constructor would set on a CPU server.
Before the expansion, the server's load_mm_data decodes the ids to text and loads the images
(async, threads); the tests hand process_and_combine_mm_data that text and the PIL images.
"""
import asyncio
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from genevolve_jax.reward.backends import ChatMessage, OpenAIChatBackend
from genevolve_jax.rollout.engine import GenerationRequest, RolloutEngine, SamplingParams
from genevolve_jax.rollout.sglang_engine import (IMAGE_MISMATCH, SGLANG_DISCONNECT_POLL_S, SGLANG_VERSION, SGLangEngine,
                                                 collapse_image_pads, parse_response, request_body)
from tests.fixtures import sglang_responses
from tests.fixtures.sglang_cpu import load
from tests.fixtures.sglang_fake import FakeBehaviour, running_fake_sglang

PAD, VSTART, VEND = 151655, 151652, 151653


@pytest.fixture(scope="module")
def sgl():
    return load()


def qwen3vl_hf_processor(tok, min_pixels=65536, max_pixels=16777216):
    """transformers' Qwen3VLProcessor as the server runs it on a prompt with images: the PIL image
    processor of a Qwen3-VL checkpoint (patch 16, merge 2) and a tokenizer with the vision tokens.
    Built without ProcessorMixin.__init__, which insists on a video processor (torchvision)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    class ImagesOnly(Qwen3VLProcessor):
        def __init__(self):
            self.image_processor = Qwen2VLImageProcessorPil(
                size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=16, temporal_patch_size=2,
                merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
            self.tokenizer, self.video_processor, self.chat_template = tok, None, None
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.vision_start_token, self.vision_end_token = "<|vision_start|>", "<|vision_end|>"
            self.image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
            self.video_token_id = tok.convert_tokens_to_ids("<|video_pad|>")

    return ImagesOnly()


def sglang_image_processor(sgl, hf_processor):
    """SGLang's BaseMultimodalProcessor around ``hf_processor``, with the attributes its constructor
    sets on a CPU server (its constructor also reads the running server's global context and starts
    executors, which a test has not got)."""
    base = sgl.base_processor.BaseMultimodalProcessor
    image = sgl.schedule_batch.Modality.IMAGE

    class ServerSide(base):
        def __init__(self):
            self._processor, self._tokenizer = hf_processor, hf_processor.tokenizer
            self.hf_config = type("HFConfig", (), {"model_type": "qwen3_vl"})()
            self.image_config, self.video_config, self.audio_config = {}, {}, {}
            self.mm_feature_transport, self.use_cuda_ipc, self.use_ipc_pool_handle_cache = "cpu", False, False
            self.image_processor_backend, self.disable_fast_image_processor = "pil", True
            self.skip_tokenizer_init, self._tokenizer_auto_adds_specials = True, False
            self.mm_processor_executor, self.mm_processor_worker_num = None, 1
            # The Qwen3-VL entries of the table of processor outputs the constructor builds.
            self.FEATURE_NAMES = ["pixel_values"]
            self.ATTR_NAME_TO_MODALITY = {"pixel_values": image, "image_grid_thw": image}

        async def process_mm_data_async(self, *args, **kwargs):
            raise NotImplementedError

    return ServerSide()


def server_expansion(sgl, server, tok, sent_ids, images):
    """The prompt ids SGLang 0.5.23 builds from a token-id prompt with images (load_mm_data decodes the
    ids to text for the HF processor; process_and_combine_mm_data expands)."""
    base_output = sgl.base_processor.BaseMultiModalProcessorOutput(input_text=tok.decode(sent_ids),
                                                                  input_ids=list(sent_ids), images=list(images))
    tokens = sgl.base_processor.MultimodalSpecialTokens(image_token="<|image_pad|>",
                                                        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"))
    _, input_ids, _ = server.process_and_combine_mm_data(base_output, tokens)
    return input_ids.tolist()


def random_images(rng, n):
    return [Image.new("RGB", (int(rng.integers(24, 1400)), int(rng.integers(24, 1400))), tuple(rng.integers(0, 255, 3)))
            for _ in range(n)]


def trainer_prompt(rng, tok, images):
    """A prompt as the agent loop builds it: text, and each image expanded to the trainer's count."""
    pad, start, end = (tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"))
    words = ["draw", "a", "red", "circle", "the", "image", "shows"]
    ids = tok.encode(" ".join(rng.choice(words, 4)), add_special_tokens=False)
    for im in images:
        ids += [start] + [pad] * RolloutEngine.num_image_tokens(None, im) + [end]
        ids += tok.encode(" " + " ".join(rng.choice(words, 3)), add_special_tokens=False)
    return ids


@pytest.fixture(scope="module")
def tok():
    from genevolve_jax.processing.tokenizer import default_tokenizer
    return default_tokenizer()


def test_installed_sglang_is_the_version_launch_targets(sgl):
    assert sgl.version == SGLANG_VERSION
    # The retry floor is SGLang's own disconnect poll.
    assert sgl.environ.envs.SGLANG_REQUEST_STATE_WAIT_TIMEOUT.get() == SGLANG_DISCONNECT_POLL_S
    # /server_info is ServerArgs.resolved_dict() + extras: the flag the engine reads is a top-level field.
    from sglang.srt.arg_groups.arg_utils import record_fields
    from sglang.srt.server_args import ServerArgs
    assert "enable_deterministic_inference" in {f.name for f in record_fields(ServerArgs)}


def test_every_generate_body_passes_sglangs_schema_and_request_models(sgl, tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (9, 90, 200)).save(path)
    reqs = []
    for i in range(12):
        n_img = int(rng.integers(0, 3))
        images = ([str(path)] + [Image.new("RGB", (int(rng.integers(8, 64)),) * 2)] * 2)[:n_img]
        ids = rng.integers(10, 5000, 5).tolist()
        for _ in range(n_img):
            ids += [VSTART] + [PAD] * int(rng.integers(1, 30)) + [VEND]
        sp = SamplingParams(max_new_tokens=int(rng.integers(1, 9)), temperature=float(rng.choice([0.0, 0.7, 1.3])),
                            top_p=float(rng.choice([1.0, 0.95])), top_k=int(rng.choice([-1, 20])),
                            stop=tuple(rng.choice(["</answer>", "\n\n"], int(rng.integers(0, 2)))),
                            stop_token_ids=(151645, 151643), seed=None if i % 3 else int(rng.integers(0, 2**31)))
        reqs.append(GenerationRequest(ids, sp, images, request_id=f"traj-{i}" if i % 4 else ""))
    with running_fake_sglang(FakeBehaviour(slow_first=1, slow_s=3.0, image_tokens=1)) as (url, log):
        SGLangEngine([url], timeout_s=1.0, retries=1, backoff_s=0.01, disconnect_poll_s=0.1).generate(reqs)
    bodies = log.generate_bodies
    assert len(bodies) == len(reqs) + 1  # one retry
    for body in bodies:
        assert sgl.contract.generate_contract_error(json.loads(json.dumps(body))) is None, body
        sgl.api_types.GenerateRequest.from_json_value(body)
        obj = sgl.io_struct.GenerateReqInput(**body)
        obj.normalize_batch_and_arguments()
        assert obj.is_single and obj.rid == body.get("rid", obj.rid) and obj.return_logprob is True
        assert obj.logprob_start_len == -1 and obj.input_ids == body["input_ids"]
        assert obj.return_prompt_token_ids is ("image_data" in body)
        if "image_data" in body:
            assert body["input_ids"].count(PAD) == len(body["image_data"])
        from sglang.srt.sampling.sampling_params import SamplingParams as SGLangSamplingParams
        params = SGLangSamplingParams(**body["sampling_params"])
        params.verify(vocab_size=151936)
    # The gate refuses what SGLang does not know: so the checks above can fail.
    wrong = dict(bodies[0], sampling_params={**bodies[0]["sampling_params"], "seed": 3})
    assert "seed" in sgl.contract.generate_contract_error(wrong)
    assert sgl.contract.generate_contract_error(dict(bodies[0], input_ids="1 2")) is not None


def test_the_judges_chat_request_is_sglangs_openai_chat_request(sgl):
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": "8"}}]})

    backend = OpenAIChatBackend("http://judge:30000", "qwen3-vl", temperature=0.0, max_tokens=64,
                                transport=httpx.MockTransport(handler))
    msgs = [ChatMessage("system", ["You grade images."]),
            ChatMessage("user", ["Score this:", Image.new("RGB", (32, 24), (1, 2, 3)), "and this", Image.new("RGB", (8, 8))])]
    assert asyncio.run(backend.complete(msgs)) == "8"
    req = sgl.openai_protocol.ChatCompletionRequest.model_validate(seen[0])
    assert req.model == "qwen3-vl" and req.max_tokens == 64 and req.temperature == 0.0
    parts = req.messages[1].content
    assert [p.type for p in parts] == ["text", "image_url", "text", "image_url"]
    assert parts[1].image_url.url.startswith("data:image/")


def test_sglangs_expansion_of_our_image_prompts_is_the_trainers_sequence(sgl, tok):
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    hf = qwen3vl_hf_processor(tok)
    server = sglang_image_processor(sgl, hf)
    # 0.5.23's default for token-id prompts: keep the client's ids, expand each pad by the HF count.
    assert sgl.environ.envs.SGLANG_MM_AVOID_RETOKENIZE.get() is True
    rng = np.random.default_rng(2)
    for _ in range(6):
        images = random_images(rng, int(rng.integers(1, 4)))
        ours = trainer_prompt(rng, tok, images)
        sent = request_body(GenerationRequest(ours, images=images), image_pad=pad)["input_ids"]
        assert server_expansion(sgl, server, tok, sent, images) == ours
        # The older build_input_ids (the pad after each vision_start) gives the same sequence.
        grids = [hf.image_processor(images=[im], return_tensors="np")["image_grid_thw"][0] for im in images]
        legacy = type("Legacy", (), {"IM_TOKEN_ID": pad, "spatial_merge_size": 2})()
        built, offsets, _ = sgl.base_processor.BaseMultimodalProcessor.build_input_ids(legacy, sent, img_grid_thw=grids)
        assert built == ours and len(offsets) == len(images)
    # What the old client sent (the pads already expanded) is what SGLang's processing refuses.
    with pytest.raises(ValueError, match="number of <.image_pad.> tokens"):
        server_expansion(sgl, server, tok, ours, images)


def test_a_server_processor_with_other_pixel_limits_is_masked_not_trained_on(sgl, tok):
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    images = [Image.new("RGB", (900, 700))]
    ours = trainer_prompt(np.random.default_rng(3), tok, images)
    sent = collapse_image_pads(ours, pad)
    small = sglang_image_processor(sgl, qwen3vl_hf_processor(tok, max_pixels=256 * 256))
    served = server_expansion(sgl, small, tok, sent, images)
    assert len(served) < len(ours)
    res = parse_response(sglang_responses.generate_response("r", [5, 6], [-0.1, -0.2], prompt_ids=served), ours, pad)
    assert res.finish_reason == "abort" and res.error.startswith(IMAGE_MISMATCH)
    agreeing = sglang_image_processor(sgl, qwen3vl_hf_processor(tok))
    served = server_expansion(sgl, agreeing, tok, sent, images)
    assert parse_response(sglang_responses.generate_response("r", [5], [-0.1], prompt_ids=served), ours,
                          pad).token_ids == [5]


def test_recorded_response_shapes_are_the_wheels_and_parse(sgl):
    sb, tm = sgl.schedule_batch, sgl.tokenizer_manager.TokenizerManager
    assert sb.FINISH_MATCHED_TOKEN(matched=151645).to_json() == sglang_responses.finish_stop_token(151645)
    assert sb.FINISH_LENGTH(length=7).to_json() == sglang_responses.finish_length(7)
    assert sb.FINISH_ABORT("server shutting down").to_json() == sglang_responses.finish_abort("server shutting down")
    lps, ids = [-0.5, -1.25, -0.0625], [17, 4, 151645]
    # The tokenizer manager's own formatting of output_token_logprobs (no text under skip-tokenizer-init),
    # through JSON as the HTTP layer sends it.
    wheel_entries = json.loads(json.dumps(tm.detokenize_logprob_tokens(None, lps, ids, False)))
    body = sglang_responses.generate_response("rid-1", ids, lps, finish=sb.FINISH_MATCHED_TOKEN(matched=151645).to_json(),
                               prompt_ids=[1, 2, 3])
    assert body["meta_info"]["output_token_logprobs"] == wheel_entries
    res = parse_response(json.loads(json.dumps(body)))
    assert (res.token_ids, res.logprobs, res.finish_reason) == (ids, lps, "stop")
    length = sglang_responses.generate_response("rid-2", ids[:2], lps[:2], finish=sb.FINISH_LENGTH(length=2).to_json(),
                                                text="ab")
    assert parse_response(length).finish_reason == "length"
    abort = sglang_responses.generate_response("rid-3", [], [], finish=sb.FINISH_ABORT("bye").to_json())
    assert (parse_response(abort).finish_reason, parse_response(abort).error) == ("abort", "bye")
    # Weight reload: our body builds SGLang's request (flush_cache on by default), and the response
    # fields are its output's.
    req = sgl.io_struct.UpdateWeightFromDiskReqInput(model_path="/w/weights_v3", weight_version="3")
    assert req.flush_cache is True and req.abort_all_requests is False
    out = sgl.io_struct.UpdateWeightFromDiskReqOutput(success=False, message="m")
    assert set(sglang_responses.reload_response(False, "m")) == {"success", "message", "num_paused_requests"} \
        == {f for f in out.__struct_fields__ if f not in ("rid", "http_worker_ipc")}
