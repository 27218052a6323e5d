"""JaxEngine: cached greedy decoding equals full-forward argmax (text and image prompts), recorded
log-probs equal the training forward's fused log-probs, continuous batching changes no output,
stop ids/strings, sharded sampling layout, weight updates and bad requests."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from genevolve_jax.models.hf_io import model_from_state_dict, random_state_dict
from genevolve_jax.models.qwen3_vl import config as qwen_config
from genevolve_jax.models.qwen3_vl.model import forward, forward_hidden, prepare_inputs
from genevolve_jax.ops.fused_logprob import token_logprobs
from genevolve_jax.processing.image import ImageProcessorConfig, preprocess_images
from genevolve_jax.processing.tokenizer import default_tokenizer, special_token_ids
from genevolve_jax.rollout.engine import GenerationRequest, SamplingParams
from genevolve_jax.rollout.config import default_engine_config, validate
from genevolve_jax.rollout.jax_engine import JaxEngine
from genevolve_jax.rollout.sampling import filter_logits, sample_tokens

PROCESSOR = ImageProcessorConfig(min_pixels=32 * 32, max_pixels=96 * 96)
_forward = jax.jit(forward)
_hidden = jax.jit(forward_hidden)


def tiny_config(tok):
    sp = special_token_ids(tok)
    return qwen_config.tiny(vocab_size=len(tok)).replace(
        image_token_id=sp["<|image_pad|>"], video_token_id=sp["<|video_pad|>"],
        vision_start_token_id=sp["<|vision_start|>"], vision_end_token_id=sp["<|vision_end|>"])


def engine_config(**kw):
    """The module's engines: four slots (two where a test needs slot pressure), one cache length, and
    prompts padded to at least 64 tokens, so that few windows occur. Each distinct config, prompt
    bucket and attended window compiles its own prefill and decode programs, most of this module's
    time; engines of one config read them back from the session's compilation cache."""
    cfg = default_engine_config()
    cfg.max_slots, cfg.max_seq_len, cfg.steps_per_sync, cfg.min_prefill_bucket = 4, 160, 3, 64
    cfg.update(kw)
    return cfg


@pytest.fixture(scope="module")
def setup():
    tok = default_tokenizer()
    cfg = tiny_config(tok)
    model = model_from_state_dict(cfg, random_state_dict(cfg, seed=11))
    engine = JaxEngine(model, tok, engine_config(), image_processor=PROCESSOR)
    yield tok, cfg, model, engine
    engine.close()


@pytest.fixture(scope="module")
def pair(setup):
    """A two-slot engine, for the tests that need slot pressure. Tests that change its weights put
    the module model's back; each starts from whatever rows the last one left parked."""
    tok, cfg, model, _ = setup
    engine = JaxEngine(model, tok, engine_config(max_slots=2))
    yield engine
    engine.close()


def text_ids(rng, n, tok):
    return rng.integers(len(special_token_ids(tok)), len(tok), n).tolist()


def image_prompt(rng, tok, cfg, engine, path):
    pads = engine.num_image_tokens(str(path))
    return (text_ids(rng, 4, tok) + [cfg.vision_start_token_id] + [cfg.image_token_id] * pads
            + [cfg.vision_end_token_id] + text_ids(rng, 3, tok))


def write_image(path, rng):
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(path)
    return path


def full_logits(model, cfg, ids, images=(), pad_to=64):
    """The training forward over ``ids`` right-padded to ``pad_to`` (one compile for every length;
    causal attention keeps padding from touching real positions). Logits [pad_to, V]."""
    vision = {}
    if images:
        pix, grid = preprocess_images([Image.open(p) for p in images], PROCESSOR)
        vision = dict(pixel_values=pix, image_grid_thw=grid)
    row = np.zeros((1, max(pad_to, len(ids))), np.int64)
    mask = np.zeros_like(row)
    row[0, :len(ids)], mask[0, :len(ids)] = ids, 1
    batch = prepare_inputs(cfg, row, mask, **vision)
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, batch))[0], batch


def test_greedy_with_the_cache_equals_step_by_step_full_forward_argmax(setup, tmp_path):
    tok, cfg, model, engine = setup
    rng = np.random.default_rng(0)
    img = write_image(tmp_path / "a.png", rng)
    prompts = [(text_ids(rng, 7, tok), []), (image_prompt(rng, tok, cfg, engine, img), [str(img)])]
    steps = 6
    results = engine.generate([GenerationRequest(p, SamplingParams(max_new_tokens=steps, temperature=0.0),
                                                 images=imgs) for p, imgs in prompts])
    for (prompt, imgs), res in zip(prompts, results):
        ids, want_lp = list(prompt), []
        for _ in range(steps):  # no cache: a whole forward per token
            logits, _ = full_logits(model, cfg, ids, imgs)
            last = logits[len(ids) - 1].astype(np.float64)
            nxt = int(np.argmax(last))
            want_lp.append(float(last[nxt] - last.max() - np.log(np.exp(last - last.max()).sum())))
            ids.append(nxt)
        assert res.finish_reason == "length", res.error
        assert res.token_ids == ids[len(prompt):]
        np.testing.assert_allclose(res.logprobs, want_lp, atol=1e-4)  # greedy records T=1 log-probs
    assert len(set(results[0].token_ids)) > 1


def test_sampled_logprobs_equal_the_training_forward_fused_logprobs(setup, tmp_path):
    tok, cfg, model, engine = setup
    rng = np.random.default_rng(1)
    img = write_image(tmp_path / "b.png", rng)
    temperature = 0.7
    prompts = [(text_ids(rng, 9, tok), []), (image_prompt(rng, tok, cfg, engine, img), [str(img)])]
    params = SamplingParams(max_new_tokens=12, temperature=temperature, top_p=0.9, top_k=40, seed=5)
    results = engine.generate([GenerationRequest(p, params, images=i) for p, i in prompts])
    graphdef, state = nnx.split(model)
    kernel = model.lm_head_kernel()
    for (prompt, imgs), res in zip(prompts, results):
        ids = prompt + res.token_ids
        _, batch = full_logits(model, cfg, ids, imgs)
        hidden = _hidden(graphdef, state, batch)
        width = batch.input_ids.shape[1]
        targets = jnp.asarray([ids[1:] + [0] * (width - len(ids) + 1)])
        lp = np.asarray(token_logprobs(hidden, kernel, targets, chunk_size=256, temperature=temperature))[0]
        want = lp[len(prompt) - 1: len(ids) - 1]
        np.testing.assert_allclose(res.logprobs, want, atol=1e-4, rtol=0)
        assert np.ptp(want) > 0.1
    # The same seed gives the same tokens; another seed other tokens.
    again = engine.generate([GenerationRequest(prompts[0][0], params)])[0]
    other = engine.generate([GenerationRequest(prompts[0][0], SamplingParams(
        max_new_tokens=12, temperature=temperature, top_p=0.9, top_k=40, seed=6))])[0]
    assert again.token_ids == results[0].token_ids and other.token_ids != results[0].token_ids


def test_sampler_cuts_and_raw_logprob_switch_against_numpy():
    rng = np.random.default_rng(2)
    b, v = 6, 50
    logits = rng.normal(0, 2, (b, v)).astype(np.float32)
    temp = np.array([0.7, 1.0, 0.5, 1.3, 0.0, 0.9], np.float32)
    top_p = np.array([0.8, 1.0, 0.5, 0.95, 1.0, 1.0], np.float32)
    top_k = np.array([-1, 5, -1, 10, -1, 1], np.int32)
    kept = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits / np.where(temp > 0, temp, 1)[:, None]),
                                                jnp.asarray(top_p), jnp.asarray(top_k))))
    for r in range(b):  # float64 reference: top-k, then the smallest top-p nucleus of the rest
        z = logits[r].astype(np.float64) / (temp[r] if temp[r] > 0 else 1.0)
        order = np.argsort(-z)
        k = top_k[r] if top_k[r] > 0 else v
        p = np.exp(z[order[:k]] - z[order[:k]].max())
        p /= p.sum()
        n = int(np.searchsorted(np.cumsum(p), top_p[r] - 1e-12) + 1)
        want = np.zeros(v, bool)
        want[order[:min(n, k)]] = True
        np.testing.assert_array_equal(kept[r], want, err_msg=f"row {r}")
    draws = []
    for c in range(40):
        tokens, lp = sample_tokens(jnp.asarray(logits), jnp.asarray(temp), jnp.asarray(top_p), jnp.asarray(top_k),
                                   jnp.arange(b, dtype=jnp.uint32), jnp.full((b,), c, jnp.int32))
        tokens = np.asarray(tokens)
        assert kept[np.arange(b), tokens].all()
        scaled = logits.astype(np.float64) / np.where(temp > 0, temp, 1)[:, None]
        ref = scaled - np.log(np.exp(scaled - scaled.max(1, keepdims=True)).sum(1, keepdims=True)) \
            - scaled.max(1, keepdims=True)
        np.testing.assert_allclose(np.asarray(lp), ref[np.arange(b), tokens], atol=1e-5)
        _, raw = sample_tokens(jnp.asarray(logits), jnp.asarray(temp), jnp.asarray(top_p), jnp.asarray(top_k),
                               jnp.arange(b, dtype=jnp.uint32), jnp.full((b,), c, jnp.int32), raw_logprobs=True)
        z = logits.astype(np.float64)
        ref1 = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
        np.testing.assert_allclose(np.asarray(raw), ref1[np.arange(b), tokens], atol=1e-5)
        draws.append(tokens)
    draws = np.array(draws)
    assert (draws[:, 4] == logits[4].argmax()).all() and (draws[:, 5] == logits[5].argmax()).all()
    assert len(set(draws[:, 0])) > 1


def test_continuous_batching_gives_the_outputs_of_one_at_a_time(setup):
    tok, cfg, model, _ = setup
    rng = np.random.default_rng(3)
    # 2 slots, 6 requests of different lengths: requests enter as others finish (and evict the
    # parked rows of earlier ones), with decode windows of several sizes (64 and 128: the 60-token
    # prompt crosses 64 as it decodes).
    engine = JaxEngine(model, tok, engine_config(max_slots=2))
    try:
        reqs = [GenerationRequest(text_ids(rng, int(n), tok), SamplingParams(
            max_new_tokens=int(m), temperature=0.0 if i % 2 else 0.8, seed=i))
            for i, (n, m) in enumerate([(5, 9), (20, 4), (11, 14), (3, 7), (60, 10), (8, 5)])]
        together = engine.generate(reqs)
        assert engine.stats["max_live"] == 2 and engine.stats["evictions"] > 0
        alone = [engine.generate([r])[0] for r in reqs]
    finally:
        engine.close()
    for a, b in zip(together, alone):
        assert a.finish_reason == b.finish_reason == "length"
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_stop_token_ids_and_stop_strings(setup):
    tok, cfg, model, engine = setup
    rng = np.random.default_rng(4)
    prompt = text_ids(rng, 6, tok)
    free = engine.generate([GenerationRequest(prompt, SamplingParams(max_new_tokens=24, temperature=0.0))])[0]
    ids = free.token_ids
    stop_id = ids[5]
    first = ids.index(stop_id)
    res = engine.generate([GenerationRequest(prompt, SamplingParams(max_new_tokens=24, temperature=0.0,
                                                                    stop_token_ids=(stop_id,)))])[0]
    assert res.finish_reason == "stop" and res.token_ids == ids[:first + 1]
    # A stop string spanning the text of tokens 8..10 ends the turn at the token completing it.
    text = tok.decode(ids, skip_special_tokens=False)
    piece = tok.decode(ids[8:11], skip_special_tokens=False)
    assert piece and piece in text
    res = engine.generate([GenerationRequest(prompt, SamplingParams(max_new_tokens=24, temperature=0.0,
                                                                    stop=(piece,)))])[0]
    assert res.finish_reason == "stop"
    n = len(res.token_ids)
    assert res.token_ids == ids[:n] and piece in tok.decode(ids[:n], skip_special_tokens=False)
    assert piece not in tok.decode(ids[:n - 1], skip_special_tokens=False)
    assert n <= 11


def test_sharded_sampling_layout_matches_a_single_device(setup):
    tok, cfg, model, engine = setup
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices")
    ecfg = engine_config()
    ecfg.mesh.data, ecfg.mesh.tensor = 2, 2
    sharded = JaxEngine(model, tok, ecfg)
    try:
        rng = np.random.default_rng(5)
        reqs = [GenerationRequest(text_ids(rng, n, tok), SamplingParams(max_new_tokens=6, temperature=0.0))
                for n in (4, 13, 9)]
        got = sharded.generate(reqs)
        spec = sharded.params["language_model"]["layers"][0]["self_attn"]["q_proj"]["kernel"].get_value().sharding.spec
        assert "tensor" in tuple(spec)
    finally:
        sharded.close()
    want = engine.generate(reqs)
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_weight_update_changes_outputs_and_bad_inputs_are_named(setup, pair):
    tok, cfg, model, _ = setup
    engine = pair
    try:
        rng = np.random.default_rng(6)
        prompt = text_ids(rng, 8, tok)
        req = GenerationRequest(prompt, SamplingParams(max_new_tokens=8, temperature=0.0))
        before = engine.generate([req])[0]
        other = model_from_state_dict(cfg, random_state_dict(cfg, seed=12))
        engine.update_weights(nnx.state(other, nnx.Param))
        after = engine.generate([req])[0]
        assert after.token_ids != before.token_ids
        fresh = JaxEngine(other, tok, engine_config(max_slots=2))
        assert fresh.generate([req])[0].token_ids == after.token_ids
        fresh.close()
        small = model_from_state_dict(qwen_config.tiny(vocab_size=len(tok) - 1), random_state_dict(
            qwen_config.tiny(vocab_size=len(tok) - 1), seed=1))
        with pytest.raises(ValueError, match="embed_tokens.*shape"):
            engine.update_weights(nnx.state(small, nnx.Param))
        bad = engine.generate([GenerationRequest([10**6], req.sampling), GenerationRequest(list(range(20, 200)),
                                                                                            req.sampling), req])
        assert bad[0].finish_reason == "abort" and "vocab_size" in bad[0].error
        assert bad[1].finish_reason == "abort" and "max_seq_len" in bad[1].error
        assert bad[2].token_ids == after.token_ids
    finally:
        engine.update_weights(nnx.state(model, nnx.Param))
    assert fresh.generate([req])[0].error == "engine is closed"
    with pytest.raises(ValueError, match="engine.steps_per_sync"):
        validate(engine_config(steps_per_sync=0))


def test_a_scanned_trainer_model_and_its_stacked_updates_sample_as_the_layer_list(setup):
    """A trainer that scans its layers hands the engine stacked parameters: built from such a model,
    and updated with such parameters, the engine samples what it samples from the layer list."""
    tok, cfg, model, engine = setup
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    weights = random_state_dict(cfg, seed=int(rng.integers(100, 1000)))
    scanned = model_from_state_dict(cfg.replace(scan_layers=True), weights)
    listed = model_from_state_dict(cfg, weights)
    requests = [GenerationRequest(text_ids(rng, int(rng.integers(4, 12)), tok),
                                  SamplingParams(max_new_tokens=6, temperature=0.7, top_p=0.9, seed=i))
                for i in range(3)]
    # The module's engine samples the layer list's weights (the reference), then receives the stacked
    # ones as an update; a second engine is built from the scanned model.
    built = JaxEngine(scanned, tok, engine_config())
    try:
        assert not built.config.scan_layers
        engine.update_weights(nnx.state(listed, nnx.Param))
        want = engine.generate(requests)
        got = built.generate(requests)
        engine.update_weights(nnx.state(scanned, nnx.Param), step=3)
        updated = engine.generate(requests)
        assert engine.weight_version == 3
        for w, g, u in zip(want, got, updated):
            assert g.token_ids == w.token_ids == u.token_ids, f"seed {seed}"
            np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-6)
            np.testing.assert_allclose(u.logprobs, w.logprobs, atol=1e-6)
    finally:
        built.close()
        engine.update_weights(nnx.state(model, nnx.Param))


# --- KV reuse ------------------------------------------------------------------------------------------
def _delta(engine, before):
    return {k: engine.stats[k] - before[k] for k in ("prefill_tokens", "reused_tokens", "evictions")}


def _converse(engine, prompt, images, observations, fresh):
    """Rounds of an agent: each request resends the whole context (prompt, every sampled turn and
    observation), as genevolve_jax/agent/loop.py does. ``fresh`` drops the cache before each round."""
    context, imgs, results, deltas = list(prompt), list(images), [], []
    for r, (obs, obs_images) in enumerate(observations):
        if fresh:
            engine.flush_cache()
        before = engine.stats
        params = SamplingParams(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=30, seed=100 + r)
        res = engine.generate([GenerationRequest(list(context), params, images=list(imgs))])[0]
        assert res.finish_reason == "length", res.error
        results.append(res)
        deltas.append((len(context), _delta(engine, before)))
        context += res.token_ids + obs
        imgs += obs_images
    return results, deltas


def test_a_five_round_conversation_with_reuse_equals_fresh_prefills(setup, tmp_path):
    tok, cfg, model, engine = setup
    rng = np.random.default_rng(7)
    first, later = write_image(tmp_path / "c.png", rng), write_image(tmp_path / "d.png", rng)
    prompt = image_prompt(rng, tok, cfg, engine, first)
    pads = engine.num_image_tokens(str(later))
    observations = [(text_ids(rng, 4, tok), []), (text_ids(rng, 3, tok), []),
                    (text_ids(rng, 2, tok) + [cfg.vision_start_token_id] + [cfg.image_token_id] * pads
                     + [cfg.vision_end_token_id], [str(later)]),
                    (text_ids(rng, 5, tok), []), ([], [])]
    assert len(prompt) + 5 * 5 + sum(len(o) for o, _ in observations) < 96
    engine.flush_cache()
    reused, deltas = _converse(engine, prompt, [str(first)], observations, fresh=False)
    again, fresh_deltas = _converse(engine, prompt, [str(first)], observations, fresh=True)
    for a, b in zip(reused, again):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    # Round r ≥ 2 reuses everything the row holds (the context but the last sampled token) and
    # prefills only that token and the observation.
    for r, ((n, d), (_, f)) in enumerate(zip(deltas, fresh_deltas)):
        assert f["reused_tokens"] == 0 and f["prefill_tokens"] == n
        if r == 0:
            assert d["reused_tokens"] == 0 and d["prefill_tokens"] == n
        else:
            held = deltas[r - 1][0] + 4  # previous context and 4 of its 5 sampled tokens
            assert d["reused_tokens"] == held and d["prefill_tokens"] == n - held
    assert sum(len(r.token_ids) for r in reused) == 25


def test_group_prefix_is_prefilled_once_and_image_content_is_part_of_the_key(setup, tmp_path):
    tok, cfg, model, engine = setup
    rng = np.random.default_rng(8)
    engine.flush_cache()
    prompt = text_ids(rng, 30, tok)
    reqs = [GenerationRequest(prompt, SamplingParams(max_new_tokens=6, temperature=0.8, seed=s))
            for s in range(4)]
    before = engine.stats
    group = engine.generate(reqs)
    s = _delta(engine, before)
    assert s["prefill_tokens"] == 30 + 3 and s["reused_tokens"] == 3 * 29, s
    engine.flush_cache()
    for r, res in zip(reqs, group):  # each alone, from a fresh prefill
        engine.flush_cache()
        alone = engine.generate([r])[0]
        assert alone.token_ids == res.token_ids
        np.testing.assert_allclose(alone.logprobs, res.logprobs, atol=1e-5)
    # Same tokens, other image content: reuse stops where the image's placeholders start.
    a, b = write_image(tmp_path / "e.png", rng), write_image(tmp_path / "f.png", rng)
    img_prompt = image_prompt(rng, tok, cfg, engine, a)
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
    engine.flush_cache()
    engine.generate([GenerationRequest(img_prompt, greedy, images=[str(a)])])
    before = engine.stats
    got = engine.generate([GenerationRequest(img_prompt, greedy, images=[str(b)])])[0]
    assert _delta(engine, before)["reused_tokens"] == img_prompt.index(cfg.image_token_id)
    engine.flush_cache()
    want = engine.generate([GenerationRequest(img_prompt, greedy, images=[str(b)])])[0]
    assert got.token_ids == want.token_ids


def test_parked_conversations_are_evicted_oldest_first_and_dropped_on_new_weights(setup, pair):
    tok, cfg, model, _ = setup
    rng = np.random.default_rng(9)
    engine = pair
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
    engine.flush_cache()
    start = engine.stats
    convs = [text_ids(rng, 12, tok) for _ in range(3)]
    ends = {}
    for i in (0, 1):
        res = engine.generate([GenerationRequest(convs[i], greedy)])[0]
        ends[i] = convs[i] + res.token_ids + text_ids(rng, 3, tok)
    assert engine.stats["parked"] == 2 and _delta(engine, start)["evictions"] == 0
    before = engine.stats
    engine.generate([GenerationRequest(ends[0], greedy)])  # conversation 0 continues: row 0 refreshed
    assert _delta(engine, before)["reused_tokens"] == 12 + 3
    before = engine.stats
    engine.generate([GenerationRequest(convs[2], greedy)])  # a third: evicts conversation 1 (oldest)
    assert _delta(engine, before) == {"prefill_tokens": 12, "reused_tokens": 0, "evictions": 1}
    before = engine.stats
    res1 = engine.generate([GenerationRequest(ends[1], greedy)])[0]  # evicted: prefilled afresh
    assert _delta(engine, before)["reused_tokens"] == 0
    engine.flush_cache()
    assert engine.generate([GenerationRequest(ends[1], greedy)])[0].token_ids == res1.token_ids
    # New weights: nothing parked survives, and the same context is prefilled again.
    engine.generate([GenerationRequest(ends[1], greedy)])
    assert engine.stats["parked"] == 2  # the first result's row, and a copy of its prefix
    engine.update_weights(engine.params, step=3)
    assert engine.stats["parked"] == 0 and engine.weight_version == 3
    before = engine.stats
    engine.generate([GenerationRequest(ends[1], greedy)])
    assert _delta(engine, before)["reused_tokens"] == 0


def test_cancel_frees_a_queued_or_running_request(setup, pair):
    tok, cfg, model, _ = setup
    rng = np.random.default_rng(10)
    engine = pair
    long = SamplingParams(max_new_tokens=80, temperature=0.0)
    running = [engine.submit(GenerationRequest(text_ids(rng, 5, tok), long, request_id=rid)) for rid in "ac"]
    queued = engine.submit(GenerationRequest(text_ids(rng, 5, tok), long, request_id="b"))
    while engine.num_live < 2:  # both slots taken: "b" waits
        time.sleep(0.01)
    assert engine.num_queued == 1 and not engine.cancel("") and not engine.cancel("nope")
    assert engine.cancel("b") and queued.result(timeout=5).error == "cancelled"
    assert engine.num_queued == 0
    for rid, fut in zip("ac", running):
        assert engine.cancel(rid)
        res = fut.result(timeout=60)
        assert res.finish_reason == "abort" and res.error == "cancelled"
    assert engine.num_live == 0 and not engine.cancel("a")
    # A caller that cancels the future itself does not trip the worker.
    assert engine.submit(GenerationRequest(text_ids(rng, 5, tok), SamplingParams(max_new_tokens=3))).cancel()
    ok = engine.generate([GenerationRequest(text_ids(rng, 5, tok), SamplingParams(max_new_tokens=3))])[0]
    assert ok.finish_reason == "length"


def test_long_text_prefills_in_chunks_with_the_outputs_of_one_call(setup, tmp_path):
    """engine.prefill_tokens = 16: a 70-token prompt goes in chunks of 16 (4 chunks, then a tail),
    and so does a long continuation of a parked conversation; tokens and log-probs equal an engine
    that prefills them in one call, and the counters still say what was prefilled and reused."""
    tok, cfg, model, whole = setup        # the module's engine: engine.prefill_tokens 2048
    rng = np.random.default_rng(23)
    img = write_image(tmp_path / "e.png", rng)
    chunked = JaxEngine(model, tok, engine_config(prefill_tokens=16 + int(rng.integers(0, 16))),
                        image_processor=PROCESSOR)
    try:
        assert chunked.fns.prefill_chunk == 16 and whole.fns.prefill_chunk == 160
        whole.flush_cache()
        start = {e: e.stats["prefill_batches"] for e in (whole, chunked)}
        prompt = text_ids(rng, 70, tok)
        with_image = image_prompt(rng, tok, cfg, whole, img) + text_ids(rng, 30, tok)
        requests = [GenerationRequest(prompt, SamplingParams(max_new_tokens=6, temperature=0.7, seed=5)),
                    GenerationRequest(text_ids(rng, 9, tok), SamplingParams(max_new_tokens=6, temperature=0.0)),
                    GenerationRequest(with_image, SamplingParams(max_new_tokens=4, temperature=0.0),
                                      images=[str(img)])]
        outs = []
        for engine in (whole, chunked):
            first = engine.generate(requests)
            # Continue the first conversation with 40 more tokens: reuse, then a chunked append.
            context = prompt + first[0].token_ids + text_ids(np.random.default_rng(3), 40, tok)
            before = engine.stats
            second = engine.generate([GenerationRequest(context, SamplingParams(max_new_tokens=5, temperature=0.7,
                                                                                 seed=6))])
            outs.append((first + second, _delta(engine, before)))
        (a, da), (b, db) = outs
        for x, y in zip(a, b):
            assert x.finish_reason == y.finish_reason == "length", (x.error, y.error)
            assert x.token_ids == y.token_ids
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5, rtol=0)
        assert da == db and da["reused_tokens"] == 70 + 5 and da["prefill_tokens"] == 41
        # 70 tokens: 4 chunks of 16 and a 6-token tail; the continuation: 2 chunks and a tail.
        calls = {e: e.stats["prefill_batches"] - n for e, n in start.items()}
        assert calls[chunked] - calls[whole] == 4 + 2
    finally:
        chunked.close()
