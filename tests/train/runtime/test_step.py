"""The sharded train step on 8 simulated CPU devices: strategies agree with the single-device
step, accumulation equals a bigger batch, frozen params stay frozen, remat changes nothing."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genevolve_jax.data.packing import Trajectory, pack
from genevolve_jax.models import hf_io
from genevolve_jax.models.qwen3_vl import rope
from genevolve_jax.models.qwen3_vl.config import tiny
from genevolve_jax.sharding.mesh import MeshError, make_mesh
from genevolve_jax.train.losses.step_losses import SFTLoss
from genevolve_jax.train.runtime import step_config
from genevolve_jax.train.runtime.state import bytes_per_device, create_train_state, is_vision_path, make_schedule
from genevolve_jax.train.runtime.step import TrainStep
from tests.fixtures.batches import packed_text_batch

FAST = {"xla_backend_optimization_level": 0}


def small_config(**kw):
    cfg = tiny()
    return cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=2),
                       vision=dataclasses.replace(cfg.vision, depth=2, deepstack_visual_indexes=(0, 1)), **kw)


def build_model(cfg, seed=0):
    """Random HF weights (random norms and biases too) loaded without running any initialiser."""
    return hf_io.model_from_state_dict(cfg, hf_io.random_state_dict(cfg, seed=seed))


def train_cfg(**kw):
    c = step_config.default_config()
    # A larger lr and eps than SFT's so that one update is large and smooth in the gradient:
    # params then differ visibly when gradients differ (Adam's first step is lr·sign(g) otherwise).
    c.optimizer.learning_rate = 1e-2
    c.optimizer.eps = 1e-3
    c.schedule.warmup_ratio = 0.0
    for k, v in kw.items():
        c[k] = v
    return step_config.validate(c)


def text_batch(rows=16, length=32, seed=0):
    return packed_text_batch(rows, length, seed)


@pytest.fixture(scope="module")
def model():
    return build_model(small_config())


def reference_batch():
    return text_batch(rows=8, seed=3)


@pytest.fixture(scope="module")
def reference(model):
    """The single-device float32 step (no accumulation) on :func:`reference_batch`: the parameters
    before and after it, and its metrics. The strategies, accumulation and bf16 tests compare against
    this one step, so that it compiles once for the module."""
    _, old, new, _, metrics = run_step(model, "fsdp", {"fsdp": 1}, reference_batch(), devices=jax.devices()[:1])
    return host(old), host(new), metrics


def run_step(model, strategy, sizes, batch, devices=None, accum=1, freeze=is_vision_path, dtype=jnp.float32,
             cfg=None):
    mesh = make_mesh(sizes, devices)
    setup, params, opt = create_train_state(model, cfg or train_cfg(), mesh, strategy, total_steps=10, freeze=freeze)
    step = TrainStep(setup, SFTLoss(chunk_size=128), grad_accum_steps=accum, compute_dtype=dtype, compiler_options=FAST)
    old = host(params)  # the step donates its inputs
    new_params, new_opt, metrics = step(params, opt, batch, jax.random.key(0))
    return setup, old, new_params, new_opt, jax.tree.map(np.asarray, metrics)


def host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def assert_trees_close(a, b, atol):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_strategies_match_single_device(model, reference):
    batch = reference_batch()
    old, ref_params, ref_m = reference
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(ref_params["train"]),
                                                            jax.tree.leaves(old["train"])))
    assert moved > 1e-3, "the step must move parameters for the comparison to mean anything"
    meshes = {"dp": {"data": 8}, "fsdp": {"fsdp": 8}, "tp": {"data": 4, "tensor": 2},
              "fsdp_tp": {"fsdp": 4, "tensor": 2}, "fsdp_sp": {"fsdp": 2, "sequence": 4}}
    for strategy, sizes in meshes.items():
        _, _, params, _, m = run_step(model, strategy, sizes, batch)
        np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-5, err_msg=strategy)
        np.testing.assert_allclose(m["grad_norm"], ref_m["grad_norm"], rtol=1e-5, err_msg=strategy)
        assert_trees_close(host(params), ref_params, atol=1e-5)


def test_fsdp_shards_params_and_optimizer(model):
    mesh = make_mesh({"fsdp": 8})
    _, params, opt = create_train_state(model, train_cfg(), mesh, "fsdp", total_steps=10, freeze=is_vision_path)
    total_params = sum(x.nbytes for x in jax.tree.leaves(params))
    total_opt = sum(x.nbytes for x in jax.tree.leaves(opt))
    assert bytes_per_device(params) <= 1.15 * total_params / 8
    assert bytes_per_device(opt) <= 1.15 * total_opt / 8
    # dp keeps everything whole on every device
    _, p_dp, _ = create_train_state(model, train_cfg(), make_mesh({"data": 8}), "dp", total_steps=10,
                                      freeze=is_vision_path)
    assert bytes_per_device(p_dp) == total_params


def test_grad_accumulation_equals_big_batch(model, reference):
    _, p1, m1 = reference                                   # the same batch in one micro-batch
    _, _, p4, _, m4 = run_step(model, "fsdp", {"fsdp": 1}, reference_batch(), devices=jax.devices()[:1], accum=4)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["weight"], m1["weight"])
    assert_trees_close(host(p4), p1, atol=1e-6)


def _image_batch(cfg, seed=4):
    """Two packed rows, one trajectory carrying a 1x4x4-patch image (4 merged placeholder tokens)."""
    rng = np.random.default_rng(seed)
    img = cfg.image_token_id
    ids = np.concatenate([rng.integers(1, 400, 5), [cfg.vision_start_token_id], [img] * 4,
                          [cfg.vision_end_token_id], rng.integers(1, 400, 8)])
    grid = np.array([[1, 4, 4]])
    pos, _ = rope.get_rope_index(ids[None], None, grid, None, None, spatial_merge_size=2,
                                 image_token_id=img, video_token_id=cfg.video_token_id)
    pixels = rng.standard_normal((16, cfg.vision.patch_dim)).astype(np.float32)
    t_img = Trajectory(ids, (np.arange(len(ids)) > 11).astype(np.float32), position_ids=pos[:, 0],
                       pixel_values=pixels, image_grid_thw=grid)
    t_txt = Trajectory(rng.integers(1, 400, 12), np.ones(12, np.float32))
    batch, _ = pack([t_img, t_txt], 24, num_rows=2)
    return batch


def test_frozen_vision_unchanged_with_images(model):
    batch = _image_batch(model.config)
    assert "pixel_values" in batch
    _, old, new, opt, m = run_step(model, "fsdp", {"fsdp": 2}, batch, devices=jax.devices()[:2])
    assert np.isfinite(m["loss"]) and m["weight"] > 0
    old, new = host(old), host(new)
    assert jax.tree.leaves(old["frozen"]), "the vision tower must be in the frozen set"
    assert "visual" not in old["train"] and "visual" in old["frozen"]
    for a, b in zip(jax.tree.leaves(old["frozen"]), jax.tree.leaves(new["frozen"])):
        np.testing.assert_array_equal(a, b)
    assert any(np.abs(a - b).max() > 1e-4 for a, b in zip(jax.tree.leaves(old["train"]),
                                                          jax.tree.leaves(new["train"])))
    # No optimiser state for frozen parameters.
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(opt)[0]]
    assert not any("visual" in p for p in paths)


@pytest.mark.slow
def test_remat_policies_give_equal_grads():
    """Scanned decoder under each remat policy, and the unscanned decoder, all holding the same
    weights (loaded from the same HF-named tensors): identical gradients."""
    batch = text_batch(rows=2, length=24, seed=5)
    arrays = {k: jnp.asarray(v) for k, v in batch.items()}
    loss_fn = SFTLoss(chunk_size=128)
    grads = {}
    for scan, policy in ((False, "none"), (True, "none"), (True, "full"), (True, "save_dots")):
        m = build_model(small_config(scan_layers=scan, remat=policy), seed=1)  # same HF weights
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)

        def f(p, rest):
            num, den, _ = loss_fn(nnx.merge(graphdef, p, rest), arrays, None)
            return num / den

        grads[scan, policy] = host(jax.jit(jax.grad(f), compiler_options=FAST)(params, rest))
    for policy in ("full", "save_dots"):
        assert_trees_close(grads[True, policy], grads[True, "none"], atol=1e-7)
    # Unscanned layer i's gradient is row i of the scanned (stacked) gradient.
    flat = grads[False, "none"]["language_model"]["layers"]
    stacked = grads[True, "none"]["language_model"]["layers"]
    for path, s in jax.tree_util.tree_flatten_with_path(stacked)[0]:
        for i in range(2):
            leaf = flat[i]
            for k in path:
                leaf = leaf[k.key] if hasattr(k, "key") else getattr(leaf, k.name)
            np.testing.assert_allclose(s[i], leaf, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_bf16_compute_keeps_fp32_master_weights(model, reference):
    _, _, m32 = reference                                   # the same batch in float32
    _, _, p16, _, m16 = run_step(model, "fsdp", {"fsdp": 1}, reference_batch(), devices=jax.devices()[:1],
                                 dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p16))
    np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=2e-2)


def test_schedule_warmup_then_cosine():
    c = step_config.default_config()
    s = make_schedule(c, 100)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(2)), 1e-5, rtol=1e-6)  # 2% of 100 steps of warmup
    np.testing.assert_allclose(float(s(51)), 0.5e-5, rtol=1e-3)
    assert float(s(100)) < 1e-9
    # optimizer.lora_learning_rate: the peak of a model that trains adapters, when set.
    assert make_schedule(c, 100, adapters=True)(2) == s(2)
    c.optimizer.lora_learning_rate = 3e-4
    np.testing.assert_allclose(float(make_schedule(c, 100, adapters=True)(2)), 3e-4, rtol=1e-6)
    np.testing.assert_allclose(float(make_schedule(c, 100)(2)), 1e-5, rtol=1e-6)


def test_sft_loss_honours_the_loss_config(model):
    """SFT reads loss.logprob.sft_temperature and chunk_size: the step's loss (two micro-batches)
    equals the token-mean NLL of log_softmax(logits / T) computed in float64 numpy from the full
    logits, at a random temperature and a chunk size that does not divide the vocabulary."""
    from genevolve_jax.train.losses.config import default_loss_config
    from genevolve_jax.train.runtime.batch_layout import hidden_states_of
    rng = np.random.default_rng(11)
    cfg = default_loss_config()
    cfg.logprob.sft_temperature = float(rng.uniform(0.5, 2.5))
    cfg.logprob.chunk_size = 96
    batch = text_batch(rows=4, length=24, seed=int(rng.integers(100)))
    mesh = make_mesh({"fsdp": 1}, jax.devices()[:1])
    setup, params, opt = create_train_state(model, train_cfg(), mesh, "fsdp", total_steps=10, freeze=is_vision_path)
    # One compiled forward (op by op, the model's ~90 small programs compile one each).
    full_logits = nnx.jit(lambda m, b: m.logits(hidden_states_of(m, b)))
    logits = np.asarray(full_logits(model, {k: jnp.asarray(v) for k, v in batch.items()}),
                        np.float64) / cfg.logprob.sft_temperature
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, batch["targets"][..., None].astype(np.int64), -1)[..., 0]
    mask = batch["loss_mask"].astype(np.float64)
    want = -(picked * mask).sum() / mask.sum()
    _, _, m = TrainStep(setup, SFTLoss(cfg), grad_accum_steps=2, compiler_options=FAST)(
        params, opt, batch, jax.random.key(0))
    np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)
    assert float(m["sft/bad_targets"]) == 0
    bad = default_loss_config()
    bad.sft.aggregation = "seq-mean-token-sum"
    with pytest.raises(ValueError, match="loss.sft.aggregation must be 'token-mean'"):
        SFTLoss(bad)


def test_bad_batches_and_configs_are_refused(model):
    mesh = make_mesh({"data": 8})
    setup, params, opt = create_train_state(model, train_cfg(), mesh, "dp", total_steps=10, freeze=is_vision_path)
    step = TrainStep(setup, SFTLoss(chunk_size=128), compiler_options=FAST)
    with pytest.raises(MeshError, match="micro-batch rows of 'input_ids' = 4 is not divisible"):
        step(params, opt, text_batch(rows=4), jax.random.key(0))
    step4 = TrainStep(setup, SFTLoss(chunk_size=128), grad_accum_steps=3, compiler_options=FAST)
    with pytest.raises(ValueError, match="not divisible by grad_accum_steps 3"):
        step4(params, opt, text_batch(rows=8), jax.random.key(0))
    c = step_config.default_config()
    c.optimizer.weight_decay = -1.0
    with pytest.raises(ValueError, match="train.optimizer.weight_decay must be >= 0"):
        step_config.validate(c)
    c = step_config.default_config()
    c.optimizer.lora_learning_rate = -1e-4
    with pytest.raises(ValueError, match="train.optimizer.lora_learning_rate"):
        step_config.validate(c)
    c = step_config.default_config()
    c.remat = "some"
    with pytest.raises(ValueError, match="train.remat"):
        step_config.validate(c)
