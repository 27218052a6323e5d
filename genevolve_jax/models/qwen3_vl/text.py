"""The Qwen3-VL text decoder in Flax NNX, with a preallocated KV cache.

Pre-norm decoder layers: GQA self-attention with per-head RMSNorm on q and k *before* the rotary
embedding, interleaved MRoPE, a SwiGLU MLP, no biases anywhere. Deepstack: the merged features
of selected vision layers are added to the hidden states at visual positions right after decoder
layers 0..k−1 (k = number of deepstack levels), as transformers' ``Qwen3VLTextModel`` does.

The cache is a plain pytree (:class:`KVCache`) so it crosses jit boundaries and can be donated.
Tokens are written at slots [length, length + T): with a scalar ``length`` the write position is
shared by the whole batch (left-padded rows); with a [B] ``length`` every row has its own (a
*ragged* cache, the rollout engine's: right-padded chunks, each row advancing by its real tokens).
Per-row padding is tracked in ``valid`` so padded rows and empty slots are never attended to.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from genevolve_jax.models.layers import Dense, Embed, RMSNorm, sub_key
from genevolve_jax.models.qwen3_vl import rope
from genevolve_jax.models.qwen3_vl.config import Qwen3VLConfig
from genevolve_jax.ops.attention import attention, cached_attention
from genevolve_jax.ops.precision import narrow, widen
from genevolve_jax.sharding import logical


CACHE_AXES = (logical.BATCH, logical.KV_HEADS, logical.CACHE_SEQ,
              logical.HEAD_DIM)   # logical axes of a cache's k and v


class KVCache(NamedTuple):
    """Keys/values of every decoder layer in preallocated slots.

    k, v: one [B, KV, S, hd] array per layer (rotary already applied to k): heads-first, the
      order attention reads them in (``ops.attention.cached_attention``).
    valid: [B, S] bool, True where a slot holds a real (non-padding) token.
    length: [] int32, slots written so far (the same for every row); or [B] int32, each row's own
      write position (a ragged cache: a chunk's real tokens go at [length_b, length_b + n_b) and
      writes past S are dropped).
    next_position: [B] int32, the rope position of each row's next token: its number of real
      tokens plus its rope delta (``rope.get_rope_index``), as transformers' generate uses.
    """
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid: jax.Array
    length: jax.Array
    next_position: jax.Array

    @property
    def max_length(self) -> int:
        return int(self.valid.shape[1])

    @property
    def ragged(self) -> bool:
        return self.length.ndim == 1


def write_slots(buffer: jax.Array, values: jax.Array, length: jax.Array) -> jax.Array:
    """``buffer`` [B, S, ...] with ``values`` [B, T, ...] written at slots [length, length + T):
    one shared offset (scalar ``length``) or one per row ([B]; slots past S are dropped)."""
    values = values.astype(buffer.dtype)
    if length.ndim == 0:
        return jax.lax.dynamic_update_slice(buffer, values, (0, length) + (0,) * (buffer.ndim - 2))
    b, t = values.shape[:2]
    slots = length[:, None] + jnp.arange(t, dtype=length.dtype)[None, :]
    return buffer.at[jnp.arange(b)[:, None], slots].set(values, mode="drop")


def write_kv_slots(buffer: jax.Array, values: jax.Array, length: jax.Array) -> jax.Array:
    """A heads-first cache ``buffer`` [B, KV, S, hd] with ``values`` [B, T, KV, hd] (the projection's
    order) written at slots [length, length + T), as :func:`write_slots`."""
    values = values.astype(buffer.dtype)
    if length.ndim == 0:
        return jax.lax.dynamic_update_slice(buffer, values.transpose(0, 2, 1, 3), (0, 0, length, 0))
    t, s = values.shape[1], buffer.shape[2]
    if t > s:
        raise ValueError(f"write_kv_slots: {t} new slots for a cache of {s}")

    # One dynamic_update_slice per row (vmapped), not a scatter: XLA:TPU lays the cache out with
    # its slot axis before the heads when few heads are local, and a scatter into the heads-first
    # order then copied the whole cache on every call (44.6 GiB of temporaries in tpu_pod's engine
    # plan; 6.9 GiB for prefill and 4.2 for decode this way). A row that would run past S writes
    # at S − T instead, its slots before `at` keeping their contents: the slots past S are
    # dropped, as write_slots does.
    def row(buf, val, at):   # buf [KV, S, hd], val [T, KV, hd]
        start = jnp.clip(at, 0, s - t)
        index = jnp.arange(t, dtype=at.dtype) - (at - start)     # value written at slot start + j
        old = jax.lax.dynamic_slice(buf, (0, start, 0), (buf.shape[0], t, buf.shape[2]))
        new = jnp.take(val, jnp.clip(index, 0, t - 1), axis=0).transpose(1, 0, 2)
        return jax.lax.dynamic_update_slice(buf, jnp.where((index >= 0)[None, :, None], new, old), (0, start, 0))
    return jax.vmap(row)(buffer, values, length)


def write_positions(length: jax.Array, t: int) -> jax.Array:
    """The slots [1 or B, T] that :func:`write_slots` fills (the causal mask's query positions)."""
    slots = jnp.arange(t, dtype=jnp.int32)[None, :]
    return slots + (length[:, None] if length.ndim == 1 else length)


def init_cache(config: Qwen3VLConfig, batch_size: int, max_length: int, dtype=None) -> KVCache:
    t = config.text
    dtype = dtype or config.jnp_dtype
    shape = (batch_size, t.num_key_value_heads, max_length, t.head_dim)
    zeros = tuple(logical.constrain(jnp.zeros(shape, dtype), CACHE_AXES) for _ in range(t.num_hidden_layers))
    zeros_v = tuple(logical.constrain(jnp.zeros(shape, dtype), CACHE_AXES) for _ in range(t.num_hidden_layers))
    return KVCache(k=zeros, v=zeros_v, valid=jnp.zeros((batch_size, max_length), bool),
                   length=jnp.zeros((), jnp.int32), next_position=jnp.zeros((batch_size,), jnp.int32))


class TextAttention(nnx.Module):
    def __init__(self, config: Qwen3VLConfig, *, rngs: nnx.Rngs):
        t = config.text
        pd, dt = config.jnp_param_dtype, config.jnp_dtype
        d, h, kv, hd = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim
        self.q_proj = Dense((d,), (h, hd), in_axes=(logical.EMBED,), out_axes=(logical.HEADS, logical.HEAD_DIM),
                            use_bias=False, param_dtype=pd, dtype=dt, rngs=rngs, lora=config.lora_for("q_proj"))
        self.k_proj = Dense((d,), (kv, hd), in_axes=(logical.EMBED,), out_axes=(logical.KV_HEADS, logical.HEAD_DIM),
                            use_bias=False, param_dtype=pd, dtype=dt, rngs=rngs, lora=config.lora_for("k_proj"))
        self.v_proj = Dense((d,), (kv, hd), in_axes=(logical.EMBED,), out_axes=(logical.KV_HEADS, logical.HEAD_DIM),
                            use_bias=False, param_dtype=pd, dtype=dt, rngs=rngs, lora=config.lora_for("v_proj"))
        self.o_proj = Dense((h, hd), (d,), in_axes=(logical.HEADS, logical.HEAD_DIM), out_axes=(logical.EMBED,),
                            use_bias=False, param_dtype=pd, dtype=dt, rngs=rngs, lora=config.lora_for("o_proj"))
        self.q_norm = RMSNorm(hd, logical.HEAD_DIM, eps=t.rms_norm_eps, param_dtype=pd, rngs=rngs)
        self.k_norm = RMSNorm(hd, logical.HEAD_DIM, eps=t.rms_norm_eps, param_dtype=pd, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, kv_valid: jax.Array | None,
                 cache_kv: tuple[jax.Array, jax.Array] | None = None, cache_length: jax.Array | None = None,
                 cache_valid: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 cache_window: int | None = None, dropout_key: jax.Array | None = None):
        """x [B, T, D]. Without a cache: causal self-attention over x (kv_valid masks padding).

        With ``cache_kv`` (k, v of [B, KV, S, hd]): the new keys/values are written at slots
        [cache_length, cache_length + T) and the queries attend to the whole cache, restricted
        by ``cache_valid`` [B, S] (which must already include the new tokens). Returns
        (output [B, T, D], updated (k, v) or None). ``segment_ids`` [B, T] (packed rows, no cache):
        a token attends only to tokens of its own segment. ``cache_window`` (static): attend over
        the first that many slots only (every valid key lies there); the cache is still written
        in place, so a caller never copies it to narrow attention. ``dropout_key``: adapter
        dropout (train steps only), an independent mask per projection.
        """
        q_axes = (logical.BATCH, logical.SEQ, logical.HEADS, logical.HEAD_DIM)
        kv_axes = (logical.BATCH, logical.SEQ, logical.KV_HEADS, logical.HEAD_DIM)
        q = apply_qk(self.q_norm, self.q_proj(x, sub_key(dropout_key, 0)), cos, sin, q_axes)
        k = apply_qk(self.k_norm, self.k_proj(x, sub_key(dropout_key, 1)), cos, sin, kv_axes)
        v = logical.constrain(self.v_proj(x, sub_key(dropout_key, 2)), kv_axes)
        if cache_kv is None:
            out = attention(q, k, v, causal=True, kv_valid_mask=kv_valid, q_segment_ids=segment_ids,
                            kv_segment_ids=segment_ids)
            new_cache = None
        else:
            ck, cv = cache_kv
            ck = logical.constrain(write_kv_slots(ck, k, cache_length), CACHE_AXES)
            cv = logical.constrain(write_kv_slots(cv, v, cache_length), CACHE_AXES)
            w = ck.shape[2] if cache_window is None else min(int(cache_window), ck.shape[2])
            out = cached_attention(q, ck[:, :, :w], cv[:, :, :w], q_positions=write_positions(cache_length, x.shape[1]),
                                   kv_valid_mask=cache_valid[:, :w])
            new_cache = (ck, cv)
        out = logical.constrain(out, (logical.BATCH, logical.SEQ, logical.HEADS, logical.HEAD_DIM))
        return self.o_proj(out, sub_key(dropout_key, 3)), new_cache


def apply_qk(norm: RMSNorm, x: jax.Array, cos: jax.Array, sin: jax.Array, axes) -> jax.Array:
    """The per-head norm and the rotary embedding of a projected q or k, in float32 and rounded to
    x's dtype once: no rounding in between for XLA to keep in one program and drop in another
    (ops/precision.py). The tables stay as rounded to the compute dtype (as transformers does)."""
    rotated = rope.apply_rotary(norm.normalized(x), widen(cos), widen(sin))
    return logical.constrain(narrow(rotated, x.dtype), axes)


class TextMLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: Qwen3VLConfig, *, rngs: nnx.Rngs):
        t = config.text
        kw = dict(use_bias=False, param_dtype=config.jnp_param_dtype, dtype=config.jnp_dtype, rngs=rngs)
        self.gate_proj = Dense((t.hidden_size,), (t.intermediate_size,), in_axes=(logical.EMBED,),
                               out_axes=(logical.MLP,), lora=config.lora_for("gate_proj"), **kw)
        self.up_proj = Dense((t.hidden_size,), (t.intermediate_size,), in_axes=(logical.EMBED,),
                             out_axes=(logical.MLP,), lora=config.lora_for("up_proj"), **kw)
        self.down_proj = Dense((t.intermediate_size,), (t.hidden_size,), in_axes=(logical.MLP,),
                               out_axes=(logical.EMBED,), lora=config.lora_for("down_proj"), **kw)

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        gate = self.gate_proj(x, sub_key(dropout_key, 0))
        up = self.up_proj(x, sub_key(dropout_key, 1))
        # In float32, rounded once (ops/precision.py).
        hidden = narrow(jax.nn.silu(widen(gate)) * widen(up), gate.dtype)
        return self.down_proj(logical.constrain(hidden, (logical.BATCH, logical.SEQ, logical.MLP)),
                              sub_key(dropout_key, 2))


class TextDecoderLayer(nnx.Module):
    def __init__(self, config: Qwen3VLConfig, *, rngs: nnx.Rngs):
        t = config.text
        pd = config.jnp_param_dtype
        self.self_attn = TextAttention(config, rngs=rngs)
        self.mlp = TextMLP(config, rngs=rngs)
        self.input_layernorm = RMSNorm(t.hidden_size, logical.EMBED, eps=t.rms_norm_eps, param_dtype=pd, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(t.hidden_size, logical.EMBED, eps=t.rms_norm_eps, param_dtype=pd,
                                                rngs=rngs)

    def __call__(self, x, cos, sin, kv_valid, cache_kv=None, cache_length=None, cache_valid=None,
                 segment_ids=None, cache_window=None, dropout_key=None):
        attn, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, kv_valid, cache_kv, cache_length,
                                         cache_valid, segment_ids, cache_window, sub_key(dropout_key, 0))
        x = residual_add(x, attn)
        x = residual_add(x, self.mlp(self.post_attention_layernorm(x), sub_key(dropout_key, 1)))
        return logical.constrain(x, (logical.BATCH, logical.SEQ, logical.EMBED)), new_cache


def residual_add(x: jax.Array, update: jax.Array) -> jax.Array:
    """x + update in x's dtype, the sum rounded in every program (ops/precision.py)."""
    return narrow(widen(x) + widen(update), x.dtype)


class DeepstackInputs(NamedTuple):
    """Visual features to add after the first decoder layers.

    index: [B, L] int32, for each position the row of ``features[i]`` to add there, −1 where the
      position is not visual.
    features: one [N_visual, D] array per deepstack level; level i is added after layer i.
    """
    index: jax.Array
    features: Sequence[jax.Array]


REMAT_POLICIES = {
    "full": None,  # keep only each layer's input; recompute everything in the backward pass
    # keep the projection/MLP matmul outputs, recompute attention scores and elementwise ops
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def stack_layers(layers: Sequence[nnx.Module]) -> nnx.Module:
    """One module whose parameters carry a leading [L] axis, from L identical-structure layers.

    Built from separately initialised layers, so a scanned model holds exactly the weights the
    unscanned one would from the same seed. Logical axes stay the per-layer ones; the sharding
    rules add the leading ``layers`` axis (``logical.state_partition_specs``).
    """
    graphdef, first = nnx.split(layers[0])
    states = [first] + [nnx.split(layer)[1] for layer in layers[1:]]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    return nnx.merge(graphdef, stacked)


class Qwen3VLTextModel(nnx.Module):
    def __init__(self, config: Qwen3VLConfig, *, rngs: nnx.Rngs):
        t = config.text
        self.config = config
        self.embed_tokens = Embed(t.vocab_size, t.hidden_size, param_dtype=config.jnp_param_dtype,
                                  dtype=config.jnp_dtype, rngs=rngs)
        layers = [TextDecoderLayer(config, rngs=rngs) for _ in range(t.num_hidden_layers)]
        self.layers = stack_layers(layers) if config.scan_layers else nnx.List(layers)
        self.norm = RMSNorm(t.hidden_size, logical.EMBED, eps=t.rms_norm_eps, param_dtype=config.jnp_param_dtype,
                            rngs=rngs)

    def rope_tables(self, position_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        t = self.config.text
        return rope.text_rope(position_ids, head_dim=t.head_dim, theta=t.rope_theta, mrope_section=t.mrope_section,
                              dtype=self.config.jnp_dtype)

    def __call__(self, inputs_embeds: jax.Array, position_ids: jax.Array, attention_mask: jax.Array | None = None,
                 *, deepstack: DeepstackInputs | None = None,
                 cache: KVCache | None = None, cache_window: int | None = None,
                 segment_ids: jax.Array | None = None,
                 dropout_key: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """Final (normed) hidden states [B, T, D], and the updated cache when one is given.

        inputs_embeds: [B, T, D]; position_ids: [3, B, T] (or [B, T] for text only);
        attention_mask: [B, T], 0 for padding. With a cache, the T tokens are appended at slot
        ``cache.length``; ``cache.next_position`` is left for the caller to advance.
        segment_ids: [B, T] for packed rows (no cache): attention stays within a segment.
        cache_window (static): with a cache, attend over its first that many slots only.
        dropout_key: adapter dropout in a train step (layer i uses ``sub_key(dropout_key, i)``,
        scanned or not); None, as every other forward passes, is deterministic.
        """
        x = logical.constrain(inputs_embeds.astype(self.config.jnp_dtype), (logical.BATCH, logical.SEQ, logical.EMBED))
        b, t = x.shape[:2]
        n_layers = self.config.text.num_hidden_layers
        mask = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        cos, sin = self.rope_tables(position_ids)
        if deepstack is not None and len(deepstack.features) > n_layers:
            raise ValueError(f"{len(deepstack.features)} deepstack levels for {n_layers} decoder layers")
        n_deep = 0 if deepstack is None else len(deepstack.features)
        if self.config.scan_layers and cache is None:
            x = self._scanned(x, cos, sin, mask, segment_ids, deepstack, dropout_key)
            return self.norm(x), None
        new_k, new_v, cache_valid = [], [], None
        if cache is not None:
            cache_valid = write_slots(cache.valid, mask, cache.length)
        apply = self._layer_apply(remat=cache is None)
        for i in range(n_layers):
            layer = self.layers[i] if not self.config.scan_layers else self._layer_slice(i)
            kv = None if cache is None else (cache.k[i], cache.v[i])
            graphdef, state = nnx.split(layer)
            # cached calls (decoding) are neither rematerialised nor dropped out
            extra = (None, sub_key(dropout_key, i)) if cache is None else (cache_window,)
            x, layer_cache = apply(graphdef, state, x, cos, sin, mask, kv,
                                   None if cache is None else cache.length, cache_valid, segment_ids, *extra)
            if layer_cache is not None:
                new_k.append(layer_cache[0])
                new_v.append(layer_cache[1])
            if i < n_deep:
                x = add_visual_features(x, deepstack.index, deepstack.features[i])
        x = self.norm(x)
        if cache is None:
            return x, None
        # A ragged row advances by its real tokens (right padding is overwritten by the next write).
        length = cache.length + (jnp.sum(mask, axis=1, dtype=cache.length.dtype) if cache.ragged else t)
        return x, cache._replace(k=tuple(new_k), v=tuple(new_v), valid=cache_valid, length=length)

    def _layer_apply(self, remat: bool):
        """(graphdef, state, *layer args) -> layer output, checkpointed per the remat policy."""
        def apply(graphdef, state, *args):
            return nnx.merge(graphdef, state)(*args)
        if not remat or self.config.remat == "none":
            return apply
        return jax.checkpoint(apply, policy=REMAT_POLICIES[self.config.remat], static_argnums=(0,))

    def _layer_slice(self, i: int) -> nnx.Module:
        graphdef, state = nnx.split(self.layers)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))

    def _scanned(self, x, cos, sin, mask, segment_ids, deepstack, dropout_key=None):
        """All decoder layers as one ``lax.scan`` over the stacked parameters.

        Deepstack levels ride along as a stacked [L, N, D] addend that is zero past the last
        level, so the scanned body is the same for every layer (x + 0 leaves x unchanged).
        """
        n_layers = self.config.text.num_hidden_layers
        graphdef, state = nnx.split(self.layers)
        apply = self._layer_apply(remat=True)
        if deepstack is not None and len(deepstack.features):
            feats = jnp.stack([f.astype(x.dtype) for f in deepstack.features])
            feats = jnp.concatenate([feats, jnp.zeros((n_layers - feats.shape[0],) + feats.shape[1:], feats.dtype)])
            index = deepstack.index
        else:
            feats, index = None, None

        def body(h, xs):
            layer_state, feat, i = xs
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
            h, _ = apply(graphdef, layer_state, h, cos, sin, mask, None, None, None, segment_ids, None, key)
            if feat is not None:
                h = add_visual_features(h, index, feat)
            return h, None

        x, _ = jax.lax.scan(body, x, (state, feats, jnp.arange(n_layers)))
        return x


def add_visual_features(x: jax.Array, index: jax.Array, features: jax.Array) -> jax.Array:
    """x[b, l] += features[index[b, l]] where index >= 0 (deepstack injection)."""
    gathered = jnp.take(features, jnp.maximum(index, 0), axis=0).astype(x.dtype)
    return jnp.where((index >= 0)[..., None], x + gathered, x)
