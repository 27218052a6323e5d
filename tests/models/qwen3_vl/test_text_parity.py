"""The text half of Qwen3-VL against transformers: attention op, MRoPE tables, rope index, and the
decoder (with deepstack injection and padding), fp32, every weight randomised."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from genevolve_jax.models.qwen3_vl import config as qwen_config
from genevolve_jax.models.qwen3_vl import keymap, rope
from genevolve_jax.models.qwen3_vl.text import DeepstackInputs, Qwen3VLTextModel
from genevolve_jax.ops.attention import attention
from tests.fixtures import hf_qwen3_vl as R

TOL = 1e-4


# --- attention op -------------------------------------------------------------------------------
def _attention_reference(q, k, v, mask):
    """float64 numpy: repeat K/V heads, masked softmax."""
    group = q.shape[2] // k.shape[2]
    k = np.repeat(k, group, axis=2)
    v = np.repeat(v, group, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask[:, None], s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


def test_attention_matches_float64_reference_with_gqa_padding_segments_and_cache_slots():
    rng = np.random.default_rng(0)
    b, t, s, h, kv, d = 2, 5, 9, 6, 2, 8
    q = rng.standard_normal((b, t, h, d))
    k = rng.standard_normal((b, s, kv, d))
    v = rng.standard_normal((b, s, kv, d))
    valid = rng.random((b, s)) > 0.25
    valid[:, 0] = True
    q_pos = np.array([[4, 5, 6, 7, 8], [2, 3, 4, 5, 6]])
    seg_q = rng.integers(0, 2, (b, t))
    seg_k = rng.integers(0, 2, (b, s))
    seg_k[np.arange(b)[:, None], q_pos] = seg_q  # a query's own slot is in its segment
    valid[np.arange(b)[:, None], q_pos] = True
    mask = (np.arange(s)[None, None] <= q_pos[:, :, None]) & valid[:, None] & (seg_q[:, :, None] == seg_k[:, None])
    got = attention(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32),
                    causal=True, q_positions=q_pos, kv_valid_mask=valid, q_segment_ids=seg_q, kv_segment_ids=seg_k)
    np.testing.assert_allclose(np.asarray(got), _attention_reference(q, k, v, mask), atol=1e-5)
    # Bidirectional, segmented only (the vision tower's use).
    seg = np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2]] * b)
    qb = rng.standard_normal((b, s, h, d))
    got = attention(jnp.asarray(qb, jnp.float32), jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32),
                    causal=False, q_segment_ids=seg, kv_segment_ids=seg)
    np.testing.assert_allclose(np.asarray(got), _attention_reference(qb, k, v, seg[:, :, None] == seg[:, None]),
                               atol=1e-5)


def test_attention_fully_masked_rows_stay_finite_and_shapes_are_checked():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, 3, 2, 4)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 3, 1, 4)), jnp.float32)
    out = attention(q, k, k, causal=True, kv_valid_mask=np.array([[False, True, True]]))
    assert np.isfinite(np.asarray(out)).all()  # query 0 sees nothing: finite, not NaN
    with pytest.raises(ValueError, match="multiple"):
        attention(jnp.zeros((1, 2, 3, 4)), jnp.zeros((1, 2, 2, 4)), jnp.zeros((1, 2, 2, 4)), causal=True)


# --- MRoPE tables ---------------------------------------------------------------------------------
@pytest.mark.parametrize("head_dim,section,theta", [(16, (2, 3, 3), 10000.0), (128, (24, 20, 20), 5e6),
                                                    (32, (4, 6, 6), 1e6)])
def test_text_rope_matches_transformers(head_dim, section, theta):
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding
    hf_cfg = transformers.Qwen3VLTextConfig(head_dim=head_dim, hidden_size=64, num_attention_heads=4,
                                            rope_parameters={"rope_type": "default", "rope_theta": theta,
                                                             "mrope_section": list(section)})
    rng = np.random.default_rng(head_dim)
    pos = rng.integers(0, 20000, (3, 2, 7))
    cos_t, sin_t = Qwen3VLTextRotaryEmbedding(hf_cfg)(torch.zeros(1, dtype=torch.float32), torch.as_tensor(pos))
    cos, sin = rope.text_rope(pos, head_dim=head_dim, theta=theta, mrope_section=section)
    # Large positions: float32 phase error grows like |pos|·ulp, transformers computes the same way.
    np.testing.assert_allclose(np.asarray(cos), cos_t.numpy(), atol=2e-3)
    np.testing.assert_allclose(np.asarray(sin), sin_t.numpy(), atol=2e-3)
    small = rng.integers(0, 300, (3, 2, 7))
    cos_t, sin_t = Qwen3VLTextRotaryEmbedding(hf_cfg)(torch.zeros(1), torch.as_tensor(small))
    cos, sin = rope.text_rope(small, head_dim=head_dim, theta=theta, mrope_section=section)
    np.testing.assert_allclose(np.asarray(cos), cos_t.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(sin), sin_t.numpy(), atol=1e-5)


def test_mrope_layout_is_interleaved_thw():
    axis = rope.mrope_axis_of_slot(128, (24, 20, 20))
    assert axis[:6].tolist() == [0, 1, 2, 0, 1, 2]
    assert (axis == 1).sum() == 20 and (axis == 2).sum() == 20 and (axis[60:] == 0).all()


# --- rope index -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_tiny():
    return R.random_hf_model(qwen_config.tiny(), seed=3)


def _mixed_rows(cfg, rng):
    """Rows mixing text, images and 2-frame videos; returns rows and the grids in order."""
    image_grids, video_grids, rows = [], [], []
    for r in range(4):
        row = R.text_tokens(cfg, int(rng.integers(1, 5)), rng)
        for _ in range(int(rng.integers(0, 3))):
            if rng.random() < 0.5:
                g = [1, 2 * int(rng.integers(1, 4)), 2 * int(rng.integers(1, 4))]
                image_grids.append(g)
                row += R.placeholder_segment(cfg, g, "image", rng)
            else:
                g = [int(rng.integers(1, 3)), 2 * int(rng.integers(1, 3)), 2 * int(rng.integers(1, 4))]
                video_grids.append(g)
                row += R.placeholder_segment(cfg, g, "video", rng)
            row += R.text_tokens(cfg, int(rng.integers(0, 4)), rng)
        rows.append(row)
    return rows, np.array(image_grids).reshape(-1, 3), np.array(video_grids).reshape(-1, 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rope_index_matches_transformers_on_mixed_padded_rows(hf_tiny, seed):
    cfg = qwen_config.tiny()
    rng = np.random.default_rng(seed)
    rows, image_grids, video_grids = _mixed_rows(cfg, rng)
    ids, mask = R.pad_rows(rows, ["left", "right", "left", "right"])
    types = rope.token_types(ids, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id)
    ig = image_grids if len(image_grids) else None
    vg = video_grids if len(video_grids) else None
    want_pos, want_delta = hf_tiny.model.get_rope_index(
        torch.as_tensor(ids), torch.as_tensor(types), None if ig is None else torch.as_tensor(ig),
        None if vg is None else torch.as_tensor(vg), torch.as_tensor(mask))
    pos, delta = rope.get_rope_index(ids, types, ig, vg, mask, spatial_merge_size=cfg.vision.spatial_merge_size)
    np.testing.assert_array_equal(pos, want_pos.numpy())
    np.testing.assert_array_equal(delta, want_delta.numpy()[:, 0])
    # Without mm_token_type_ids, from the placeholder ids alone.
    pos2, _ = rope.get_rope_index(ids, None, ig, vg, mask, spatial_merge_size=2, image_token_id=cfg.image_token_id,
                                  video_token_id=cfg.video_token_id)
    np.testing.assert_array_equal(pos2, pos)


def test_rope_index_rejects_runs_that_do_not_match_the_grids():
    cfg = qwen_config.tiny()
    ids = np.array([[1, 2] + [cfg.image_token_id] * 5 + [3]])
    with pytest.raises(ValueError, match="5 image placeholder tokens"):
        rope.get_rope_index(ids, image_grid_thw=np.array([[1, 4, 4]]), spatial_merge_size=2,
                            image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id)
    with pytest.raises(ValueError, match="needs more image grids"):
        rope.get_rope_index(ids, spatial_merge_size=2, image_token_id=cfg.image_token_id,
                            video_token_id=cfg.video_token_id)


# --- decoder ------------------------------------------------------------------------------------------
def load_text_weights(model: Qwen3VLTextModel, cfg, state_dict):
    """Copy the language-model tensors of an HF state dict through the key map entries."""
    for e in keymap.key_entries(cfg):
        if e.nnx[0] != "language_model":
            continue
        obj = model
        for part in e.nnx[1:]:
            obj = obj[part] if isinstance(part, int) else getattr(obj, part)
        obj.set_value(jnp.asarray(e.to_nnx(state_dict[e.hf]), obj.get_value().dtype))


def test_text_decoder_with_deepstack_and_padding_matches_transformers(hf_tiny):
    cfg = qwen_config.tiny()
    rng = np.random.default_rng(5)
    ours = nnx.eval_shape(lambda: Qwen3VLTextModel(cfg, rngs=nnx.Rngs(0)))  # every weight is loaded below
    load_text_weights(ours, cfg, R.state_dict_numpy(hf_tiny))
    b, length, d = 3, 11, cfg.text.hidden_size
    embeds = rng.standard_normal((b, length, d)).astype(np.float32)
    mask = np.ones((b, length), np.int64)
    mask[1, :3] = 0   # left padding
    mask[2, -4:] = 0  # right padding
    pos = np.zeros((3, b, length), np.int64)
    for r in range(b):
        n = int(mask[r].sum())
        p = np.stack([np.arange(n), np.arange(n) + rng.integers(0, 3), np.arange(n) * 2]) + rng.integers(0, 5)
        pos[:, r, mask[r].astype(bool)] = p
    visual = (rng.random((b, length)) < 0.4) & mask.astype(bool)
    n_vis = int(visual.sum())
    levels = [rng.standard_normal((n_vis, d)).astype(np.float32) for _ in cfg.vision.deepstack_visual_indexes]
    with torch.no_grad():
        want = hf_tiny.model.language_model(
            inputs_embeds=torch.as_tensor(embeds), attention_mask=torch.as_tensor(mask),
            position_ids=torch.as_tensor(pos), visual_pos_masks=torch.as_tensor(visual),
            deepstack_visual_embeds=[torch.as_tensor(x) for x in levels]).last_hidden_state.numpy()
    index = np.where(visual, np.cumsum(visual.reshape(-1)).reshape(b, length) - 1, -1).astype(np.int32)
    graphdef, state = nnx.split(ours)

    @jax.jit
    def run(state, deepstack):
        return nnx.merge(graphdef, state)(jnp.asarray(embeds), jnp.asarray(pos), jnp.asarray(mask),
                                          deepstack=deepstack)[0]

    got = run(state, DeepstackInputs(jnp.asarray(index), [jnp.asarray(x) for x in levels]))
    valid = mask.astype(bool)
    assert np.abs(want[valid]).max() > 0.5  # not a near-zero comparison
    np.testing.assert_allclose(np.asarray(got)[valid], want[valid], atol=TOL, rtol=0)
    # Without deepstack the visual positions differ: the injection is really exercised.
    plain = run(state, None)
    assert np.abs(np.asarray(plain)[visual] - want[visual]).max() > 1e-2
