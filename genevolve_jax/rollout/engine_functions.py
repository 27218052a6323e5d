"""The JaxEngine's device functions: its jitted prefill and decode chunk, the layouts they take
(weights tensor-parallel under the "sample" rules, the ragged KV cache, replicated host inputs),
and the host arrays they are called with.

:class:`EngineFunctions` builds them from the model's graph and its parameters, real or abstract
(``jax.ShapeDtypeStruct``), and allocates nothing. The engine (rollout/jax_engine.py) calls them on
its weights and cache; ``genevolve plan --phase engine`` traces the very same functions on abstract
arguments (:meth:`EngineFunctions.abstract_prefill_args` / :meth:`abstract_decode_args`) and
compiles them for a target.

- ``prefill(params, rest, batch, cache, src, dst, start, offset, sampling, mode, window)``: rows
  ``src[i]``'s first ``start[i]`` cache positions (a reused prefix; none when 0) are read into a
  ``[B, window]`` view, the new tokens appended there, the view written to row ``dst[i]`` (out of
  range for padding rows: dropped), and the first token sampled from the last logits.
- ``decode_chunk(params, rest, head, tokens, cache, live, temp, top_p, top_k, seeds, counters, mode,
  window)``: ``steps_per_sync`` decode steps in one scan over every slot, attending over the first
  ``window`` cache positions; rows not ``live`` do not advance.

``mode`` ("greedy" | "sample" | "filter") and ``window`` are static: each value is its own compile,
so windows are powers of two (:func:`bucket`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from genevolve_jax.models.qwen3_vl.text import CACHE_AXES, KVCache, init_cache
from genevolve_jax.rollout.sampling import sample_tokens
from genevolve_jax.sharding import logical

SAMPLING_MODES = ("greedy", "sample", "filter")


def engine_mesh(engine_cfg, devices) -> jax.sharding.Mesh:
    """The engine's mesh (``engine.mesh``) over the first of ``devices`` in id order: an engine is
    host-local, so a caller passes this host's devices (a plan: the target's first host)."""
    from genevolve_jax.sharding.logical import MESH_AXES
    from genevolve_jax.sharding.mesh import make_mesh
    sizes = {a: int(engine_cfg.mesh.get(a, 1)) for a in MESH_AXES}
    n = int(np.prod(list(sizes.values())))
    devices = sorted(devices, key=lambda d: d.id)
    if n > len(devices):
        raise ValueError(f"engine.mesh {sizes} needs {n} devices; {len(devices)} are available")
    return make_mesh(sizes, devices[:n])


def sampling_layout(params, mesh: jax.sharding.Mesh):
    """The shardings the engine samples with: a tree like ``params`` (the list-layout ``nnx.Param``
    state, arrays or abstract) of NamedShardings over ``mesh``, by the "sample" rules (weights
    tensor-parallel only)."""
    return logical.state_shardings(params, mesh, "sample")


def sampling_shardings(model_config, cfg=None, devices=None):
    """The layout a JaxEngine built with ``cfg`` (the ``engine`` section) samples with, on
    ``devices`` (default: this host's): a tree of NamedShardings like the model's list-layout
    ``nnx.Param`` state. Known before the engine exists, so that a trainer can move its weights
    straight into it (Collective.local_model) instead of building a copy that the engine moves."""
    from genevolve_jax.models.hf_io import abstract_split
    from genevolve_jax.rollout import config as engine_config
    cfg = engine_config.validate(cfg if cfg is not None else engine_config.default_engine_config())
    mesh = engine_mesh(cfg, jax.local_devices() if devices is None else devices)
    return sampling_layout(abstract_split(model_config.replace(scan_layers=False))[1], mesh)


def bucket(n: int, lo: int, hi: int) -> int:
    """The power of two ≥ ``n``, clipped to [lo, hi]: prefill lengths, row counts and windows."""
    return min(hi, max(lo, 1 << max(0, (n - 1).bit_length())))


class EngineFunctions:
    """The engine's jitted functions for ``engine_cfg`` (the ``engine`` config section) on ``mesh``.

    ``params``: the model's ``nnx.Param`` state (arrays or ``ShapeDtypeStruct``s) — only its
    structure and shapes are read, to derive the sampling layout. ``weight_dtype``: the dtype the
    engine holds its weights in (:meth:`held`): the trainer's compute dtype, to which the trainer
    casts its params for every forward, so that the engine computes with the very same values
    (None: the model's compute dtype, ``model.dtype``). In bf16 that halves the weights' bytes and
    what each decode step reads; the head still accumulates in float32 (``model.logits``)."""

    def __init__(self, graphdef, model_config, params, engine_cfg, mesh: jax.sharding.Mesh, weight_dtype=None):
        self.graphdef = graphdef
        self.config = model_config
        self.mesh = mesh
        self.weight_dtype = jnp.dtype(weight_dtype if weight_dtype is not None else model_config.jnp_dtype)
        self.slots = int(engine_cfg.max_slots)
        self.chunk = int(engine_cfg.steps_per_sync)
        self.max_seq_len = int(engine_cfg.max_seq_len)
        self.min_prefill_bucket = int(engine_cfg.min_prefill_bucket)
        self.prefill_tokens = int(engine_cfg.prefill_tokens)
        # Text longer than this is prefilled in chunks of it (a power of two ≤ prefill_tokens), so
        # no call holds the scores of a whole long prompt.
        self.prefill_chunk = min(1 << (self.prefill_tokens.bit_length() - 1), self.max_seq_len)
        self.capacity = self.max_seq_len + self.chunk  # room for a chunk past a row's budget
        self.raw_logprobs = bool(engine_cfg.raw_logprobs)
        self.param_shardings = sampling_layout(params, mesh)
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.cache_shardings = self._cache_shardings()
        self.prefill, self.decode_chunk = self._build()

    def rules(self):
        """The context the functions run under: the model's activation constraints resolve to this mesh."""
        return logical.use_rules(self.mesh, "sample")

    def held(self, params):
        """``params`` (arrays, or ``ShapeDtypeStruct``s for a plan) with their floating leaves in
        :attr:`weight_dtype`, cast where they are (on the sender's devices, before the move: half the
        bytes cross in bf16)."""
        def cast(x):
            if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == self.weight_dtype:
                return x
            if isinstance(x, jax.ShapeDtypeStruct):
                return jax.ShapeDtypeStruct(x.shape, self.weight_dtype, sharding=x.sharding)
            return jnp.asarray(x).astype(self.weight_dtype)
        return jax.tree.map(cast, params)

    # -- layouts -----------------------------------------------------------------------------------
    def _named(self, axes, shape) -> NamedSharding:
        return NamedSharding(self.mesh, logical.partition_spec(axes, logical.rules_for("sample"), self.mesh, shape))

    def _cache_shardings(self) -> KVCache:
        t = self.config.text
        kv = self._named(CACHE_AXES, (self.slots, t.num_key_value_heads, self.capacity, t.head_dim))
        per_row = self._named((logical.BATCH,), (self.slots,))
        n = t.num_hidden_layers
        valid = self._named((logical.BATCH, logical.CACHE_SEQ), (self.slots, self.capacity))
        return KVCache(k=(kv,) * n, v=(kv,) * n, valid=valid, length=per_row, next_position=per_row)

    def _fresh_cache(self) -> KVCache:
        cache = init_cache(self.config, self.slots, self.capacity)
        return cache._replace(length=jnp.zeros((self.slots,), jnp.int32))

    def new_cache(self) -> KVCache:
        """An empty cache of ``max_slots`` rows × ``capacity`` positions, in its sharding."""
        with self.rules():
            return jax.jit(self._fresh_cache, out_shardings=self.cache_shardings)()

    def abstract_cache(self) -> KVCache:
        shapes = jax.eval_shape(self._fresh_cache)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                            self.cache_shardings)

    def decode_head(self, params, rest):
        """A [D, V] copy of a tied output projection, for decode on CPU; None otherwise.

        XLA:CPU runs the tied head's [B, D]·[V, D]ᵀ product through a slow path at small batch:
        measured on the issue-16 mid shape (V 32,000, D 512), 21.7 against 11.8 ms per step at B8
        with a materialised [D, V] kernel (equal at B1). GPUs read either layout at speed, and an
        untied head is [D, V] already, so the copy is made only for a tied head on CPU."""
        if not self.copies_head:
            return None
        with self.rules():
            return jax.jit(self._head_kernel, out_shardings=self.replicated)(params, rest)

    @property
    def copies_head(self) -> bool:
        return bool(self.config.tie_word_embeddings) and self.mesh.devices.flat[0].platform == "cpu"

    def _head_kernel(self, params, rest):
        return nnx.merge(self.graphdef, params, rest).lm_head_kernel()

    def abstract_decode_head(self, params, rest):
        """:meth:`decode_head` without computing it (None where the engine makes no copy)."""
        if not self.copies_head:
            return None
        s = jax.eval_shape(self._head_kernel, params, rest)
        return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated)

    # -- host inputs ---------------------------------------------------------------------------------
    def prefill_host_arrays(self, rows: int) -> dict[str, np.ndarray]:
        """Per-row prefill inputs for ``rows`` rows, as padding: ``src`` 0, ``dst`` out of range
        (the row's writes are dropped), no reused prefix, temperature 1, no top-p/top-k."""
        return dict(src=np.zeros(rows, np.int32), dst=np.full(rows, self.slots, np.int32),
                    start=np.zeros(rows, np.int32), offset=np.zeros(rows, np.int32),
                    temp=np.ones(rows, np.float32), top_p=np.ones(rows, np.float32),
                    top_k=np.full(rows, -1, np.int32), seed=np.zeros(rows, np.uint32))

    def decode_host_arrays(self) -> dict[str, np.ndarray]:
        """Per-slot decode inputs, every slot idle."""
        s = self.slots
        return dict(tokens=np.zeros(s, np.int32), live=np.zeros(s, bool), temp=np.ones(s, np.float32),
                    top_p=np.ones(s, np.float32), top_k=np.full(s, -1, np.int32), seeds=np.zeros(s, np.uint32),
                    counters=np.zeros(s, np.int32))

    def prefill_rows(self, length: int) -> int:
        """Rows of every prefill call padded to ``length`` tokens: ``engine.prefill_tokens // length``
        rounded down to a power of two, in [1, max_slots]. Fixed per length, so the row count adds no
        compiles (a call with fewer requests pads rows; one with more is split)."""
        n = max(1, self.prefill_tokens // max(1, length))
        return min(1 << (n.bit_length() - 1), self.slots)

    def prefill_window(self, start_plus_bucket: int) -> int:
        return bucket(start_plus_bucket, self.min_prefill_bucket, self.capacity)

    def decode_window(self, longest_row: int) -> int:
        """The attended window of a chunk: every live row's length plus the chunk, as a power of two."""
        return bucket(longest_row + self.chunk, self.min_prefill_bucket, self.capacity)

    # -- abstract arguments (plans) ------------------------------------------------------------------
    @staticmethod
    def _abstract(tree):
        # Host inputs carry no sharding (the engine passes numpy arrays): jit's in_shardings place them.
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)

    def abstract_prefill_args(self, params, rest, rows: int, length: int, *, mode: str = "filter",
                              window: int | None = None, image_grids: tuple = ()) -> tuple:
        """The arguments of one prefill call of ``rows`` requests padded to ``length`` tokens, as the
        engine builds them, attending over ``window`` positions (default: a fresh prefill's, the
        smallest that holds it). ``image_grids``: the (t, h, w) patch grids of the first request's
        images (the engine prefills a request with images alone), their placeholders first."""
        from genevolve_jax.models.qwen3_vl.model import prepare_inputs
        ids = np.zeros((rows, length), np.int32)
        mask = np.ones((rows, length), np.int32)
        vision = {}
        if image_grids:
            v = self.config.vision
            n = sum(t * h * w for t, h, w in image_grids)
            ids[0, :n // v.spatial_merge_size ** 2] = self.config.image_token_id
            vision = dict(pixel_values=np.zeros((n, v.patch_dim), np.float32),
                          image_grid_thw=np.asarray(image_grids, np.int64))
        batch = prepare_inputs(self.config, ids, mask, **vision)
        h = self.prefill_host_arrays(rows)
        sampling = (h["temp"], h["top_p"], h["top_k"], h["seed"])
        window = window or self.prefill_window(length)
        return (params, rest, self._abstract(batch), self.abstract_cache(),
                *self._abstract((h["src"], h["dst"], h["start"], h["offset"], sampling)), mode, window)

    def abstract_decode_args(self, params, rest, head=None, *, mode: str = "filter",
                             window: int | None = None) -> tuple:
        """The arguments of one decode chunk over every slot, attending over ``window`` positions
        (default: the whole capacity, the largest the engine uses)."""
        h = self._abstract(self.decode_host_arrays())
        return (params, rest, head, h["tokens"], self.abstract_cache(), h["live"], h["temp"], h["top_p"],
                h["top_k"], h["seeds"], h["counters"], mode, window or self.capacity)

    # -- the functions ---------------------------------------------------------------------------------
    def _build(self):
        graphdef, capacity, chunk, raw = self.graphdef, self.capacity, self.chunk, self.raw_logprobs
        rep, cache_sh, p_sh = self.replicated, self.cache_shardings, self.param_shardings

        def model_of(params, rest):
            return nnx.merge(graphdef, params, rest)

        def prefill(params, rest, batch, cache: KVCache, src, dst, start, offset, sampling, mode, window):
            # Copy (the reused prefix) and prefill in one pass over a [B, window] view.
            view = KVCache(k=tuple(x[src, :, :window] for x in cache.k), v=tuple(x[src, :, :window] for x in cache.v),
                           valid=jnp.arange(window)[None, :] < start[:, None], length=start, next_position=offset)
            logits, view = model_of(params, rest).prefill(batch, cache=view)
            rows = jnp.zeros((dst.shape[0], capacity), bool).at[:, :window].set(view.valid)
            put = lambda full, part: full.at[dst, :, :window].set(part.astype(full.dtype), mode="drop")  # noqa: E731
            cache = KVCache(tuple(map(put, cache.k, view.k)), tuple(map(put, cache.v, view.v)),
                            cache.valid.at[dst].set(rows, mode="drop"),
                            cache.length.at[dst].set(view.length, mode="drop"),
                            cache.next_position.at[dst].set(view.next_position, mode="drop"))
            temp, top_p, top_k, seed = sampling
            token, lp = sample_tokens(logits, temp, top_p, top_k, seed, jnp.zeros_like(start), raw_logprobs=raw,
                                      use_filter=mode == "filter", greedy_only=mode == "greedy")
            return token, lp, cache

        def decode_chunk(params, rest, head, tokens, cache, live, temp, top_p, top_k, seeds, counters, mode, window):
            # The scan carries the whole (donated) cache and writes each token in place; attention
            # reads only the first `window` slots. (Carrying a [slots, window] copy instead cost a
            # second cache at a full window: 24 GiB a device in the 2B GPU plan.)
            model = model_of(params, rest)

            def step(carry, i):
                tok, cache = carry
                logits, cache = model.decode_step(tok, cache, live, head_kernel=head, window=window)
                new, lp = sample_tokens(logits, temp, top_p, top_k, seeds, counters + i, raw_logprobs=raw,
                                        use_filter=mode == "filter", greedy_only=mode == "greedy")
                return (jnp.where(live, new, tok), cache), (new, lp)

            (_, cache), (toks, lps) = jax.lax.scan(step, (tokens, cache), jnp.arange(chunk, dtype=jnp.int32))
            return toks, lps, cache

        jit_prefill = jax.jit(prefill, static_argnums=(9, 10), donate_argnames="cache",
                              in_shardings=(p_sh, rep, rep, cache_sh, rep, rep, rep, rep, rep),
                              out_shardings=(rep, rep, cache_sh))
        jit_decode = jax.jit(decode_chunk, static_argnums=(11, 12), donate_argnames="cache",
                             in_shardings=(p_sh, rep, rep, rep, cache_sh, rep, rep, rep, rep, rep, rep),
                             out_shardings=(rep, rep, cache_sh))
        return jit_prefill, jit_decode


def sampling_mode(params) -> str:
    """The sampler variant a batch of ``SamplingParams`` needs (static: each is its own compile)."""
    if all(p.temperature <= 0 for p in params):
        return "greedy"
    return "filter" if any(p.temperature > 0 and (p.top_p < 1.0 or p.top_k > 0) for p in params) else "sample"


__all__ = ["EngineFunctions", "SAMPLING_MODES", "bucket", "engine_mesh", "sampling_mode"]
