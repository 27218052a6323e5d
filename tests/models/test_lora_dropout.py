"""Adapter dropout (``model.lora.dropout``, PEFT's lora_dropout): y = x·W + s·(dropout_p(x)·A)·B in a
train step's trained forward only. The adapter branch against float64 numpy under the same mask,
p = 0 and key-less forwards equal to the deterministic path bit for bit, a train-step gradient
that p > 0 changes and one key reproduces, and forwards outside training that
ignore the rate. The config field is validated and read."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genevolve_jax.models import hf_io
from genevolve_jax.models.layers import Dense, LoRAParam
from genevolve_jax.models.qwen3_vl.config import ConfigError, LoRAConfig, tiny
from genevolve_jax.models.qwen3_vl.model import forward, prepare_inputs
from genevolve_jax.train.losses.step_losses import SFTLoss
from genevolve_jax.train.runtime.model_setup import default_model_config, lora_config, validate_model
from tests.fixtures.batches import packed_text_batch
from tests.fixtures.lora import with_random_b

RATE = 0.5


def test_the_field_is_validated_and_read():
    cfg = default_model_config()
    cfg.lora.rank, cfg.lora.dropout = 4, 0.1
    assert lora_config(validate_model(cfg)).dropout == 0.1
    for bad in (-0.1, 1.0, float("nan")):
        broken = default_model_config()
        broken.lora.dropout = bad
        with pytest.raises(ValueError, match="model.lora.dropout"):
            validate_model(broken)
    with pytest.raises(ConfigError, match="lora dropout"):
        LoRAConfig(4, 8.0, dropout=1.0)
    # A training setting, not part of the adapters: a checkpoint's adapters load under another rate.
    assert LoRAConfig(4, 8.0, dropout=0.3).same_adapters(LoRAConfig(4, 8.0))
    assert not LoRAConfig(4, 8.0).same_adapters(LoRAConfig(8, 8.0))


def test_dense_branch_against_float64_numpy():
    rng = np.random.default_rng(3)
    dense = Dense((6,), (2, 5), in_axes=(None,), out_axes=(None, None), use_bias=False, param_dtype=jnp.float32,
                  dtype=jnp.float32, rngs=nnx.Rngs(0), lora=LoRAConfig(3, 6.0, dropout=RATE))
    a, b = rng.normal(size=(6, 3)), rng.normal(size=(3, 2, 5))
    dense.lora_a.set_value(jnp.asarray(a, jnp.float32))
    dense.lora_b.set_value(jnp.asarray(b, jnp.float32))
    x = rng.normal(size=(4, 7, 6)).astype(np.float32)
    key = jax.random.key(11)
    keep = np.asarray(jax.random.bernoulli(key, 1 - RATE, x.shape), np.float64)
    assert 0.3 < keep.mean() < 0.7
    w = np.asarray(dense.kernel.get_value(), np.float64)
    want = (np.einsum("...i,ijk->...jk", x, w)
            + 2.0 * np.einsum("...r,rjk->...jk", (x * keep / (1 - RATE)) @ a, b))
    np.testing.assert_allclose(np.asarray(dense(jnp.asarray(x), key)), want, rtol=1e-5, atol=1e-5)
    plain = np.einsum("...i,ijk->...jk", x, w) + 2.0 * np.einsum("...r,rjk->...jk", x @ a, b)
    np.testing.assert_allclose(np.asarray(dense(jnp.asarray(x))), plain, rtol=1e-5, atol=1e-5)


def small(rate):
    cfg = tiny()
    return cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=2),
                       vision=dataclasses.replace(cfg.vision, depth=1, deepstack_visual_indexes=(0,)),
                       lora=LoRAConfig(4, 8.0, dropout=rate))


@pytest.fixture(scope="module")
def models():
    """{rate: model} with the same weights (random B)."""
    cfg = small(0.0)
    base = with_random_b(hf_io.model_from_state_dict(cfg, hf_io.random_state_dict(cfg, seed=0)))
    state = nnx.state(base)
    graphdef = nnx.split(nnx.eval_shape(lambda: type(base)(small(RATE), rngs=nnx.Rngs(0))))[0]
    return {0.0: base, RATE: nnx.merge(graphdef, state)}


def text_batch(rows=2, length=16, seed=0):
    return {k: jnp.asarray(v) for k, v in packed_text_batch(rows, length, seed, min_len=5).items()}


def adapter_grads(model, batch):
    """key -> (loss, gradient w.r.t. the adapters) of the train step's SFT loss (one compile)."""
    graphdef, adapters, rest = nnx.split(model, LoRAParam, ...)

    @jax.jit
    def f(adapters, key):
        def loss(ad):
            num, den, _ = SFTLoss(chunk_size=128)(nnx.merge(graphdef, ad, rest), batch, key)
            return num / den
        return jax.value_and_grad(loss)(adapters)

    def at(key):
        value, grads = f(adapters, key)
        return float(value), jax.tree.map(np.asarray, nnx.to_pure_dict(grads))
    return at


def leaves(tree):
    return jax.tree.leaves(tree)


def test_train_step_gradient_changes_with_the_rate_and_one_key_reproduces_it(models):
    batch = text_batch()
    k1, k2 = jax.random.key(1), jax.random.key(2)
    plain, dropped = adapter_grads(models[0.0], batch), adapter_grads(models[RATE], batch)
    loss0, g0 = plain(k1)
    # p = 0: the key is not used, the numbers are the deterministic forward's bit for bit.
    loss0b, g0b = plain(k2)
    assert loss0 == loss0b and all(np.array_equal(a, b) for a, b in zip(leaves(g0), leaves(g0b)))
    loss1, g1 = dropped(k1)
    loss1b, g1b = dropped(k1)
    loss2, g2 = dropped(k2)
    assert loss1 == loss1b and all(np.array_equal(a, b) for a, b in zip(leaves(g1), leaves(g1b)))
    assert loss1 != loss0 and loss2 != loss1
    for name in ("lora_a", "lora_b"):
        pick = lambda g: [v for p, v in jax.tree_util.tree_flatten_with_path(g)[0] if name in str(p[-1])]  # noqa: E731
        for ref, drop, other in zip(pick(g0), pick(g1), pick(g2)):
            assert np.abs(ref).max() > 0
            assert not np.allclose(ref, drop, rtol=1e-3, atol=0), name
            assert not np.array_equal(drop, other), name


def test_forwards_outside_training_ignore_the_rate(models):
    cfg = models[0.0].config
    rng = np.random.default_rng(5)
    ids = rng.integers(1, 400, (2, 9))
    batch = prepare_inputs(cfg, ids, np.ones_like(ids))
    outs = [np.asarray(jax.jit(forward)(*nnx.split(m), batch)) for m in (models[0.0], models[RATE])]
    assert np.array_equal(*outs)
    logits = [np.asarray(m.prefill(ids, max_length=12)[0]) for m in (models[0.0], models[RATE])]
    assert np.array_equal(*logits)


def test_on_policy_pi_old_is_the_deterministic_forward(models):
    """With dropout and no stored π_old, the evolve loss takes π_old from a forward without dropout
    (the policy that sampled): the same loss and gradient as when that forward's log-probs are
    given as π_old, and not π_old = the dropped-out forward's own (the ratio would be 1)."""
    from genevolve_jax.train.losses.step_losses import EvolveLoss, policy_logprobs
    from genevolve_jax.train.rl.batch_assembly import assemble_evolve_batch
    from genevolve_jax.train.rl.records import RolloutSample
    from tests.train.losses.support import loss_config

    rng = np.random.default_rng(4)
    samples = []
    for i in range(6):
        p, body = int(rng.integers(2, 6)), int(rng.integers(4, 14))
        mask = [0] * p + [1] * body
        lp = [float(-rng.gamma(1.0, 0.7)) if m else 0.0 for m in mask]
        samples.append(RolloutSample(f"s{i}", i // 3, rng.integers(1, 400, p + body).tolist(), mask, lp,
                                     float(rng.random()), prompt_length=p))
    cfg = loss_config(grpo={"kl_coef": 0.0}, sdl={"coef": 0.0}, logprob={"chunk_size": 32})
    batch = assemble_evolve_batch(samples, rng.normal(size=6).astype(np.float32), seq_len=24, row_multiple=2,
                                  loss_cfg=cfg, old_logprobs=False)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    graphdef, adapters, rest = nnx.split(models[RATE], LoRAParam, ...)
    key = jax.random.key(3)
    plain = jax.jit(lambda ad: policy_logprobs(nnx.merge(graphdef, ad, rest), batch, cfg))(adapters)

    @jax.jit
    def loss_and_grads(ad, b):
        def f(ad):
            num, den, mets = EvolveLoss(cfg)(nnx.merge(graphdef, ad, rest), b, key)
            return num / den, mets
        return jax.value_and_grad(f, has_aux=True)(ad)

    (on_loss, on_mets), on_grads = loss_and_grads(adapters, batch)
    (given_loss, _), given_grads = loss_and_grads(adapters, {**batch, "old_logprobs": plain})
    np.testing.assert_allclose(float(on_loss), float(given_loss), rtol=1e-6)
    for a, b in zip(leaves(on_grads), leaves(given_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)
    # The trained forward dropped out: π_old (deterministic) is not its own log-probs (ratio ≠ 1).
    assert float(on_mets["grpo/approx_kl_old"]) > 1e-6
