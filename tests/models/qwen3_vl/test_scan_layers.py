"""Scanned decoder layers (stacked [L, ...] params, one lax.scan): same logits as the layer list,
deepstack included, and the HF key map still round-trips through the stacked layout."""
import jax
import numpy as np
import pytest
from flax import nnx

from genevolve_jax.models import hf_io
from genevolve_jax.models.qwen3_vl import keymap
from genevolve_jax.models.qwen3_vl.config import tiny
from genevolve_jax.models.qwen3_vl.model import forward, prepare_inputs
from genevolve_jax.sharding import logical
from genevolve_jax.sharding.mesh import make_mesh


def _inputs(cfg, rng):
    img = cfg.image_token_id
    row = np.concatenate([rng.integers(1, 400, 4), [cfg.vision_start_token_id], [img] * 4,
                          [cfg.vision_end_token_id], rng.integers(1, 400, 5)])
    ids = np.stack([row, rng.integers(1, 400, len(row))])
    pixels = rng.standard_normal((16, cfg.vision.patch_dim)).astype(np.float32)
    return ids, pixels, np.array([[1, 4, 4]])


@pytest.fixture(scope="module")
def models():
    """The same random HF weights (random norms and biases too) loaded into both layouts; the
    scanned model is filled row by row through the key map's streaming import."""
    cfg = tiny()
    weights = hf_io.random_state_dict(cfg, seed=3)
    flat = hf_io.model_from_state_dict(cfg, weights)
    scanned = hf_io.model_from_state_dict(cfg.replace(scan_layers=True, remat="full"), weights)
    return flat, scanned


def _logits(model, ids, pixels, grid):
    batch = prepare_inputs(model.config, ids, pixel_values=pixels, image_grid_thw=grid)
    graphdef, state = nnx.split(model)
    fn = jax.jit(forward, static_argnums=0, compiler_options={"xla_backend_optimization_level": 0})
    return np.asarray(fn(graphdef, state, batch))


def test_scanned_logits_equal_layer_list_with_deepstack(models):
    flat, scanned = models
    assert scanned.language_model.layers.mlp.up_proj.kernel.get_value().shape[0] == 3
    ids, pixels, grid = _inputs(flat.config, np.random.default_rng(0))
    want = _logits(flat, ids, pixels, grid)
    got = _logits(scanned, ids, pixels, grid)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the image actually matters (deepstack + scatter run inside the scanned model)
    other = _logits(scanned, ids, pixels * 0.5, grid)
    assert np.abs(other - got).max() > 1e-4


def test_keymap_round_trips_through_stacked_layout(models):
    flat, scanned = models
    a = dict(keymap.hf_state_dict(flat))
    b = dict(keymap.hf_state_dict(scanned))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    entries = keymap.key_entries(scanned.config)
    stacked = [e for e in entries if e.stack_index is not None]
    assert len(stacked) == 3 * 11 and all(e.nnx[:2] == ("language_model", "layers") for e in stacked)
    bad = dict(a)
    key = "model.language_model.layers.1.mlp.up_proj.weight"
    bad[key] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="layers.1.mlp.up_proj.weight"):
        keymap.load_hf_state_dict(scanned, bad)


def test_stacked_params_get_a_layers_axis_in_specs(models):
    _, scanned = models
    mesh = make_mesh({"fsdp": 8})
    specs = logical.state_partition_specs(nnx.state(scanned, nnx.Param), "fsdp", mesh)
    spec = specs["language_model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert tuple(spec) == (None, "fsdp", None)  # [layers, embed, mlp]: embed takes fsdp
    assert jax.tree.leaves(specs)
