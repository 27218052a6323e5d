"""The decoder layers' two parameter layouts, and conversion between them.

- a list of L layers (``language_model.layers.{i}.X``): what the JaxEngine decodes with, one KV
  cache per layer;
- one stacked module (``language_model.layers.X`` with a leading [L] axis, ``config.scan_layers``):
  what a trainer that scans its layers holds (one compiled layer body; MaxText's default on TPU).

A trainer, a checkpoint and an engine may hold different layouts of the same weights: the engine
converts what the trainer hands it, a checkpoint records the layout it was saved in and restores
into the one asked for. The values never change, only where the layer index lives.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def _layers(pure: dict) -> dict:
    return pure["language_model"]["layers"]


def is_stacked(params: nnx.State) -> bool:
    """True when ``params`` (an ``nnx.State`` of the model's parameters) holds the stacked layout:
    the layer list's keys are layer indexes, the stacked module's are parameter names."""
    keys = list(_layers(nnx.to_pure_dict(params)))
    return bool(keys) and not all(isinstance(k, int) for k in keys)


def _with_layout(pure: dict, stacked: bool) -> dict:
    layers = _layers(pure)
    if (bool(layers) and not all(isinstance(k, int) for k in layers)) == stacked:
        return pure
    if stacked:
        rows = [layers[i] for i in range(len(layers))]
        new: Any = jax.tree.map(lambda *xs: jnp.stack(xs), *rows)
    else:
        count = jax.tree.leaves(layers)[0].shape[0]
        new = {i: jax.tree.map(lambda a, i=i: a[i], layers) for i in range(count)}
    language_model = dict(pure["language_model"], layers=new)
    return dict(pure, language_model=language_model)


def convert_params(params: nnx.State, template: nnx.State) -> nnx.State:
    """``params`` in the layer layout of ``template`` (an ``nnx.State`` of the target model's
    parameters, abstract or concrete): values from ``params``, structure and variable metadata
    (logical axes) from ``template``. Returns ``params`` itself when the layouts already agree."""
    want = is_stacked(template)
    if is_stacked(params) == want:
        return params
    out = jax.tree.map(lambda x: x, template)   # a new State: the template is left as it was
    nnx.replace_by_pure_dict(out, _with_layout(nnx.to_pure_dict(params), want))
    return out


def with_layer_layout(model: nnx.Module, scan_layers: bool) -> nnx.Module:
    """``model`` with its decoder layers in the asked-for layout (itself when it already is)."""
    if bool(model.config.scan_layers) == bool(scan_layers):
        return model
    from genevolve_jax.models.hf_io import abstract_model
    config = model.config.replace(scan_layers=bool(scan_layers))
    graphdef, template, rest = nnx.split(abstract_model(config), nnx.Param, ...)
    _, params, have_rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("with_layer_layout: the model holds non-parameter state "
                         f"({jax.tree_util.tree_structure(rest)}); only parameters are converted")
    return nnx.merge(graphdef, convert_params(params, template), have_rest)


def with_layout_of(model: nnx.Module, tree) -> nnx.Module:
    """``model`` with its decoder layers laid out as in ``tree``, any tree shaped like a parameter
    state (an engine's weight shardings, say); ``tree`` None: ``model`` as it is."""
    return model if tree is None else with_layer_layout(model, scan_layers=is_stacked(tree))


__all__ = ["is_stacked", "convert_params", "with_layer_layout", "with_layout_of"]
