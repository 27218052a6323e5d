"""Roundings to the compute dtype that every compiled program keeps.

A bf16 model rounds its values to bf16 at the points its code names (a norm's output, a residual
sum, the attention probabilities before the weighted sum). XLA may drop an f32 → bf16 → f32 round
trip inside a fusion and go on with the unrounded f32 value (``xla_allow_excess_precision``, on by
default; on CPU, every YNNPACK fusion, which XLA picks by shape). Whether it does depends on how
the program is fused, so one model gave different bf16 values in a batch of 1 and of 64 rows, and
in the trainer's packed rows and the rollout engine's decode step: measured on the 2-layer tiny
model with trained-LM-like logits (tests/rollout/test_engine_bf16_logprobs.py), a quarter of the
first norm's outputs moved by one bf16 step between the two batch sizes, and the engine's
log-probs were a mean 1.87e-2 from the trainer's (8.3e-4 with these functions).

``reduce_precision`` to the narrow type's bits is an op XLA keeps: a value passed through it is the
rounded value whether or not the convert around it survives. :func:`narrow` rounds with it where
the model rounds; :func:`widen` reads a narrow value back into float32 through it, for values the
model does not round itself (a matmul's or an add's bf16 output). In float32 both are plain casts,
so fp32 numerics are unchanged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _pinned(x32: jax.Array, dtype) -> jax.Array:
    """``x32`` rounded to ``dtype``'s precision, kept in float32 (unchanged for a float32 dtype)."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32 or not jnp.issubdtype(dtype, jnp.floating):
        return x32
    info = jnp.finfo(dtype)
    return jax.lax.reduce_precision(x32, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def narrow(x32: jax.Array, dtype) -> jax.Array:
    """``x32`` rounded to ``dtype`` (round to nearest even, as ``astype``), in every program."""
    return _pinned(x32, dtype).astype(dtype)


def widen(x: jax.Array) -> jax.Array:
    """``x`` (any float dtype) in float32, holding exactly the values ``x`` holds in its own dtype,
    also where XLA would hand over the unrounded float32 value that ``x`` was rounded from."""
    return _pinned(x.astype(jnp.float32), x.dtype)
