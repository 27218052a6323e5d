"""Attention dispatch: backend choice, splash (Pallas interpreter on CPU) and cuDNN (GPU only)
against the XLA path, with causal + segment + padding masks, forward and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genevolve_jax.ops import attention
from genevolve_jax.sharding import logical
from genevolve_jax.sharding.mesh import make_mesh


def _inputs(b=2, t=128, h=4, kv=2, d=16, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), dtype)
    k = jnp.asarray(rng.standard_normal((b, t, kv, d)), dtype)
    v = jnp.asarray(rng.standard_normal((b, t, kv, d)), dtype)
    cut1, cut2 = sorted(rng.integers(10, t - 10, 2))
    seg = np.zeros((b, t), np.int32)
    seg[0, :cut1], seg[0, cut1:cut2] = 1, 2        # two packed trajectories, then padding
    seg[1, :] = 1
    valid = seg > 0
    valid[1, t - 20:] = False                       # right padding in row 1
    return q, k, v, jnp.asarray(seg), jnp.asarray(valid)


def test_choice_by_backend_and_inputs():
    q, k, _, _, _ = _inputs()
    assert attention.choose_implementation(q, k, backend="cpu") == "xla"
    assert attention.choose_implementation(q, k, backend="tpu") == "splash"
    assert attention.choose_implementation(q, k, backend="gpu") == "xla"  # fp32: cuDNN needs half precision
    qh, kh = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    assert attention.choose_implementation(qh, kh, backend="gpu") == "cudnn"
    assert attention.choose_implementation(qh, kh, backend="gpu", q_positions=jnp.zeros((2, 128))) == "xla"
    assert attention.choose_implementation(q[:, :100], k[:, :100], backend="tpu") == "xla"  # not a block multiple
    with attention.use_implementation("xla"):
        assert attention.choose_implementation(qh, kh, backend="gpu") == "xla"
    with attention.use_implementation("cudnn"), pytest.raises(ValueError, match="cuDNN attention needs bf16/fp16"):
        attention.choose_implementation(q, k, backend="gpu")
    with pytest.raises(ValueError, match="attention implementation must be one of"):
        with attention.use_implementation("flash3"):
            pass


def test_splash_matches_xla_forward_and_grad():
    q, k, v, seg, valid = _inputs()
    kw = dict(causal=True, q_segment_ids=seg, kv_segment_ids=seg, kv_valid_mask=valid)
    m = np.asarray(valid)[..., None, None]

    def loss(fn, q, k, v):
        out = fn(q, k, v, **kw)
        return jnp.sum(jnp.where(m, out, 0.0) * jnp.cos(jnp.arange(out.size).reshape(out.shape)))

    ref, g_ref = jax.value_and_grad(lambda *a: loss(attention.xla_attention, *a), argnums=(0, 1, 2))(q, k, v)
    splash = lambda *a, **kw: attention.splash_attention(*a, interpret=True, **kw)  # noqa: E731
    got, g_got = jax.value_and_grad(lambda *a: loss(splash, *a), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    for a, b in zip(g_got, g_ref):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_splash_under_a_mesh_runs_per_shard():
    q, k, v, seg, valid = _inputs(b=2)
    kw = dict(causal=True, q_segment_ids=seg, kv_segment_ids=seg, kv_valid_mask=valid)
    ref = attention.xla_attention(q, k, v, **kw)
    mesh = make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4])
    with logical.use_rules(mesh, "tp"):
        got = jax.jit(lambda q, k, v: attention.splash_attention(q, k, v, interpret=True, **kw))(q, k, v)
    m = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(got)[m], np.asarray(ref)[m], rtol=1e-5, atol=1e-5)


def test_a_splash_kernel_built_inside_one_jit_serves_the_next():
    """The train step builds the kernel inside its trace; the reference forward that follows, with
    the same shape, reuses it. (A shape no other test uses: the kernel must be built in the trace.)"""
    q, k, v, seg, valid = _inputs(t=384, h=6, kv=2, seed=7)
    kw = dict(causal=True, q_segment_ids=seg, kv_segment_ids=seg, kv_valid_mask=valid, interpret=True)

    def total(q, k, v):
        return jnp.sum(jnp.where(np.asarray(valid)[..., None, None], attention.splash_attention(q, k, v, **kw), 0.0))

    inside_grad, _ = jax.jit(jax.value_and_grad(total))(q, k, v)
    again = jax.jit(total)(q, k, v)
    np.testing.assert_allclose(again, inside_grad, rtol=1e-6)


@pytest.mark.gpu
def test_cudnn_matches_xla_in_bf16():
    q, k, v, seg, valid = _inputs(t=256, d=64, dtype=jnp.bfloat16)
    kw = dict(causal=True, q_segment_ids=seg, kv_segment_ids=seg, kv_valid_mask=valid)
    ref = np.asarray(attention.xla_attention(q, k, v, **kw), np.float32)
    got = np.asarray(jax.jit(lambda *a: attention.cudnn_attention(*a, **kw))(q, k, v), np.float32)
    m = np.asarray(valid)
    np.testing.assert_allclose(got[m], ref[m], atol=2e-2)
    plain = np.asarray(attention.cudnn_attention(q, k, v, causal=True), np.float32)
    np.testing.assert_allclose(plain, np.asarray(attention.xla_attention(q, k, v, causal=True), np.float32), atol=2e-2)


def _float64_attention(q, k, v, seg, valid):
    """Causal, segment- and padding-masked attention in float64 numpy (GQA by repeating K/V)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, d = q.shape
    k, v = np.repeat(k, h // k.shape[2], axis=2), np.repeat(v, h // v.shape[2], axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
    seg, valid = np.asarray(seg), np.asarray(valid)
    mask = (np.tril(np.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :]) & valid[:, None, :])
    with np.errstate(invalid="ignore"):  # fully masked (padding) queries give NaN; callers skip them
        s = np.where(mask[:, None], s, -np.inf)
        s = s - s.max(-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(-1, keepdims=True)
        return np.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("t", [256, 640])   # 2 and 5 blocks of 128
def test_causal_blocks_match_float64_forward_and_grad(t):
    """Long causal rows go in query blocks (ops.attention.causal_block); at every valid query the
    output equals float64 attention, and the gradients equal the unblocked XLA computation's."""
    block = attention.causal_block(t)
    assert block and t % block == 0 and t // block <= 16
    q, k, v, seg, valid = _inputs(t=t, seed=t)
    kw = dict(causal=True, kv_valid_mask=valid, q_segment_ids=seg, kv_segment_ids=seg)
    # Jitted, as the model runs it: eagerly, each op of each block's distinct shape would compile alone.
    out = jax.jit(lambda q, k, v: attention.xla_attention(q, k, v, **kw))(q, k, v)
    ref = _float64_attention(q, k, v, seg, valid)
    keep = (np.asarray(valid) & (np.asarray(seg) > 0))[:, :, None, None]
    np.testing.assert_allclose(np.where(keep, out, 0), np.where(keep, ref, 0), atol=2e-5)

    # The same attention unblocked: queries given explicit positions never take the blocked path.
    def whole(q, k, v):
        return attention.xla_attention(q, k, v, q_positions=jnp.arange(t), **kw)

    weight = jnp.asarray(np.random.default_rng(t).standard_normal(q.shape), jnp.float32) * keep

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * weight)

    g_blocked = jax.jit(jax.grad(loss(lambda q, k, v: attention.xla_attention(q, k, v, **kw)),
                                 argnums=(0, 1, 2)))(q, k, v)
    g_whole = jax.jit(jax.grad(loss(whole), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_blocked, g_whole):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_short_rows_and_decode_go_whole():
    assert attention.causal_block(128) == 0 and attention.causal_block(200) == 0
    assert attention.causal_block(1024) == 128 and attention.causal_block(4096) == 256
    assert attention.causal_block(32768) == 2048
    assert attention.causal_block(1000) == 0          # no block of a multiple of 128 divides it


@pytest.mark.parametrize("t", [1, 5])
def test_cached_attention_over_a_heads_first_cache_matches_float64(t):
    """New queries against a cache held heads-first, keys and values [B, KV, S, hd]: at every
    query, float64 softmax attention over the slots at or before its own that are valid, query
    head h reading KV head h // (H // KV)."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    b, kv, group, d, s = 3, 2, int(rng.integers(1, 4)), 16, 40
    h = kv * group
    q = rng.standard_normal((b, t, h, d)).astype(np.float32)
    keys = rng.standard_normal((b, s, kv, d)).astype(np.float32)
    values = rng.standard_normal((b, s, kv, d)).astype(np.float32)
    start = rng.integers(0, s - t, b)                       # each row's own write position
    positions = start[:, None] + np.arange(t)[None, :]
    valid = rng.random((b, s)) < 0.8
    valid[np.arange(b)[:, None], positions] = True          # a query always sees itself
    out = attention.cached_attention(jnp.asarray(q), jnp.asarray(keys.transpose(0, 2, 1, 3)),
                             jnp.asarray(values.transpose(0, 2, 1, 3)), q_positions=jnp.asarray(positions),
                             kv_valid_mask=jnp.asarray(valid))
    want = np.zeros((b, t, h, d))
    for i in range(b):
        for j in range(t):
            seen = valid[i] & (np.arange(s) <= positions[i, j])
            for head in range(h):
                c = head // group
                score = keys[i, seen, c].astype(np.float64) @ q[i, j, head].astype(np.float64) / np.sqrt(d)
                p = np.exp(score - score.max())
                want[i, j, head] = (p / p.sum()) @ values[i, seen, c].astype(np.float64)
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, err_msg=f"seed {seed}")
    with pytest.raises(ValueError, match="k, v \\[B,KV,S,hd\\]"):   # the model's own [B, S, KV, hd]
        attention.cached_attention(jnp.asarray(q), jnp.asarray(keys),
                           jnp.asarray(values), q_positions=jnp.asarray(positions), kv_valid_mask=jnp.asarray(valid))
