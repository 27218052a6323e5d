"""JaxEngine: in-process sampling with a KV cache and continuous batching.

A fixed number of batch *slots* share one preallocated KV cache ([slots, S] per layer). A worker
thread runs the schedule; callers (``generate``, the agent loop, the HTTP server's handlers) only
queue requests and wait for their futures, so requests from several callers share the device:

- admission: a queued request is prefilled alone (batch 1, left-padded to a power-of-two bucket,
  images through the vision tower) into a small cache, which is copied into a free slot's row so
  that its last token sits just before the shared write position; its first token is sampled from
  the prefill logits. Admission happens between decode chunks, so new requests enter while others
  are mid-generation;
- decode: ``steps_per_sync`` decode steps run in one jitted scan over all slots (idle slots are
  masked and do not advance); tokens come back to the host once per chunk, where stop token ids,
  stop strings and ``max_new_tokens`` are checked, and a finished slot is freed (tokens it sampled
  after finishing in the same chunk are discarded);
- compaction: all rows share the cache's write position, so when it would run past the cache the
  valid slots of every live row are gathered to the front (positions live in ``next_position``,
  not in slot indices, so this changes no logits).

Everything on the device runs under ``jax.jit`` with explicit shardings from the "sample" rules of
genevolve_jax/sharding/logical.py (weights tensor-parallel only, slots split over ``data``), inside
``logical.use_rules`` so the model's activation constraints resolve to the same mesh.

Log-probs: see genevolve_jax/rollout/sampling.py. By default the recorded log-prob is that of
``log_softmax(logits / temperature)`` (what the trainer recomputes for the importance ratio);
``cfg.raw_logprobs = True`` records temperature-1 log-probs instead.

A request whose prompt plus ``max_new_tokens`` exceeds ``cfg.max_seq_len`` generates up to the
limit and finishes with "length"; a prompt that alone fills it is aborted with the reason.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import os
import queue
import threading
import traceback
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from genevolve_jax.models.qwen3_vl.model import ModelBatch, prepare_inputs
from genevolve_jax.models.qwen3_vl.text import KVCache, init_cache
from genevolve_jax.rollout.engine import GenerationRequest, GenerationResult, RolloutEngine
from genevolve_jax.rollout.sampling import sample_tokens
from genevolve_jax.sharding import logical as L
from genevolve_jax.sharding.logical import MESH_AXES


def default_engine_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.max_slots = 32          # concurrent sequences in the decode batch
    cfg.max_seq_len = 8192      # prompt + generated tokens per request (cache slots per row)
    cfg.steps_per_sync = 8      # decode steps per jitted chunk between host checks
    cfg.min_prefill_bucket = 64  # prompts are left-padded to max(this, next power of two)
    cfg.raw_logprobs = False    # True: record log_softmax(logits) instead of log_softmax(logits / T)
    cfg.seed = 0                # seeds requests that carry none
    cfg.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1})
    return cfg


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    for name in ("max_slots", "max_seq_len", "steps_per_sync", "min_prefill_bucket"):
        value = cfg[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"engine.{name} must be a positive integer, got {value!r}")
    if cfg.min_prefill_bucket > cfg.max_seq_len:
        raise ValueError(f"engine.min_prefill_bucket must be <= engine.max_seq_len ({cfg.max_seq_len}), "
                         f"got {cfg.min_prefill_bucket}")
    if not isinstance(cfg.raw_logprobs, bool):
        raise ValueError(f"engine.raw_logprobs must be a bool, got {cfg.raw_logprobs!r}")
    for axis in MESH_AXES:
        size = cfg.mesh.get(axis, 1)
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"engine.mesh.{axis} must be a positive integer, got {size!r}")
    return cfg


def _bucket(n: int, lo: int, hi: int) -> int:
    return min(hi, max(lo, 1 << max(0, (n - 1).bit_length())))


@dataclasses.dataclass
class _Job:
    request: GenerationRequest
    future: cf.Future
    seed: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    max_new: int = 0
    pending: int = 0  # last sampled token, not yet in the cache


class JaxEngine(RolloutEngine):
    """``RolloutEngine`` over a Flax Qwen3-VL model; see the module docstring."""

    def __init__(self, model: nnx.Module, tokenizer=None, cfg: ml_collections.ConfigDict | None = None, *,
                 mesh: jax.sharding.Mesh | None = None, image_processor=None):
        self.cfg = validate(cfg if cfg is not None else default_engine_config())
        self.config = model.config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        if mesh is None:
            from genevolve_jax.sharding.mesh import make_mesh
            sizes = {a: int(self.cfg.mesh.get(a, 1)) for a in MESH_AXES}
            n = int(np.prod(list(sizes.values())))
            mesh = make_mesh(sizes, jax.devices()[:n])
        self.mesh = mesh
        self.slots = self.cfg.max_slots
        self.chunk = self.cfg.steps_per_sync
        self.capacity = self.cfg.max_seq_len + self.chunk  # room for a chunk past a row's budget
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        self._graphdef = graphdef
        self._param_shardings = L.state_shardings(params, mesh, "sample")
        self._replicated = NamedSharding(mesh, PartitionSpec())
        with self._rules():
            self._params = jax.device_put(params, self._param_shardings)
            self._rest = jax.device_put(rest, self._replicated)
            self._cache_shardings = self._cache_sharding_tree()
            self._cache = jax.jit(lambda: init_cache(self.config, self.slots, self.capacity),
                                  out_shardings=self._cache_shardings)()
        self._length = 0  # the cache's shared write position, tracked on the host
        self._build_functions()
        self._rng = np.random.default_rng(self.cfg.seed)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._active: list[_Job | None] = [None] * self.slots
        self._device_lock = threading.Lock()
        self._closed = False
        self._worker: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.stats = {"prefills": 0, "decode_chunks": 0, "compactions": 0, "max_live": 0}
        self.weight_version = 0   # the trainer step of the weights in use (update_weights)

    # -- layout ----------------------------------------------------------------------------------
    def _rules(self):
        return L.use_rules(self.mesh, "sample")

    def _named(self, axes, shape) -> NamedSharding:
        return NamedSharding(self.mesh, L.partition_spec(axes, L.rules_for("sample"), self.mesh, shape))

    def _cache_sharding_tree(self) -> KVCache:
        t = self.config.text
        kv_shape = (self.slots, self.capacity, t.num_key_value_heads, t.head_dim)
        kv = self._named((L.BATCH, L.CACHE_SEQ, L.KV_HEADS, L.HEAD_DIM), kv_shape)
        n = t.num_hidden_layers
        return KVCache(k=(kv,) * n, v=(kv,) * n, valid=self._named((L.BATCH, L.CACHE_SEQ), (self.slots, self.capacity)),
                       length=self._replicated, next_position=self._named((L.BATCH,), (self.slots,)))

    # -- jitted device functions -------------------------------------------------------------------
    def _build_functions(self) -> None:
        graphdef, config, capacity = self._graphdef, self.config, self.capacity
        raw = bool(self.cfg.raw_logprobs)
        rep, cache_sh = self._replicated, self._cache_shardings

        def model_of(params, rest):
            return nnx.merge(graphdef, params, rest)

        def admit(params, rest, batch: ModelBatch, cache: KVCache, slot, sampling, use_filter):
            model = model_of(params, rest)
            bucket = batch.input_ids.shape[1]
            logits, small = model.prefill(batch, cache=init_cache(config, 1, bucket))
            length = jnp.maximum(cache.length, bucket)
            start = length - bucket  # the prompt's last token lands at slot length − 1
            k = tuple(jax.lax.dynamic_update_slice(big, s.astype(big.dtype), (slot, start, 0, 0))
                      for big, s in zip(cache.k, small.k))
            v = tuple(jax.lax.dynamic_update_slice(big, s.astype(big.dtype), (slot, start, 0, 0))
                      for big, s in zip(cache.v, small.v))
            row = jax.lax.dynamic_update_slice(jnp.zeros((1, capacity), bool), small.valid, (0, start))
            valid = jax.lax.dynamic_update_slice(cache.valid, row, (slot, 0))
            nextpos = cache.next_position.at[slot].set(small.next_position[0])
            cache = KVCache(k, v, valid, length, nextpos)
            temp, top_p, top_k, seed = sampling
            token, lp = sample_tokens(logits, temp[None], top_p[None], top_k[None], seed[None],
                                      jnp.zeros((1,), jnp.int32), raw_logprobs=raw, use_filter=use_filter)
            return token[0], lp[0], cache

        def decode_chunk(params, rest, tokens, cache, live, temp, top_p, top_k, seeds, counters, use_filter):
            model = model_of(params, rest)

            def step(carry, i):
                tok, cache = carry
                logits, cache = model.decode_step(tok, cache, live)
                new, lp = sample_tokens(logits, temp, top_p, top_k, seeds, counters + i,
                                        raw_logprobs=raw, use_filter=use_filter)
                return (jnp.where(live, new, tok), cache), (new, lp)

            (_, cache), (toks, lps) = jax.lax.scan(step, (tokens, cache), jnp.arange(self.chunk, dtype=jnp.int32))
            return toks, lps, cache

        def compact(cache: KVCache, live):
            valid = cache.valid & live[:, None]
            order = jnp.argsort(~valid, axis=1, stable=True)  # each row's valid slots first, in order
            gather = lambda x: jnp.take_along_axis(x, order[:, :, None, None], axis=1)  # noqa: E731
            valid = jnp.take_along_axis(valid, order, axis=1)
            length = jnp.max(jnp.sum(valid, axis=1)).astype(jnp.int32)
            return KVCache(tuple(map(gather, cache.k)), tuple(map(gather, cache.v)), valid, length,
                           cache.next_position)

        p_sh = self._param_shardings
        self._admit = jax.jit(admit, static_argnums=6, donate_argnames="cache",
                              in_shardings=(p_sh, rep, rep, cache_sh, rep, rep),
                              out_shardings=(rep, rep, cache_sh))
        self._decode_chunk = jax.jit(decode_chunk, static_argnums=10, donate_argnames="cache",
                                     in_shardings=(p_sh, rep, rep, cache_sh, rep, rep, rep, rep, rep, rep),
                                     out_shardings=(rep, rep, cache_sh))
        self._compact = jax.jit(compact, donate_argnames="cache", in_shardings=(cache_sh, rep),
                                out_shardings=cache_sh)

    # -- public API --------------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        futures = [self.submit(r) for r in requests]
        return [f.result() for f in futures]

    def submit(self, request: GenerationRequest) -> cf.Future:
        """Queue one request; the future resolves to its GenerationResult (never raises)."""
        future: cf.Future = cf.Future()
        if self._closed:
            future.set_result(GenerationResult([], [], "abort", error="engine is closed"))
            return future
        s = request.sampling
        seed = int(s.seed) & 0xFFFFFFFF if s.seed is not None else int(self._rng.integers(0, 2**32))
        self._queue.put(_Job(request, future, seed))
        self._ensure_worker()
        return future

    def num_image_tokens(self, image) -> int:
        """Image-pad tokens for one image under this engine's image processor (merge 2×2 per token)."""
        from genevolve_jax.processing.image import image_grid
        from genevolve_jax.rollout.engine import image_size
        width, height = image_size(image)
        t, h, w = image_grid(height, width, self.image_processor)
        return t * h * w // self.config.vision.spatial_merge_size ** 2

    def update_weights(self, params, step: int = 0) -> dict[str, float]:
        """Replace the weights with ``params`` (an ``nnx.State`` of the model's ``nnx.Param``s, e.g. the
        trainer's, in any layout); they are resharded in memory to the sampling layout. Requests in
        flight continue on the new weights with their existing cache (call between rollout phases).
        ``step`` is recorded as :attr:`weight_version`."""
        want = jax.tree.structure(self._params)
        got = jax.tree.structure(params)
        if want != got:
            raise ValueError(f"update_weights: parameter tree differs from the engine's model ({got} vs {want})")
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(self._params), jax.tree.leaves(params)):
            if tuple(a.shape) != tuple(b.shape):
                raise ValueError(f"update_weights: {jax.tree_util.keystr(path)} has shape {tuple(b.shape)}, "
                                 f"the engine's model has {tuple(a.shape)}")
        new = jax.tree.map(lambda x, old: jnp.asarray(x).astype(old.dtype), params, self._params)
        with self._device_lock, self._rules():
            self._params = jax.device_put(new, self._param_shardings)
        self.weight_version = int(step)
        return {}

    def flush_cache(self) -> None:
        """Nothing to drop between requests (no prefix cache); kept for the SGLang-style API."""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        if self._worker is not None:
            self._worker.join(timeout=60)

    # -- the schedule (worker thread) ----------------------------------------------------------------
    def _ensure_worker(self) -> None:
        with self._start_lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="jax-engine", daemon=True)
                self._worker.start()

    def _run(self) -> None:
        while True:
            idle = all(j is None for j in self._active)
            full = all(j is not None for j in self._active)
            try:  # take new work only when a slot is free (a full batch keeps decoding)
                job = "none" if full else self._queue.get(block=idle, timeout=None if idle else 0)
            except queue.Empty:
                job = "none"
            if job is None:
                self._abort_all("engine closed")
                return
            try:
                with self._device_lock:
                    while job != "none":
                        self._admit_job(job)
                        if all(j is not None for j in self._active):
                            break
                        try:
                            job = self._queue.get_nowait()
                        except queue.Empty:
                            job = "none"
                        if job is None:
                            self._queue.put(None)
                            break
                    if any(j is not None for j in self._active):
                        self._step()
            except Exception as exc:  # a device failure aborts the live requests, not the engine
                self._abort_all(f"engine error: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}")
                self._reset_cache()

    def _abort_all(self, why: str) -> None:
        for i, job in enumerate(self._active):
            if job is not None:
                self._finish(i, "abort", why)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None and not job.future.done():
                job.future.set_result(GenerationResult([], [], "abort", error=why))

    def _reset_cache(self) -> None:
        with self._rules():
            self._cache = jax.jit(lambda: init_cache(self.config, self.slots, self.capacity),
                                  out_shardings=self._cache_shardings)()
        self._length = 0

    def _model_batch(self, req: GenerationRequest):
        prompt = [int(t) for t in req.prompt_ids]
        n = len(prompt)
        if n == 0:
            raise ValueError("prompt_ids is empty")
        if n >= self.cfg.max_seq_len:
            raise ValueError(f"prompt of {n} tokens leaves no room under engine.max_seq_len={self.cfg.max_seq_len}")
        bucket = _bucket(n, self.cfg.min_prefill_bucket, self.cfg.max_seq_len)
        ids = np.zeros((1, bucket), np.int32)
        mask = np.zeros((1, bucket), np.int32)
        ids[0, bucket - n:] = prompt
        mask[0, bucket - n:] = 1
        vision = {}
        if req.images:
            from genevolve_jax.processing.image import preprocess_images
            processed = preprocess_images([_open_image(x) for x in req.images], self.image_processor)
            vision = dict(pixel_values=processed[0], image_grid_thw=processed[1])
        return prepare_inputs(self.config, ids, mask, **vision), n

    def _admit_job(self, job: _Job) -> None:
        try:
            batch, n = self._model_batch(job.request)
        except Exception as exc:  # bad prompt or image: this request only
            job.future.set_result(GenerationResult([], [], "abort", error=f"bad request: {exc}"))
            return
        slot = self._active.index(None)
        s = job.request.sampling
        job.max_new = min(s.max_new_tokens, self.cfg.max_seq_len - n)
        sampling = (np.float32(s.temperature), np.float32(s.top_p), np.int32(s.top_k), np.uint32(job.seed))
        try:
            with self._rules():
                token, lp, self._cache = self._admit(self._params, self._rest, batch, self._cache, np.int32(slot),
                                                     sampling, _needs_filter([s]))
        except Exception as exc:
            job.future.set_result(GenerationResult([], [], "abort", error=f"prefill failed: {type(exc).__name__}: "
                                                                          f"{exc}"))
            raise
        self._length = max(self._length, batch.input_ids.shape[1])
        self.stats["prefills"] += 1
        self._active[slot] = job
        self.stats["max_live"] = max(self.stats["max_live"], sum(j is not None for j in self._active))
        self._accept(slot, int(token), float(lp))

    def _step(self) -> None:
        live = np.array([j is not None for j in self._active])
        if self._length + self.chunk > self.capacity:
            with self._rules():
                self._cache = self._compact(self._cache, live)
            self._length = int(self._cache.length)
            self.stats["compactions"] += 1
        jobs = [(i, j) for i, j in enumerate(self._active) if j is not None]
        tokens = np.zeros(self.slots, np.int32)
        temp = np.ones(self.slots, np.float32)
        top_p = np.ones(self.slots, np.float32)
        top_k = np.full(self.slots, -1, np.int32)
        seeds = np.zeros(self.slots, np.uint32)
        counters = np.zeros(self.slots, np.int32)
        for i, j in jobs:
            s = j.request.sampling
            tokens[i], temp[i], top_p[i], top_k[i] = j.pending, s.temperature, s.top_p, s.top_k
            seeds[i], counters[i] = j.seed, len(j.tokens)
        with self._rules():
            toks, lps, self._cache = self._decode_chunk(
                self._params, self._rest, tokens, self._cache, live, temp, top_p, top_k, seeds, counters,
                _needs_filter([j.request.sampling for _, j in jobs]))
        self._length += self.chunk
        self.stats["decode_chunks"] += 1
        toks, lps = np.asarray(toks), np.asarray(lps)
        for i, _ in jobs:
            for step in range(self.chunk):
                if self._active[i] is None:
                    break
                self._accept(i, int(toks[step, i]), float(lps[step, i]))

    def _accept(self, slot: int, token: int, logprob: float) -> None:
        """Record one sampled token of a slot and finish the slot when it stops."""
        job = self._active[slot]
        s = job.request.sampling
        job.tokens.append(token)
        job.logprobs.append(logprob)
        job.pending = token
        if not np.isfinite(logprob):
            self._finish(slot, "abort", "non-finite logits (cache overflow or bad weights)")
        elif token in s.stop_token_ids or (s.stop and self._hits_stop_string(job.tokens, s.stop)):
            self._finish(slot, "stop")
        elif len(job.tokens) >= job.max_new:
            self._finish(slot, "length")

    def _hits_stop_string(self, tokens: list[int], stops: Sequence[str]) -> bool:
        if self.tokenizer is None:
            raise ValueError("stop strings need the engine to have a tokenizer")
        # A stop string first appears when its last token arrives; a string of n bytes spans at most
        # n + 1 byte-level tokens, so decoding that tail is enough (and the newest token must matter).
        width = max(len(x.encode()) for x in stops) + 2
        tail = self.tokenizer.decode(tokens[-width:], skip_special_tokens=False)
        before = self.tokenizer.decode(tokens[-width:-1], skip_special_tokens=False)
        return any(x in tail and x not in before for x in stops)

    def _finish(self, slot: int, reason: str, error: str = "") -> None:
        job = self._active[slot]
        self._active[slot] = None
        if reason == "abort":
            result = GenerationResult([], [], "abort", error=error)
        else:
            result = GenerationResult(list(job.tokens), list(job.logprobs), reason)
        if not job.future.done():
            job.future.set_result(result)


def _open_image(image):
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image
        with Image.open(image) as img:
            return img.convert("RGB")
    return image


def _needs_filter(params) -> bool:
    return any(p.temperature > 0 and (p.top_p < 1.0 or p.top_k > 0) for p in params)


# --- construction from files -------------------------------------------------------------------------
def from_checkpoint(path: str | os.PathLike, cfg: ml_collections.ConfigDict | None = None,
                    **load_kw: Any) -> tuple[JaxEngine, Any]:
    """``(engine, tokenizer)`` for a checkpoint or HF directory (what eval's agent source expects)."""
    from genevolve_jax.models.loading import load_model, load_tokenizer
    tokenizer = load_tokenizer(path)
    return JaxEngine(load_model(path, **load_kw), tokenizer, cfg), tokenizer


__all__ = ["JaxEngine", "default_engine_config", "validate", "from_checkpoint"]
