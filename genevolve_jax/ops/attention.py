"""Segment-aware dot-product attention (the XLA path).

One function serves the text decoder (causal, padding, KV cache), packed training sequences
(segment ids) and the vision tower (bidirectional, segmented per image/frame). Behind the same
signature, :func:`attention` dispatches to cuDNN flash attention on GPU
(``jax.nn.dot_product_attention(implementation="cudnn")``), to splash attention on TPU (Pallas),
and to the XLA einsum path on CPU or whenever a fused kernel cannot take the inputs (fp32, a KV
cache, odd lengths). All paths honour causal, padding and segment masks; the choice is per call,
from the backend, or forced with :func:`use_implementation`.

Numerics follow transformers: scores and softmax in float32, probabilities cast back to the value
dtype before the weighted sum (a rounding that every program keeps: ops/precision.py).
Grouped-query attention is done by viewing the query heads as [kv_heads, group] instead of
repeating K/V, so no [B, S, H, hd] copy of the cache is made.

A query with no visible key (a padding row) gets a uniform distribution over masked keys instead
of NaN: masked scores are a large finite negative number. Its output is meaningless but finite,
so it cannot poison valid positions through 0 * NaN in later layers.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax
import jax.numpy as jnp

from genevolve_jax.ops.precision import narrow

# Large and finite: exp(mask - max) underflows to exactly 0 next to any real score, and a fully
# masked row stays finite (uniform) instead of NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(*, batch: int, q_len: int, kv_len: int, causal: bool,
                   q_positions: jax.Array | None = None, kv_valid_mask: jax.Array | None = None,
                   q_segment_ids: jax.Array | None = None,
                   kv_segment_ids: jax.Array | None = None) -> jax.Array | None:
    """The boolean [B, T, S] visibility mask the arguments of :func:`attention` describe.

    Returns None when nothing is masked (bidirectional, unsegmented, all keys valid).
    """
    mask = None

    def both(a, b):
        return b if a is None else a & b

    if causal:
        if q_positions is None:
            # Queries are the last q_len keys (a plain forward has q_len == kv_len).
            q_positions = jnp.arange(q_len, dtype=jnp.int32)[None, :] + (kv_len - q_len)
        q_positions = jnp.broadcast_to(jnp.asarray(q_positions, jnp.int32), (batch, q_len))
        kv_index = jnp.arange(kv_len, dtype=jnp.int32)
        mask = both(mask, kv_index[None, None, :] <= q_positions[:, :, None])
    if kv_valid_mask is not None:
        valid = jnp.broadcast_to(jnp.asarray(kv_valid_mask).astype(bool), (batch, kv_len))
        mask = both(mask, jnp.broadcast_to(valid[:, None, :], (batch, q_len, kv_len)))
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    if q_segment_ids is not None:
        qs = jnp.broadcast_to(jnp.asarray(q_segment_ids), (batch, q_len))
        ks = jnp.broadcast_to(jnp.asarray(kv_segment_ids), (batch, kv_len))
        mask = both(mask, qs[:, :, None] == ks[:, None, :])
    return mask


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
                  q_positions: jax.Array | None = None, kv_valid_mask: jax.Array | None = None,
                  q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
                  scale: float | None = None) -> jax.Array:
    """Multi-head dot-product attention with grouped K/V heads (the XLA path; the reference).

    Args:
      q: [B, T, H, hd] queries.
      k, v: [B, S, KV, hd] keys and values; H must be a multiple of KV (query head h reads KV head
        h // (H // KV), the transformers ``repeat_kv`` convention).
      causal: mask keys that come after the query. Key j sits at index j of the S axis (a cache
        slot, or a token of a packed row).
      q_positions: [B, T] (or [T]) index of each query on the key axis, for the causal mask.
        Default: the queries are the last T keys (T == S for a plain forward). For a KV cache,
        pass the slots the new tokens were written to.
      kv_valid_mask: [B, S] bool/int, False for padding or empty cache slots.
      q_segment_ids, kv_segment_ids: [B, T] / [B, S] ints; a query sees only keys of its own
        segment (packed sequences; images/frames in the vision tower).
      scale: score scale, default hd ** -0.5.
    Returns:
      [B, T, H, hd] in q's dtype.
    """
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"attention expects q [B,T,H,hd] and k, v [B,S,KV,hd]; got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    if h % kv:
        raise ValueError(f"query heads {h} are not a multiple of key/value heads {kv}")
    block = causal_block(t) if causal and q_positions is None and t == s else 0
    if block:
        return _causal_blocks(q, k, v, block, kv_valid_mask=kv_valid_mask, q_segment_ids=q_segment_ids,
                              kv_segment_ids=kv_segment_ids, scale=scale)
    group = h // kv
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, t, kv, group, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(q.dtype),
                        preferred_element_type=jnp.float32) * jnp.float32(scale)
    mask = attention_mask(batch=b, q_len=t, kv_len=s, causal=causal, q_positions=q_positions,
                          kv_valid_mask=kv_valid_mask, q_segment_ids=q_segment_ids,
                          kv_segment_ids=kv_segment_ids)
    if mask is not None:
        scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
    probs = narrow(jax.nn.softmax(scores, axis=-1), v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=v.dtype)
    return out.reshape(b, t, h, d).astype(q.dtype)


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, *, q_positions: jax.Array,
                     kv_valid_mask: jax.Array, scale: float | None = None) -> jax.Array:
    """New queries against a KV cache held heads-first (the XLA path, on every backend).

    q: [B, T, H, hd]; k_cache, v_cache: [B, KV, S, hd]; q_positions: [B, T] (or [1, T]) cache slot
    of each query (causal over slots); kv_valid_mask: [B, S]. Returns [B, T, H, hd], the numbers
    of :func:`xla_attention` on the keys/values transposed to [B, S, KV, hd].

    Why heads-first: both products then batch over (B, KV) with the cache's last two axes as a
    matmul reads them, so the attended window is read where it lies. Measured on the 2-core CPU
    at the issue-16 mid shape (B8, 337 slots, 8 layers): with the cache held [B, S, KV, hd], XLA
    copied every layer's window into matmul order on every decode step, 5.9 of 25.3 ms per step.
    (Keys held [B, KV, hd, S] were no faster in the engine, and on TPU the compiler then copied
    the whole cache in every call: 44.6 GiB of temporaries in tpu_pod's engine plan.)
    """
    b, t, h, d = q.shape
    kv, s = k_cache.shape[1], k_cache.shape[2]
    if k_cache.ndim != 4 or v_cache.shape != k_cache.shape or k_cache.shape[0] != b or k_cache.shape[3] != d \
            or h % kv:
        raise ValueError(f"cached_attention expects q [B,T,H,hd] and k, v [B,KV,S,hd] with H a multiple of KV; "
                         f"got {q.shape}, {k_cache.shape}, {v_cache.shape}")
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k_cache.astype(q.dtype),
                        preferred_element_type=jnp.float32) * jnp.float32(scale)
    mask = attention_mask(batch=b, q_len=t, kv_len=s, causal=True, q_positions=q_positions,
                          kv_valid_mask=kv_valid_mask)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
    probs = narrow(jax.nn.softmax(scores, axis=-1), v_cache.dtype)
    # [B, KV, G, T, S] · [B, KV, S, hd] into [B, KV, G, T, hd], reordered after (it is small):
    # written straight into [B, T, KV, G, hd], XLA:CPU took a transposed matmul 5× slower.
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v_cache, preferred_element_type=v_cache.dtype)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


# Causal self-attention over a long row goes in query blocks, each against the keys up to its end:
# the [T, T] scores are never materialised and the blocks above the diagonal are never computed.
# Measured on the 2-core CPU (8 rows × 1024 tokens, 8 heads of 16, segments, forward + backward):
# 1.47 s whole, 0.37 s in blocks of 128, 0.50 s in blocks of 256. At most 16 blocks (unrolled).
_MIN_CAUSAL_BLOCK = 128
_MAX_CAUSAL_BLOCKS = 16


def causal_block(t: int) -> int:
    """The query block of causal self-attention over ``t`` tokens; 0 when it goes whole (short,
    or no block size of at most 16 blocks divides it)."""
    if t < 2 * _MIN_CAUSAL_BLOCK:
        return 0
    block = max(_MIN_CAUSAL_BLOCK, -(-t // _MAX_CAUSAL_BLOCKS))
    block = -(-block // _MIN_CAUSAL_BLOCK) * _MIN_CAUSAL_BLOCK
    return block if t % block == 0 and t // block > 1 else 0


def _causal_blocks(q, k, v, block, *, kv_valid_mask, q_segment_ids, kv_segment_ids, scale):
    """:func:`xla_attention` (causal, T == S) one query block at a time. Every unmasked key of a
    query is in its block's key range, so outputs equal the whole computation to float rounding;
    a fully masked (padding) query averages over its block's keys instead of all of them."""
    b, t = q.shape[:2]

    def cut(x, lo, hi):
        return None if x is None else jnp.broadcast_to(jnp.asarray(x), (b, t))[:, lo:hi]

    outs = []
    for lo in range(0, t, block):
        hi = lo + block
        outs.append(xla_attention(q[:, lo:hi], k[:, :hi], v[:, :hi], causal=True,
                                  q_positions=jnp.arange(lo, hi, dtype=jnp.int32),
                                  kv_valid_mask=cut(kv_valid_mask, 0, hi), q_segment_ids=cut(q_segment_ids, lo, hi),
                                  kv_segment_ids=cut(kv_segment_ids, 0, hi), scale=scale))
    return jnp.concatenate(outs, axis=1)


# --- dispatch -------------------------------------------------------------------------------------
IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
_FORCED: contextvars.ContextVar[str] = contextvars.ContextVar("genevolve_attention_impl", default="auto")
_SPLASH_BLOCK = 128  # splash tiles the sequence in blocks of this many tokens


@contextlib.contextmanager
def use_implementation(name: str) -> Iterator[None]:
    """Force an attention implementation while tracing ("auto" picks by backend)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {name!r}")
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


_TARGET_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar("genevolve_attention_target", default=None)


@contextlib.contextmanager
def compile_for(backend: str) -> Iterator[None]:
    """Trace for ``backend`` ("cpu", "gpu", "tpu") instead of the process's default backend: a
    deviceless compile (``genevolve plan``) on a CPU host must pick the target's kernels."""
    token = _TARGET_BACKEND.set(backend)
    try:
        yield
    finally:
        _TARGET_BACKEND.reset(token)


def target_backend() -> str:
    return _TARGET_BACKEND.get() or jax.default_backend()


def choose_implementation(q: jax.Array, k: jax.Array, *, q_positions=None, backend: str | None = None) -> str:
    """The implementation ``attention`` uses for these inputs.

    A forced choice that cannot take the inputs raises instead of silently falling back."""
    forced = _FORCED.get()
    backend = backend or target_backend()
    t, s, d = q.shape[1], k.shape[1], q.shape[-1]
    half = q.dtype in (jnp.bfloat16, jnp.float16)
    cudnn_ok = half and q_positions is None and d % 8 == 0 and d <= 256 and t == s
    splash_ok = q_positions is None and t == s and t % _SPLASH_BLOCK == 0
    if forced == "xla":
        return "xla"
    if forced == "cudnn":
        if not cudnn_ok:
            raise ValueError("cuDNN attention needs bf16/fp16 inputs, head_dim a multiple of 8 (<= 256), "
                             f"no KV cache and q_len == kv_len; got {q.dtype}, head_dim {d}, lengths {t}/{s}")
        return "cudnn"
    if forced == "splash":
        if not splash_ok:
            raise ValueError(f"splash attention needs q_len == kv_len, a multiple of {_SPLASH_BLOCK}, and no "
                             f"KV cache; got lengths {t}/{s}")
        return "splash"
    if backend == "gpu" and cudnn_ok:
        return "cudnn"
    if backend == "tpu" and splash_ok:
        return "splash"
    return "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
              q_positions: jax.Array | None = None, kv_valid_mask: jax.Array | None = None,
              q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
              scale: float | None = None) -> jax.Array:
    """Multi-head dot-product attention with grouped K/V heads, on the fastest path available.

    Arguments and result as :func:`xla_attention`, whose numerics every path matches.
    """
    impl = choose_implementation(q, k, q_positions=q_positions)
    kw = dict(causal=causal, q_positions=q_positions, kv_valid_mask=kv_valid_mask,
              q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, scale=scale)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, **kw)
    if impl == "splash":
        return splash_attention(q, k, v, **kw)
    return xla_attention(q, k, v, **kw)


def cudnn_attention(q, k, v, *, causal, q_positions=None, kv_valid_mask=None, q_segment_ids=None,
                    kv_segment_ids=None, scale=None):
    """cuDNN fused (flash) attention. GQA is native (H a multiple of KV). Causal-only inputs use
    cuDNN's own causal mask; padding and segments go in as a boolean mask, which cuDNN applies
    as a bias tile by tile (the mask itself is [B, 1, T, S] booleans)."""
    del q_positions  # cuDNN is only chosen without a KV cache
    b, t, _, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    mask = attention_mask(batch=b, q_len=t, kv_len=k.shape[1], causal=False, kv_valid_mask=kv_valid_mask,
                          q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    if mask is not None:
        # A padding query with no visible key would be a fully masked row: let it see itself
        # (its output is discarded), keeping the softmax finite like the XLA path.
        mask = mask | jnp.eye(t, dtype=bool)[None]
        mask = mask[:, None]
    out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, scale=scale,
                                       is_causal=causal, implementation="cudnn")
    return out.astype(q.dtype)


def _splash_segments(b, t, kv_valid_mask, q_segment_ids, kv_segment_ids):
    """Fold padding into segment ids: an invalid position gets id −1 on both sides, so padding
    sees only padding (never valid tokens) and no row is fully masked."""
    qs = jnp.zeros((b, t), jnp.int32) if q_segment_ids is None else jnp.broadcast_to(
        jnp.asarray(q_segment_ids, jnp.int32), (b, t))
    ks = jnp.zeros((b, t), jnp.int32) if kv_segment_ids is None else jnp.broadcast_to(
        jnp.asarray(kv_segment_ids, jnp.int32), (b, t))
    if kv_valid_mask is not None:
        valid = jnp.broadcast_to(jnp.asarray(kv_valid_mask).astype(bool), (b, t))
        qs, ks = jnp.where(valid, qs, -1), jnp.where(valid, ks, -1)
    return qs, ks


def _splash_kernel(group: int, t: int, causal: bool, interpret: bool):
    """The splash kernel of one call. Built anew in every trace, never cached across calls: the
    kernel holds its mask's block tables as arrays, which inside a jit trace are that trace's
    values, so a kernel kept from the train step's trace would fail the next jit of the same shape
    (the reference or π_old forward) with an UnexpectedTracerError. Building them eagerly instead
    (``ensure_compile_time_eval``) fails a deviceless TPU compile, which has no device to put them
    on. The costly part, the numpy block tables of the mask, is cached by jax's own mask processing."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    one = sm.CausalMask((t, t)) if causal else sm.FullMask((t, t))
    block = min(512, t) if t % 512 == 0 else _SPLASH_BLOCK
    sizes = sk.BlockSizes(block_q=block, block_kv_compute=block, block_kv=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    # One kernel per KV head: its `group` query heads share that K/V (MQA form of GQA).
    return sk.make_splash_mqa_single_device(sm.MultiHeadMask([one] * group), block_sizes=sizes,
                                            interpret=interpret)


def splash_attention(q, k, v, *, causal, q_positions=None, kv_valid_mask=None, q_segment_ids=None,
                     kv_segment_ids=None, scale=None, interpret: bool | None = None):
    """Splash (Pallas TPU) attention with segment ids. ``interpret`` runs the kernel in the Pallas
    interpreter (any backend; for tests). Under an active mesh the kernel runs per shard through
    ``shard_map`` over the batch and kv-head axes (sequence must be whole per device)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    from genevolve_jax.sharding import logical

    del q_positions
    b, t, h, d = q.shape
    kvh = k.shape[2]
    group = h // kvh
    scale = d ** -0.5 if scale is None else scale
    interpret = target_backend() != "tpu" if interpret is None else interpret
    qs, ks = _splash_segments(b, t, kv_valid_mask, q_segment_ids, kv_segment_ids)

    def local(q, k, v, qs, ks):
        kernel = _splash_kernel(group, q.shape[1], causal, interpret)
        lb, lt, lh, _ = q.shape
        lkv = k.shape[2]
        qg = (q * jnp.asarray(scale, q.dtype)).reshape(lb, lt, lkv, group, d).transpose(0, 2, 3, 1, 4)
        kk, vv = k.astype(q.dtype).transpose(0, 2, 1, 3), v.astype(q.dtype).transpose(0, 2, 1, 3)

        def one(qh, kh, vh, qsr, ksr):  # [G, T, d], [T, d], [T, d]
            return kernel(qh, kh, vh, segment_ids=sk.SegmentIds(q=qsr, kv=ksr))

        per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))
        out = jax.vmap(per_head)(qg, kk, vv, qs, ks)  # [B, KV, G, T, d]
        return out.transpose(0, 3, 1, 2, 4).reshape(lb, lt, lh, d).astype(q.dtype)

    ctx = logical.active()
    if ctx is None:
        return local(q, k, v, qs, ks)
    from jax.sharding import PartitionSpec as P
    batch_axes = logical.partition_spec((logical.BATCH,), ctx.rules, ctx.mesh, (b,))[0]
    head_axes = logical.partition_spec((logical.KV_HEADS,), ctx.rules, ctx.mesh, (kvh,))[0]
    qkv_spec = P(batch_axes, None, head_axes, None)
    seg_spec = P(batch_axes, None)
    return jax.shard_map(local, mesh=ctx.mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec, seg_spec),
                         out_specs=qkv_spec, check_vma=False)(q, k, v, qs, ks)
