"""Small NNX building blocks shared by the text decoder and the vision tower.

Every parameter is tagged with logical axis names (see ``genevolve_jax.sharding.logical``). Kernels are
stored input-major ([in..., out...]); the HF key map transposes/reshapes on import and export.
Norms are computed in float32 whatever the compute dtype, as transformers does.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from genevolve_jax.ops.precision import narrow, widen
from genevolve_jax.sharding import logical

default_kernel_init = nnx.initializers.normal(0.02)


class LoRAParam(nnx.Param):
    """A low-rank adapter matrix. A Param subclass, so code that takes every Param still sees it,
    and the trainer's filters can tell adapters (trained) from the base (frozen) by type."""


LORA_PARAM_DTYPE = jnp.float32   # adapters stay float32 whatever the base is held in


class RMSNorm(nnx.Module):
    """y = x / rms(x) * scale (Qwen3 RMSNorm; ``scale`` is HF ``weight``), in float32 and rounded to
    x's dtype once, at the end (``ops.precision.narrow``).

    transformers rounds x / rms(x) to bf16 before the weight multiplies it, a second rounding; XLA
    keeps that one in some programs and drops it in others (ops/precision.py), which made the
    engine's decode and the trainer's packed rows disagree. In float32 the numbers are the
    two-step form's."""

    def __init__(self, dim: int, axis_name: str | None, *, eps: float, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = logical.param(rngs, nnx.initializers.ones, (dim,), (axis_name,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return narrow(self.normalized(x), x.dtype)

    def normalized(self, x: jax.Array) -> jax.Array:
        """The norm in float32, not rounded (for a caller that goes on in float32 and rounds once);
        the weight as x's dtype holds it."""
        x32 = widen(x)
        var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        return x32 * jax.lax.rsqrt(var + self.eps) * widen(self.scale.get_value().astype(x.dtype))


class LayerNorm(nnx.Module):
    """Standard LayerNorm with bias, statistics in float32 (vision blocks and mergers)."""

    def __init__(self, dim: int, axis_name: str | None, *, eps: float = 1e-6, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = logical.param(rngs, nnx.initializers.ones, (dim,), (axis_name,), param_dtype)
        self.bias = logical.param(rngs, nnx.initializers.zeros, (dim,), (axis_name,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale.get_value().astype(jnp.float32) + self.bias.get_value().astype(jnp.float32)
        return y.astype(dtype)


class Dense(nnx.Module):
    """A linear map with a possibly multi-dimensional kernel ``in_shape + out_shape``.

    Multi-dimensional kernels (e.g. [embed, heads, head_dim]) keep the head axis visible to the
    sharding rules, so tensor parallelism splits heads rather than an opaque fused dimension.
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], *, in_axes: Sequence[str | None],
                 out_axes: Sequence[str | None], use_bias: bool, param_dtype, dtype, rngs: nnx.Rngs,
                 kernel_init=default_kernel_init, lora=None):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.dtype = dtype
        self.kernel = logical.param(rngs, kernel_init, self.in_shape + self.out_shape,
                              tuple(in_axes) + tuple(out_axes), param_dtype)
        self.bias = (logical.param(rngs, nnx.initializers.zeros, self.out_shape, tuple(out_axes), param_dtype)
                     if use_bias else None)
        # ``lora`` (a config.LoRAConfig): y += scale·(x·A)·B with A [in..., r] sharded like the
        # kernel's input dims and B [r, out...] like its output dims. Both start at zero without
        # drawing from ``rngs`` (so the base weights of a seed are the same with or without
        # adapters); models/lora.py:init_adapters then draws A, and B stays zero: the model is the base.
        self.lora = lora
        if lora is not None:
            self.lora_a = LoRAParam(jnp.zeros(self.in_shape + (lora.rank,), LORA_PARAM_DTYPE),
                                    logical_axes=tuple(in_axes) + (logical.LORA_RANK,))
            self.lora_b = LoRAParam(jnp.zeros((lora.rank,) + self.out_shape, LORA_PARAM_DTYPE),
                                    logical_axes=(logical.LORA_RANK,) + tuple(out_axes))

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """``dropout_key``: the train step's key for adapter dropout (PEFT's lora_dropout on the
        adapter branch's input); None (every forward outside a train step) is deterministic."""
        n_in = len(self.in_shape)
        kernel = self.kernel.get_value().astype(self.dtype)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel, (contract, ((), ())),
                                preferred_element_type=self.dtype)
        if self.lora is not None:
            y = y + self.adapter_delta(x, dropout_key)
        if self.bias is not None:
            y = y + self.bias.get_value().astype(self.dtype)
        return y

    def adapter_delta(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """scale·(dropout(x)·A)·B in the compute dtype: exactly zero while B is zero. Dropout
        (inverted, as torch's: kept inputs scaled by 1/(1−p)) only with a key and a rate > 0."""
        n_in = len(self.in_shape)
        rate = self.lora.dropout
        if dropout_key is not None and rate > 0:
            keep = jax.random.bernoulli(dropout_key, 1.0 - rate, x.shape)
            x = jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
        a = self.lora_a.get_value().astype(self.dtype)
        b = self.lora_b.get_value().astype(self.dtype)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        xa = jax.lax.dot_general(x.astype(self.dtype), a, (contract, ((), ())), preferred_element_type=self.dtype)
        delta = jax.lax.dot_general(xa, b, (((xa.ndim - 1,), (0,)), ((), ())), preferred_element_type=self.dtype)
        return delta * jnp.asarray(self.lora.scale, self.dtype)


def sub_key(key: jax.Array | None, i: int) -> jax.Array | None:
    """The ``i``-th independent key below ``key`` (None stays None: a deterministic forward)."""
    return None if key is None else jax.random.fold_in(key, i)


class Embed(nnx.Module):
    """Token embedding table [vocab, embed] (a tied model's output head is its transpose)."""

    def __init__(self, num: int, dim: int, *, param_dtype, dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = logical.param(rngs, nnx.initializers.normal(0.02), (num, dim), (logical.VOCAB, logical.EMBED),
                                       param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding.get_value(), ids, axis=0).astype(self.dtype)
