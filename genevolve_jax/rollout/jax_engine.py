"""JaxEngine: in-process sampling with a KV cache, prefix reuse and continuous batching.

A fixed number of batch *slots* share one preallocated, *ragged* KV cache ([slots, S] per layer,
each row with its own write position): a row holds one conversation from slot 0 on. A worker thread
runs the schedule; callers (``generate``, the agent loop, the HTTP server's handlers) only queue
requests and wait for their futures, so requests from several callers share the device:

- placement (genevolve_jax/rollout/cache_rows.py): a finished request's row is *parked* with the
  tokens it holds. A new request that continues a parked conversation (an agent's next round, which
  resends the whole context) takes that row over and prefills only the appended tokens; one that
  shares a prefix with any row (the K rollouts of one prompt) copies that prefix into a free row;
  anything else is a fresh prefill. Parked rows are evicted least recently used first, and all of
  them are dropped when the weights change. ``engine.kv_reuse = False`` turns reuse off;
- admission: the placed requests of one wave are prefilled together where their padded lengths
  agree (right-padded to a power of two, in calls of a fixed row count per length,
  ``engine.prefill_tokens // length``, so that a new mix of requests compiles nothing new; images
  go one request per call, through the vision tower). A text suffix longer than
  ``engine.prefill_tokens`` is prefilled in chunks of that size (a power of two) into its row
  first, so that no call holds the attention scores of a whole long prompt (a suffix carrying
  images goes whole: its images are encoded in one call). A prefill reads its rows' reused
  prefixes and writes the new tokens over a window of the cache just long enough for them; its
  first token is sampled from the prefill logits. Admission happens between decode chunks, so new
  requests enter while others are mid-generation;
- decode: ``steps_per_sync`` decode steps run in one jitted scan over all slots (rows without a
  request are masked and do not advance), attending over the window of the cache in use (a power
  of two ≥ every live row's length plus a chunk), not the whole capacity. Tokens come back to the
  host once per chunk, where stop token ids, stop strings, ``max_new_tokens`` and cancellations
  are checked, and a finished slot is released (tokens it sampled after finishing in the same
  chunk are discarded: the row's host record says which tokens it really holds).

The device functions (prefill, decode chunk) and their layouts live in
genevolve_jax/rollout/engine_functions.py, where ``genevolve plan --phase engine`` compiles them
too: ``jax.jit`` with explicit shardings from the "sample" rules of genevolve_jax/sharding/logical.py
(weights tensor-parallel only, slots split over ``data``), under ``logical.use_rules``. Prefer
tensor parallelism: over ``data`` the ragged per-row cache writes reshard the whole cache
(BENCHMARKS.md, "Plans").

Log-probs: see genevolve_jax/rollout/sampling.py. By default the recorded log-prob is that of
``log_softmax(logits / temperature)`` (what the trainer recomputes for the importance ratio);
``cfg.raw_logprobs = True`` records temperature-1 log-probs instead. The weights are held in the
trainer's compute dtype and the head accumulates in float32 like the trainer's fused op: in fp32
the recorded log-probs are the trainer's to 1e-5, in bf16 a mean 8.3e-4 from them on the CPU
(ops/precision.py; tests/rollout/test_engine_bf16_logprobs.py). Reuse changes only where a token's
keys/values were computed (tests/rollout/test_jax_engine_reuse.py).
A request whose prompt plus ``max_new_tokens`` exceeds ``cfg.max_seq_len`` generates up to the
limit and finishes with "length"; a prompt that alone fills it is aborted with the reason.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import os
import queue
import threading
import traceback
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from genevolve_jax.models.qwen3_vl.layer_layout import convert_params, with_layer_layout
from genevolve_jax.models.qwen3_vl.model import prepare_inputs
from genevolve_jax.rollout import config as engine_config
from genevolve_jax.rollout.cache_rows import (DEFER, Placement, RowPool, check_request, image_key, image_runs,
                                              next_position)
from genevolve_jax.rollout.engine import GenerationRequest, GenerationResult, RolloutEngine, image_size
from genevolve_jax.rollout.engine_functions import EngineFunctions, engine_mesh, sampling_mode
from genevolve_jax.rollout.engine_functions import bucket as bucket_of

COUNTERS = ("requests", "prefill_batches", "prefill_tokens", "reused_tokens", "decode_tokens", "decode_chunks",
            "evictions", "max_live")


@dataclasses.dataclass
class _Job:
    request: GenerationRequest
    future: cf.Future
    seed: int
    state: str = "queued"  # queued → live → done; "cancelled" marks a cancel not yet applied
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    max_new: int = 0
    pending: int = 0  # last sampled token, not yet in the cache


@dataclasses.dataclass
class _Prefill:
    """One placed request: the part of its prompt to prefill and where it goes."""
    job: _Job
    place: Placement
    suffix: np.ndarray        # prompt[reuse:]
    images: list              # the request's images among the suffix's placeholders
    offset: int               # rope position of the first suffix token
    bucket: int               # padded suffix length
    reused: int = 0           # prompt tokens whose keys/values came from the pool
    lead: np.ndarray | None = None   # text prefilled before the suffix, in chunks (long prompts)
    lead_place: Placement | None = None
    lead_offset: int = 0


class JaxEngine(RolloutEngine):
    """``RolloutEngine`` over a Flax Qwen3-VL model; see the module docstring."""

    def __init__(self, model: nnx.Module, tokenizer=None, cfg: ml_collections.ConfigDict | None = None, *,
                 mesh: jax.sharding.Mesh | None = None, image_processor=None, weight_dtype=None):
        """``weight_dtype``: the dtype the engine holds its weights in; a trainer passes its compute
        dtype (``train.compute_dtype``), so the engine samples with the weights its forward uses.
        None: the model's compute dtype (``model.dtype``). See EngineFunctions."""
        self.cfg = engine_config.validate(cfg if cfg is not None else engine_config.default_engine_config())
        # Decode keeps one KV cache per layer: a trainer's stacked (scanned) layers become a list.
        model = with_layer_layout(model, scan_layers=False)
        self.config = model.config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        if mesh is None:  # an engine is host-local: its mesh is this host's devices
            mesh = engine_mesh(self.cfg, jax.local_devices())
        self.mesh = mesh
        self.slots = self.cfg.max_slots
        self.chunk = self.cfg.steps_per_sync
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        self.fns = EngineFunctions(graphdef, self.config, params, self.cfg, mesh, weight_dtype)
        with self._rules():
            self._params = jax.device_put(self.fns.held(params), self.fns.param_shardings)
            self._rest = jax.device_put(rest, self.fns.replicated)
        self._head = self.fns.decode_head(self._params, self._rest)
        # Shapes and dtypes of the weights, for update_weights after release_weights dropped them.
        self._layout = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self._params)
        self._version = 0         # bumped by every weight update; parked rows of older ones are stale
        self._reset_cache()
        self._rng = np.random.default_rng(self.cfg.seed)
        self._queue: queue.Queue[list[_Job] | None] = queue.Queue()
        self._pending: collections.deque[_Job] = collections.deque()  # taken from the queue, not placed
        self._active: list[_Job | None] = [None] * self.slots
        self._device_lock = threading.Lock()
        self._jobs_lock = threading.Lock()  # request states and the request-id index
        self._by_id: dict[str, _Job] = {}
        self._closed = False
        self._worker: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._queued = 0          # submitted requests still in state "queued"
        self.weight_version = 0   # the trainer step of the weights in use (update_weights)

    def _rules(self):
        return self.fns.rules()

    def _reset_cache(self) -> None:
        self._cache = self.fns.new_cache()
        self.pool = RowPool(self.slots, self.config.image_token_id, reuse=self.cfg.kv_reuse, version=self._version)

    # -- public API --------------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return [f.result() for f in self.submit_many(requests)]

    def submit(self, request: GenerationRequest) -> cf.Future:
        """Queue one request; the future resolves to its GenerationResult (never raises)."""
        return self.submit_many([request])[0]

    def submit_many(self, requests: Sequence[GenerationRequest]) -> list[cf.Future]:
        """Queue requests together: the worker sees them at once, so they are placed in one wave
        and their prefills batched (one by one, the first could start decoding alone)."""
        futures = [cf.Future() for _ in requests]
        if self._closed:
            for f in futures:
                f.set_result(GenerationResult([], [], "abort", error="engine is closed"))
            return futures
        jobs = []
        for request, future in zip(requests, futures):
            s = request.sampling
            seed = int(s.seed) & 0xFFFFFFFF if s.seed is not None else int(self._rng.integers(0, 2**32))
            jobs.append(_Job(request, future, seed))
        with self._jobs_lock:
            self._queued += len(jobs)
            for job in jobs:
                if job.request.request_id:
                    self._by_id[job.request.request_id] = job
        self._queue.put(jobs)
        self._ensure_worker()
        return futures

    def cancel(self, request_id: str) -> bool:
        """Abort the queued or running request with this ``request_id``: its future resolves to an
        "abort" result with error "cancelled" (a running one at the next host check, between decode
        chunks, which frees its slot). False when no such request is queued or running."""
        if not request_id:
            return False
        with self._jobs_lock:
            job = self._by_id.get(request_id)
            if job is None or job.state not in ("queued", "live"):
                return False
            was_queued = job.state == "queued"
            self._set_state(job, "cancelled")
        if was_queued:
            self._resolve(job, GenerationResult([], [], "abort", error="cancelled"))
        return True

    @property
    def num_live(self) -> int:
        """Requests decoding in a slot now."""
        return sum(j is not None for j in self._active)

    @property
    def num_queued(self) -> int:
        """Requests submitted and not yet in a slot (cancelled ones excluded)."""
        return self._queued

    def _set_state(self, job: _Job, state: str) -> None:
        """Move a request to ``state``; the caller holds ``_jobs_lock``."""
        self._queued += (state == "queued") - (job.state == "queued")
        job.state = state

    @property
    def stats(self) -> dict[str, int]:
        """Counters since construction: ``requests`` placed, ``prefill_batches`` (device calls),
        ``prefill_tokens`` (prompt tokens run through the model), ``reused_tokens`` (prompt tokens
        whose keys/values came from a cached row), ``decode_tokens`` (tokens sampled by decode
        steps), ``decode_chunks``, ``evictions`` (parked conversations dropped for room),
        ``max_live``; and the current ``live``, ``parked`` and ``queued`` counts."""
        out = dict(self._counters)
        out.update(live=self.num_live, parked=self.pool.num_parked, queued=self.num_queued)
        return out

    @property
    def params(self):
        """The weights in use (an ``nnx.State`` in the sampling layout); read-only by convention."""
        return self._params

    def num_image_tokens(self, image) -> int:
        """Image-pad tokens for one image under this engine's image processor (merge 2×2 per token)."""
        t, h, w = self._image_grid(image)
        return t * h * w // self.config.vision.spatial_merge_size ** 2

    def image_inputs(self, images: Sequence):
        """The pixel values and grids (``processing.image.ProcessedImages``) that a prefill feeds the
        vision tower for a request's ``images`` (paths or PIL images): each decoded by
        ``processing.image.load_image``, the trainer's decoder, then this engine's image processor."""
        from genevolve_jax.processing.image import load_image, preprocess_images
        return preprocess_images([load_image(x) for x in images], self.image_processor)

    def _image_grid(self, image) -> tuple[int, int, int]:
        from genevolve_jax.processing.image import image_grid
        width, height = image_size(image)
        return image_grid(height, width, self.image_processor)

    @property
    def weight_shardings(self):
        """The sampling layout of the weights (tensor-parallel over ``engine.mesh``)."""
        return self.fns.param_shardings

    @property
    def weight_dtype(self):
        return self.fns.weight_dtype

    def update_weights(self, params, step: int = 0) -> dict[str, float]:
        """Replace the weights with ``params`` (an ``nnx.State`` of the model's ``nnx.Param``s, e.g. the
        trainer's, in any sharding, its decoder layers stacked or as a list); they are resharded in
        memory to the sampling layout. Parked conversations are dropped (their keys/values belong to
        the old weights); requests in flight continue on the new weights with their existing cache
        and are not parked when they end (call between rollout phases). ``step`` is recorded as
        :attr:`weight_version`."""
        params = convert_params(params, self._layout)
        want = jax.tree.structure(self._layout)
        got = jax.tree.structure(params)
        if want != got:
            raise ValueError(f"update_weights: parameter tree differs from the engine's model ({got} vs {want})")
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(self._layout), jax.tree.leaves(params)):
            if tuple(a.shape) != tuple(b.shape):
                raise ValueError(f"update_weights: {jax.tree_util.keystr(path)} has shape {tuple(b.shape)}, "
                                 f"the engine's model has {tuple(a.shape)}")
        new = self.fns.held(params)
        with self._device_lock, self._rules():
            self._params = None   # the old weights go before the head is computed from the new
            self._params = jax.device_put(new, self.fns.param_shardings)
            self._head = self.fns.decode_head(self._params, self._rest)
            # Waited for here, so that the trainer's time/weight_sync_s holds the reshard rather
            # than the next rollout's first call (JAX dispatches asynchronously).
            jax.block_until_ready((self._params, self._head))
            self._version += 1
            self.pool.new_version(self._version)
        self.weight_version = int(step)
        return {}

    def release_weights(self) -> None:
        """Drop the weights (and the decode head made from them) until :meth:`update_weights`: a
        trainer's sync then holds one copy of the engine's weights, not two. Call between rollout
        phases; nothing samples meanwhile."""
        with self._device_lock:
            self._params = self._head = None

    def flush_cache(self) -> None:
        """Drop every parked conversation (the next requests prefill from scratch)."""
        with self._device_lock:
            self.pool.drop_parked()

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

    def _take_queued(self, block: bool) -> bool:
        """Move submitted requests to the pending list; False once the engine is closing."""
        try:
            item = self._queue.get(block=block)
            while True:
                if item is None:
                    return False
                self._pending.extend(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            return True

    def _run(self) -> None:
        while True:
            idle = not self._pending and self.num_live == 0
            if not self._take_queued(block=idle):
                self._abort_all("engine closed")
                return
            try:
                with self._device_lock:
                    self._apply_cancels()
                    self._admit_pending()
                    if self.num_live:
                        self._step()
            except Exception as exc:  # a device failure aborts the live requests, not the engine
                why = f"engine error: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
                for i, job in enumerate(self._active):
                    if job is not None:
                        self._finish(i, "abort", why)
                self._reset_cache()

    def _abort_all(self, why: str) -> None:
        for i, job in enumerate(self._active):
            if job is not None:
                self._finish(i, "abort", why)
        self._take_queued(block=False)
        while self._pending:
            self._resolve(self._pending.popleft(), GenerationResult([], [], "abort", error=why))

    def _resolve(self, job: _Job, result: GenerationResult) -> None:
        with self._jobs_lock:
            self._set_state(job, "done")
            if self._by_id.get(job.request.request_id) is job:
                del self._by_id[job.request.request_id]
        try:  # a caller may have cancelled the future itself; the engine goes on regardless
            job.future.set_result(result)
        except cf.InvalidStateError:
            pass

    def _apply_cancels(self) -> None:
        for slot, job in enumerate(self._active):
            if job is not None and job.state == "cancelled":
                self._finish(slot, "abort", "cancelled")

    # -- admission ------------------------------------------------------------------------------------
    def _plan(self, job: _Job) -> _Prefill | str | None:
        """Place one request (a _Prefill, DEFER, or None when no row is free); bad requests abort."""
        req = job.request
        try:
            prompt, grids = check_request(req, self.config, self.cfg.max_seq_len, self._image_grid)
            keys = [image_key(x) for x in req.images]
        except Exception as exc:  # bad prompt or image: this request only
            self._resolve(job, GenerationResult([], [], "abort", error=f"bad request: {exc}"))
            return "rejected"
        place = self.pool.place(prompt, keys)
        if place is None or place == DEFER:
            return place
        m = place.reuse
        k = len(image_runs(prompt[:m], self.config.image_token_id))
        offset = next_position(prompt[:m], grids[:k], self.config)
        images = list(req.images[k:])
        # A long text suffix goes in chunks of fns.prefill_chunk tokens (a text token advances the
        # rope position by one); the last chunk, like a short suffix, samples the first token.
        chunk = self.fns.prefill_chunk
        lead = 0 if images else max(0, (len(prompt) - m - 1) // chunk) * chunk
        lo = self.cfg.min_append_bucket if m + lead else self.cfg.min_prefill_bucket
        bucket = bucket_of(len(prompt) - m - lead, lo, self.cfg.max_seq_len)
        tail = dataclasses.replace(place, reuse=m + lead, source=place.slot if lead else place.source)
        return _Prefill(job, tail, prompt[m + lead:], images, offset + lead, bucket, reused=m,
                        lead=prompt[m:m + lead], lead_place=place, lead_offset=offset)

    def _admit_pending(self) -> None:
        while self._pending and self.pool.has_room():
            self.pool.begin_wave()
            wave, later = [], collections.deque()
            while self._pending:
                job = self._pending.popleft()
                with self._jobs_lock:
                    if job.state != "queued":
                        continue  # cancelled while queued (already resolved)
                plan = self._plan(job)
                if plan is None:  # no free row: it and everything after it wait
                    later.append(job)
                    later.extend(self._pending)
                    self._pending.clear()
                elif plan == DEFER:
                    later.append(job)
                elif plan != "rejected":
                    wave.append(plan)
            self._pending = later
            if not wave:
                return
            self._run_wave(wave)

    def _prefill_leads(self, wave: list[_Prefill]) -> list[_Prefill]:
        """Run the leading chunks of long prompts (one chunk per call, into the request's own row);
        returns the plans whose rows are ready for their last part."""
        ready = []
        chunk = self.fns.prefill_chunk
        for p in wave:
            n = 0 if p.lead is None else len(p.lead)
            ok = True
            for lo in range(0, n, chunk):
                place = p.lead_place if lo == 0 else dataclasses.replace(
                    p.lead_place, reuse=p.lead_place.reuse + lo, source=p.lead_place.slot)
                part = _Prefill(p.job, place, p.lead[lo:lo + chunk], [], p.lead_offset + lo, chunk)
                if self._prefill_call([part], chunk) is None:
                    ok = False
                    break
            if ok:
                ready.append(p)
        return ready

    def _run_wave(self, wave: list[_Prefill]) -> None:
        try:
            wave = self._prefill_leads(wave)
        except Exception:  # the wave's requests were taken off the queue: none may be left waiting
            for p in wave:
                if not p.job.future.done():
                    self._resolve(p.job, GenerationResult([], [], "abort", error="an earlier prefill failed"))
            raise
        groups: dict[tuple, list[_Prefill]] = collections.defaultdict(list)
        for p in wave:
            groups[(p.bucket, bool(p.images), id(p) if p.images else 0)].append(p)
        calls = []
        for (bucket, images, _), plans in groups.items():
            per_call = 1 if images else self.fns.prefill_rows(bucket)
            calls += [(plans[i:i + per_call], bucket) for i in range(0, len(plans), per_call)]
        for i, (plans, bucket) in enumerate(calls):
            try:
                self._prefill_batch(plans, bucket)
            except Exception:  # the wave's later requests were taken off the queue: abort them too
                for later, _ in calls[i + 1:]:
                    for p in later:
                        self._resolve(p.job, GenerationResult([], [], "abort", error="an earlier prefill failed"))
                raise

    def _prefill_call(self, plans: list[_Prefill], bucket: int):
        """One prefill call over ``plans`` (padded to ``bucket`` tokens): (tokens, log-probs) of the
        rows, or None when their inputs were bad (those requests are aborted here). A device error
        aborts them and propagates."""
        rows = 1 if plans[0].images else self.fns.prefill_rows(bucket)
        ids = np.zeros((rows, bucket), np.int32)
        mask = np.zeros((rows, bucket), np.int32)
        mask[len(plans):, 0] = 1  # padding rows hold one token so that every row has positions
        h = self.fns.prefill_host_arrays(rows)
        for r, p in enumerate(plans):
            n = len(p.suffix)
            ids[r, :n], mask[r, :n] = p.suffix, 1
            h["src"][r] = p.place.source if p.place.reuse else p.place.slot
            h["dst"][r], h["start"][r], h["offset"][r] = p.place.slot, p.place.reuse, p.offset
            s = p.job.request.sampling
            h["temp"][r], h["top_p"][r], h["top_k"][r], h["seed"][r] = s.temperature, s.top_p, s.top_k, p.job.seed
        window = self.fns.prefill_window(int(max(h["start"] + bucket)))
        try:
            vision = {}
            if plans[0].images:
                processed = self.image_inputs(plans[0].images)
                vision = dict(pixel_values=processed.pixel_values, image_grid_thw=processed.image_grid_thw)
            batch = prepare_inputs(self.config, ids, mask, **vision)
        except Exception as exc:  # an image that fails to load or process: these requests only
            for p in plans:
                self.pool.finish(p.place.slot, None)
                self._resolve(p.job, GenerationResult([], [], "abort", error=f"bad request: {exc}"))
            return None
        mode = sampling_mode([p.job.request.sampling for p in plans])
        try:
            with self._rules():
                tokens, lps, self._cache = self.fns.prefill(
                    self._params, self._rest, batch, self._cache, h["src"], h["dst"], h["start"], h["offset"],
                    (h["temp"], h["top_p"], h["top_k"], h["seed"]), mode, window)
        except Exception as exc:
            for p in plans:
                self.pool.finish(p.place.slot, None)
                self._resolve(p.job, GenerationResult([], [], "abort", error=f"prefill failed: "
                                                                            f"{type(exc).__name__}: {exc}"))
            raise
        self._counters["prefill_batches"] += 1
        return np.asarray(tokens), np.asarray(lps)

    def _prefill_batch(self, plans: list[_Prefill], bucket: int) -> None:
        out = self._prefill_call(plans, bucket)
        if out is None:
            return
        tokens, lps = out
        c = self._counters
        for r, p in enumerate(plans):
            job, slot, n = p.job, p.place.slot, len(p.job.request.prompt_ids)
            job.max_new = min(job.request.sampling.max_new_tokens, self.cfg.max_seq_len - n)
            self.pool.mark_prefilled(slot, n)
            c["requests"] += 1
            c["prefill_tokens"] += n - p.reused
            c["reused_tokens"] += p.reused
            c["evictions"] += int((p.lead_place or p.place).evicted)
            with self._jobs_lock:
                cancelled = job.state == "cancelled"
                if not cancelled:
                    self._set_state(job, "live")
            self._active[slot] = job
            if cancelled:
                self._finish(slot, "abort", "cancelled")
            else:
                self._accept(slot, int(tokens[r]), float(lps[r]))
        c["max_live"] = max(c["max_live"], self.num_live)

    # -- decoding -------------------------------------------------------------------------------------
    def _step(self) -> None:
        jobs = [(i, j) for i, j in enumerate(self._active) if j is not None]
        h = self.fns.decode_host_arrays()
        for i, j in jobs:
            s = j.request.sampling
            h["live"][i] = True
            h["tokens"][i], h["temp"][i], h["top_p"][i], h["top_k"][i] = j.pending, s.temperature, s.top_p, s.top_k
            h["seeds"][i], h["counters"][i] = j.seed, len(j.tokens)
        window = self.fns.decode_window(max(self.pool.device_length(i) for i, _ in jobs))
        with self._rules():
            toks, lps, self._cache = self.fns.decode_chunk(
                self._params, self._rest, self._head, h["tokens"], self._cache, h["live"], h["temp"], h["top_p"],
                h["top_k"], h["seeds"], h["counters"], sampling_mode([j.request.sampling for _, j in jobs]), window)
        self._counters["decode_chunks"] += 1
        toks, lps = np.asarray(toks), np.asarray(lps)
        for i, _ in jobs:
            self.pool.mark_decoded(i, self.chunk)
            for step in range(self.chunk):
                if self._active[i] is None:
                    break
                self._counters["decode_tokens"] += 1
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
        elif job.state == "cancelled":
            self._finish(slot, "abort", "cancelled")
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
            self.pool.finish(slot, None)
            result = GenerationResult([], [], "abort", error=error)
        else:
            # The row holds the prompt and every sampled token but the last (never fed back).
            self.pool.finish(slot, job.tokens[:-1])
            result = GenerationResult(list(job.tokens), list(job.logprobs), reason)
        self._resolve(job, result)


# --- construction from files -------------------------------------------------------------------------
def from_checkpoint(path: str | os.PathLike, cfg: ml_collections.ConfigDict | None = None,
                    **load_kw: Any) -> tuple[JaxEngine, Any]:
    """``(engine, tokenizer)`` for a checkpoint or HF directory (what eval's agent source expects)."""
    from genevolve_jax.models.loading import load_model, load_tokenizer
    tokenizer = load_tokenizer(path)
    return JaxEngine(load_model(path, **load_kw), tokenizer, cfg), tokenizer


__all__ = ["JaxEngine", "from_checkpoint"]
