"""Qwen3VLForConditionalGeneration in Flax NNX: vision tower + text decoder + lm head.

Inputs travel as a :class:`ModelBatch`, built on the host by :func:`prepare_inputs`, which checks
every shape and count before any compute (placeholder tokens vs. the features the grids produce,
patch rows vs. grids) and computes the 3D rope index in numpy. Image/video grids are static
(pytree aux data): they fix the vision tower's shapes, so a new grid layout is a new trace.

Three ways in:
- methods on the module (eager or under ``nnx.jit``): ``__call__`` → logits, ``hidden_states`` →
  final hidden states without the [B, L, V] logits (the fused loss op takes hidden + kernel),
  ``packed_hidden_states`` → the same for the train step's packed rows (segment ids, per-row
  image blocks), with ``lm_head_kernel`` the one head kernel every loss uses,
  ``prefill`` / ``decode_step`` with a preallocated :class:`KVCache`;
- pure functions of (graphdef, state, …) for ``jax.jit`` in hot loops (DESIGN.md decision 1):
  :func:`forward`, :func:`forward_hidden`, :func:`prefill_fn`, :func:`decode_fn`.

Decoding positions follow transformers' generate: the next token of a row sits at rope position
(its number of real tokens + its rope delta), so left padding does not shift positions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from genevolve_jax.models.layers import Dense, sub_key
from genevolve_jax.models.lora import init_adapters, merged_kernel
from genevolve_jax.models.qwen3_vl import rope
from genevolve_jax.models.qwen3_vl.config import HEAD_LORA_TARGET, Qwen3VLConfig
from genevolve_jax.models.qwen3_vl.text import DeepstackInputs, KVCache, Qwen3VLTextModel, init_cache
from genevolve_jax.models.qwen3_vl.vision import Qwen3VLVisionModel, VisionInputs
from genevolve_jax.sharding import logical

Grid = tuple[tuple[int, int, int], ...]


@struct.dataclass
class ModelBatch:
    """Validated model inputs. Arrays are pytree leaves; the grids are static."""
    input_ids: jax.Array                    # [B, L] int32
    attention_mask: jax.Array               # [B, L] int32, 0 for padding
    position_ids: jax.Array                 # [3, B, L] int32 (rope.get_rope_index)
    rope_deltas: jax.Array                  # [B] int32
    pixel_values: jax.Array | None = None   # [sum t·h·w over images, C·T·P·P]
    pixel_values_videos: jax.Array | None = None
    image_grid_thw: Grid = struct.field(pytree_node=False, default=())
    video_grid_thw: Grid = struct.field(pytree_node=False, default=())


@struct.dataclass
class RowImages:
    """Per-row image blocks of a train batch (RL rows): row r's patches and the host-computed
    vision inputs of its grids (:func:`genevolve_jax.models.qwen3_vl.vision.vision_inputs`),
    zero-padded to one patch budget P; ``segment_ids`` 0 marks padding patches."""
    pixel_values: jax.Array     # [B, P, C·T·p·p]
    pos_indices: jax.Array      # [B, P, 4] int32
    pos_weights: jax.Array      # [B, P, 4]
    rope_positions: jax.Array   # [B, P, 2] int32
    segment_ids: jax.Array      # [B, P] int32


def _grid_tuple(grid, name: str, merge: int) -> Grid:
    if grid is None:
        return ()
    g = np.asarray(grid)
    if g.ndim != 2 or g.shape[1] != 3 or not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array [n, 3] of (t, h, w), got shape {g.shape} "
                         f"dtype {g.dtype}")
    if (g <= 0).any():
        raise ValueError(f"{name} has non-positive entries: {g.tolist()}")
    if (g[:, 1:] % merge).any():
        raise ValueError(f"{name} heights/widths must be multiples of spatial_merge_size={merge}: {g.tolist()}")
    return tuple(tuple(int(x) for x in row) for row in g)


def _check_pixels(pixels, grid: Grid, patch_dim: int, pixel_name: str, grid_name: str):
    if pixels is None and not grid:
        return None
    if pixels is None or not grid:
        missing = pixel_name if pixels is None else grid_name
        raise ValueError(f"{missing} is missing: {pixel_name} and {grid_name} come together")
    pixels = np.asarray(pixels) if not isinstance(pixels, jax.Array) else pixels
    rows = sum(t * h * w for t, h, w in grid)
    if pixels.ndim != 2 or pixels.shape != (rows, patch_dim):
        raise ValueError(f"{pixel_name} has shape {tuple(pixels.shape)}; {grid_name} {list(grid)} needs "
                         f"({rows}, {patch_dim})")
    return jnp.asarray(pixels)


def prepare_inputs(config: Qwen3VLConfig, input_ids, attention_mask=None, *, pixel_values=None,
                   image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None) -> ModelBatch:
    """Check inputs on the host and compute the rope index; raises ValueError naming the field."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be an integer array [batch, length], got shape {ids.shape} "
                         f"dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= config.text.vocab_size):
        raise ValueError(f"input_ids hold ids outside [0, vocab_size={config.text.vocab_size}): "
                         f"min {ids.min()}, max {ids.max()}")
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids {ids.shape}")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("attention_mask must hold only 0 and 1")
    merge = config.vision.spatial_merge_size
    igrid = _grid_tuple(image_grid_thw, "image_grid_thw", merge)
    vgrid = _grid_tuple(video_grid_thw, "video_grid_thw", merge)
    pix = _check_pixels(pixel_values, igrid, config.vision.patch_dim, "pixel_values", "image_grid_thw")
    vpix = _check_pixels(pixel_values_videos, vgrid, config.vision.patch_dim, "pixel_values_videos",
                         "video_grid_thw")
    for token, grid, kind in ((config.image_token_id, igrid, "image"), (config.video_token_id, vgrid, "video")):
        is_tok = ids == token
        tokens = int(is_tok.sum())
        features = sum(t * h * w for t, h, w in grid) // merge ** 2
        if tokens != features:
            raise ValueError(f"input_ids hold {tokens} {kind} placeholder tokens (id {token}) but "
                             f"{kind}_grid_thw produces {features} {kind} features")
        if (is_tok & (mask == 0)).any():
            raise ValueError(f"{kind} placeholder tokens sit at padded positions (attention_mask 0)")
    position_ids, deltas = rope.get_rope_index(
        ids, None, np.array(igrid) if igrid else None, np.array(vgrid) if vgrid else None, mask,
        spatial_merge_size=merge, image_token_id=config.image_token_id, video_token_id=config.video_token_id)
    # Cast on the host: a device-side cast compiles once per new shape (every prompt length).
    i32 = lambda x: jnp.asarray(np.asarray(x, np.int32))  # noqa: E731
    return ModelBatch(input_ids=i32(ids), attention_mask=i32(mask), position_ids=i32(position_ids),
                      rope_deltas=i32(deltas),
                      pixel_values=pix, pixel_values_videos=vpix, image_grid_thw=igrid, video_grid_thw=vgrid)


def _placeholder_index(ids: jax.Array, token_id: int) -> jax.Array:
    """[B, L] running index of each placeholder over the batch (row-major), −1 elsewhere."""
    is_tok = ids == token_id
    running = jnp.cumsum(is_tok.reshape(-1)).reshape(ids.shape) - 1
    return jnp.where(is_tok, running, -1).astype(jnp.int32)


def scatter_features(embeds: jax.Array, index: jax.Array, features: jax.Array) -> jax.Array:
    """``embeds`` [B, L, D] with position (b, l) replaced by ``features[index[b, l]]`` where the
    index is ≥ 0 (a placeholder's running feature number, see :func:`_placeholder_index`)."""
    gathered = jnp.take(features, jnp.maximum(index, 0), axis=0).astype(embeds.dtype)
    return jnp.where((index >= 0)[..., None], gathered, embeds)


class Qwen3VLForConditionalGeneration(nnx.Module):
    def __init__(self, config: Qwen3VLConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.visual = Qwen3VLVisionModel(config, rngs=rngs)
        self.language_model = Qwen3VLTextModel(config, rngs=rngs)
        t = config.text
        self.lm_head = None if config.tie_word_embeddings else Dense(
            (t.hidden_size,), (t.vocab_size,), in_axes=(logical.EMBED,), out_axes=(logical.VOCAB,), use_bias=False,
            param_dtype=config.jnp_param_dtype, dtype=config.jnp_dtype, rngs=rngs,
            lora=config.lora_for(HEAD_LORA_TARGET))
        if config.lora is not None:   # drawn after every base parameter: a seed's base is the same
            init_adapters(self, rngs.params())

    # --- pieces --------------------------------------------------------------------------------------
    def _vision(self, pixels: jax.Array, grid: Grid, dropout_key: jax.Array | None = None):
        embeds, deepstack = self.visual(pixels.astype(self.config.jnp_dtype), np.asarray(grid, np.int64),
                                        dropout_key)
        return embeds, list(deepstack)

    def embed(self, batch: ModelBatch,
              dropout_key: jax.Array | None = None) -> tuple[jax.Array, DeepstackInputs | None]:
        """Token embeddings with image/video features scattered into their placeholders, and the
        deepstack features for the decoder (None for text only). ``dropout_key``: the vision
        adapters' dropout in a train step (None: deterministic)."""
        c = self.config
        x = self.language_model.embed_tokens(batch.input_ids)
        index, levels = None, None
        for j, (pixels, grid, token) in enumerate(((batch.pixel_values, batch.image_grid_thw, c.image_token_id),
                                                   (batch.pixel_values_videos, batch.video_grid_thw,
                                                    c.video_token_id))):
            if pixels is None:
                continue
            feats, deep = self._vision(pixels, grid, sub_key(dropout_key, j))
            own = _placeholder_index(batch.input_ids, token)
            x = scatter_features(x, own, feats)
            if index is None:
                index, levels = own, deep
            else:  # images first, then videos, in one feature table per level
                index = jnp.where(own >= 0, own + levels[0].shape[0], index)
                levels = [jnp.concatenate([a, b], axis=0) for a, b in zip(levels, deep)]
        x = logical.constrain(x, (logical.BATCH, logical.SEQ, logical.EMBED))
        deepstack = DeepstackInputs(index, levels) if index is not None and levels else None
        return x, deepstack

    def lm_head_kernel(self) -> jax.Array:
        """The output projection as an input-major [D, V] kernel (the embedding table when tied).
        With an adapter on the head it is the merged kernel W + s·A·B (models/lora.py:merged_kernel,
        as a merged model, the engine's, holds it); the losses differentiate A and B through it. That
        costs one [D, V] temporary, which is why the shipped configs leave the head out of
        model.lora.targets."""
        if self.lm_head is None:
            return self.language_model.embed_tokens.embedding.get_value().T
        if self.lm_head.lora is None:
            return self.lm_head.kernel.get_value()
        return merged_kernel(self.lm_head)

    def logits(self, hidden: jax.Array, head_kernel: jax.Array | None = None) -> jax.Array:
        """``hidden @ head`` in float32: both operands in the compute dtype, the products accumulated
        and returned in float32, as the trainer's fused log-prob op forms its logits
        (ops/fused_logprob.py). Rounded to bf16, logits in the tens (a trained LM's probable tokens)
        move by up to 0.06–0.125: the engine's log-probs were a mean 6.3e-2 from the trainer's in
        tests/rollout/test_engine_bf16_logprobs.py, 1.9e-2 with this head, 8.3e-4 with the model's
        roundings pinned too (ops/precision.py).
        ``head_kernel``: a [D, V] copy of :meth:`lm_head_kernel` to use instead (the engine's CPU decode)."""
        dtype = self.config.jnp_dtype
        kernel = self.lm_head_kernel() if head_kernel is None else head_kernel
        out = jnp.einsum("...d,dv->...v", hidden.astype(dtype), kernel.astype(dtype),
                         preferred_element_type=jnp.float32)
        return logical.constrain(out, (logical.BATCH, logical.SEQ, logical.VOCAB)) if out.ndim == 3 else out

    # --- full forward --------------------------------------------------------------------------------
    def _as_batch(self, batch_or_ids, attention_mask, kw) -> ModelBatch:
        if isinstance(batch_or_ids, ModelBatch):
            if attention_mask is not None or kw:
                raise TypeError("pass either a ModelBatch or raw inputs, not both")
            return batch_or_ids
        if not _is_concrete(batch_or_ids):
            raise TypeError("under jit, pass a ModelBatch built on the host by prepare_inputs (the rope index "
                            "and placeholder checks need concrete token ids)")
        return prepare_inputs(self.config, batch_or_ids, attention_mask, **kw)

    def hidden_states(self, batch_or_ids, attention_mask=None, **kw) -> jax.Array:
        """Final normed hidden states [B, L, D]; no logits are formed."""
        batch = self._as_batch(batch_or_ids, attention_mask, kw)
        x, deepstack = self.embed(batch)
        hidden, _ = self.language_model(x, batch.position_ids, batch.attention_mask, deepstack=deepstack)
        return hidden

    def __call__(self, batch_or_ids, attention_mask=None, **kw) -> jax.Array:
        """Logits [B, L, V] in float32 (:meth:`logits`). Accepts a ModelBatch or the raw inputs of
        :func:`prepare_inputs` (input_ids, attention_mask, pixel_values, image_grid_thw, …)."""
        return self.logits(self.hidden_states(batch_or_ids, attention_mask, **kw))

    # --- the train step's forward: packed rows, per-row image blocks -------------------------------
    def encode_row_images(self, images: "RowImages",
                          dropout_key: jax.Array | None = None) -> tuple[jax.Array, list[jax.Array]]:
        """Vision features of per-row image blocks: (merged [B·P/m², D], deepstack levels).

        Row r carries its own images' patches in ``images.pixel_values[r]`` ([P, C·T·P·P],
        zero-padded to the batch's patch budget P) with the host-computed vision inputs of its grids
        (segment 0 marks padding). The blocks are flattened into one patch list and encoded once;
        attention segments are made unique per (row, image) and padding patches only see each
        other, so every real image is encoded exactly as on its own. ``dropout_key``: adapter
        dropout of a train step (None: deterministic)."""
        pix = images.pixel_values
        b, p, d = pix.shape
        seg = images.segment_ids
        seg = jnp.where(seg > 0, seg + jnp.arange(b, dtype=seg.dtype)[:, None] * (p + 1), 0)
        aux = VisionInputs(pos_indices=images.pos_indices.reshape(b * p, -1),
                           pos_weights=images.pos_weights.reshape(b * p, -1),
                           rope_positions=images.rope_positions.reshape(b * p, -1),
                           segment_ids=seg.reshape(b * p))
        feats, deepstack = self.visual.encode(pix.reshape(b * p, d), aux, dropout_key=dropout_key)
        return feats, list(deepstack)

    def _row_image_embeddings(self, ids: jax.Array, images: "RowImages", features):
        """Token embeddings with row r's k-th placeholder replaced by feature r·(P/m²) + k, and the
        matching deepstack inputs. Only the first (real patches)/m² placeholders of a row take
        features: a row without images (or a placeholder id the policy sampled as text past its
        images) keeps the token embedding, as the sampler saw it."""
        feats, deepstack = features
        merge2 = self.config.vision.spatial_merge_size ** 2
        segments = images.segment_ids
        per_row = segments.shape[1] // merge2
        real = jnp.sum(segments > 0, axis=1, dtype=jnp.int32)[:, None] // merge2
        local = jnp.cumsum((ids == self.config.image_token_id).astype(jnp.int32), axis=1) - 1
        is_tok = (ids == self.config.image_token_id) & (local < real)
        index = jnp.where(is_tok, local + jnp.arange(ids.shape[0], dtype=jnp.int32)[:, None] * per_row, -1)
        x = scatter_features(self.language_model.embed_tokens(ids), index, feats)
        x = logical.constrain(x, (logical.BATCH, logical.SEQ, logical.EMBED))
        return x, (DeepstackInputs(index, deepstack) if deepstack else None)

    def packed_hidden_states(self, input_ids: jax.Array, position_ids: jax.Array, segment_ids: jax.Array | None, *,
                             pixel_values: jax.Array | None = None, image_grid_thw: Grid = (),
                             row_images: "RowImages | None" = None, image_features=None,
                             dropout_key: jax.Array | None = None) -> jax.Array:
        """Final hidden states [B, T, D] of packed or padded rows, never the logits: the train
        step's forward (SFT, GRPO policy, SDL teacher, reference and π_old rows).

        ``position_ids`` are batch-major [B, 3, T] (data/packing.py) and ``segment_ids`` keep
        attention inside each packed trajectory (0 = padding). Images come either as SFT's flat
        ``pixel_values`` with static ``image_grid_thw`` (placeholders in row order), or as RL's
        per-row blocks ``row_images`` (:meth:`encode_row_images`); ``image_features`` passes the
        latter already encoded (a teacher row reuses its student row's images). ``dropout_key``:
        adapter dropout (the train step's policy forward only; None is deterministic), the
        decoder's and the vision tower's masks drawn from independent sub-keys."""
        positions = jnp.swapaxes(position_ids, 0, 1)
        valid = jnp.ones(input_ids.shape, jnp.int32) if segment_ids is None else (segment_ids > 0).astype(jnp.int32)
        if row_images is not None:
            if image_features is None:
                image_features = self.encode_row_images(row_images, sub_key(dropout_key, 1))
            x, deepstack = self._row_image_embeddings(input_ids, row_images, image_features)
        else:
            batch = ModelBatch(input_ids=input_ids, attention_mask=valid, position_ids=positions,
                               rope_deltas=jnp.zeros(input_ids.shape[:1], jnp.int32), pixel_values=pixel_values,
                               image_grid_thw=tuple(tuple(int(v) for v in row) for row in image_grid_thw))
            x, deepstack = self.embed(batch, sub_key(dropout_key, 1))
        hidden, _ = self.language_model(x, positions, valid, deepstack=deepstack, segment_ids=segment_ids,
                                        dropout_key=sub_key(dropout_key, 0))
        return hidden

    # --- cached decoding ------------------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        return init_cache(self.config, batch_size, max_length)

    def prefill(self, batch_or_ids, max_length: int | None = None, *, cache: KVCache | None = None,
                all_logits: bool = False, attention_mask=None, **kw) -> tuple[jax.Array, KVCache]:
        """Run a prompt into a fresh cache, or append a further chunk (a tool observation, a new
        user turn, possibly with images) to a cache that already holds a conversation.

        The chunk's rope index (from :func:`prepare_inputs`, which numbers it from 0) is shifted by
        each row's ``cache.next_position``: the positions a single forward over the whole
        conversation would give, since every text/vision position is an offset from the running
        text position. Returns (logits, cache): logits [B, V] at each row's last real token of the
        chunk, or [B, L, V] with ``all_logits``. ``max_length`` sizes a new cache.
        """
        batch = self._as_batch(batch_or_ids, attention_mask, kw)
        b, length = batch.input_ids.shape
        if cache is None:
            if max_length is None:
                raise ValueError("prefill needs max_length (cache slots) or a cache")
            cache = self.init_cache(b, max_length)
        _check_capacity(cache, length)
        offset = cache.next_position.astype(jnp.int32)
        x, deepstack = self.embed(batch)
        positions = batch.position_ids + offset[None, :, None]
        hidden, cache = self.language_model(x, positions, batch.attention_mask, deepstack=deepstack, cache=cache)
        n_real = jnp.sum(batch.attention_mask, axis=1).astype(jnp.int32)
        cache = cache._replace(next_position=offset + n_real + batch.rope_deltas.astype(jnp.int32))
        if all_logits:
            logits = self.logits(hidden)
        else:
            # Each row's last real token (the row ends at L−1 under left padding, earlier under right;
            # a row with no real token in this chunk reads slot L−1, meaningless but finite).
            last = length - 1 - jnp.argmax(batch.attention_mask[:, ::-1], axis=1)
            logits = self.logits(jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0])
        return _poison_if_overflow(logits, cache), cache

    def decode_step(self, tokens: jax.Array, cache: KVCache, token_valid: jax.Array | None = None,
                    head_kernel: jax.Array | None = None, window: int | None = None) -> tuple[jax.Array, KVCache]:
        """Append one text token per row ([B] ids) and return its next-token logits [B, V].

        ``token_valid`` [B] bool marks rows that really take a token this step (False for rows
        already finished: their slot is left masked and their position does not advance).
        ``head_kernel``: the output projection as a materialised [D, V] array (a copy of
        :meth:`lm_head_kernel`) to use instead of the module's own (see JaxEngine, which keeps one
        for tied embeddings on CPU). ``window`` (static): attend over the cache's first that many
        slots (every row's keys must lie there); the cache itself is updated in place.
        """
        _check_capacity(cache, 1)
        tokens = jnp.asarray(tokens, jnp.int32).reshape(-1)
        b = tokens.shape[0]
        valid = jnp.ones((b,), bool) if token_valid is None else jnp.asarray(token_valid).astype(bool)
        x = self.language_model.embed_tokens(tokens[:, None])
        positions = jnp.broadcast_to(cache.next_position[None, :, None], (3, b, 1))
        hidden, cache = self.language_model(x, positions, valid[:, None], cache=cache, cache_window=window)
        cache = cache._replace(next_position=cache.next_position + valid.astype(jnp.int32))
        last = hidden[:, 0]
        logits = self.logits(last, head_kernel)
        return _poison_if_overflow(logits, cache), cache


def _is_concrete(x) -> bool:
    """False for a jit tracer (no host value). Avoids jax.core, whose public surface keeps shrinking."""
    try:
        np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return False
    return True


def _check_capacity(cache: KVCache, new_tokens: int) -> None:
    """Fail early when the cache length is concrete (eager use); under jit see _poison_if_overflow."""
    if not _is_concrete(cache.length):
        return
    if int(cache.length) + new_tokens > cache.max_length:
        raise ValueError(f"KV cache holds {cache.max_length} slots; {int(cache.length)} are used and "
                         f"{new_tokens} more were asked for")


def _poison_if_overflow(logits: jax.Array, cache: KVCache) -> jax.Array:
    # Under jit an overflowing write is clamped by dynamic_update_slice and would silently
    # overwrite the last slots; NaN logits make that impossible to miss. A ragged cache ([B]
    # lengths, writes past the end dropped) poisons only its overflowing rows.
    over = cache.length > cache.max_length
    over = over.reshape(over.shape + (1,) * (logits.ndim - over.ndim)) if over.ndim else over
    return jnp.where(over, jnp.nan, logits).astype(logits.dtype)


# --- pure functions for jax.jit (split/merge at the boundary) ---------------------------------------------
def forward(graphdef: nnx.GraphDef, state: nnx.State, batch: ModelBatch) -> jax.Array:
    """Logits [B, L, V]: ``jax.jit(forward)(graphdef, state, batch)``."""
    return nnx.merge(graphdef, state)(batch)


def forward_hidden(graphdef: nnx.GraphDef, state: nnx.State, batch: ModelBatch) -> jax.Array:
    """Final hidden states [B, L, D], no logits."""
    return nnx.merge(graphdef, state).hidden_states(batch)


def prefill_fn(graphdef: nnx.GraphDef, state: nnx.State, batch: ModelBatch, cache: KVCache,
               all_logits: bool = False) -> tuple[jax.Array, KVCache]:
    """``jax.jit(prefill_fn, static_argnames="all_logits", donate_argnames="cache")``."""
    return nnx.merge(graphdef, state).prefill(batch, cache=cache, all_logits=all_logits)


def decode_fn(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, cache: KVCache,
              token_valid: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """``jax.jit(decode_fn, donate_argnames="cache")``: one token per row."""
    return nnx.merge(graphdef, state).decode_step(tokens, cache, token_valid)


__all__ = ["ModelBatch", "RowImages", "prepare_inputs", "Qwen3VLForConditionalGeneration", "KVCache", "forward",
           "forward_hidden", "prefill_fn", "decode_fn"]
