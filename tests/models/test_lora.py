"""LoRA adapters in the model: rank 0 is the base's exact tree, fresh adapters give the base's logits
bit for bit (text and an image, vision adapters on), the adapter delta against float64 numpy, and
merged (W + s·A·B) against unmerged logits at 1e-5 in float32."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from genevolve_jax.models import hf_io, lora
from genevolve_jax.models.layers import LoRAParam
from genevolve_jax.models.qwen3_vl.config import LORA_TARGETS, TEXT_LORA_TARGETS, ConfigError, LoRAConfig, tiny
from genevolve_jax.models.qwen3_vl.model import forward, prepare_inputs
from genevolve_jax.train.runtime.model_setup import default_model_config, lora_config, validate_model
from tests.fixtures import hf_qwen3_vl as R
from tests.fixtures.lora import with_random_b

RANK, ALPHA = 4, 8.0


def small_config(**kw):
    cfg = tiny()
    return cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=2),
                       vision=dataclasses.replace(cfg.vision, depth=2, deepstack_visual_indexes=(0, 1)), **kw)


@pytest.fixture(scope="module")
def models():
    """(base, adapted) from the same random HF weights; the adapted one on text and vision blocks
    and the head."""
    cfg = small_config()
    sd = hf_io.random_state_dict(cfg, seed=0)
    adapted_cfg = cfg.replace(lora=LoRAConfig(RANK, ALPHA, LORA_TARGETS))
    return hf_io.model_from_state_dict(cfg, sd), hf_io.model_from_state_dict(adapted_cfg, sd)


@pytest.fixture(scope="module")
def image_batch(models):
    cfg = models[0].config
    rng = np.random.default_rng(7)
    grid = np.array([[1, 4, 4]])
    rows = [R.text_tokens(cfg, 3, rng) + R.placeholder_segment(cfg, grid[0], "image", rng) + R.text_tokens(cfg, 4, rng),
            R.text_tokens(cfg, 11, rng)]
    ids, mask = R.pad_rows(rows, "left")
    return dict(input_ids=ids, attention_mask=mask, pixel_values=R.random_pixels(cfg, grid, rng), image_grid_thw=grid)


_forward = jax.jit(forward)


def logits(model, b):
    graphdef, state = nnx.split(model)
    batch = prepare_inputs(model.config, b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"],
                           image_grid_thw=b["image_grid_thw"])
    return np.asarray(_forward(graphdef, state, batch))


def test_rank_zero_is_the_base_tree_and_the_config_is_checked():
    cfg = default_model_config()
    assert lora_config(validate_model(cfg)) is None
    cfg.lora.rank = 8
    assert lora_config(cfg) == LoRAConfig(8, 16.0, TEXT_LORA_TARGETS)
    for field, bad in (("rank", -1), ("alpha", 0.0), ("targets", ["q_proj", "embed_tokens"])):
        broken = default_model_config()
        broken.lora[field] = bad
        with pytest.raises(ValueError, match=f"model.lora.{field}"):
            validate_model(broken)
    with pytest.raises(ConfigError, match="lora targets"):
        LoRAConfig(4, 8.0, ("embed_tokens",))
    # The head's adapter is a kernel delta: no input dropout, and no separate head when tied.
    head = default_model_config()
    head.lora.rank, head.lora.dropout, head.lora.targets = 8, 0.1, ["q_proj", "lm_head"]
    with pytest.raises(ValueError, match="model.lora.dropout"):
        validate_model(head)
    with pytest.raises(ConfigError, match="dropout"):
        LoRAConfig(4, 8.0, ("lm_head",), dropout=0.1)
    with pytest.raises(ConfigError, match="untied head"):
        small_config(tie_word_embeddings=True, lora=LoRAConfig(4, 8.0, ("q_proj", "lm_head")))
    # A head rank of its own: only with the head as a target, at the adapters' scale.
    head.lora.dropout, head.lora.head_rank = 0.0, 32
    lora = lora_config(validate_model(head))
    assert (lora.head.rank, lora.head.scale, lora.max_rank) == (32, lora.scale, 32)
    assert not lora.same_adapters(LoRAConfig(8, 16.0, ("q_proj", "lm_head")))
    assert LoRAConfig(8, 16.0, ("q_proj", "lm_head"), head_rank=8) == LoRAConfig(8, 16.0, ("q_proj", "lm_head"))
    head.lora.targets = ["q_proj"]
    with pytest.raises(ValueError, match="model.lora.head_rank"):
        validate_model(head)
    with pytest.raises(ConfigError, match="head_rank"):
        LoRAConfig(4, 8.0, ("q_proj",), head_rank=8)


def test_adapters_are_float32_params_on_the_targets_and_the_base_is_untouched(models):
    base, adapted = models
    base_state = nnx.state(base, nnx.Param)
    adapted_base = nnx.state(adapted, nnx.Not(LoRAParam))
    assert jax.tree.structure(base_state) == jax.tree.structure(adapted_base)
    for a, b in zip(jax.tree.leaves(base_state), jax.tree.leaves(adapted_base)):
        np.testing.assert_array_equal(a, b)
    flat = dict(nnx.to_flat_state(nnx.state(adapted, LoRAParam)))
    cfg = adapted.config
    # 7 text projections × 2 layers + 4 vision projections × 2 blocks + the head, an A and a B each
    assert len(flat) == 2 * (7 * cfg.text.num_hidden_layers + 4 * cfg.vision.depth + 1)
    q = adapted.language_model.layers[0].self_attn.q_proj
    t = cfg.text
    assert q.lora_a.get_value().shape == (t.hidden_size, RANK)
    assert q.lora_b.get_value().shape == (RANK, t.num_attention_heads, t.head_dim)
    assert q.lora_a.get_metadata()["logical_axes"] == ("embed", "lora_rank")
    assert q.lora_b.get_metadata()["logical_axes"] == ("lora_rank", "heads", "head_dim")
    head = adapted.lm_head
    assert head.lora_a.get_metadata()["logical_axes"] == ("embed", "lora_rank")
    assert head.lora_b.get_value().shape == (RANK, t.vocab_size)
    assert head.lora_b.get_metadata()["logical_axes"] == ("lora_rank", "vocab")
    for path, var in flat.items():
        assert var.get_value().dtype == np.float32, path
        if path[-1] == "lora_b":
            assert not np.any(var.get_value()), path
        else:   # PEFT's kaiming-uniform bound 1/√fan_in, and not degenerate
            a = np.asarray(var.get_value())
            fan_in = int(np.prod(a.shape[:-1]))
            assert 0.5 / np.sqrt(fan_in) < np.abs(a).max() <= 1 / np.sqrt(fan_in), path


def test_fresh_adapters_give_the_base_logits_bit_for_bit(models, image_batch):
    base, adapted = models
    np.testing.assert_array_equal(logits(adapted, image_batch), logits(base, image_batch))


def test_adapter_delta_against_float64_numpy(models):
    q = with_random_b(models[1]).language_model.layers[1].self_attn.o_proj   # a two-dim input (heads, head_dim)
    x = np.random.default_rng(3).normal(size=(2, 5) + q.in_shape).astype(np.float32)
    a, b = (np.asarray(v.get_value(), np.float64) for v in (q.lora_a, q.lora_b))
    want = (ALPHA / RANK) * np.einsum("btij,ijr,rd->btd", x.astype(np.float64), a, b)
    np.testing.assert_allclose(np.asarray(q.adapter_delta(x)), want, rtol=0, atol=1e-6)
    assert np.abs(want).max() > 1e-2


def test_merged_model_equals_the_adapted_one(models, image_batch):
    trained = with_random_b(models[1])
    unmerged = logits(trained, image_batch)
    assert np.abs(unmerged - logits(models[0], image_batch)).max() > 1e-3   # the adapters do something
    merged = lora.merged_model(trained)
    assert merged.config.lora is None and not nnx.state(merged, LoRAParam)
    np.testing.assert_allclose(logits(merged, image_batch), unmerged, rtol=0, atol=1e-5)
