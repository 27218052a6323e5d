"""Group scoring: concurrent render and judge calls under limits, the cache on reruns, and masking
of samples whose calls still fail after their retries."""
import asyncio
import logging

import httpx
import numpy as np
import pytest
from PIL import Image

from genevolve_jax.render.base import RenderError
from genevolve_jax.render.remote import RetryableError
from genevolve_jax.reward import config as reward_config
from genevolve_jax.reward.backends import ChatMessage, OpenAIChatBackend
from genevolve_jax.reward.scorer import RewardSample, RewardScorer, summarize

KSCORE_ANSWER = ('```json\n{"rationale": "ok", "faithfulness": 1, "visual_correctness": 0.5, "text_accuracy": 0,'
                 ' "aesthetics": 0.5, "text_accuracy_na": false}\n```')  # KScore 0.1 + 0.2 + 0 + 0.05 = 0.35
PROGRAM_ANSWER = '{"rationale": "good", "score": 0.75}'


class FakeRenderer:
    renderer_id = "fake"

    def __init__(self, fail_on: str = ""):
        self.calls = 0
        self.fail_on = fail_on

    async def render(self, request):
        self.calls += 1
        await asyncio.sleep(0.01)
        if self.fail_on and self.fail_on in request.prompt:
            raise RenderError("render service failed: HTTP 500 after 3 tries")
        return Image.new("RGB", (16, 16), (request.seed * 10 % 256, 100, 50))


class FakeBackend:
    """A ChatBackend that answers by rubric, fails for requests containing 'UNJUDGEABLE', and
    records how many calls were in flight at once."""
    backend_id = "fake-judge"

    def __init__(self):
        self.calls = 0
        self.in_flight = 0
        self.peak = 0

    async def complete(self, messages):
        assert isinstance(messages[0], ChatMessage)
        self.calls += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(0.03)
            text = messages[-1].content[-1]
            if "UNJUDGEABLE" in text:
                raise RetryableError("timeout (180s)")
            return KSCORE_ANSWER if "Image 1 is the GENERATED image" in text else PROGRAM_ANSWER
        finally:
            self.in_flight -= 1


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(4)
    paths = {}
    for name in ("ref1", "ref2", "gt"):
        p = tmp_path / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (12, 18, 3), dtype=np.uint8)).save(p)
        paths[name] = str(p)
    return paths


def _sample(i, files, prompt="The fox from the first reference image in deep snow.", n_refs=1, request="a fox"):
    refs = [{"img_id": f"IMG_00{k + 1}", "note": "fox fur and face", "path": files[f"ref{k + 1}"]} for k in range(n_refs)]
    return RewardSample(f"s{i}", request, {"gen_prompt": prompt, "reference_images": refs}, gt_image=files["gt"],
                        task={"meta": {"primary_skills": ["creative_drawing"]}}, skills_queried=["creative_drawing"],
                        seed=i)


def _vlm_cfg(cache_dir, concurrency=16):
    cfg = reward_config.get_config()
    cfg.judge_kind = "vlm"
    cfg.cache_dir = str(cache_dir)
    cfg.endpoint.max_retries = 3
    cfg.endpoint.backoff_s = 0.0
    cfg.endpoint.max_concurrency = concurrency
    return cfg


def test_group_rewards_zero_and_masked_samples(tmp_path, files, caplog):
    renderer, backend = FakeRenderer(fail_on="BROKEN"), FakeBackend()
    scorer = RewardScorer.from_config(_vlm_cfg(tmp_path / "cache"), renderer=renderer, backend=backend)
    samples = [_sample(0, files, n_refs=2), _sample(1, files, prompt=""), _sample(2, files, request="UNJUDGEABLE x"),
               _sample(3, files, prompt="BROKEN prompt"), _sample(4, files, n_refs=0),
               RewardSample("s5", "a fox", _sample(5, files).program, gt_image=None)]
    with caplog.at_level(logging.INFO, logger="genevolve_jax.reward"):
        records = asyncio.run(scorer.score_group(samples))
    ok, empty, judge_failed, render_failed, no_refs, no_gt = records
    assert ok.reward == pytest.approx(0.5 * 0.35 + 0.5 * 0.75) and not ok.masked
    assert ok.r_img == pytest.approx(0.35) and ok.r_text == 0.75 and ok.image_path
    assert (empty.reward, empty.masked, empty.reason) == (0.0, False, "empty_program: gen_prompt is empty")
    assert no_refs.reward == 0.0 and no_refs.reason.startswith("reference_count_out_of_range: 0")
    assert judge_failed.masked and judge_failed.reward is None
    assert judge_failed.reason == "judge_failed: timeout (180s) after 3 tries"
    assert render_failed.masked and render_failed.reason.startswith("render_failed: render service failed")
    assert no_gt.masked and no_gt.reason.startswith("gt_image_missing")
    # only the three samples that passed the program gate and had a GT image were rendered
    assert renderer.calls == 3
    stats = summarize(records)
    assert stats["masked"] == 3 and stats["mean_reward"] == pytest.approx((ok.reward + 0 + 0) / 3)
    assert stats["masked_reasons"] == {"judge_failed": 1, "render_failed": 1, "gt_image_missing": 1}
    assert any("MASKED (judge_failed" in r.getMessage() for r in caplog.records)


def test_rerun_pays_nothing_twice(tmp_path, files):
    samples = [_sample(i, files) for i in range(3)]
    r1, b1 = FakeRenderer(), FakeBackend()
    scorer = RewardScorer.from_config(_vlm_cfg(tmp_path / "c"), renderer=r1, backend=b1)
    first = asyncio.run(scorer.score_group(samples))
    assert (r1.calls, b1.calls) == (3, 6)
    r2, b2 = FakeRenderer(), FakeBackend()
    scorer = RewardScorer.from_config(_vlm_cfg(tmp_path / "c"), renderer=r2, backend=b2)   # a new run, same cache
    second = asyncio.run(scorer.score_group(samples))
    assert (r2.calls, b2.calls) == (0, 0)
    assert [r.reward for r in second] == [r.reward for r in first]
    assert all(r.details["render_cached"] and r.details["kscore_cached"] and r.details["program_cached"]
               for r in second)


def test_calls_run_concurrently_within_the_bound(tmp_path, files):
    backend = FakeBackend()
    scorer = RewardScorer.from_config(_vlm_cfg(tmp_path / "c", concurrency=3), renderer=FakeRenderer(),
                                      backend=backend)
    records = asyncio.run(scorer.score_group([_sample(i, files, request=f"fox {i}") for i in range(8)]))
    assert not any(r.masked for r in records)
    assert backend.peak == 3  # concurrent, never beyond the endpoint limit
    assert backend.calls == 16


def test_judge_failing_over_http_masks_the_sample(tmp_path, files):
    def down(request):
        raise httpx.ConnectError("connection refused", request=request)
    backend = OpenAIChatBackend("http://127.0.0.1:9", "judge", transport=httpx.MockTransport(down))
    scorer = RewardScorer.from_config(_vlm_cfg(tmp_path / "c"), renderer=FakeRenderer(), backend=backend)
    (rec,) = asyncio.run(scorer.score_group([_sample(0, files)]))
    assert rec.masked and rec.reward is None
    assert rec.reason.startswith("judge_failed: ConnectError") and rec.reason.endswith("after 3 tries")


def test_rule_judge_is_the_default_and_every_line_says_proxy(tmp_path, files, caplog):
    cfg = reward_config.get_config()
    assert cfg.judge_kind == "rule"
    renderer = FakeRenderer()
    scorer = RewardScorer.from_config(cfg, renderer=renderer)
    samples = [_sample(0, files), _sample(1, files, prompt=""),
               RewardSample("bad", "x", _sample(2, files).program, task={"meta": {"primary_skills": [3]}})]
    with caplog.at_level(logging.INFO, logger="genevolve_jax.reward"):
        good, empty, bad = asyncio.run(scorer.score_group(samples))
    assert good.proxy and good.judge == "rule (proxy)" and renderer.calls == 1
    # hygiene 1 -> R_img 1; notes 1 and skills 1 -> R_text 1
    assert good.reward == pytest.approx(1.0)
    assert empty.proxy and empty.reward == 0.0
    assert bad.masked and bad.reason.startswith("bad_task_row") and "primary_skills" in bad.reason
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all("[proxy]" in line for line in lines)
    assert summarize([good, empty, bad])["proxy"] is True
