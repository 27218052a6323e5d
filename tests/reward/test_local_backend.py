"""The local judge: a Qwen3-VL checkpoint judging in-process through a rollout engine.

The engine here is the ScriptedEngine (the JaxEngine's own decoding is tested in tests/rollout), so
these tests check what the backend adds: ChatML prompts with image pads expanded per image, decoding
of the reply into the judges' parsers, and an aborted generation masking the sample after retries.
"""
import asyncio

import numpy as np
import pytest
from PIL import Image

from genevolve_jax.processing.tokenizer import default_tokenizer
from genevolve_jax.reward import config as reward_config
from genevolve_jax.reward.backends import ChatMessage
from genevolve_jax.reward.local_backend import EngineChatBackend
from genevolve_jax.reward.scorer import RewardSample, RewardScorer
from tests.fixtures.engines import ABORT, ScriptedEngine

KSCORE = ('{"rationale": "shape right, colour wrong", "faithfulness": 1, "visual_correctness": 0.5, '
          '"text_accuracy": 0, "aesthetics": 1, "text_accuracy_na": true}')  # 0.1 + 0.2 + 0.4·0.5 + 0.1 = 0.6
PROGRAM = '{"rationale": "enough", "score": 0.5}'


class _Renderer:
    renderer_id = "solid"

    async def render(self, request):
        return Image.new("RGB", (32, 48), (200, 30, 30))


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


def _images(seed):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 70), (90, 33))]


def test_prompt_expands_each_image_to_its_pad_count(tok):
    engine = ScriptedEngine([KSCORE], tok)
    backend = EngineChatBackend(engine, tok)
    a, b = _images(0)
    ids, images = backend.prompt([ChatMessage("system", ["be strict"]),
                                  ChatMessage("user", ["Image 1:", a, "Image 2:", b, "score it"])])
    assert images == [a, b]
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    start = tok.convert_tokens_to_ids("<|vision_start|>")
    runs, n = [], 0
    for i in ids:
        if i == pad:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    assert runs == [engine.num_image_tokens(a), engine.num_image_tokens(b)] and all(r > 0 for r in runs)
    assert ids.count(start) == 2
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nbe strict<|im_end|>\n<|im_start|>user\nImage 1:")
    assert text.endswith("score it<|im_end|>\n<|im_start|>assistant\n")
    assert backend.sampling.temperature == 0.0 and tok.convert_tokens_to_ids("<|im_end|>") in \
        backend.sampling.stop_token_ids


def _scorer(tmp_path, engine, tok):
    cfg = reward_config.get_config()
    cfg.judge_kind = "vlm"
    cfg.cache_dir = str(tmp_path / "cache")
    cfg.endpoint.max_retries = 2
    cfg.endpoint.backoff_s = 0.0
    return RewardScorer.from_config(cfg, renderer=_Renderer(), backend=EngineChatBackend(engine, tok))


def _sample(tmp_path, i):
    ref, gt = tmp_path / f"ref{i}.png", tmp_path / f"gt{i}.png"
    a, b = _images(i)
    a.save(ref)
    b.save(gt)
    program = {"gen_prompt": "A red square like the first reference image.",
               "reference_images": [{"img_id": "IMG_001", "note": "the square", "path": str(ref)}]}
    return RewardSample(f"s{i}", "a red square", program, gt_image=str(gt), seed=i)


def test_local_judge_scores_a_group_through_the_engine(tmp_path, tok):
    # The KScore judge and the program judge each make one call per sample: route each prompt to
    # the reply for its rubric (the KScore rubric names image 1 the GENERATED image).
    class Routed(ScriptedEngine):
        def generate(self, requests):
            out = []
            for r in requests:
                text = tok.decode(r.prompt_ids, skip_special_tokens=True)
                reply = KSCORE if "GENERATED" in text else PROGRAM
                out.append(ScriptedEngine([reply], tok).generate([r])[0])
            return out

    [rec] = asyncio.run(_scorer(tmp_path, Routed([], tok), tok).score_group([_sample(tmp_path, 1)]))
    assert not rec.masked
    assert rec.r_img == pytest.approx(0.6) and rec.r_text == pytest.approx(0.5)
    assert rec.reward == pytest.approx(0.5 * 0.6 + 0.5 * 0.5)


def test_aborting_engine_masks_the_sample_after_retries(tmp_path, tok):
    engine = ScriptedEngine([], tok, default_turn=ABORT)
    [rec] = asyncio.run(_scorer(tmp_path, engine, tok).score_group([_sample(tmp_path, 2)]))
    assert rec.masked and rec.reward is None
    assert rec.reason.startswith("judge_failed") and "aborted" in rec.reason
