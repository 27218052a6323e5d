"""Prefill + cached decode steps equal the full forward (ours and transformers'), with left/right
padding, an image in the prompt, a row that skips a step, and cache overflow caught."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genevolve_jax.models.qwen3_vl import config as qwen_config
from genevolve_jax.models.qwen3_vl.hf_reference import hf_logits
from genevolve_jax.models.qwen3_vl.model import decode_fn, prefill_fn, prepare_inputs
from genevolve_jax.models.qwen3_vl.text import init_cache, write_kv_slots
from tests.fixtures import hf_qwen3_vl as R

TOL = 1e-4
STEPS = 4
_prefill = jax.jit(prefill_fn, static_argnames="all_logits")  # shared: equal shapes reuse the compile
_decode = jax.jit(decode_fn)


@pytest.fixture(scope="module")
def setup():
    cfg = qwen_config.tiny()
    hf = R.random_hf_model(cfg, 4)
    return cfg, hf, R.nnx_model_from_hf(hf, cfg)


def _prompt(cfg, rng):
    grid = np.array([[1, 4, 4]])  # 4 merged tokens spanning 2 positions: rope delta −2
    rows = [R.text_tokens(cfg, 2, rng) + R.placeholder_segment(cfg, grid[0], "image", rng) + R.text_tokens(cfg, 2, rng),
            R.text_tokens(cfg, 5, rng),
            R.text_tokens(cfg, 9, rng)]
    ids, mask = R.pad_rows(rows, ["left", "right", "left"])
    return ids, mask, grid, R.random_pixels(cfg, grid, rng)


def test_prefill_and_decode_steps_equal_the_full_forward(setup):
    cfg, hf, ours = setup
    rng = np.random.default_rng(20)
    ids, mask, grid, pix = _prompt(cfg, rng)
    b, length = ids.shape
    new = rng.integers(0, cfg.image_token_id, (STEPS, b))
    took = np.ones((STEPS, b), bool)
    took[1, 2] = False  # row 2 is idle at step 1: its slot stays masked, its position does not advance
    graphdef, state = nnx.split(ours)
    prefill, decode = _prefill, _decode
    batch = prepare_inputs(cfg, ids, mask, pixel_values=pix, image_grid_thw=grid)
    cache = init_cache(cfg, b, length + STEPS)
    last, cache = prefill(graphdef, state, batch, cache)
    steps = []
    for k in range(STEPS):
        logits, cache = decode(graphdef, state, jnp.asarray(new[k]), cache, jnp.asarray(took[k]))
        steps.append(np.asarray(logits))
    assert int(cache.length) == length + STEPS

    # transformers' full forward over prompt + generated tokens; an idle step is a masked slot.
    full_ids = np.concatenate([ids, new.T], axis=1)
    full_mask = np.concatenate([mask, took.T.astype(mask.dtype)], axis=1)
    want = hf_logits(hf, cfg, full_ids, full_mask, pixel_values=pix, image_grid_thw=grid)
    last_real = length - 1 - np.argmax(mask[:, ::-1], axis=1)
    np.testing.assert_allclose(np.asarray(last), want[np.arange(b), last_real], atol=TOL, rtol=0)
    for k in range(STEPS):
        rows = took[k]
        np.testing.assert_allclose(steps[k][rows], want[rows, length + k], atol=TOL, rtol=0)
    assert np.abs(want).max() > 1.0

    # Our own full forward with all logits agrees too (same prefill function, longer prompt).
    batch_full = prepare_inputs(cfg, full_ids, full_mask, pixel_values=pix, image_grid_thw=grid)
    all_logits, full_cache = prefill(graphdef, state, batch_full, init_cache(cfg, b, length + STEPS), True)
    valid = full_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(all_logits)[valid], want[valid], atol=TOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(full_cache.next_position), np.asarray(cache.next_position))

    # The cache is full now: eager use refuses, a jitted step poisons its logits instead of
    # silently overwriting the last slot.
    with pytest.raises(ValueError, match=f"KV cache holds {length + STEPS} slots; {length + STEPS} are used"):
        ours.decode_step(jnp.asarray(new[0]), cache)
    poisoned, _ = decode(graphdef, state, jnp.asarray(new[0]), cache, jnp.ones((b,), bool))
    assert np.isnan(np.asarray(poisoned)).all()


def test_decode_positions_follow_rope_deltas(setup):
    """After an image the next text position is (real tokens + delta), not the slot index."""
    cfg, _, ours = setup
    rng = np.random.default_rng(21)
    ids, mask, grid, pix = _prompt(cfg, rng)
    batch = prepare_inputs(cfg, ids, mask, pixel_values=pix, image_grid_thw=grid)
    graphdef, state = nnx.split(ours)
    _, cache = _prefill(graphdef, state, batch, init_cache(cfg, ids.shape[0], ids.shape[1] + STEPS))
    pos = np.asarray(batch.position_ids)
    expected = np.array([pos[0, r][mask[r].astype(bool)].max() + 1 for r in range(ids.shape[0])])
    np.testing.assert_array_equal(np.asarray(cache.next_position), expected)
    assert expected[0] < mask[0].sum()  # the image row really has a negative delta
    with pytest.raises(ValueError, match="max_length"):
        ours.prefill(batch)


def test_appending_a_chunk_with_an_image_to_a_cached_conversation(setup):
    """Multi-turn: prompt, then an observation chunk holding an image, then decoding, equals one
    forward over the whole conversation (rope positions continue from each row's next position)."""
    cfg, hf, ours = setup
    rng = np.random.default_rng(22)
    first_ids, first_mask, _, _ = _prompt(cfg, rng)
    first_ids, first_mask = first_ids[1:], first_mask[1:]  # two text-only rows (right/left padded)
    grid = np.array([[1, 2, 4]])
    pix = R.random_pixels(cfg, grid, rng)
    chunk = [R.text_tokens(cfg, 3, rng), R.text_tokens(cfg, 1, rng) + R.placeholder_segment(cfg, grid[0], "image", rng)]
    ids2, mask2 = R.pad_rows(chunk, "left")
    b, total = 2, first_ids.shape[1] + ids2.shape[1] + 2
    graphdef, state = nnx.split(ours)
    _, cache = _prefill(graphdef, state, prepare_inputs(cfg, first_ids, first_mask), init_cache(cfg, b, total))
    last2, cache = _prefill(graphdef, state, prepare_inputs(cfg, ids2, mask2, pixel_values=pix, image_grid_thw=grid),
                            cache)
    new = rng.integers(0, cfg.image_token_id, (2, b))
    steps = []
    for k in range(2):
        logits, cache = _decode(graphdef, state, jnp.asarray(new[k]), cache, jnp.ones((b,), bool))
        steps.append(np.asarray(logits))
    full_ids = np.concatenate([first_ids, ids2, new.T], axis=1)
    full_mask = np.concatenate([first_mask, mask2, np.ones((b, 2), int)], axis=1)
    want = hf_logits(hf, cfg, full_ids, full_mask, pixel_values=pix, image_grid_thw=grid)
    np.testing.assert_allclose(np.asarray(last2), want[:, total - 3], atol=TOL, rtol=0)
    for k in range(2):
        np.testing.assert_allclose(steps[k], want[:, total - 2 + k], atol=TOL, rtol=0)


def test_kv_writes_land_heads_first_and_drop_what_runs_past_the_cache():
    """Per-row write positions, some running past the cache or starting beyond it: every slot
    in range holds the new value, every other slot keeps its old one (numpy reference)."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    b, kv, s, d, t = 6, 2, 12, 3, int(rng.integers(1, 6))
    buffer = rng.standard_normal((b, kv, s, d)).astype(np.float32)
    values = rng.standard_normal((b, t, kv, d)).astype(np.float32)
    length = np.concatenate([rng.integers(0, s - t + 1, 3), [s - t + 1, s - 1, s + 2]]).astype(np.int32)
    got = np.asarray(jax.jit(write_kv_slots)(buffer, values, length))
    want = buffer.copy()
    for i in range(b):
        for j in range(t):
            if length[i] + j < s:
                want[i, :, length[i] + j] = values[i, j]
    np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}")
    # One shared position (the whole batch at once).
    shared = np.asarray(write_kv_slots(buffer, values, np.int32(2)))
    np.testing.assert_array_equal(shared[:, :, 2:2 + t], values.transpose(0, 2, 1, 3))
    np.testing.assert_array_equal(shared[:, :, 2 + t:], buffer[:, :, 2 + t:])
