"""The Qwen3-VL vision tower in Flax NNX.

Patches arrive flattened (C·T·P·P each) in the processor's merge-block order: for each image or
video, frame by frame, spatial_merge_size² neighbouring patches are consecutive. Everything that
depends on the grids (position-embedding interpolation taps, rotary positions, which patches may
attend to which) is computed on the host in numpy by :func:`vision_inputs`, because grid_thw fixes
the shapes; the jitted part (:meth:`Qwen3VLVisionModel.encode`) only sees arrays.

Numerics follow transformers' Qwen3VLVisionModel: interpolation weights, rotary tables and the
rotation itself in float32; LayerNorm statistics and softmax in float32; tanh-GELU in the block MLP
and erf-GELU in the mergers. Attention is bidirectional within one image or one video frame.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from genevolve_jax.models.layers import Dense, LayerNorm, sub_key
from genevolve_jax.models.qwen3_vl.config import Qwen3VLConfig, VisionConfig
from genevolve_jax.models.qwen3_vl.text import REMAT_POLICIES
from genevolve_jax.ops.attention import attention
from genevolve_jax.sharding import logical

_LN_EPS = 1e-6


# --- host-side precomputation from grid_thw --------------------------------------------------------
class VisionInputs(NamedTuple):
    """Per-patch arrays derived from grid_thw (all [N] leading, N = Σ t·h·w)."""
    pos_indices: np.ndarray   # int32 [N, 4]   rows of the learned position table (bilinear taps)
    pos_weights: np.ndarray   # float32 [N, 4] their bilinear weights
    rope_positions: np.ndarray  # int32 [N, 2] (row, column) of the patch in its frame
    segment_ids: np.ndarray   # int32 [N]      one id per image / per video frame


def check_grid_thw(grid_thw, vision: VisionConfig) -> np.ndarray:
    """grid_thw as an int64 [n, 3] host array, or an error naming what is wrong."""
    try:
        grid = np.asarray(grid_thw)
    except jax.errors.TracerArrayConversionError:
        raise TypeError("grid_thw must be a concrete host array (it fixes the shapes); precompute "
                        "vision_inputs(grid_thw, config) outside jit and call Qwen3VLVisionModel.encode") from None
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
        raise ValueError(f"grid_thw must have shape [n_images, 3] with n_images >= 1, got {grid.shape}")
    if not np.issubdtype(grid.dtype, np.integer):
        raise ValueError(f"grid_thw must be integer, got dtype {grid.dtype}")
    grid = grid.astype(np.int64)
    m = vision.spatial_merge_size
    for i, (t, h, w) in enumerate(grid.tolist()):
        if t < 1 or h < 1 or w < 1:
            raise ValueError(f"grid_thw[{i}] = {[t, h, w]} has a non-positive entry")
        if h % m or w % m:
            raise ValueError(f"grid_thw[{i}] = {[t, h, w]}: h and w must be multiples of "
                             f"spatial_merge_size={m}")
    return grid


def _merge_block_rows_cols(h: int, w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each patch of an h×w frame listed in merge-block order."""
    rows = np.arange(h).reshape(h // merge, merge, 1, 1)
    cols = np.arange(w).reshape(1, 1, w // merge, merge)
    rows = np.broadcast_to(rows, (h // merge, merge, w // merge, merge)).transpose(0, 2, 1, 3)
    cols = np.broadcast_to(cols, (h // merge, merge, w // merge, merge)).transpose(0, 2, 1, 3)
    return rows.reshape(-1), cols.reshape(-1)


def _bilinear_axis(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Two taps per target index on one axis, align_corners=True, border clamp; float32 like torch."""
    f32 = np.float32
    # Same float32 operation order as transformers: index * (side - 1) / max(size - 1, 1).
    src = index.astype(f32) * f32(side - 1) / f32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(f32))
    weights = np.maximum(f32(1) - distance, f32(0)).astype(f32)
    return taps, weights


def vision_inputs(grid_thw, vision: VisionConfig) -> VisionInputs:
    """Interpolation taps, rotary positions and attention segments for a list of grids."""
    grid = check_grid_thw(grid_thw, vision)
    side = int(vision.num_position_embeddings ** 0.5)
    if side * side != vision.num_position_embeddings:
        raise ValueError(f"vision_config.num_position_embeddings={vision.num_position_embeddings} is not a "
                         "perfect square (the learned position grid is side×side)")
    m = vision.spatial_merge_size
    indices, weights, positions, segments = [], [], [], []
    segment = 0
    for t, h, w in grid.tolist():
        rows, cols = _merge_block_rows_cols(h, w, m)
        h_taps, h_w = _bilinear_axis(rows, h, side)
        w_taps, w_w = _bilinear_axis(cols, w, side)
        idx = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
        wts = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
        # Every frame of a video has the same spatial layout and is its own attention segment.
        indices.append(np.tile(idx, (t, 1)))
        weights.append(np.tile(wts, (t, 1)))
        positions.append(np.tile(np.stack([rows, cols], axis=-1), (t, 1)))
        segments.append(np.repeat(np.arange(segment, segment + t), h * w))
        segment += t
    return VisionInputs(pos_indices=np.concatenate(indices).astype(np.int32),
                        pos_weights=np.concatenate(weights).astype(np.float32),
                        rope_positions=np.concatenate(positions).astype(np.int32),
                        segment_ids=np.concatenate(segments).astype(np.int32))


def uniform_segment_length(grid_thw) -> int | None:
    """h·w when every image and video frame of ``grid_thw`` has the same h·w, else None."""
    sizes = {int(h) * int(w) for _, h, w in np.asarray(grid_thw).reshape(-1, 3).tolist()}
    return sizes.pop() if len(sizes) == 1 else None


def num_patches(grid_thw) -> int:
    return int(np.prod(np.asarray(grid_thw), axis=-1).sum())


# --- rotary ---------------------------------------------------------------------------------------
def vision_inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """head_dim/4 frequencies shared by the row and the column axis (float32)."""
    spatial = head_dim // 2
    exponent = np.arange(0, spatial, 2, dtype=np.float32) / np.float32(spatial)
    return (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)


def vision_rope(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [N, head_dim] in float32: [rows | cols] angles, the pair repeated (rotate-half layout)."""
    inv = jnp.asarray(vision_inverse_frequencies(head_dim, theta))
    freqs = positions.astype(jnp.float32)[..., None] * inv          # [N, 2, hd/4]
    angles = freqs.reshape(freqs.shape[0], -1)                       # [N, hd/2]: rows then cols
    angles = jnp.concatenate([angles, angles], axis=-1)              # [N, hd]
    return jnp.cos(angles), jnp.sin(angles)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [N, H, hd]; rotated in float32 and cast back, as transformers does for the vision tower."""
    x32 = x.astype(jnp.float32)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return (x32 * cos + _rotate_half(x32) * sin).astype(x.dtype)


# --- modules --------------------------------------------------------------------------------------
class PatchEmbed(nnx.Module):
    """Conv3d with kernel == stride == (T, P, P) is a Dense on the flattened (C, T, P, P) patch."""

    def __init__(self, vision: VisionConfig, *, param_dtype, dtype, rngs: nnx.Rngs):
        self.proj = Dense((vision.patch_dim,), (vision.hidden_size,), in_axes=(logical.VIS_IN,),
                          out_axes=(logical.VIS_EMBED,), use_bias=True, param_dtype=param_dtype, dtype=dtype,
                          rngs=rngs)

    def __call__(self, patches: jax.Array) -> jax.Array:
        return self.proj(patches)


class PositionTable(nnx.Module):
    """The learned side×side position grid, stored flat [side², hidden]."""

    def __init__(self, num: int, dim: int, *, param_dtype, rngs: nnx.Rngs):
        self.embedding = logical.param(rngs, nnx.initializers.normal(0.02), (num, dim), (None, logical.VIS_EMBED),
                                 param_dtype)

    def __call__(self, indices: jax.Array, weights: jax.Array) -> jax.Array:
        """Σ_taps table[idx] · weight, accumulated in float32 (the weights are float32)."""
        rows = jnp.take(self.embedding.get_value(), indices, axis=0).astype(jnp.float32)
        return jnp.sum(rows * weights.astype(jnp.float32)[..., None], axis=-2)


def no_lora(_target: str) -> None:
    """The ``lora_for`` of a model without adapters."""
    return None


class VisionAttention(nnx.Module):
    def __init__(self, vision: VisionConfig, *, param_dtype, dtype, rngs: nnx.Rngs, lora_for=no_lora):
        d, h, hd = vision.hidden_size, vision.num_heads, vision.head_dim
        self.qkv = Dense((d,), (3, h, hd), in_axes=(logical.VIS_EMBED,),
                         out_axes=(None, logical.VIS_HEADS, logical.HEAD_DIM), use_bias=True,
                         param_dtype=param_dtype, dtype=dtype, rngs=rngs, lora=lora_for("vision.qkv"))
        self.proj = Dense((h, hd), (d,), in_axes=(logical.VIS_HEADS, logical.HEAD_DIM), out_axes=(logical.VIS_EMBED,),
                          use_bias=True, param_dtype=param_dtype, dtype=dtype, rngs=rngs,
                          lora=lora_for("vision.proj"))

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array,
                 segment_length: int | None = None, dropout_key: jax.Array | None = None) -> jax.Array:
        qkv = self.qkv(x, sub_key(dropout_key, 0))                                            # [N, 3, H, hd]
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        n, h, d = q.shape
        if segment_length:
            # All images/frames have one size: attend within [n_seg, S] blocks, O(N·S) not O(N²).
            blocks = (n // segment_length, segment_length, h, d)
            out = attention(q.reshape(blocks), k.reshape(blocks), v.reshape(blocks), causal=False)
            out = out.reshape(n, h, d)
        else:
            seg = segment_ids[None, :]
            out = attention(q[None], k[None], v[None], causal=False, q_segment_ids=seg, kv_segment_ids=seg)[0]
        return self.proj(out, sub_key(dropout_key, 1))


class VisionMLP(nnx.Module):
    def __init__(self, vision: VisionConfig, *, param_dtype, dtype, rngs: nnx.Rngs, lora_for=no_lora):
        kw = dict(use_bias=True, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.linear_fc1 = Dense((vision.hidden_size,), (vision.intermediate_size,), in_axes=(logical.VIS_EMBED,),
                                out_axes=(logical.VIS_MLP,), lora=lora_for("vision.linear_fc1"), **kw)
        self.linear_fc2 = Dense((vision.intermediate_size,), (vision.hidden_size,), in_axes=(logical.VIS_MLP,),
                                out_axes=(logical.VIS_EMBED,), lora=lora_for("vision.linear_fc2"), **kw)

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        # hidden_act = gelu_pytorch_tanh
        hidden = jax.nn.gelu(self.linear_fc1(x, sub_key(dropout_key, 0)), approximate=True)
        return self.linear_fc2(hidden, sub_key(dropout_key, 1))


class VisionBlock(nnx.Module):
    def __init__(self, vision: VisionConfig, *, param_dtype, dtype, rngs: nnx.Rngs, lora_for=no_lora):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.norm1 = LayerNorm(vision.hidden_size, logical.VIS_EMBED, eps=_LN_EPS, **kw)
        self.norm2 = LayerNorm(vision.hidden_size, logical.VIS_EMBED, eps=_LN_EPS, **kw)
        self.attn = VisionAttention(vision, dtype=dtype, lora_for=lora_for, **kw)
        self.mlp = VisionMLP(vision, dtype=dtype, lora_for=lora_for, **kw)

    def __call__(self, x, cos, sin, segment_ids, segment_length=None, dropout_key=None):
        x = x + self.attn(self.norm1(x), cos, sin, segment_ids, segment_length, sub_key(dropout_key, 0))
        x = x + self.mlp(self.norm2(x), sub_key(dropout_key, 1))
        return logical.constrain(x, (logical.VIS_TOKENS, logical.VIS_EMBED))


class PatchMerger(nnx.Module):
    """Concatenate each merge block's spatial_merge_size² patches, then LayerNorm → fc1 → GELU → fc2.

    The final merger normalises each patch before the concatenation (``postshuffle=False``); the
    deepstack mergers normalise the concatenated 4·hidden vector (``postshuffle=True``).
    """

    def __init__(self, vision: VisionConfig, *, postshuffle: bool, param_dtype, dtype, rngs: nnx.Rngs):
        self.merged = vision.hidden_size * vision.spatial_merge_size ** 2
        self.postshuffle = postshuffle
        norm_dim, norm_axis = (self.merged, logical.VIS_IN) if postshuffle else (vision.hidden_size, logical.VIS_EMBED)
        self.norm = LayerNorm(norm_dim, norm_axis, eps=_LN_EPS, param_dtype=param_dtype, rngs=rngs)
        kw = dict(use_bias=True, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.linear_fc1 = Dense((self.merged,), (self.merged,), in_axes=(logical.VIS_IN,), out_axes=(logical.VIS_MLP,),
                                **kw)
        self.linear_fc2 = Dense((self.merged,), (vision.out_hidden_size,), in_axes=(logical.VIS_MLP,),
                                out_axes=(logical.EMBED,), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.postshuffle:
            x = self.norm(x.reshape(-1, self.merged))
        else:
            x = self.norm(x).reshape(-1, self.merged)
        x = self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=False))
        return logical.constrain(x, (logical.VIS_TOKENS, logical.EMBED))


class Qwen3VLVisionModel(nnx.Module):
    """``visual(pixel_values, grid_thw) -> (embeds [N/m², out_hidden], [deepstack features])``."""

    def __init__(self, config: Qwen3VLConfig, *, rngs: nnx.Rngs):
        self.config = config
        v = config.vision
        kw = dict(param_dtype=config.jnp_param_dtype, dtype=config.jnp_dtype, rngs=rngs)
        self.patch_embed = PatchEmbed(v, **kw)
        self.pos_embed = PositionTable(v.num_position_embeddings, v.hidden_size,
                                       param_dtype=config.jnp_param_dtype, rngs=rngs)
        self.blocks = nnx.List([VisionBlock(v, lora_for=config.lora_for, **kw) for _ in range(v.depth)])
        self.merger = PatchMerger(v, postshuffle=False, **kw)
        self.deepstack_merger_list = nnx.List(
            [PatchMerger(v, postshuffle=True, **kw) for _ in v.deepstack_visual_indexes])

    def __call__(self, pixel_values: jax.Array, grid_thw,
                 dropout_key: jax.Array | None = None) -> tuple[jax.Array, list[jax.Array]]:
        aux = vision_inputs(grid_thw, self.config.vision)
        return self.encode(pixel_values, aux, segment_length=uniform_segment_length(grid_thw),
                           dropout_key=dropout_key)

    def encode(self, pixel_values: jax.Array, aux: VisionInputs,
               segment_length: int | None = None,
               dropout_key: jax.Array | None = None) -> tuple[jax.Array, list[jax.Array]]:
        """The jittable forward; ``aux`` comes from :func:`vision_inputs` (numpy or device arrays).

        ``segment_length`` (static; see :func:`uniform_segment_length`) says every image/frame has
        that many patches, which lets attention run per block instead of under an N×N mask.
        ``dropout_key``: adapter dropout of a train step (None: deterministic).
        """
        v = self.config.vision
        n = aux.segment_ids.shape[0]
        if pixel_values.ndim != 2 or pixel_values.shape != (n, v.patch_dim):
            raise ValueError(f"pixel_values must have shape [{n}, {v.patch_dim}] (Σ t·h·w of grid_thw, "
                             f"C·T·P·P), got {tuple(pixel_values.shape)}")
        if n % (v.spatial_merge_size ** 2):
            raise ValueError(f"{n} patches is not a multiple of spatial_merge_size²")
        if segment_length is not None and (segment_length < 1 or n % segment_length):
            raise ValueError(f"segment_length={segment_length} does not divide the {n} patches")
        dtype = self.config.jnp_dtype
        x = self.patch_embed(pixel_values.astype(dtype))
        x = x + self.pos_embed(jnp.asarray(aux.pos_indices), jnp.asarray(aux.pos_weights)).astype(dtype)
        x = logical.constrain(x, (logical.VIS_TOKENS, logical.VIS_EMBED))
        cos, sin = vision_rope(jnp.asarray(aux.rope_positions), v.head_dim, v.rope_theta)
        segment_ids = jnp.asarray(aux.segment_ids)
        apply = self._block_apply(segment_length)
        deepstack: list[jax.Array] = []
        for i, block in enumerate(self.blocks):
            graphdef, state = nnx.split(block)
            x = apply(graphdef, state, x, cos, sin, segment_ids, sub_key(dropout_key, i))
            if i in v.deepstack_visual_indexes:
                deepstack.append(self.deepstack_merger_list[v.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), deepstack

    def _block_apply(self, segment_length: int | None):
        """(graphdef, state, x, cos, sin, segment_ids, dropout_key) -> x, checkpointed per
        config.remat (as the text decoder's layers are)."""
        def apply(graphdef, state, x, cos, sin, segment_ids, dropout_key):
            return nnx.merge(graphdef, state)(x, cos, sin, segment_ids, segment_length, dropout_key)
        if self.config.remat == "none":
            return apply
        return jax.checkpoint(apply, policy=REMAT_POLICIES[self.config.remat], static_argnums=(0,))


__all__ = ["Qwen3VLVisionModel", "VisionInputs", "vision_inputs", "check_grid_thw", "num_patches",
           "uniform_segment_length", "vision_rope", "vision_inverse_frequencies"]
