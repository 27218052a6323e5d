"""The HF key map is a bijection over transformers' real Qwen3-VL state dict, shapes included."""
import numpy as np
import pytest
import torch
import transformers

from genevolve_jax.models.qwen3_vl import config as qwen_config
from genevolve_jax.models.qwen3_vl import keymap


def _hf_model(cfg: qwen_config.Qwen3VLConfig):
    hf_cfg = transformers.Qwen3VLConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                           if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    return transformers.Qwen3VLForConditionalGeneration(hf_cfg).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_key_map_is_a_bijection_over_the_real_state_dict(tied):
    cfg = qwen_config.tiny(tie_word_embeddings=tied)
    sd = {k: v for k, v in _hf_model(cfg).state_dict().items()}
    entries = keymap.key_entries(cfg)
    hf_names = [e.hf for e in entries]
    nnx_paths = [e.nnx for e in entries]
    assert len(set(hf_names)) == len(hf_names) and len(set(nnx_paths)) == len(nnx_paths)
    expected = set(sd) - ({"lm_head.weight"} if tied else set())
    assert set(hf_names) == expected
    rng = np.random.default_rng(1)
    for e in entries:
        assert tuple(sd[e.hf].shape) == e.hf_shape, e.hf
        a = rng.standard_normal(e.hf_shape).astype(np.float32)
        b = e.to_nnx(a)
        assert b.shape == e.nnx_shape
        np.testing.assert_array_equal(e.to_hf(b), a)


def test_linear_entries_match_torch_semantics():
    """y = x @ W.T in torch equals contracting x with our input-major kernel."""
    cfg = qwen_config.tiny()
    rng = np.random.default_rng(2)
    by_name = {e.hf: e for e in keymap.key_entries(cfg)}
    e = by_name["model.language_model.layers.0.self_attn.o_proj.weight"]
    w = rng.standard_normal(e.hf_shape)
    x = rng.standard_normal((5, cfg.text.num_attention_heads, cfg.text.head_dim))
    ours = np.einsum("bhd,hde->be", x, e.to_nnx(w))
    np.testing.assert_allclose(ours, x.reshape(5, -1) @ w.T, rtol=1e-12)
    e = by_name["model.visual.patch_embed.proj.weight"]
    w = rng.standard_normal(e.hf_shape)
    patch = rng.standard_normal((7,) + e.hf_shape[1:])
    conv = np.einsum("nctpq,dctpq->nd", patch, w)  # Conv3d with kernel == stride == patch
    np.testing.assert_allclose(patch.reshape(7, -1) @ e.to_nnx(w), conv, rtol=1e-12)
    e = by_name["model.visual.blocks.0.attn.qkv.weight"]
    w = rng.standard_normal(e.hf_shape)
    x = rng.standard_normal((3, cfg.vision.hidden_size))
    q_torch = (x @ w.T)[:, : cfg.vision.hidden_size].reshape(3, cfg.vision.num_heads, -1)
    np.testing.assert_allclose(np.einsum("nd,dshk->nshk", x, e.to_nnx(w))[:, 0], q_torch, rtol=1e-12)


def test_bad_checkpoints_fail_before_reading_with_the_key_named():
    cfg = qwen_config.tiny()
    shapes = {e.hf: e.hf_shape for e in keymap.key_entries(cfg)}
    missing = dict(shapes)
    del missing["model.language_model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="layers.1.mlp.up_proj.weight"):
        keymap.check_hf_keys(cfg, missing)
    bad = dict(shapes)
    bad["model.visual.blocks.2.attn.qkv.bias"] = (5,)
    with pytest.raises(ValueError, match=r"blocks.2.attn.qkv.bias.*\(5,\)"):
        keymap.check_hf_keys(cfg, bad)
    extra = dict(shapes)
    extra["model.language_model.layers.9.mlp.up_proj.weight"] = (1, 1)
    with pytest.raises(ValueError, match="layers.9"):
        keymap.check_hf_keys(cfg, extra)


def test_config_round_trips_through_transformers_and_rejects_other_models():
    cfg = qwen_config.tiny(tie_word_embeddings=True)
    hf_cfg = transformers.Qwen3VLConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                           if k not in ("architectures", "model_type")})
    again = qwen_config.Qwen3VLConfig.from_hf_dict(hf_cfg.to_dict())
    assert again == cfg
    legacy = cfg.to_hf_dict()
    rope = legacy["text_config"].pop("rope_parameters")
    legacy["text_config"]["rope_theta"] = rope["rope_theta"]
    legacy["text_config"]["rope_scaling"] = {"rope_type": "default", "mrope_section": rope["mrope_section"],
                                             "mrope_interleaved": True}
    assert qwen_config.Qwen3VLConfig.from_hf_dict(legacy) == cfg
    with pytest.raises(qwen_config.ConfigError, match="model_type"):
        qwen_config.Qwen3VLConfig.from_hf_dict({**legacy, "model_type": "qwen2_5_vl"})
    del legacy["text_config"]["rope_scaling"]
    with pytest.raises(qwen_config.ConfigError, match="mrope_section"):
        qwen_config.Qwen3VLConfig.from_hf_dict(legacy)
    broken = cfg.to_hf_dict()
    del broken["vision_config"]["depth"]
    with pytest.raises(qwen_config.ConfigError, match="vision_config.depth"):
        qwen_config.Qwen3VLConfig.from_hf_dict(broken)
