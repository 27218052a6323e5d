"""Stacked and listed decoder layers hold the same weights: conversion both ways is exact, keeps
each parameter's logical axes, and leaves a parameter tree already in the wanted layout alone."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from genevolve_jax.models import hf_io
from genevolve_jax.models.qwen3_vl.config import tiny
from genevolve_jax.models.qwen3_vl.layer_layout import convert_params, is_stacked, leaf_rows, with_layer_layout


@pytest.fixture(scope="module", params=[2, 3])
def pair(request):
    """The same random HF weights loaded as a layer list and as stacked layers (the key map fills
    the stacked rows independently of the code under test)."""
    cfg, n = tiny(), request.param
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=n),
                      vision=dataclasses.replace(cfg.vision,
                                                 deepstack_visual_indexes=cfg.vision.deepstack_visual_indexes[:n]))
    weights = hf_io.random_state_dict(cfg, seed=int(np.random.default_rng().integers(1 << 20)))
    return hf_io.model_from_state_dict(cfg, weights), hf_io.model_from_state_dict(cfg.replace(scan_layers=True),
                                                                                  weights)


def _flat(state):
    return {k: (np.asarray(v.get_value()), v.get_metadata()["logical_axes"])
            for k, v in nnx.to_flat_state(state)}


def _assert_same(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k][0], fb[k][0], err_msg=str(k))
        assert fa[k][1] == fb[k][1], k


def test_models_convert_both_ways_exactly(pair):
    listed, stacked = pair
    to_stacked = with_layer_layout(listed, scan_layers=True)
    assert to_stacked.config == stacked.config
    _assert_same(nnx.state(to_stacked, nnx.Param), nnx.state(stacked, nnx.Param))
    to_list = with_layer_layout(stacked, scan_layers=False)
    assert to_list.config == listed.config
    _assert_same(nnx.state(to_list, nnx.Param), nnx.state(listed, nnx.Param))
    assert with_layer_layout(listed, scan_layers=False) is listed


def test_params_take_the_templates_layout(pair):
    listed, stacked = pair
    lp, sp = nnx.state(listed, nnx.Param), nnx.state(stacked, nnx.Param)
    assert is_stacked(sp) and not is_stacked(lp)
    _assert_same(convert_params(sp, lp), lp)
    # The template may be abstract (shapes only): values come from the parameters.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), sp)
    _assert_same(convert_params(lp, abstract), sp)
    assert convert_params(lp, lp) is lp


def test_leaf_rows_name_where_each_listed_leaf_lives_in_the_stack(pair):
    """A transfer that takes rows (sharding/weight_stream.py) reads each leaf of the list layout from
    the stacked parameters: the leaf, or the row, that ``leaf_rows`` names holds exactly its values.
    Shardings name leaves as the state does (a tree of them is a valid template)."""
    listed, stacked = pair
    lp, sp = nnx.state(listed, nnx.Param), nnx.state(stacked, nnx.Param)
    src = jax.tree.leaves(sp)
    for template in (lp, jax.tree.map(lambda x: jax.sharding.SingleDeviceSharding(jax.devices()[0]), lp)):
        rows = leaf_rows(sp, template)
        assert len(rows) == len(jax.tree.leaves(lp)) and any(r is not None for _, r in rows)
        for (i, r), want in zip(rows, jax.tree.leaves(lp)):
            np.testing.assert_array_equal(np.asarray(src[i] if r is None else src[i][r]), np.asarray(want))
    assert leaf_rows(lp, lp) == [(i, None) for i in range(len(jax.tree.leaves(lp)))]
    with pytest.raises(ValueError, match="not in the params"):
        leaf_rows(lp, sp)            # stacking takes every row: no row of a list is a stacked leaf
