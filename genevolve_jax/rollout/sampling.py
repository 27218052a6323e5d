"""Token sampling for the JAX rollout engine: one jittable function over a batch of logits.

Each row carries its own temperature, top-p, top-k and random stream, so requests with different
sampling parameters share one decode batch. The random key of a row is
``fold_in(key(seed), counter)`` with the request's seed and the index of the token within the
request: a request samples the same tokens whichever slot it sits in and whatever else is batched
with it.

Which log-prob is recorded (the RL importance ratio depends on it): by default the log-prob of the
sampled token under ``log_softmax(logits / temperature)`` over the *whole* vocabulary, i.e. before
the top-k / top-p cut. That is the distribution the trainer recomputes (verl recomputes old
log-probs at the rollout temperature; our fused op takes the same temperature). With
``raw_logprobs`` the log-prob under ``log_softmax(logits)`` (temperature 1) is recorded instead.
Greedy rows (temperature 0) always record the temperature-1 log-prob.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def row_keys(seeds: jax.Array, counters: jax.Array) -> jax.Array:
    """[B] uint32 seeds and [B] int32 counters -> [B] typed PRNG keys."""
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)


def filter_logits(scaled: jax.Array, top_p: jax.Array, top_k: jax.Array) -> jax.Array:
    """Mask (−inf) everything outside each row's top-k, then outside the smallest set of the
    remaining tokens whose renormalised mass reaches top-p (the order SGLang and vLLM use).

    scaled [B, V] float32 (already divided by temperature); top_p [B] in (0, 1]; top_k [B] int,
    <= 0 for no cut. Ties at a threshold are kept.
    """
    vocab = scaled.shape[-1]
    desc = -jnp.sort(-scaled, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
    desc_k = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], desc, -jnp.inf)
    probs = jax.nn.softmax(desc_k, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly better tokens
    n_keep = jnp.maximum(jnp.sum((before < top_p[:, None]) & (jnp.arange(vocab)[None, :] < k[:, None]),
                                 axis=-1), 1)
    pth = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)
    threshold = jnp.maximum(kth, pth)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def sample_tokens(logits: jax.Array, temperature: jax.Array, top_p: jax.Array, top_k: jax.Array,
                  seeds: jax.Array, counters: jax.Array, *, raw_logprobs: bool = False,
                  use_filter: bool = True, greedy_only: bool = False) -> tuple[jax.Array, jax.Array]:
    """One token per row and its recorded log-prob (see the module docstring).

    logits [B, V] (any float dtype; computed in float32); temperature [B] (0 = greedy);
    top_p [B]; top_k [B] (<= 0: off); seeds [B] uint32; counters [B] int32.
    ``use_filter=False`` skips the sort when no row cuts (top_p == 1 and top_k off everywhere);
    ``greedy_only=True`` (every row at temperature 0) skips the random draw and the tempered
    log-softmax, which cost more than the rest of a small model's decode step on a CPU.
    Returns (tokens [B] int32, logprobs [B] float32).
    """
    logits = logits.astype(jnp.float32)
    if greedy_only:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return tokens, jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    greedy = temperature <= 0
    temp = jnp.where(greedy, 1.0, temperature).astype(jnp.float32)
    scaled = logits / temp[:, None]
    candidates = filter_logits(scaled, top_p.astype(jnp.float32), top_k) if use_filter else scaled
    keys = row_keys(seeds, counters)
    sampled = jax.vmap(jax.random.categorical)(keys, candidates)
    tokens = jnp.where(greedy, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)
    raw = jax.nn.log_softmax(logits, axis=-1)
    at_temp = raw if raw_logprobs else jnp.where(greedy[:, None], raw, jax.nn.log_softmax(scaled, axis=-1))
    lp = jnp.take_along_axis(at_temp, tokens[:, None], axis=-1)[:, 0]
    return tokens, lp
