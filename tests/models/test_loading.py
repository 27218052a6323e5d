"""Orbax model checkpoints: exact round trip, dtype change and re-layout on restore, clear errors."""
import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from genevolve_jax.models import hf_io
from genevolve_jax.models import loading as ckpt
from genevolve_jax.models.qwen3_vl import config as qwen_config
from genevolve_jax.models.qwen3_vl import keymap


def _params(model):
    return {".".join(map(str, k)): np.asarray(v.get_value())
            for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cfg = qwen_config.tiny(tie_word_embeddings=False)
    model = hf_io.model_from_state_dict(cfg, hf_io.random_state_dict(cfg, seed=3))
    path = ckpt.save_model(tmp_path_factory.mktemp("ck") / "model", model)
    return path, cfg, _params(model)


def test_restore_is_exact_and_keeps_the_config(saved):
    path, cfg, params = saved
    restored = ckpt.restore_model(path)
    assert restored.config == cfg
    got = _params(restored)
    assert got.keys() == params.keys() and len(got) == len(keymap.key_entries(cfg))
    for k, v in params.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_restore_in_bf16_and_under_another_layout(saved):
    path, cfg, params = saved
    r16 = ckpt.restore_model(path, param_dtype="bfloat16")
    assert r16.config.param_dtype == "bfloat16" and r16.config.dtype == "bfloat16"
    k = "language_model.layers.1.mlp.up_proj.kernel"
    got = np.asarray(r16.language_model.layers[1].mlp.up_proj.kernel.get_value())
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.view(np.uint16), params[k].astype(ml_dtypes.bfloat16).view(np.uint16))
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    sharded = ckpt.restore_model(path, mesh=mesh, rules="fsdp")
    emb = sharded.language_model.embed_tokens.embedding.get_value()
    assert emb.sharding.spec == P(None, "fsdp")
    np.testing.assert_array_equal(np.asarray(emb), params["language_model.embed_tokens.embedding"])


def test_overwrite_and_missing_checkpoint_errors(saved, tmp_path):
    path, cfg, _ = saved
    model = ckpt.restore_model(path)
    with pytest.raises(FileExistsError, match="overwrite"):
        ckpt.save_model(path, model)
    with pytest.raises(ckpt.CheckpointNotFound, match=ckpt.CONFIG_FILE):
        ckpt.restore_model(tmp_path)
    (tmp_path / ckpt.CONFIG_FILE).write_text('{"param_dtype": "float32"}')
    with pytest.raises(qwen_config.ConfigError, match="hf_config"):
        ckpt.restore_model(tmp_path)


def test_generic_pytree_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tree = {"step": np.int32(17), "mu": {"a": rng.standard_normal((3, 4)).astype(np.float32)}}
    ckpt.save_pytree(tmp_path / "opt", tree)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)
    back = ckpt.restore_pytree(tmp_path / "opt", abstract)
    assert int(back["step"]) == 17
    np.testing.assert_array_equal(np.asarray(back["mu"]["a"]), tree["mu"]["a"])
    with pytest.raises(FileExistsError):
        ckpt.save_pytree(tmp_path / "opt", tree)


def test_the_layers_layout_is_saved_and_converted_on_restore(saved, tmp_path):
    """A checkpoint records whether its decoder layers are stacked (a scanning trainer's) or a list,
    and restores into either: row i of a stacked parameter is layer i, exactly."""
    import json
    path, cfg, params = saved
    stacked = ckpt.restore_model(path, scan_layers=True)
    assert stacked.config.scan_layers
    kernel = np.asarray(stacked.language_model.layers.mlp.up_proj.kernel.get_value())
    assert kernel.shape[0] == cfg.text.num_hidden_layers
    for i in range(cfg.text.num_hidden_layers):
        np.testing.assert_array_equal(kernel[i], params[f"language_model.layers.{i}.mlp.up_proj.kernel"])
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
    sharded = ckpt.restore_model(path, scan_layers=True, mesh=mesh, rules="fsdp")
    got = sharded.language_model.layers.mlp.up_proj.kernel.get_value()
    assert got.sharding.spec == P(None, "fsdp", None)        # [layers, embed, mlp]
    np.testing.assert_array_equal(np.asarray(got), kernel)

    again = ckpt.save_model(tmp_path / "stacked", stacked)
    saved_json = json.loads((tmp_path / "stacked" / ckpt.CONFIG_FILE).read_text())
    assert saved_json["scan_layers"] is True
    assert ckpt.restore_model(again).config.scan_layers        # None keeps the saved layout
    back = ckpt.load_model(again, scan_layers=False)
    assert not back.config.scan_layers
    assert _params(back).keys() == params.keys()
    for k, v in _params(back).items():
        np.testing.assert_array_equal(v, params[k], err_msg=k)

    # Written before the layout was recorded: a list. A layout that is not a boolean is named.
    del saved_json["scan_layers"]
    (tmp_path / "stacked" / ckpt.CONFIG_FILE).write_text(json.dumps(saved_json))
    assert not ckpt.load_model_config(again).scan_layers
    saved_json["scan_layers"] = "yes"
    (tmp_path / "stacked" / ckpt.CONFIG_FILE).write_text(json.dumps(saved_json))
    with pytest.raises(qwen_config.ConfigError, match="scan_layers"):
        ckpt.restore_model(again)
