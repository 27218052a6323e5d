"""LoRA adapters in PEFT's format against the installed ``peft``: an adapter we write, loaded by
``peft.PeftModel.from_pretrained`` on transformers' Qwen3VLForConditionalGeneration, gives our
logits (fp32, with an image) within 1e-4, text, vision and head adapters; the config round-trips and
reading it back into fresh adapters gives the same tensors."""
import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from genevolve_jax.models import hf_io, peft_io
from genevolve_jax.models.layers import LoRAParam
from genevolve_jax.models.qwen3_vl.config import TEXT_LORA_TARGETS, VISION_LORA_TARGETS, ConfigError, LoRAConfig, tiny
from genevolve_jax.models.qwen3_vl.hf_reference import hf_logits
from genevolve_jax.models.qwen3_vl.model import forward, prepare_inputs
from tests.fixtures import hf_qwen3_vl as R

peft = pytest.importorskip("peft")

# The head at a rank of its own (PEFT's rank_pattern / alpha_pattern for lm_head).
LORA = LoRAConfig(4, 8.0, TEXT_LORA_TARGETS + ("vision.qkv", "vision.proj", "lm_head"), head_rank=8)


def small_config():
    cfg = tiny()
    return cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=2),
                       vision=dataclasses.replace(cfg.vision, depth=2, deepstack_visual_indexes=(0, 1)))


def trained(model, seed=1):
    """``model`` with random B (and its random A): an adapter that has moved."""
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    rng = np.random.default_rng(seed)
    for path, var in flat.items():
        if path[-1] == "lora_b":
            flat[path] = var.replace(rng.normal(0, 0.05, var.get_value().shape).astype(np.float32))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(config, our adapted model, its PEFT directory, inputs with one image)."""
    cfg = small_config()
    ours = trained(hf_io.model_from_state_dict(cfg.replace(lora=LORA), hf_io.random_state_dict(cfg, seed=0)))
    path = tmp_path_factory.mktemp("peft") / "adapter"
    assert sorted(peft_io.save_adapter(ours, path)) == sorted([peft_io.ADAPTER_CONFIG, peft_io.ADAPTER_WEIGHTS])
    rng = np.random.default_rng(5)
    grid = np.array([[1, 4, 4]])
    row = R.text_tokens(cfg, 3, rng) + R.placeholder_segment(cfg, grid[0], "image", rng) + R.text_tokens(cfg, 6, rng)
    inputs = dict(input_ids=np.array([row]), pixel_values=R.random_pixels(cfg, grid, rng), image_grid_thw=grid)
    return cfg, ours, path, inputs


def our_logits(model, inputs):
    graphdef, state = nnx.split(model)
    batch = prepare_inputs(model.config, inputs["input_ids"], pixel_values=inputs["pixel_values"],
                           image_grid_thw=inputs["image_grid_thw"])
    return np.asarray(jax.jit(forward)(graphdef, state, batch))


def test_peft_loads_our_adapter_and_gives_our_logits(written):
    cfg, ours, path, inputs = written
    hf = R.random_hf_model(cfg, seed=0)
    base = hf_logits(hf, cfg, inputs["input_ids"], pixel_values=inputs["pixel_values"],
                     image_grid_thw=inputs["image_grid_thw"])
    wrapped = peft.PeftModel.from_pretrained(hf, str(path))    # injects the LoRA layers into ``hf``
    adapted = [n for n, m in wrapped.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    # 7 text projections × 2 layers + qkv and proj × 2 vision blocks (not the patch embedding's
    # proj) + the head
    assert len(adapted) == 7 * 2 + 2 * 2 + 1 and not any("patch_embed" in n or "merger" in n for n in adapted)
    assert any(n.endswith(".lm_head") for n in adapted)
    want = hf_logits(hf, cfg, inputs["input_ids"], pixel_values=inputs["pixel_values"],
                     image_grid_thw=inputs["image_grid_thw"])
    got = our_logits(ours, inputs)
    assert np.abs(want - base).max() > 1e-2     # the adapters change the logits
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert wrapped.base_model.model.lm_head.r["default"] == 8 and wrapped.base_model.model.lm_head.scaling[
        "default"] == LORA.scale


def test_one_rank_form_pads_every_adapter_and_peft_gives_the_same_logits(written, tmp_path):
    """The folder an SGLang server loads (one ``r`` for every module): every adapter padded with
    zeros to the head's rank 8 at the common scale; PEFT reads it to the same logits."""
    cfg, ours, _, inputs = written
    peft_io.save_adapter(ours, tmp_path, one_rank=True)
    d = json.loads((tmp_path / peft_io.ADAPTER_CONFIG).read_text())
    assert (d["r"], d["lora_alpha"]) == (8, 16.0) and "rank_pattern" not in d
    tensors = load_file(tmp_path / peft_io.ADAPTER_WEIGHTS)
    q_a = tensors[f"{peft_io.PEFT_PREFIX}model.language_model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert q_a.shape[0] == 8 and np.any(q_a[:4]) and not np.any(q_a[4:])
    assert all(v.shape[0 if ".lora_A." in k else 1] == 8 for k, v in tensors.items())
    wrapped = peft.PeftModel.from_pretrained(R.random_hf_model(cfg, seed=0), str(tmp_path))
    want = hf_logits(wrapped.base_model.model, cfg, inputs["input_ids"], pixel_values=inputs["pixel_values"],
                     image_grid_thw=inputs["image_grid_thw"])
    np.testing.assert_allclose(our_logits(ours, inputs), want, rtol=0, atol=1e-4)


def test_the_config_round_trips_and_import_fills_fresh_adapters(written):
    cfg, ours, path, inputs = written
    assert peft_io.read_adapter_config(path) == LORA
    text_only = peft_io.adapter_config(LoRAConfig(8, 16.0))
    assert text_only["target_modules"] == list(TEXT_LORA_TARGETS) and text_only["r"] == 8
    head_lora = LoRAConfig(8, 16.0, TEXT_LORA_TARGETS + ("lm_head",))
    with_head = peft_io.adapter_config(head_lora)
    assert with_head["target_modules"] == list(TEXT_LORA_TARGETS) + ["lm_head"]
    (path.parent / "with_head").mkdir()
    (path.parent / "with_head" / peft_io.ADAPTER_CONFIG).write_text(json.dumps(with_head))
    assert peft_io.read_adapter_config(path.parent / "with_head") == head_lora
    graphdef, state = nnx.split(ours)
    flat = dict(nnx.to_flat_state(state))
    for key, var in flat.items():
        if isinstance(var, LoRAParam):
            flat[key] = var.replace(np.zeros(var.get_value().shape, np.float32))
    fresh = nnx.merge(graphdef, nnx.from_flat_state(flat))
    assert not any(np.any(x) for x in jax.tree.leaves(nnx.state(fresh, LoRAParam)))
    peft_io.load_adapter(fresh, path)
    for a, b in zip(jax.tree.leaves(nnx.state(fresh, LoRAParam)), jax.tree.leaves(nnx.state(ours, LoRAParam))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A file that lacks an adapter of the model, or a tensor of another rank, and a DoRA adapter
    # fail naming what is wrong.
    tensors = load_file(path / peft_io.ADAPTER_WEIGHTS)
    first = sorted(tensors)[0]
    for name, broken in (("missing", {k: v for k, v in tensors.items() if k != first}),
                         ("has shape", {**tensors, first: np.concatenate([tensors[first]] * 2)})):
        (path.parent / name).mkdir()
        save_file(broken, path.parent / name / peft_io.ADAPTER_WEIGHTS)
        with pytest.raises(ValueError, match=name):
            peft_io.load_adapter(fresh, path.parent / name)
    d = json.loads((path / peft_io.ADAPTER_CONFIG).read_text())
    (path.parent / "dora").mkdir()
    (path.parent / "dora" / peft_io.ADAPTER_CONFIG).write_text(json.dumps({**d, "use_dora": True}))
    with pytest.raises(ConfigError, match="use_dora"):
        peft_io.read_adapter_config(path.parent / "dora")
    # A head rank is read from rank_pattern only at the adapter's scale, and only for lm_head.
    assert (d["rank_pattern"], d["alpha_pattern"]) == ({"lm_head": 8}, {"lm_head": 16.0})
    for name, bad, field in (("scale", {"alpha_pattern": {"lm_head": 8.0}}, "alpha_pattern"),
                             ("other", {"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
                             ("bad_rank", {"rank_pattern": {"lm_head": 0}}, "rank_pattern")):
        (path.parent / name).mkdir()
        (path.parent / name / peft_io.ADAPTER_CONFIG).write_text(json.dumps({**d, **bad}))
        with pytest.raises(ConfigError, match=field):
            peft_io.read_adapter_config(path.parent / name)
    assert set(VISION_LORA_TARGETS) - set(LORA.targets) == {"vision.linear_fc1", "vision.linear_fc2"}
