"""The sharded train step: a pure ``(params, opt_state, batch, rng) -> (params, opt_state, metrics)``.

Compiled with ``jax.jit`` and explicit in/out shardings under the mesh, with the NNX graph merged
from its static ``graphdef`` inside (split/merge at the boundary, no ``nnx.jit`` traversal).

A loss function has the shape ``loss_fn(model, microbatch, rng) -> (loss_sum, weight, metric_sums)``
and the step minimises ``Σ loss_sum / Σ weight`` over the micro-batches of a step. A loss function
with ``metrics_are_means = True`` returns per-micro-batch means instead; the step averages them
(except the counts listed in its ``summed_metrics``). Returning sums
rather than means makes accumulation exact: m micro-batches give the same loss and gradient as
one batch m times larger, whatever the mask counts per micro-batch. SFT's weight is the number of
trained tokens; a seq-mean GRPO loss's weight is the number of sequences.

Micro-batch i takes rows i, i+m, i+2m, … of the batch, so on a batch-sharded mesh every device
keeps its own rows and no data moves between micro-batches.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from genevolve_jax.models.qwen3_vl.model import ModelBatch, scatter_features
from genevolve_jax.models.qwen3_vl.text import DeepstackInputs
from genevolve_jax.models.qwen3_vl.vision import VisionInputs
from genevolve_jax.ops.fused_logprob import token_logprobs
from genevolve_jax.sharding import logical as L
from genevolve_jax.sharding.mesh import check_divisible
from genevolve_jax.train.state import TrainSetup

LossFn = Callable[[nnx.Module, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, jax.Array, dict]]

# Logical axes of batch fields; any other [B, T] field is (batch, seq), any [B] field (batch,).
BATCH_AXES = {"position_ids": (L.BATCH, None, L.SEQ), "teacher_position_ids": (L.BATCH, None, L.SEQ),
              # Per-row image blocks of RL batches (see row_image_features): batch-major, so they
              # split into micro-batches and shard over the batch like every other field.
              "row_pixel_values": (L.BATCH, None, None), "row_vision_pos_indices": (L.BATCH, None, None),
              "row_vision_pos_weights": (L.BATCH, None, None), "row_vision_rope_positions": (L.BATCH, None, None),
              "row_vision_segment_ids": (L.BATCH, None)}
ROW_IMAGE_FIELDS = ("row_pixel_values", "row_vision_pos_indices", "row_vision_pos_weights",
                    "row_vision_rope_positions", "row_vision_segment_ids")
NOT_BATCH_MAJOR = ("pixel_values",)
STATIC_FIELDS = ("image_grid_thw",)  # host-side; part of the compile key, never traced


def batch_axes(name: str, ndim: int) -> tuple:
    if name in NOT_BATCH_MAJOR:
        return (None,) * ndim
    if name in BATCH_AXES:
        return BATCH_AXES[name]
    return ((L.BATCH, L.SEQ) + (None,) * max(0, ndim - 2))[:ndim]


def batch_shardings(batch: Mapping[str, Any], mesh, rules) -> dict:
    return {k: NamedSharding(mesh, L.partition_spec(batch_axes(k, v.ndim), rules, mesh, v.shape))
            for k, v in batch.items()}


def _mesh_axes_for(rules, name) -> tuple:
    t = rules.get(name)
    return () if t is None else ((t,) if isinstance(t, str) else tuple(t))


def check_batch(batch: Mapping[str, Any], mesh, rules, grad_accum_steps: int) -> None:
    """Refuse batches whose rows or tokens cannot be split as the strategy asks."""
    dims = {}
    for k, v in batch.items():
        if k in NOT_BATCH_MAJOR:
            if grad_accum_steps > 1:
                raise ValueError(f"batch field {k!r} is not batch-major; image batches cannot be split "
                                 "into micro-batches inside the step (use grad_accum_steps=1)")
            continue
        b = v.shape[0]
        if b % grad_accum_steps:
            raise ValueError(f"batch field {k!r} has {b} rows, not divisible by grad_accum_steps "
                             f"{grad_accum_steps}")
        dims[f"micro-batch rows of {k!r}"] = (b // grad_accum_steps, _mesh_axes_for(rules, L.BATCH))
        seq_dim = batch_axes(k, v.ndim).index(L.SEQ) if L.SEQ in batch_axes(k, v.ndim) else None
        if seq_dim is not None:
            dims[f"tokens of {k!r}"] = (v.shape[seq_dim], _mesh_axes_for(rules, L.SEQ))
    check_divisible(mesh, dims)


def cast_floating(tree, dtype):
    """Cast floating leaves to the compute dtype (before use, so fsdp gathers move bf16)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _split_micro(x: jax.Array, m: int) -> jax.Array:
    """[B, ...] -> [m, B/m, ...] with micro-batch i = rows i, i+m, … (see module docstring)."""
    b = x.shape[0]
    return jnp.swapaxes(x.reshape(b // m, m, *x.shape[1:]), 0, 1)


def build_step_fn(setup: TrainSetup, loss_fn: LossFn, *, compute_dtype=jnp.float32,
                  grad_accum_steps: int = 1, static: Mapping[str, Any] | None = None) -> Callable:
    """The pure (not yet jitted) step function. ``static`` entries (host-side values that fix
    shapes, such as ``image_grid_thw``) are added to every micro-batch the loss function sees."""
    static = dict(static or {})
    tx = setup.tx

    def grads_of(train, frozen, mb, key):
        def f(train_p):
            model = setup.merge({"train": cast_floating(train_p, compute_dtype),
                                 "frozen": cast_floating(frozen, compute_dtype)})
            num, den, mets = loss_fn(model, {**mb, **static}, key)
            return num.astype(jnp.float32), (den.astype(jnp.float32), mets)
        (num, (den, mets)), g = jax.value_and_grad(f, has_aux=True)(train)
        g = jax.lax.with_sharding_constraint(g, setup.param_shardings["train"])
        return num, den, mets, g

    def step(params, opt_state, batch, rng):
        train, frozen = params["train"], params["frozen"]
        if grad_accum_steps == 1:
            num, den, mets, grads = grads_of(train, frozen, batch, rng)
        else:
            micro = {k: _split_micro(v, grad_accum_steps) for k, v in batch.items()}
            keys = jax.random.split(rng, grad_accum_steps)
            first = {k: v[0] for k, v in micro.items()}
            shapes = jax.eval_shape(lambda: grads_of(train, frozen, first, keys[0]))
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            zeros = zeros[:3] + (jax.lax.with_sharding_constraint(zeros[3], setup.param_shardings["train"]),)

            def body(acc, xs):
                mb, key = xs
                out = grads_of(train, frozen, mb, key)
                return jax.tree.map(jnp.add, acc, out), None

            (num, den, mets, grads), _ = jax.lax.scan(body, zeros, (micro, keys))
            if getattr(loss_fn, "metrics_are_means", False):
                # Per-micro-batch means (the evolve loss): report their mean, not their sum;
                # counts it names in ``summed_metrics`` stay totals.
                summed = set(getattr(loss_fn, "summed_metrics", ()))
                mets = {k: v if k in summed else v / grad_accum_steps for k, v in mets.items()}
        safe = jnp.where(den > 0, den, 1.0)
        grads = jax.tree.map(lambda g: (g / safe).astype(g.dtype), grads)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, opt_state, train)
        train = optax.apply_updates(train, updates)
        # Every count in the chain advances together; the first one is the step number.
        count = optax.tree_utils.tree_get_all_with_path(opt_state, "count")[0][1]
        # The step's own numbers win over same-named loss-function metrics.
        metrics = {**mets, "loss": num / safe, "weight": den, "grad_norm": grad_norm,
                   "learning_rate": setup.schedule(jnp.maximum(count - 1, 0))}
        return {"train": train, "frozen": frozen}, opt_state, metrics

    return step


class TrainStep:
    """The jitted step with shardings; compiled once per batch layout (shapes, field names and
    static fields such as image grids)."""

    def __init__(self, setup: TrainSetup, loss_fn: LossFn, *, compute_dtype=jnp.float32,
                 grad_accum_steps: int = 1, donate: bool = True, compiler_options: Mapping[str, Any] | None = None):
        self.setup = setup
        # Passed to XLA as is, e.g. {"xla_backend_optimization_level": 0} for quick CPU compiles.
        self.compiler_options = dict(compiler_options or {})
        self.loss_fn = loss_fn
        self.compute_dtype = compute_dtype
        self.grad_accum_steps = grad_accum_steps
        self._donate = (0, 1) if donate else ()
        self._jitted: dict = {}

    @staticmethod
    def split_static(batch: Mapping[str, Any]) -> tuple[dict, dict]:
        arrays = {k: v for k, v in batch.items() if k not in STATIC_FIELDS}
        static = {k: tuple(tuple(int(x) for x in row) for row in np.asarray(v).reshape(-1, 3))
                  for k, v in batch.items() if k in STATIC_FIELDS}
        return arrays, static

    def jitted(self, arrays: Mapping[str, Any], static: Mapping[str, Any]):
        key = (tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in arrays.items())),
               tuple(sorted(static.items())))
        if key not in self._jitted:
            s = self.setup
            check_batch(arrays, s.mesh, s.rules, self.grad_accum_steps)
            fn = build_step_fn(s, self.loss_fn, compute_dtype=self.compute_dtype,
                               grad_accum_steps=self.grad_accum_steps, static=static)
            replicated = NamedSharding(s.mesh, PartitionSpec())
            in_sh = (s.param_shardings, s.opt_shardings, batch_shardings(arrays, s.mesh, s.rules), replicated)
            out_sh = (s.param_shardings, s.opt_shardings, replicated)
            self._jitted[key] = jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh,
                                        donate_argnums=self._donate,
                                        compiler_options=self.compiler_options or None)
        return self._jitted[key]

    def lower(self, params, opt_state, batch, rng):
        arrays, static = self.split_static(batch)
        with L.use_rules(self.setup.mesh, self.setup.rules):
            return self.jitted(arrays, static).lower(params, opt_state, arrays, rng)

    def place_batch(self, arrays: Mapping[str, Any]) -> dict:
        """Host arrays -> global arrays in the batch shardings. Every process passes the same full
        batch and keeps only its own shards, which also works when the mesh spans processes."""
        shardings = batch_shardings(arrays, self.setup.mesh, self.setup.rules)
        out = {}
        for k, v in arrays.items():
            if isinstance(v, jax.Array):
                out[k] = v
            else:
                host = np.asarray(v)
                out[k] = jax.make_array_from_callback(host.shape, shardings[k], lambda idx, h=host: h[idx])
        return out

    def __call__(self, params, opt_state, batch, rng):
        arrays, static = self.split_static(batch)
        arrays = self.place_batch(arrays)
        with L.use_rules(self.setup.mesh, self.setup.rules):
            return self.jitted(arrays, static)(params, opt_state, arrays, rng)

    def compile_and_time(self, params, opt_state, batch, rng):
        """(compiled, compile seconds, arrays to call it with): for compare-sharding and benchmarks."""
        arrays, _ = self.split_static(batch)
        t0 = time.perf_counter()
        compiled = self.lower(params, opt_state, batch, rng).compile()
        return compiled, time.perf_counter() - t0, arrays


# --- the Qwen3-VL token-level losses ---------------------------------------------------------------
def lm_head_kernel(model) -> jax.Array:
    """[D, V] head kernel; the embedding table transposed when embeddings are tied."""
    if hasattr(model, "lm_head_kernel"):
        return model.lm_head_kernel()
    head = getattr(model, "lm_head", None)
    if head is not None:
        return head.kernel.get_value()
    return model.language_model.embed_tokens.embedding.get_value().T


def row_image_features(model, batch: Mapping[str, Any]) -> tuple[jax.Array, list[jax.Array]]:
    """Vision features of a batch's per-row image blocks: (merged [B·P/m², D], deepstack levels).

    Row r carries its own images' patches in ``row_pixel_values[r]`` ([P, C·T·P·P], zero-padded
    to the batch's patch budget P) with the host-computed :class:`VisionInputs` of its grids
    (``row_vision_*``; segment 0 marks padding). The blocks are flattened into one patch list and
    encoded once; attention segments are made unique per (row, image), and the padding patches
    only see each other, so every real image is encoded exactly as on its own.
    """
    pix = batch["row_pixel_values"]
    b, p, d = pix.shape
    seg = batch["row_vision_segment_ids"]
    seg = jnp.where(seg > 0, seg + jnp.arange(b, dtype=seg.dtype)[:, None] * (p + 1), 0)
    aux = VisionInputs(pos_indices=batch["row_vision_pos_indices"].reshape(b * p, -1),
                       pos_weights=batch["row_vision_pos_weights"].reshape(b * p, -1),
                       rope_positions=batch["row_vision_rope_positions"].reshape(b * p, -1),
                       segment_ids=seg.reshape(b * p))
    feats, deepstack = model.visual.encode(pix.reshape(b * p, d), aux)
    return feats, list(deepstack)


def _row_image_embeddings(model, ids: jax.Array, segments: jax.Array, features) -> tuple[jax.Array, Any]:
    """Token embeddings with row r's k-th placeholder replaced by feature r·(P/m²) + k, and the
    matching deepstack inputs. Only the first (real patches)/m² placeholders of a row take
    features: a row without images (or a placeholder id the policy sampled as text past its
    images) keeps the token embedding, as the sampler saw it."""
    feats, deepstack = features
    merge2 = model.config.vision.spatial_merge_size ** 2
    per_row = segments.shape[1] // merge2
    real = jnp.sum(segments > 0, axis=1, dtype=jnp.int32)[:, None] // merge2
    local = jnp.cumsum((ids == model.config.image_token_id).astype(jnp.int32), axis=1) - 1
    is_tok = (ids == model.config.image_token_id) & (local < real)
    index = jnp.where(is_tok, local + jnp.arange(ids.shape[0], dtype=jnp.int32)[:, None] * per_row, -1)
    x = scatter_features(model.language_model.embed_tokens(ids), index, feats)
    x = L.constrain(x, (L.BATCH, L.SEQ, L.EMBED))
    return x, (DeepstackInputs(index, deepstack) if deepstack else None)


def qwen3vl_hidden_states(model, batch: Mapping[str, Any], image_features=None) -> jax.Array:
    """Final hidden states [B, T, D] of a (packed or padded) batch, never the logits.

    Position ids arrive batch-major [B, 3, T] (see data/packing.py) and go to the decoder as
    [3, B, T]; segment ids keep attention inside each packed trajectory. Images, when present, are
    encoded by the vision tower and scattered into their placeholders with deepstack features:
    either SFT's flat ``pixel_values`` + static ``image_grid_thw``, or RL's per-row image blocks
    (``row_pixel_values`` …, see :func:`row_image_features`). ``image_features`` passes the
    latter's already encoded features (a teacher row reuses its student row's images).
    """
    ids = batch["input_ids"]
    positions = jnp.swapaxes(batch["position_ids"], 0, 1)
    segment_ids = batch.get("segment_ids")
    valid = jnp.ones(ids.shape, jnp.int32) if segment_ids is None else (segment_ids > 0).astype(jnp.int32)
    if "row_pixel_values" in batch:
        if image_features is None:
            image_features = row_image_features(model, batch)
        x, deepstack = _row_image_embeddings(model, ids, batch["row_vision_segment_ids"], image_features)
    else:
        grid = batch.get("image_grid_thw", ())
        mb = ModelBatch(input_ids=ids, attention_mask=valid, position_ids=positions,
                        rope_deltas=jnp.zeros(ids.shape[:1], jnp.int32), pixel_values=batch.get("pixel_values"),
                        image_grid_thw=tuple(tuple(int(x) for x in row) for row in grid))
        x, deepstack = model.embed(mb)
    hidden, _ = model.language_model(x, positions, valid, deepstack=deepstack, segment_ids=segment_ids)
    return hidden


def sft_loss_fn(chunk_size: int = 8192, loss_cfg=None) -> LossFn:
    """SFT on assistant tokens: loss_sum = −Σ m·log π(target), weight = Σ m (METHOD.md §5).

    With ``loss_cfg`` (genevolve_jax.train.losses.config) the loss goes through
    :func:`genevolve_jax.train.losses.sft.sft_loss_from_hidden` (its chunk size and temperature);
    its token-mean times the token count is the exact sum, so accumulation stays exact. Other
    aggregations average over rows, which for packed rows are not trajectories: refused.
    """
    if loss_cfg is not None and loss_cfg.sft.aggregation != "token-mean":
        raise ValueError(f"loss.sft.aggregation must be 'token-mean' for the packed train step, got "
                         f"{loss_cfg.sft.aggregation!r} (packed rows hold several trajectories)")

    def loss_fn(model, batch, rng):
        del rng
        hidden = qwen3vl_hidden_states(model, batch)
        kernel = lm_head_kernel(model).astype(hidden.dtype)
        mask = batch["loss_mask"].astype(jnp.float32)
        if loss_cfg is None:
            logp = token_logprobs(hidden, kernel, batch["targets"], chunk_size=chunk_size)
            return -jnp.sum(logp * mask), jnp.sum(mask), {}
        from genevolve_jax.train.losses.sft import sft_loss_from_hidden
        loss, mets = sft_loss_from_hidden(hidden, kernel, batch["targets"], mask, loss_cfg)
        tokens = jnp.sum(mask)
        # Only sums are returned as metrics: the step adds them over micro-batches.
        return loss * tokens, tokens, {"sft/bad_targets": mets["sft/bad_targets"]}

    return loss_fn
