"""The train step with LoRA: only adapters train and hold optimiser state, the base (held in bf16)
stays bit for bit, adapters stay float32, and a sharded step (fsdp × tensor on 8 simulated
devices; fsdp × sequence) agrees with the one-device step, as compare-sharding checks for full
fine-tuning."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genevolve_jax.models import hf_io
from genevolve_jax.models.layers import LoRAParam
from genevolve_jax.models.lora import freeze_filter
from genevolve_jax.models.qwen3_vl.config import tiny
from genevolve_jax.sharding.mesh import make_mesh
from genevolve_jax.train.losses.step_losses import SFTLoss
from genevolve_jax.train.runtime import step_config
from genevolve_jax.train.runtime.state import create_train_state, is_vision_path
from genevolve_jax.train.runtime.step import TrainStep
from tests.fixtures.batches import packed_text_batch
from tests.fixtures.lora import HEADED_LORA

FAST = {"xla_backend_optimization_level": 0}
STEPS = 2


def lora_model():
    cfg = tiny()
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=1),
                      vision=dataclasses.replace(cfg.vision, depth=1, deepstack_visual_indexes=(0,)),
                      param_dtype="bfloat16", dtype="float32", lora=HEADED_LORA)
    return hf_io.model_from_state_dict(cfg, hf_io.random_state_dict(cfg, seed=0))


def train_cfg():
    c = step_config.default_config()
    c.optimizer.learning_rate = 1e-3
    c.optimizer.lora_learning_rate = 1e-2        # the one a model with adapters trains at
    c.optimizer.eps = 1e-3
    c.schedule.warmup_ratio = 0.0
    return step_config.validate(c)


def text_batch(rows=8, length=24, seed=0):
    return packed_text_batch(rows, length, seed)


def host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def run(model, sizes, devices=None, strategy="fsdp_tp"):
    """STEPS steps; (setup, initial host params, final params, final opt state, per-step metrics)."""
    mesh = make_mesh(sizes, devices)
    setup, params, opt = create_train_state(model, train_cfg(), mesh, strategy, total_steps=10,
                                            freeze=freeze_filter(True, is_vision_path))
    step = TrainStep(setup, SFTLoss(chunk_size=128), compute_dtype=jnp.float32, compiler_options=FAST)
    first, metrics = host(params), []
    for i in range(STEPS):
        params, opt, m = step(params, opt, text_batch(seed=i), jax.random.key(i))
        metrics.append(host(m))
    return setup, first, params, opt, metrics


@pytest.fixture(scope="module")
def model():
    return lora_model()


@pytest.fixture(scope="module")
def one_device(model):
    return run(model, {"fsdp": 1}, devices=jax.devices()[:1])


def test_only_adapters_train_and_the_base_stays_bit_for_bit(one_device):
    setup, first, params, opt, metrics = one_device
    assert float(setup.schedule(0)) == np.float32(1e-2)      # optimizer.lora_learning_rate
    train_vars = jax.tree.leaves(params["train"], is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert train_vars and all(isinstance(v, LoRAParam) for v in train_vars)
    assert not any(isinstance(v, LoRAParam) for v in
                   jax.tree.leaves(params["frozen"], is_leaf=lambda x: isinstance(x, nnx.Variable)))
    frozen = host(params["frozen"])
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(first["frozen"])[0], jax.tree.leaves(frozen)):
        assert a.dtype == jnp.bfloat16, path   # the base is held in bf16
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(first["train"]),
                                                        jax.tree.leaves(host(params["train"])))]
    assert min(moved) > 0, "every adapter (A and B) moves"
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(host(params["train"])))
    # The optimiser holds the adapters' moments and its counters, nothing of the base's size.
    n_adapter = sum(x.size for x in jax.tree.leaves(first["train"]))
    n_opt = sum(x.size for x in jax.tree.leaves(opt))
    assert 2 * n_adapter <= n_opt <= 2 * n_adapter + 16
    assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)


@pytest.mark.parametrize("strategy,sizes", [("fsdp_tp", {"fsdp": 4, "tensor": 2}),
                                            ("fsdp_sp", {"fsdp": 2, "sequence": 4})])
def test_sharded_step_agrees_with_one_device(model, one_device, strategy, sizes):
    _, _, ref_params, _, ref_metrics = one_device
    setup, _, params, _, metrics = run(model, sizes, strategy=strategy)
    q_a = setup.param_shardings["train"]["language_model"]["layers"][0]["self_attn"]["q_proj"]["lora_a"]
    q_b = setup.param_shardings["train"]["language_model"]["layers"][0]["self_attn"]["q_proj"]["lora_b"]
    assert tuple(q_a.spec) == ("fsdp", None)              # A like the kernel's input dim
    # B like the kernel's output (heads) dims: split over tensor where there is one
    assert tuple(q_b.spec) == (None, "tensor" if "tensor" in sizes else None, None)
    for m, r in zip(metrics, ref_metrics):
        np.testing.assert_allclose(m["loss"], r["loss"], rtol=1e-5)
        np.testing.assert_allclose(m["grad_norm"], r["grad_norm"], rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(host(params))[0], jax.tree.leaves(host(ref_params))):
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=0, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
