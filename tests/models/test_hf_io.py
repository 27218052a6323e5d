"""HF I/O: streaming safetensors reader/writer, sharding, and round trips with transformers' Qwen3-VL."""
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors
import torch
from safetensors import safe_open

from genevolve_jax.models import hf_io
from genevolve_jax.models.qwen3_vl import config as qwen_config
from genevolve_jax.models.qwen3_vl import keymap


def _random_state_dict(rng, n=12):
    out = {}
    for i in range(n):
        shape = tuple(int(s) for s in rng.integers(1, 9, size=int(rng.integers(1, 4))))
        dtype = [np.float32, ml_dtypes.bfloat16, np.float16][i % 3]
        out[f"block.{i}.w"] = rng.standard_normal(shape).astype(dtype)
    return out


def _tensor_bytes(file):
    with safe_open(file, framework="pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())


@pytest.mark.parametrize("limit", [1, 150, 700, "1GB"])
def test_shards_respect_the_limit_and_read_back_bit_exact(tmp_path, limit):
    rng = np.random.default_rng(int(hf_io.parse_size(limit)) % 1000)
    sd = _random_state_dict(rng)
    written = hf_io.save_state_dict(sd, tmp_path, max_shard_bytes=limit)
    shards = sorted(w for w in written if w.endswith(".safetensors"))
    max_bytes = hf_io.parse_size(limit)
    if len(shards) == 1:
        assert shards == ["model.safetensors"] and not (tmp_path / hf_io.SAFE_INDEX).exists()
    else:
        index = json.loads((tmp_path / hf_io.SAFE_INDEX).read_text())
        assert set(index["weight_map"]) == set(sd)
        assert set(index["weight_map"].values()) == set(shards)
        assert index["metadata"]["total_size"] == sum(v.nbytes for v in sd.values())
        assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for s in shards:
        with safe_open(str(tmp_path / s), framework="pt") as f:
            names = list(f.keys())
        # Over the limit only when one tensor alone is bigger than the limit.
        assert _tensor_bytes(str(tmp_path / s)) <= max_bytes or len(names) == 1
    # The reference reader (torch) and ours both get every tensor back exactly, dtype included.
    reader = hf_io.SafetensorsReader(tmp_path)
    assert reader.shapes() == {k: v.shape for k, v in sd.items()}
    for s in shards:
        with safe_open(str(tmp_path / s), framework="pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                assert str(t.dtype).split(".")[-1] == {"float32": "float32", "bfloat16": "bfloat16",
                                                       "float16": "float16"}[np.dtype(sd[k].dtype).name]
                np.testing.assert_array_equal(t.float().numpy(), sd[k].astype(np.float32))
    for k, v in sd.items():
        got = reader[k]
        assert got.dtype == v.dtype and got.shape == v.shape
        np.testing.assert_array_equal(got.astype(np.float32), v.astype(np.float32))


def test_reexport_into_the_same_dir_drops_stale_shards(tmp_path):
    sd = _random_state_dict(np.random.default_rng(3))
    hf_io.save_state_dict(sd, tmp_path, max_shard_bytes=100)
    assert (tmp_path / hf_io.SAFE_INDEX).exists()
    (tmp_path / "model_ema.safetensors").write_bytes(b"not ours")  # a file we did not write stays
    hf_io.save_state_dict(sd, tmp_path, max_shard_bytes="1GB")
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "model_ema.safetensors"]
    assert set(hf_io.SafetensorsReader(tmp_path)) == set(sd)


def test_shapes_come_from_headers_without_reading_tensors(tmp_path, monkeypatch):
    sd = _random_state_dict(np.random.default_rng(4))
    hf_io.save_state_dict(sd, tmp_path, max_shard_bytes=200)

    def forbidden(*a, **k):
        raise AssertionError("tensor data read")
    reader = hf_io.SafetensorsReader(tmp_path)          # reads the headers, and nothing after them
    monkeypatch.setattr(safetensors, "safe_open", forbidden)
    monkeypatch.setattr("builtins.open", forbidden)
    assert reader.shapes() == {k: v.shape for k, v in sd.items()}
    assert reader.dtypes() == {k: np.dtype(v.dtype) for k, v in sd.items()}
    with pytest.raises(AssertionError, match="tensor data read"):
        reader["block.0.w"]


def test_bad_directories_name_the_file(tmp_path):
    sd = _random_state_dict(np.random.default_rng(5))
    hf_io.save_state_dict(sd, tmp_path, max_shard_bytes=150)
    index = json.loads((tmp_path / hf_io.SAFE_INDEX).read_text())
    # A shard the index lists is gone.
    victim = sorted(set(index["weight_map"].values()))[1]
    os.rename(tmp_path / victim, tmp_path / "moved")
    with pytest.raises(hf_io.CheckpointError, match=victim):
        hf_io.SafetensorsReader(tmp_path)
    os.rename(tmp_path / "moved", tmp_path / victim)
    # The index points a tensor at a shard that does not hold it.
    bad = json.loads(json.dumps(index))
    other = sorted(set(index["weight_map"].values()) - {index["weight_map"]["block.3.w"]})[0]
    bad["weight_map"]["block.3.w"] = other
    (tmp_path / hf_io.SAFE_INDEX).write_text(json.dumps(bad))
    with pytest.raises(hf_io.CheckpointError, match=rf"block\.3\.w.*{other}"):
        hf_io.SafetensorsReader(tmp_path)
    (tmp_path / hf_io.SAFE_INDEX).write_text(json.dumps(index))
    # A truncated shard.
    data = (tmp_path / victim).read_bytes()
    (tmp_path / victim).write_bytes(data[:-3])
    with pytest.raises(hf_io.CheckpointError, match=f"{victim}.*truncated"):
        hf_io.SafetensorsReader(tmp_path)
    with pytest.raises(hf_io.CheckpointError, match="does not exist"):
        hf_io.SafetensorsReader(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(hf_io.CheckpointError, match="no model.safetensors"):
        hf_io.SafetensorsReader(empty)


def test_parse_size():
    assert hf_io.parse_size("5GB") == 5 * 10**9
    assert hf_io.parse_size("2GiB") == 2 * 2**30
    assert hf_io.parse_size("1.5MB") == 1_500_000
    assert hf_io.parse_size(123) == 123
    for bad in ("five", "5XB", "0", -1):
        with pytest.raises(ValueError, match="size"):
            hf_io.parse_size(bad)


# --- model level: our NNX model ↔ transformers' PyTorch Qwen3-VL -----------------------------------
from flax import nnx  # noqa: E402

from genevolve_jax.models.qwen3_vl.hf_reference import hf_logits  # noqa: E402
from genevolve_jax.models.qwen3_vl.model import forward, prepare_inputs  # noqa: E402
from tests.fixtures import hf_qwen3_vl as R  # noqa: E402


def _our_model(cfg, seed):
    return hf_io.model_from_state_dict(cfg, hf_io.random_state_dict(cfg, seed))


_forward = jax.jit(forward, static_argnums=0)


def _inputs(cfg, seed):
    """Two rows, right-padded: text + one image + text, and text only."""
    rng = np.random.default_rng(seed)
    grid = np.array([[1, 4, 6]])
    rows = [R.text_tokens(cfg, 4, rng) + R.placeholder_segment(cfg, grid[0], "image", rng) + R.text_tokens(cfg, 3, rng),
            R.text_tokens(cfg, 9, rng)]
    ids, mask = R.pad_rows(rows, "right")
    return dict(input_ids=ids, attention_mask=mask, pixel_values=R.random_pixels(cfg, grid, rng), image_grid_thw=grid)


def _ours(model, inp):
    batch = prepare_inputs(model.config, inp["input_ids"], inp["attention_mask"], pixel_values=inp["pixel_values"],
                           image_grid_thw=inp["image_grid_thw"])
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, batch), np.float32)


def _theirs(hf_model, cfg, inp):
    return hf_logits(hf_model, cfg, inp["input_ids"], inp["attention_mask"], pixel_values=inp["pixel_values"],
                     image_grid_thw=inp["image_grid_thw"])


def _max_diff(a, b, mask):
    return float(np.abs(a - b)[mask.astype(bool)].max())


def _hf_load(path, dtype):
    import transformers
    model, info = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
        path, dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("tied", [False, True])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, tied):
    cfg = qwen_config.tiny(tie_word_embeddings=tied)
    model = _our_model(cfg, seed=11 + tied)
    written = hf_io.save_pretrained(model, tmp_path, dtype="float32", max_shard_bytes=150_000)
    assert hf_io.SAFE_INDEX in written
    assert ("lm_head.weight" in hf_io.SafetensorsReader(tmp_path)) is not tied
    hf = _hf_load(tmp_path, torch.float32)
    if tied:
        assert hf.lm_head.weight.data_ptr() == hf.model.language_model.embed_tokens.weight.data_ptr()
    inp = _inputs(cfg, seed=5)
    ours, theirs = _ours(model, inp), _theirs(hf, cfg, inp)
    assert np.abs(theirs).max() > 1.0  # random norms keep logits O(1): a mismatch cannot hide
    assert _max_diff(ours, theirs, inp["attention_mask"]) <= 1e-4


def test_transformers_saved_sharded_model_imports_with_equal_logits(tmp_path):
    cfg = qwen_config.tiny(tie_word_embeddings=True)
    hf = R.random_hf_model(cfg, seed=21)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / hf_io.SAFE_INDEX).exists()
    seen = []
    model = hf_io.load_pretrained(tmp_path, on_tensor=seen.append)
    assert model.config == cfg
    assert sorted(seen) == sorted(e.hf for e in keymap.key_entries(cfg))  # each tensor read exactly once
    inp = _inputs(cfg, seed=6)
    assert _max_diff(_ours(model, inp), _theirs(hf, cfg, inp), inp["attention_mask"]) <= 1e-4


def test_bf16_export_loads_in_transformers_and_in_our_loader(tmp_path):
    cfg = qwen_config.tiny(tie_word_embeddings=False)
    model = _our_model(cfg, seed=31)
    hf_io.save_pretrained(model, tmp_path, dtype="bfloat16")
    assert set(hf_io.SafetensorsReader(tmp_path).dtypes().values()) == {np.dtype(ml_dtypes.bfloat16)}
    hf16 = _hf_load(tmp_path, "auto")
    assert next(hf16.parameters()).dtype == torch.bfloat16
    ours16 = hf_io.load_pretrained(tmp_path)  # param dtype from config.json: bfloat16
    assert ours16.config.param_dtype == "bfloat16"
    assert ours16.language_model.norm.scale.get_value().dtype == jax.numpy.bfloat16
    # The same bf16-rounded weights in fp32 on both sides agree to fp32 precision ...
    ours32 = hf_io.load_pretrained(tmp_path, param_dtype="float32")
    hf32 = _hf_load(tmp_path, torch.float32)
    inp = _inputs(cfg, seed=7)
    ref = _ours(model, inp)
    assert _max_diff(_ours(ours32, inp), _theirs(hf32, cfg, inp), inp["attention_mask"]) <= 1e-4
    # ... and rounding the weights to bf16 moves logits by a bf16-sized amount, not more.
    scale = np.abs(ref).max()
    assert _max_diff(_ours(ours32, inp), ref, inp["attention_mask"]) <= 0.05 * scale


def _write_checkpoint(path, cfg, sd, max_shard_bytes="1GB", config_json=None):
    hf_io.save_state_dict(sd, path, max_shard_bytes=max_shard_bytes)
    (path / "config.json").write_text(json.dumps(config_json or cfg.to_hf_dict()))


def test_bad_checkpoints_fail_before_the_model_is_built(tmp_path, monkeypatch):
    cfg = qwen_config.tiny()
    sd = hf_io.random_state_dict(cfg, seed=41)

    def no_build():
        raise AssertionError("the model was built before the checkpoint was validated")
    monkeypatch.setattr(hf_io, "model_class", no_build)

    missing = dict(sd)
    del missing["model.language_model.layers.2.self_attn.k_norm.weight"]
    _write_checkpoint(tmp_path / "missing", cfg, missing)
    with pytest.raises(KeyError, match=r"layers\.2\.self_attn\.k_norm\.weight"):
        hf_io.load_pretrained(tmp_path / "missing")

    bad = dict(sd)
    bad["model.visual.blocks.1.mlp.linear_fc1.weight"] = np.zeros((3, 5), np.float32)
    _write_checkpoint(tmp_path / "shape", cfg, bad)
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.linear_fc1\.weight.*\(3, 5\)"):
        hf_io.load_pretrained(tmp_path / "shape")

    _write_checkpoint(tmp_path / "shard", cfg, sd, max_shard_bytes="100KB")
    index = json.loads((tmp_path / "shard" / hf_io.SAFE_INDEX).read_text())
    gone = sorted(set(index["weight_map"].values()))[-1]
    os.remove(tmp_path / "shard" / gone)
    with pytest.raises(hf_io.CheckpointError, match=gone):
        hf_io.load_pretrained(tmp_path / "shard")

    other = cfg.to_hf_dict()
    other["model_type"] = "qwen2_5_vl"
    _write_checkpoint(tmp_path / "type", cfg, sd, config_json=other)
    with pytest.raises(qwen_config.ConfigError, match=r"config\.json.*model_type.*qwen2_5_vl"):
        hf_io.load_pretrained(tmp_path / "type")


def test_legacy_4_57_config_layout_loads(tmp_path):
    cfg = qwen_config.tiny(tie_word_embeddings=True)
    sd = hf_io.random_state_dict(cfg, seed=51)
    legacy = cfg.to_hf_dict()
    rope = legacy["text_config"].pop("rope_parameters")
    legacy["text_config"].update(rope_theta=rope["rope_theta"],
                                 rope_scaling={"rope_type": "default", "mrope_section": rope["mrope_section"],
                                               "mrope_interleaved": True})
    legacy["vision_config"].pop("rope_parameters")
    for d in (legacy, legacy["text_config"], legacy["vision_config"]):
        d.pop("dtype")
    legacy["torch_dtype"] = "bfloat16"
    _write_checkpoint(tmp_path, cfg, sd, config_json=legacy)
    model = hf_io.load_pretrained(tmp_path)
    assert model.config == cfg.replace(param_dtype="bfloat16", dtype="bfloat16")
    np.testing.assert_array_equal(
        np.asarray(model.language_model.layers[1].mlp.down_proj.kernel.get_value(), np.float32),
        sd["model.language_model.layers.1.mlp.down_proj.weight"].T.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_load_places_each_tensor_on_its_shard(tmp_path):
    from jax.sharding import AxisType, PartitionSpec as P
    cfg = qwen_config.tiny()
    sd = hf_io.random_state_dict(cfg, seed=61)
    _write_checkpoint(tmp_path, cfg, sd)
    mesh = jax.make_mesh((1, 4, 2, 1), ("data", "fsdp", "tensor", "sequence"), axis_types=(AxisType.Auto,) * 4)
    model = hf_io.load_pretrained(tmp_path, mesh=mesh, rules="fsdp_tp")
    q = model.language_model.layers[0].self_attn.q_proj.kernel.get_value()
    assert q.sharding.spec == P("fsdp", "tensor", None)
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (16, 2, 16)
    by_name = {e.hf: e for e in keymap.key_entries(cfg)}
    e = by_name["model.language_model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(np.asarray(q), e.to_nnx(sd[e.hf]))


def test_variables_loading_does_not_fill_are_initialised(monkeypatch):
    """A module holding a non-parameter variable (a buffer) still comes out concrete."""
    import jax.numpy as jnp

    class Toy(nnx.Module):
        def __init__(self, config, *, rngs):
            self.config = config
            self.w = nnx.Param(jax.random.normal(rngs.params(), (3, 2)))
            self.table = nnx.Variable(jnp.arange(5.0) * config.text.rope_theta)

    monkeypatch.setattr(hf_io, "model_class", lambda: Toy)
    cfg = qwen_config.tiny()
    model = hf_io.abstract_model(cfg, seed=4)
    assert isinstance(model.table.get_value(), jax.ShapeDtypeStruct)
    model.w.set_value(jnp.ones((3, 2)))
    model = hf_io.materialise_rest(model, cfg, seed=4)
    np.testing.assert_array_equal(np.asarray(model.table.get_value()), np.arange(5.0) * cfg.text.rope_theta)
    np.testing.assert_array_equal(np.asarray(model.w.get_value()), np.ones((3, 2)))
