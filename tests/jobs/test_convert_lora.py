"""LoRA through the CLI: `genevolve import-hf HF CKPT --adapter PEFT_DIR` holds the adapter in the
checkpoint, `export-hf` writes it back as the same PEFT folder and `export-hf --merge` as a plain
HF model with the adapted model's logits; loading the checkpoint for training keeps adapters of
the same config (training goes on) and merges those of another before fresh ones."""
import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from genevolve_jax import cli
from genevolve_jax.models import hf_io, peft_io
from genevolve_jax.models.layers import LoRAParam
from genevolve_jax.models.loading import load_model
from genevolve_jax.models.qwen3_vl.config import HEAD_LORA_TARGET, TEXT_LORA_TARGETS, LoRAConfig, tiny
from genevolve_jax.models.qwen3_vl.model import forward, prepare_inputs

# The head adapted at a rank of its own (rank_pattern / alpha_pattern in the PEFT folder).
LORA = LoRAConfig(4, 8.0, TEXT_LORA_TARGETS + (HEAD_LORA_TARGET,), head_rank=8)


def logits(model, ids):
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(forward)(graphdef, state, prepare_inputs(model.config, ids)))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(HF base dir, PEFT adapter dir, the adapted model they make, checkpoint imported with the adapter)."""
    cfg = tiny()
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=2),
                      vision=dataclasses.replace(cfg.vision, depth=1, deepstack_visual_indexes=(0,)))
    sd = hf_io.random_state_dict(cfg, seed=2)
    root = tmp_path_factory.mktemp("lora_cli")
    hf_io.save_state_dict(sd, root / "hf")
    hf_io.write_hf_config(root / "hf", cfg, "float32")
    adapted = hf_io.model_from_state_dict(cfg.replace(lora=LORA), sd)
    graphdef, state = nnx.split(adapted)
    flat = dict(nnx.to_flat_state(state))
    rng = np.random.default_rng(3)
    for path, var in flat.items():
        if isinstance(var, LoRAParam):
            flat[path] = var.replace(rng.normal(0, 0.05, var.get_value().shape).astype(np.float32))
    adapted = nnx.merge(graphdef, nnx.from_flat_state(flat))
    peft_io.save_adapter(adapted, root / "adapter")
    assert cli.main(["import-hf", str(root / "hf"), str(root / "ckpt"), "--adapter", str(root / "adapter")]) == 0
    return root, adapted


def test_export_writes_the_imported_adapter_and_merge_writes_the_adapted_model(dirs):
    root, adapted = dirs
    assert cli.main(["export-hf", str(root / "ckpt"), str(root / "peft_out")]) == 0
    assert json.loads((root / "peft_out" / peft_io.ADAPTER_CONFIG).read_text()) == \
        json.loads((root / "adapter" / peft_io.ADAPTER_CONFIG).read_text())
    want, got = (load_file(d / peft_io.ADAPTER_WEIGHTS) for d in (root / "adapter", root / "peft_out"))
    assert set(got) == set(want) and len(want) == 2 * (7 * 2 + 1)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert cli.main(["export-hf", str(root / "ckpt"), str(root / "merged"), "--merge", "--dtype", "float32"]) == 0
    merged = hf_io.load_pretrained(root / "merged")
    assert merged.config.lora is None
    ids = np.random.default_rng(0).integers(10, 400, (2, 10))
    np.testing.assert_allclose(logits(merged, ids), logits(adapted, ids), rtol=0, atol=1e-5)


def test_training_loads_keep_same_adapters_and_merge_others(dirs):
    root, adapted = dirs
    ids = np.random.default_rng(1).integers(10, 400, (2, 10))
    want = logits(adapted, ids)
    same = load_model(root / "ckpt", lora=LORA)                      # adapters go on training
    assert same.config.lora == LORA and same.lm_head.lora_b.get_value().shape[0] == 8
    np.testing.assert_array_equal(np.asarray(same.language_model.layers[0].mlp.up_proj.lora_b.get_value()),
                                  np.asarray(adapted.language_model.layers[0].mlp.up_proj.lora_b.get_value()))
    other = load_model(root / "ckpt", lora=LoRAConfig(2, 4.0, ("q_proj", "v_proj")))   # merged, then fresh
    assert other.config.lora.rank == 2 and other.language_model.layers[0].mlp.up_proj.lora is None
    np.testing.assert_allclose(logits(other, ids), want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(logits(same, ids), want, rtol=0, atol=1e-6)
