"""Low-rank adapters on the Qwen3-VL projections: initialisation, merging, and the trainer's filters.

An adapted projection (``layers.Dense`` built with a ``config.LoRAConfig``) computes
y = x·W + s·(x·A)·B with s = alpha / rank, A [in..., r] and B [r, out...] as :class:`LoRAParam`
variables beside the base kernel W. B starts at zero, so a freshly adapted model is its base
exactly. The trainer freezes every parameter that is not a LoRAParam (:func:`freeze_filter`), so
only adapters get gradients and optimiser state; "adapters off" (:func:`adapters_off`, the KL
reference) is the same graph with zero adapters, and :func:`merged_model` folds W + s·A·B into a
model without adapters (the engines sample with it, and the HF export writes it). With
``lora.dropout`` p > 0 a train step computes y = x·W + s·(dropout_p(x)·A)·B, as PEFT does; only
the trained forward gets a key (:func:`adapter_dropout`), every other forward is deterministic.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from genevolve_jax.models.layers import Dense, LoRAParam

__all__ = ["LoRAParam", "adapted_projections", "adapter_dropout", "init_adapters", "kernel_delta", "merged_base_state",
           "merged_kernel", "merged_model", "with_fresh_adapters", "adapters_off", "freeze_filter", "has_adapters"]


def adapted_projections(model: nnx.Module) -> Iterator[tuple[tuple, Dense]]:
    """(path, Dense) of every projection that carries adapters, in graph order."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Dense) and node.lora is not None:
            yield tuple(path), node


def has_adapters(model: nnx.Module) -> bool:
    return getattr(model, "config", None) is not None and model.config.lora is not None


def adapter_dropout(model: nnx.Module) -> bool:
    """Whether ``model``'s adapters drop out in a train step (model.lora.dropout > 0): the train
    step's losses then pass their key to the trained forward, and only to it."""
    return has_adapters(model) and model.config.lora.dropout > 0


def init_adapters(model: nnx.Module, key: jax.Array) -> None:
    """Draw every A as PEFT does (kaiming-uniform with a = √5: U(±1/√fan_in)); B stays zero.

    Called once the base parameters are built, with a key drawn after theirs, so that a seed gives
    the same base weights with or without adapters."""
    for i, (_, dense) in enumerate(adapted_projections(model)):
        a = dense.lora_a.get_value()
        bound = 1.0 / math.sqrt(math.prod(dense.in_shape))
        dense.lora_a.set_value(jax.random.uniform(jax.random.fold_in(key, i), a.shape, a.dtype, -bound, bound))


def kernel_delta(a: jax.Array, b: jax.Array, kernel_ndim: int, scale: float) -> jax.Array:
    """s·A·B shaped like the kernel (float32): A [L?, in..., r], B [L?, r, out...], where a leading
    L marks the stacked layers of a scanned decoder."""
    stacked = a.ndim + b.ndim - kernel_ndim - 2
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    product = jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1)) if stacked else (
        lambda x, y: jnp.tensordot(x, y, axes=1))
    return scale * product(a, b)


def merged_base_state(model: nnx.Module) -> nnx.State:
    """Every variable of ``model`` but the adapters, with each adapted kernel replaced by
    W + s·A·B (computed in float32, stored in W's dtype): the state of the base model's graph."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Not(LoRAParam))))
    for path, dense in adapted_projections(model):
        key = path + ("kernel",)
        flat[key] = flat[key].replace(merged_kernel(dense))
    return nnx.from_flat_state(flat)


def merged_kernel(dense: Dense) -> jax.Array:
    """An adapted projection's W + s·A·B, computed in float32 and stored in W's dtype: the kernel a
    merged model holds, and the head kernel every loss uses when the head is adapted."""
    kernel = dense.kernel.get_value()
    delta = kernel_delta(dense.lora_a.get_value(), dense.lora_b.get_value(), kernel.ndim, dense.lora.scale)
    return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


def base_graphdef(config) -> Any:
    """The graph of ``config``'s model without adapters (abstract; nothing is allocated)."""
    from genevolve_jax.models.hf_io import abstract_split
    return abstract_split(config.replace(lora=None))[0]


def merged_model(model: nnx.Module) -> nnx.Module:
    """``model`` with its adapters folded into the base kernels, as a model without adapters
    (config.lora None); a model without adapters is returned as is."""
    if not has_adapters(model):
        return model
    return nnx.merge(base_graphdef(model.config), merged_base_state(model))


def with_fresh_adapters(model: nnx.Module, lora, *, seed: int = 0, mesh=None, rules=None) -> nnx.Module:
    """The policy ``model`` makes (its adapters merged, if any) as the base of new adapters ``lora``
    (a config.LoRAConfig): A drawn from ``seed``, B zero."""
    from genevolve_jax.models.hf_io import abstract_model, materialise_rest
    base = merged_model(model)
    config = base.config.replace(lora=lora)
    graphdef, _, rest = nnx.split(abstract_model(config, seed=seed, mesh=mesh, rules=rules),
                                  nnx.All(nnx.Param, nnx.Not(LoRAParam)), ...)
    return materialise_rest(nnx.merge(graphdef, nnx.state(base, nnx.Param), rest), config, seed=seed)


def adapters_off(train_params: nnx.State) -> nnx.State:
    """Zeros in place of every trained leaf: with LoRA on these are the adapters, and the model
    they make is the base exactly (the KL reference; no second copy of the base weights)."""
    return jax.tree.map(jnp.zeros_like, train_params)


def freeze_filter(lora_on: bool, also: Callable | None = None):
    """The trainer's ``freeze`` filter: with LoRA on, every parameter that is not an adapter (and
    whatever ``also`` names, e.g. the vision tower's adapters when it is frozen); else ``also``."""
    if not lora_on:
        return also
    not_adapter = nnx.Not(LoRAParam)
    return not_adapter if also is None else nnx.Any(not_adapter, also)
