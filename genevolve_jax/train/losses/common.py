"""Masking and aggregation shared by the losses.

Every loss takes per-token values [B, T] and a loss mask [B, T] (1 on the policy's own tokens,
0 on prompt, tool observations and padding). Masked positions are replaced by constants *before*
any arithmetic, so garbage there (inf log-probs of padding) can reach neither the value nor the
gradient. Denominators are floored at 1: an empty mask gives a zero loss with a zero gradient.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from genevolve_jax.train.losses.config import AGGREGATIONS

F32 = jnp.float32


def as_mask(mask: jax.Array) -> jax.Array:
    """Loss mask as float32 in {0, 1} (bool, int or float input; nonzero = on)."""
    return (jnp.asarray(mask) != 0).astype(F32)


def masked(x: jax.Array, mask: jax.Array, fill: float = 0.0) -> jax.Array:
    """x where mask, else ``fill``, in float32 (cuts NaN/inf at masked positions)."""
    return jnp.where(mask > 0, jnp.asarray(x, F32), fill)


def sample_mask(mask: jax.Array, sample_valid: jax.Array | None) -> jax.Array:
    """The token mask with whole trajectories removed where ``sample_valid`` [B] is false."""
    mask = as_mask(mask)
    if sample_valid is None:
        return mask
    valid = jnp.asarray(sample_valid)
    if valid.shape != mask.shape[:1]:
        raise ValueError(f"sample_valid must have shape {mask.shape[:1]}, got {valid.shape}")
    return mask * (valid != 0).astype(F32)[:, None]


def aggregate(token_values: jax.Array, mask: jax.Array, mode: str) -> jax.Array:
    """Reduce masked per-token values [B, T] to a scalar.

    token-mean:           Σ m·x / Σ m over the whole batch;
    seq-mean-token-sum:   mean over sequences with ≥ 1 token of Σ_t m·x;
    seq-mean-token-mean:  mean over sequences with ≥ 1 token of Σ_t m·x / Σ_t m.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")
    x = masked(token_values, mask)
    if mode == "token-mean":
        return x.sum() / jnp.maximum(mask.sum(), 1.0)
    per_seq_tokens = mask.sum(axis=-1)
    seq_sum = x.sum(axis=-1)
    has_tokens = (per_seq_tokens > 0).astype(F32)
    n_seqs = jnp.maximum(has_tokens.sum(), 1.0)
    if mode == "seq-mean-token-sum":
        return seq_sum.sum() / n_seqs
    return (seq_sum / jnp.maximum(per_seq_tokens, 1.0)).sum() / n_seqs


def weighted_sum(x: jax.Array, weight: jax.Array) -> jax.Array:
    """Σ weight·x over positions with a nonzero weight (garbage elsewhere cannot leak in).

    The exact-accumulation form of every aggregation: the host computes each token's weight
    from the whole step's counts (train/rl/loss_weights.py), so the sum over any split of the rows
    into micro-batches is the one-batch loss."""
    w = jnp.asarray(weight, F32)
    return jnp.sum(jnp.where(w != 0, jnp.asarray(x, F32), 0.0) * w)


def constant_weight_mean(x: jax.Array, mask: jax.Array, weight: jax.Array) -> jax.Array:
    """Σ_mask x · w for a weight that is one constant (1/N) on the mask: the micro-batch's share of
    an exact mean over the step. Summing first and scaling once keeps it within an ulp or two of
    the mean (a sum of N roundings of 1/N would not be)."""
    m = jnp.asarray(mask, F32)
    return jax.lax.stop_gradient(jnp.sum(jnp.where(m > 0, jnp.asarray(x, F32), 0.0) * m) * jnp.max(weight))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Token-mean of x over the mask, for metrics (no gradient intended)."""
    return jax.lax.stop_gradient(aggregate(x, mask, "token-mean"))


def check_same_shape(name_to_array: dict, shape) -> None:
    for name, arr in name_to_array.items():
        if arr is not None and tuple(jnp.shape(arr)) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(jnp.shape(arr))}")
