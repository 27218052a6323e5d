"""KScore arithmetic against hand-computed values, and the KScore/program judges over a stub
OpenAI-compatible server on 127.0.0.1."""
import asyncio
import base64
import io

import numpy as np
import pytest
from fastapi import FastAPI, Request
from PIL import Image

from genevolve_jax.render.remote import ContentCache
from genevolve_jax.reward.backends import OpenAIChatBackend
from genevolve_jax.reward.judge_call import JudgeFailed
from genevolve_jax.reward.kscore import KScoreJudge, KScoreVerdict, KScoreWeights, aggregate_kscore
from genevolve_jax.reward.program_judge import ProgramJudge
from tests.fixtures.servers import LoopbackServer


@pytest.mark.parametrize("f,v,t,a,expected", [
    (1, 1, 1, 1, 1.0), (0, 0, 0, 0, 0.0), (1, 0.5, 0, 0.5, 0.35), (0.5, 1, 0.5, 0, 0.65),
    (1, 1, None, 1, 0.8), (0, 0.5, None, 0.5, 0.45)])
def test_kscore_formula_hand_computed(f, v, t, a, expected):
    # 0.1f + 0.4v + 0.4t + 0.1a, t = 0.5 when not applicable
    assert KScoreVerdict(f, v, t, a).kscore() == pytest.approx(expected, abs=1e-12)


def test_kscore_against_float64_reference_on_random_verdicts():
    rng = np.random.default_rng(0)
    levels = np.array([0.0, 0.5, 1.0])
    verdicts = []
    for _ in range(50):
        f, v, t, a = rng.choice(levels, 4)
        verdicts.append(KScoreVerdict(f, v, None if rng.random() < 0.3 else t, a))
    w = np.array([0.1, 0.4, 0.4, 0.1], dtype=np.float64)
    dims = np.array([[x.faithfulness, x.visual_correctness, 0.5 if x.text_na else x.text_accuracy, x.aesthetics]
                     for x in verdicts], dtype=np.float64)
    np.testing.assert_allclose([x.kscore() for x in verdicts], dims @ w, atol=1e-12)
    agg = aggregate_kscore(verdicts)
    applicable = np.array([x.text_accuracy for x in verdicts if not x.text_na], dtype=np.float64)
    means = np.array([dims[:, 0].mean(), dims[:, 1].mean(), applicable.mean(), dims[:, 3].mean()])
    assert agg["kscore"] == pytest.approx(float(means @ w), abs=1e-12)
    assert agg["mean_sample_kscore"] == pytest.approx(float((dims @ w).mean()), abs=1e-12)
    assert agg["text_applicable"] == len(applicable)


def test_aggregate_hand_computed_with_na_rows():
    rows = [KScoreVerdict(1, 1, 1, 1), KScoreVerdict(0, 0.5, None, 1), KScoreVerdict(0.5, 0, 0, 0)]
    agg = aggregate_kscore(rows)
    # f 0.5, v 0.5, t = mean(1, 0) = 0.5 over the 2 applicable rows, a 2/3
    assert agg["kscore"] == pytest.approx(0.1 * 0.5 + 0.4 * 0.5 + 0.4 * 0.5 + 0.1 * (2 / 3))
    assert agg["mean_sample_kscore"] == pytest.approx((1.0 + 0.5 + 0.05) / 3)  # row 2: .2 + .4*.5 + .1
    only_na = aggregate_kscore([KScoreVerdict(1, 1, None, 1)], KScoreWeights(text_na_value=0.5))
    assert only_na["text_accuracy"] == 0.5


def stub_openai_server(answers):
    """An OpenAI-compatible /v1/chat/completions that replays ``answers`` (str or (status, body))
    in turn and records every request."""
    app = FastAPI()
    seen = []
    it = iter(answers)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        from fastapi.responses import JSONResponse

        seen.append(await request.json())
        ans = next(it)
        if isinstance(ans, tuple):
            return JSONResponse(ans[1], status_code=ans[0])
        return {"id": "x", "object": "chat.completion", "model": seen[-1]["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ans}, "finish_reason": "stop"}]}
    return app, seen


def _decode(url):
    assert url.startswith("data:image/jpeg;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")).astype(int)


def test_kscore_judge_over_loopback_stub_with_retry_and_cache(tmp_path):
    gen = Image.fromarray(np.full((16, 24, 3), (250, 10, 10), np.uint8))   # red
    gt = Image.fromarray(np.full((16, 24, 3), (10, 10, 250), np.uint8))    # blue
    answers = [(503, {"error": "busy"}), "I think it is fine.",  # retried: HTTP error, then no JSON
               'Verdict:\n```json\n{"rationale": "1) fox 2) snow", "faithfulness": 1, "visual_correctness": 0.5,'
               ' "text_accuracy": "n/a", "aesthetics": 0.5, "text_accuracy_na": true}\n```',
               '{"faithfulness": 0, "visual_correctness": 0, "text_accuracy": 0, "aesthetics": 0}']
    app, seen = stub_openai_server(answers)
    with LoopbackServer(app).running() as url:
        backend = OpenAIChatBackend(url, "judge-model", timeout_s=10)
        judge = KScoreJudge(backend, cache=ContentCache(tmp_path), tries=3, backoff_s=0.0)
        verdict, cached = asyncio.run(judge.judge("a fox in the snow", gen, gt))
        assert not cached and len(seen) == 3
        assert verdict.text_na and verdict.kscore() == pytest.approx(0.1 + 0.2 + 0.2 + 0.05)
        body = seen[-1]
        assert body["model"] == "judge-model" and body["temperature"] == 0.0
        parts = body["messages"][0]["content"]
        images = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
        assert len(images) == 2
        first, second = _decode(images[0]), _decode(images[1])
        assert first[..., 0].mean() > 200 and second[..., 2].mean() > 200  # image 1 generated, image 2 GT
        assert "a fox in the snow" in parts[-1]["text"]
        again, cached = asyncio.run(judge.judge("a fox in the snow", gen, gt))  # cache hit: no request
        assert cached and again == verdict and len(seen) == 3
        # a different generated image is a different key and reaches the server
        darker = Image.fromarray(np.asarray(gen) // 2)
        other, cached = asyncio.run(judge.judge("a fox in the snow", darker, gt))
        assert not cached and len(seen) == 4 and other.kscore() == pytest.approx(0.0)
        assert len(list(tmp_path.rglob("*.json"))) == 2


def test_program_judge_and_failure_after_retries():
    gt = Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    program = {"gen_prompt": "The fox from the first reference image, sitting in snow.",
               "reference_images": [{"img_id": "IMG_001", "note": "fox fur colours", "path": "/secret/local.png"}]}
    app, seen = stub_openai_server(['{"rationale": "fine", "score": 0.7}',
                                    '{"score": 9}', '{"score": 9}', "no json"])
    with LoopbackServer(app).running() as url:
        judge = ProgramJudge(OpenAIChatBackend(url + "/v1", "m"), tries=3, backoff_s=0.0)
        verdict, _ = asyncio.run(judge.judge("a fox in snow", gt, program))
        assert verdict.score == 0.75
        text = seen[0]["messages"][0]["content"][-1]["text"]
        assert "fox fur colours" in text and "/secret/local.png" not in text
        with pytest.raises(JudgeFailed, match=r"unparsable judge output.*after 3 tries"):
            asyncio.run(judge.judge("another request", gt, program))
        assert len(seen) == 4


def test_backend_timeout_is_reported_as_timeout(monkeypatch):
    import httpx

    def slow(request):
        raise httpx.ReadTimeout("read timed out", request=request)
    backend = OpenAIChatBackend("http://127.0.0.1:9", "m", timeout_s=5, transport=httpx.MockTransport(slow))
    judge = KScoreJudge(backend, tries=3, backoff_s=0.0)
    img = Image.new("RGB", (4, 4))
    with pytest.raises(JudgeFailed, match=r"^timeout \(5s\) after 3 tries$"):
        asyncio.run(judge.judge("r", img, img))
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    from genevolve_jax.render.remote import PermanentError
    with pytest.raises(PermanentError, match="NO_SUCH_JUDGE_KEY"):
        OpenAIChatBackend("http://127.0.0.1:9", "m", api_key_env="NO_SUCH_JUDGE_KEY")
