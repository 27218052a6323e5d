"""KV reuse changes where keys and values come from, never what is sampled.

A rollout phase of several prompts × several rollouts × several rounds runs through two JaxEngines
that differ only in ``engine.kv_reuse``. Every request carries its own seed, so each sampled token
must come out the same from both, and its log-prob to float32 rounding. The engine with reuse on must
also have reused exactly what the design says — each group's prompt prefilled once and copied to
the other members, each later round taking its trajectory's parked row over — so that the
comparison cannot pass with reuse silently off.
"""
import concurrent.futures as cf

import numpy as np
import pytest
from PIL import Image

from genevolve_jax.models.hf_io import model_from_state_dict, random_state_dict
from genevolve_jax.models.qwen3_vl import config as qwen_config
from genevolve_jax.processing.image import ImageProcessorConfig
from genevolve_jax.rollout.config import default_engine_config
from genevolve_jax.rollout.engine import GenerationRequest, SamplingParams
from genevolve_jax.rollout.jax_engine import JaxEngine

PROMPTS, ROLLOUTS, ROUNDS = 2, 3, 4
PROCESSOR = ImageProcessorConfig(min_pixels=32 * 32, max_pixels=64 * 64)


def engine_config(reuse: bool):
    cfg = default_engine_config()
    # One slot per trajectory: nothing is evicted, so every later round finds its parked row.
    # Windows of 64 and 128 positions: contexts start under 64 tokens and some grow past it.
    cfg.max_slots, cfg.max_seq_len, cfg.steps_per_sync, cfg.min_prefill_bucket = PROMPTS * ROLLOUTS, 128, 4, 64
    cfg.kv_reuse = reuse
    return cfg


def build_phase(rng, model_cfg, engine, image_path):
    """Prompts (the first with an image between text), per-trajectory observations and sampling."""
    def text(n):  # ids below the vision placeholders (the tiny vocabulary's last four)
        return rng.integers(0, model_cfg.image_token_id, n).tolist()

    pads = engine.num_image_tokens(str(image_path))
    prompts = [(text(int(rng.integers(10, 20))) + [model_cfg.vision_start_token_id]
                + [model_cfg.image_token_id] * pads + [model_cfg.vision_end_token_id]
                + text(int(rng.integers(10, 20))), [str(image_path)])]
    prompts += [(text(int(rng.integers(25, 45))), []) for _ in range(PROMPTS - 1)]
    n = PROMPTS * ROLLOUTS
    observations = [[text(int(rng.integers(0, 7))) for _ in range(ROUNDS - 1)] for _ in range(n)]
    stop_ids = tuple(int(t) for t in rng.choice(model_cfg.image_token_id, 25, replace=False))
    # Every request cuts (top-p < 1), so that all calls compile the one "filter" sampler.
    sampling = [[SamplingParams(max_new_tokens=int(rng.integers(2, 8)), temperature=float(rng.uniform(0.6, 1.3)),
                                top_p=float(rng.uniform(0.8, 0.99)), top_k=int(rng.choice([-1, 40])),
                                stop_token_ids=stop_ids, seed=int(rng.integers(0, 2**31)))
                 for _ in range(ROUNDS)] for _ in range(n)]
    return prompts, observations, sampling


def run_phase(engine, prompts, observations, sampling):
    """Every trajectory as the agent loop drives it: each round resends the whole context (prompt,
    sampled turns, observations) and is submitted as soon as the trajectory's previous turn is back,
    while the others decode. Round 0 of all trajectories is submitted together (the trainer's
    phase). Returns each trajectory's turns and the reuse the design predicts for them."""
    n = PROMPTS * ROLLOUTS
    c = engine.config
    # A random policy samples vision placeholder ids too, which no prompt may hold without their
    # images: a trajectory ends at such a turn (in both runs alike, as they sample the same tokens).
    vision_ids = {c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id}
    contexts = [list(prompts[t // ROLLOUTS][0]) for t in range(n)]
    turns = [[] for _ in range(n)]
    # Round 0: the first rollout of a group prefills the prompt, the others copy all of it but the
    # token whose logits they sample from. A later round takes over the row its trajectory parked,
    # which holds the context and all of the last turn but its final token (never fed back).
    expected_reuse = sum(len(p) - 1 for p, _ in prompts) * (ROLLOUTS - 1)

    def request(t, r):
        return GenerationRequest(list(contexts[t]), sampling[t][r], images=list(prompts[t // ROLLOUTS][1]))

    futures = engine.submit_many([request(t, 0) for t in range(n)])
    pending = {f: (t, 0) for t, f in enumerate(futures)}
    while pending:
        done, _ = cf.wait(pending, timeout=300, return_when=cf.FIRST_COMPLETED)
        assert done, "the engine returned nothing for 300 s"
        for future in done:
            t, r = pending.pop(future)
            res = future.result()
            assert res.finish_reason in ("stop", "length"), res.error
            turns[t].append(res)
            if r + 1 < ROUNDS and not vision_ids & set(res.token_ids):
                expected_reuse += len(contexts[t]) + len(res.token_ids) - 1
                contexts[t] += res.token_ids + observations[t][r]
                pending[engine.submit(request(t, r + 1))] = (t, r + 1)
    return turns, expected_reuse


@pytest.fixture(scope="module")
def phase_runs(tmp_path_factory):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    model_cfg = qwen_config.tiny()
    model = model_from_state_dict(model_cfg, random_state_dict(model_cfg, seed=int(rng.integers(0, 1000))))
    image_path = tmp_path_factory.mktemp("reuse") / "a.png"
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(image_path)
    runs = {}
    for reuse in (False, True):
        engine = JaxEngine(model, None, engine_config(reuse), image_processor=PROCESSOR)
        try:
            phase = build_phase(np.random.default_rng(seed + 1), model_cfg, engine, image_path)
            turns, expected_reuse = run_phase(engine, *phase)
            runs[reuse] = (turns, expected_reuse, engine.stats)
        finally:
            engine.close()
    return seed, runs


def test_reuse_on_and_off_sample_the_same_tokens_and_logprobs(phase_runs):
    seed, runs = phase_runs
    (off, _, _), (on, _, _) = runs[False], runs[True]
    assert len(on) == len(off) == PROMPTS * ROLLOUTS
    for t, (a, b) in enumerate(zip(off, on)):
        assert len(a) == len(b), f"seed {seed}, trajectory {t}"
        for r, (x, y) in enumerate(zip(a, b)):
            where = f"seed {seed}, trajectory {t}, round {r}"
            assert x.finish_reason == y.finish_reason, where
            assert x.token_ids == y.token_ids, where
            # Float32 rounding, not 0: a reused prefix's keys/values come from calls of other shapes.
            # Measured over 9 seeds: up to 1.9e-6 here, and up to 1.4e-6 between two engines without
            # reuse whose slot counts (prefill batch shapes) differ; 5e-6 is ~10 float32 steps at
            # these log-probs' magnitude (4–8). A wrong key or value moves them by orders more.
            np.testing.assert_allclose(y.logprobs, x.logprobs, atol=5e-6, rtol=0, err_msg=where)
    # The phase is not degenerate: the rollouts of one prompt sample different turns.
    firsts = [tuple(off[t][0].token_ids) for t in range(ROLLOUTS)]
    assert len(set(firsts)) > 1, f"seed {seed}"


def test_reuse_on_copied_group_prefixes_and_took_parked_rows_over(phase_runs):
    seed, runs = phase_runs
    (_, _, off), (on_turns, expected_reuse, on) = runs[False], runs[True]
    requests = sum(map(len, on_turns))
    assert requests - PROMPTS * ROLLOUTS >= PROMPTS * ROLLOUTS, f"seed {seed}: too few later rounds"
    assert on["requests"] == off["requests"] == requests
    assert off["reused_tokens"] == 0
    assert on["reused_tokens"] == expected_reuse, f"seed {seed}"
    assert on["prefill_tokens"] + on["reused_tokens"] == off["prefill_tokens"]
    assert on["evictions"] == off["evictions"] == 0
    assert on["decode_tokens"] == off["decode_tokens"]
