"""Packing: layout against an independent per-trajectory construction, and through the model:
packed per-token log-probs equal unpacked ones and no gradient crosses a segment boundary."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genevolve_jax.data.packing import Trajectory, assign_rows, pack, split_microbatches, unpacked_batch
from genevolve_jax.models import hf_io
from genevolve_jax.models.qwen3_vl.config import tiny
from genevolve_jax.ops.fused_logprob import token_logprobs
from genevolve_jax.train.runtime.batch_layout import hidden_states_of

FAST = {"xla_backend_optimization_level": 0}


def _trajs(rng, lengths, vocab=400, fields=False):
    out = []
    for n in lengths:
        extra = {"adv": rng.normal(size=n).astype(np.float32)} if fields else {}
        out.append(Trajectory(rng.integers(1, vocab, n), (rng.random(n) < 0.6).astype(np.float32),
                              token_fields=extra))
    return out


def test_layout_matches_per_trajectory_reference():
    rng = np.random.default_rng(1)
    trajs = _trajs(rng, rng.integers(2, 20, 13), fields=True)
    budget = 24
    batch, stats = pack(trajs, budget, pad_id=7)
    assert stats.trajectories == 13 and stats.tokens == sum(len(t) for t in trajs)
    seen = []
    for r in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == s)
            assert (np.diff(where) == 1).all()  # contiguous
            ids = batch["input_ids"][r, where]
            match = [i for i, t in enumerate(trajs) if len(t) == len(ids) and (t.input_ids == ids).all()]
            assert match, "segment is not one of the trajectories"
            t = trajs[match[0]]
            seen.append(match[0])
            n = len(t)
            # targets / masks shifted inside the segment; the last token scores nothing
            np.testing.assert_array_equal(batch["targets"][r, where[:-1]], t.input_ids[1:])
            np.testing.assert_array_equal(batch["loss_mask"][r, where[:-1]], t.loss_mask[1:])
            np.testing.assert_array_equal(batch["adv"][r, where[:-1]], t.token_fields["adv"][1:])
            assert batch["loss_mask"][r, where[-1]] == 0
            # MRoPE positions restart at each trajectory, same on all three axes for text
            np.testing.assert_array_equal(batch["position_ids"][r], np.broadcast_to(
                batch["position_ids"][r, 0], (3, budget)))
            np.testing.assert_array_equal(batch["position_ids"][r, 0, where], np.arange(n))
        pad = seg == 0
        assert (batch["input_ids"][r, pad] == 7).all() and (batch["loss_mask"][r, pad] == 0).all()
    assert sorted(seen) == list(range(13))


def test_first_fit_and_fixed_rows():
    assert assign_rows([5, 4, 3, 2], 7) == [[0, 3], [1, 2]]
    assert assign_rows([2, 5, 4, 3], 7, sort=True) == [[1, 0], [2, 3]]
    rng = np.random.default_rng(2)
    trajs = _trajs(rng, [10, 10, 10])
    batch, stats = pack(trajs, 16, num_rows=5)
    assert batch["input_ids"].shape == (5, 16) and stats.rows == 3
    assert (batch["segment_ids"][3:] == 0).all()
    with pytest.raises(ValueError, match="num_rows is 2"):
        pack(trajs, 16, num_rows=2)


def test_overflow_modes_and_bad_rows():
    rng = np.random.default_rng(3)
    long, short = _trajs(rng, [30, 5])
    batch, stats = pack([long, short], 16)
    assert stats.truncated == 1
    np.testing.assert_array_equal(batch["input_ids"][0], long.input_ids[:16])
    _, stats = pack([long, short], 16, overflow="drop")
    assert stats.dropped == 1 and stats.tokens == 5
    with pytest.raises(ValueError, match="trajectory 0 has 30 tokens"):
        pack([long, short], 16, overflow="error")
    img = dataclasses.replace(long, pixel_values=np.zeros((4, 8)), image_grid_thw=np.array([[1, 2, 2]]))
    _, stats = pack([img], 16)  # never truncate through images
    assert stats.dropped == 1
    bad = Trajectory(np.arange(4), np.ones(3))
    with pytest.raises(ValueError, match="trajectory 1: loss_mask has shape"):
        pack([short, bad], 16)
    with pytest.raises(ValueError, match="trajectory 0: position_ids"):
        pack([Trajectory(np.arange(4), np.ones(4), position_ids=np.zeros((2, 4)))], 16)


def test_given_positions_are_kept_and_microbatches_are_strided():
    rng = np.random.default_rng(4)
    pos = np.stack([np.arange(6), np.arange(6) * 2, np.arange(6) + 5])
    t = Trajectory(rng.integers(1, 50, 6), np.ones(6), position_ids=pos)
    batch, _ = pack([t, t], 8)
    np.testing.assert_array_equal(batch["position_ids"][1, :, :6], pos)
    big, _ = pack(_trajs(rng, [8] * 8), 8)
    micro = split_microbatches(big, 4)
    assert micro["input_ids"].shape == (4, 2, 8)
    np.testing.assert_array_equal(micro["input_ids"][1, 1], big["input_ids"][5])
    with pytest.raises(ValueError, match="not divisible by 3"):
        split_microbatches(big, 3)


@pytest.fixture(scope="module")
def model():
    cfg = tiny()
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=2),
                      vision=dataclasses.replace(cfg.vision, depth=2, deepstack_visual_indexes=(0, 1)))
    # random HF weights, norms included, loaded without running initialisers
    return hf_io.model_from_state_dict(cfg, hf_io.random_state_dict(cfg, seed=5))


def _logprobs(model, batch):
    graphdef, state = nnx.split(model)

    def f(state, batch):
        m = nnx.merge(graphdef, state)
        hidden = hidden_states_of(m, batch)
        return token_logprobs(hidden, m.lm_head_kernel(), batch["targets"], chunk_size=128)

    arrays = {k: jnp.asarray(v) for k, v in batch.items()}
    return np.asarray(jax.jit(f, compiler_options=FAST)(state, arrays))


def test_packed_equals_unpacked_per_token(model):
    rng = np.random.default_rng(6)
    trajs = _trajs(rng, [7, 12, 5, 9])
    packed, stats = pack(trajs, 20)
    assert stats.rows == 2
    ref = _logprobs(model, unpacked_batch(trajs, 20))
    got = _logprobs(model, packed)
    for i, t in enumerate(trajs):
        n = len(t)
        ref_i = ref[i, :n - 1]
        for r in range(packed["input_ids"].shape[0]):
            for s in range(1, packed["segment_ids"][r].max() + 1):
                where = np.flatnonzero(packed["segment_ids"][r] == s)
                if len(where) == n and (packed["input_ids"][r, where] == t.input_ids).all():
                    np.testing.assert_allclose(got[r, where[:-1]], ref_i, rtol=1e-5, atol=1e-5)
                    break


def test_no_gradient_crosses_segments(model):
    """d(loss of segment 2's tokens)/d(embeddings) is exactly zero outside segment 2."""
    rng = np.random.default_rng(7)
    batch, _ = pack(_trajs(rng, [6, 8, 5]), 20)
    arrays = {k: jnp.asarray(v) for k, v in batch.items()}
    lm = model.language_model
    graphdef, state = nnx.split(lm)
    embeds = lm.embed_tokens(arrays["input_ids"])
    kernel = model.lm_head_kernel()
    seg = arrays["segment_ids"]

    def loss(x):
        m = nnx.merge(graphdef, state)
        hidden, _ = m(x, jnp.swapaxes(arrays["position_ids"], 0, 1), seg > 0, segment_ids=seg)
        lp = token_logprobs(hidden, kernel, arrays["targets"], chunk_size=128)
        return jnp.sum(jnp.where(seg == 2, lp, 0.0))

    g = np.asarray(jax.jit(jax.grad(loss), compiler_options=FAST)(embeds))
    per_token = np.abs(g[0]).sum(-1)
    s = np.asarray(seg[0])
    assert per_token[s == 2].max() > 1e-4
    assert per_token[s != 2].max() == 0.0
