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


def path_names(path) -> tuple:
    """A tree path (``jax.tree_util``'s keys) as plain keys, a Variable's trailing ``.value``
    dropped: a parameter state and a tree of its shardings name a leaf alike, and the names are
    the key map's NNX paths (models/qwen3_vl/keymap.py)."""
    tu = jax.tree_util
    keys = []
    for k in path:
        if isinstance(k, (tu.DictKey, tu.FlattenedIndexKey)):
            keys.append(k.key)
        elif isinstance(k, tu.SequenceKey):
            keys.append(k.idx)
        elif isinstance(k, tu.GetAttrKey):
            keys.append(k.name)
        else:
            raise TypeError(f"path_names: a tree path key of an unknown kind, {k!r}")
    return tuple(keys[:-1] if keys and isinstance(path[-1], jax.tree_util.GetAttrKey) and keys[-1] == "value"
                 else keys)


def leaf_rows(params: nnx.State, template) -> list[tuple[int, int | None]]:
    """Where each leaf of ``template`` (a tree in the layout of a parameter state: abstract params,
    their shardings) comes from in ``params``: ``(i, None)``, leaf i of ``params`` as it is, or
    ``(i, r)``, row r of the stacked leaf i (a list layout read from a stacked one). In
    ``jax.tree.leaves(template)`` order. Why: a transfer that takes rows one bucket at a time never
    holds the whole converted list (see sharding/weight_stream.py); raises when ``template`` is
    stacked and ``params`` a list (that direction stacks, it cannot take rows)."""
    index = {path_names(p): i for i, (p, _) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0])}
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(template)[0]:
        names = path_names(path)
        if names in index:
            out.append((index[names], None))
            continue
        at = names.index("layers") if "layers" in names else -1
        stacked = names[:at + 1] + names[at + 2:] if at >= 0 and at + 1 < len(names) else None
        if stacked is None or not isinstance(names[at + 1], int) or stacked not in index:
            raise ValueError(f"leaf_rows: {'.'.join(map(str, names))} of the target layout is not in the params "
                             "(nor a row of a stacked parameter)")
        out.append((index[stacked], names[at + 1]))
    return out


def with_layer_layout(model: nnx.Module, scan_layers: bool) -> nnx.Module:
    """``model`` with its decoder layers in the asked-for layout (itself when it already is)."""
    if bool(model.config.scan_layers) == bool(scan_layers):
        return model
    from genevolve_jax.models.hf_io import abstract_split
    graphdef, template, rest = abstract_split(model.config.replace(scan_layers=bool(scan_layers)))
    _, params, have_rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("with_layer_layout: the model holds non-parameter state "
                         f"({jax.tree_util.tree_structure(rest)}); only parameters are converted")
    return nnx.merge(graphdef, convert_params(params, template), have_rest)


def with_layout_of(model: nnx.Module, tree) -> nnx.Module:
    """``model`` with its decoder layers laid out as in ``tree``, any tree shaped like a parameter
    state (an engine's weight shardings, say); ``tree`` None: ``model`` as it is."""
    return model if tree is None else with_layer_layout(model, scan_layers=is_stacked(tree))


__all__ = ["is_stacked", "convert_params", "leaf_rows", "path_names", "with_layer_layout", "with_layout_of"]
