"""Non-finite updates are skipped inside the jitted step: a NaN injected into one step's loss (its
logits, through a batch value) or only into its gradient leaves the parameters and the optimiser
state bit-identical, says which stage went non-finite, and the run continues exactly as if that
batch had never come. The same for the SFT step of the real (tiny) Qwen3-VL. The host-side guard
finds non-finite rewards before the advantages, counts skipped steps and says when to stop."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genevolve_jax.sharding.mesh import make_mesh
from genevolve_jax.train.runtime import step_config
from genevolve_jax.train.runtime.nonfinite import (STAGE_GRADIENT, STAGE_LOSS, STAGE_NONE, NonFiniteGuard,
                                                   nonfinite_metric_names)
from genevolve_jax.train.runtime.state import create_train_state
from genevolve_jax.train.runtime.step import LossFunction, TrainStep

FAST = {"xla_backend_optimization_level": 0}


def host(tree):
    return jax.tree.map(lambda x: np.array(jax.device_get(x)), tree)


def assert_bit_identical(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and la
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def _train_cfg(lr=1e-2):
    c = step_config.default_config()
    c.optimizer.learning_rate = lr
    c.schedule.warmup_ratio = 0.0
    return step_config.validate(c)


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(6, 16, rngs=rngs)
        self.b = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.b(jnp.tanh(self.a(x)))


class PoisonableLoss(LossFunction):
    """Weighted squared error plus Σ sqrt(gate · pred²): with gate = 1 a finite |pred| term; with
    gate = 0 its value is 0 but its gradient is 0 · ∞ = NaN (finite loss, non-finite gradient)."""

    def __call__(self, model, batch, rng):
        pred = model(batch["x"])
        err = jnp.sum((pred - batch["y"]) ** 2, axis=-1)
        num = jnp.sum(batch["w"] * err) + jnp.sum(jnp.sqrt(batch["gate"][:, None] * pred ** 2))
        return num, jnp.sum(batch["w"]), {"mlp/err": jnp.sum(err)}


def _mlp_batch(rng, rows=8):
    return {"x": rng.standard_normal((rows, 6)).astype(np.float32),
            "y": rng.standard_normal((rows, 3)).astype(np.float32),
            "w": rng.uniform(0.5, 1.5, rows).astype(np.float32), "gate": np.ones(rows, np.float32)}


def _mlp_state(seed):
    return create_train_state(MLP(nnx.Rngs(seed)), _train_cfg(), make_mesh({"fsdp": 8}), "fsdp", total_steps=10)


@pytest.mark.parametrize("accum", [1, 2])
def test_nonfinite_loss_or_gradient_skips_the_update_bit_for_bit(accum):
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    seed = int(rng.integers(1 << 16))
    rows = 8 * accum                                            # 8 devices per micro-batch
    good = [_mlp_batch(rng, rows) for _ in range(3)]
    bad_loss = _mlp_batch(rng, rows)
    row = int(rng.integers(rows))
    bad_loss["x"][row, int(rng.integers(6))] = np.nan          # NaN logits in one row
    bad_grad = _mlp_batch(rng, rows)
    bad_grad["gate"][int(rng.integers(rows))] = 0.0             # finite loss, NaN gradient
    bad_inf = _mlp_batch(rng, rows)
    bad_inf["w"][row] = np.inf                                  # an infinite loss weight

    setup, params, opt = _mlp_state(seed)
    step = TrainStep(setup, PoisonableLoss(), grad_accum_steps=accum, compiler_options=FAST)
    params, opt, m = step(params, opt, good[0], jax.random.key(0))
    assert float(m["skipped_nonfinite"]) == 0 and int(m["nonfinite_stage"]) == STAGE_NONE
    for batch, stage in ((bad_loss, STAGE_LOSS), (bad_grad, STAGE_GRADIENT), (bad_inf, STAGE_LOSS)):
        before_p, before_o = host(params), host(opt)
        params, opt, m = step(params, opt, batch, jax.random.key(1))
        m = host(m)
        assert float(m["skipped_nonfinite"]) == 1.0 and int(m["nonfinite_stage"]) == stage
        assert_bit_identical(host(params), before_p)
        assert_bit_identical(host(opt), before_o)
        if stage == STAGE_LOSS:
            assert not math.isfinite(float(m["loss"]))
        else:
            assert math.isfinite(float(m["loss"])) and not math.isfinite(float(m["grad_norm"]))
    trained = []
    for b in good[1:]:
        params, opt, m = step(params, opt, b, jax.random.key(2))
        assert float(m["skipped_nonfinite"]) == 0
        trained.append(float(m["loss"]))

    # The same run without the bad batches ends bit-identical: the skipped steps changed nothing,
    # not even the optimiser's step count (the learning-rate schedule did not advance).
    setup2, p2, o2 = _mlp_state(seed)
    step2 = TrainStep(setup2, PoisonableLoss(), grad_accum_steps=accum, compiler_options=FAST)
    p2, o2, _ = step2(p2, o2, good[0], jax.random.key(0))
    straight = []
    for b in good[1:]:
        p2, o2, m2 = step2(p2, o2, b, jax.random.key(2))
        straight.append(float(m2["loss"]))
    assert trained == straight
    assert_bit_identical(host(params), host(p2))
    assert_bit_identical(host(opt), host(o2))


def test_sft_step_of_qwen3vl_skips_a_nan_and_keeps_training():
    from genevolve_jax.train.losses.config import default_loss_config
    from genevolve_jax.train.losses.step_losses import SFTLoss
    from genevolve_jax.train.runtime.state import is_vision_path
    from tests.fixtures.toy_task import toy_model

    rng = np.random.default_rng(np.random.SeedSequence().entropy)

    def batch(rows=8, length=16, vocab=64):
        ids = rng.integers(1, vocab, (rows, length)).astype(np.int32)
        return {"input_ids": ids, "targets": np.roll(ids, -1, axis=1),
                "loss_mask": (rng.random((rows, length)) < 0.7).astype(np.float32),
                "segment_ids": np.ones((rows, length), np.int32),
                "position_ids": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, 3, length)).copy()}

    setup, params, opt = create_train_state(toy_model(seed=int(rng.integers(100))), _train_cfg(),
                                            make_mesh({"fsdp": 8}), "fsdp", total_steps=10, freeze=is_vision_path)
    step = TrainStep(setup, SFTLoss(default_loss_config()), compiler_options=FAST)
    params, opt, m = step(params, opt, batch(), jax.random.key(0))
    assert float(m["skipped_nonfinite"]) == 0
    poisoned = batch()
    r, t = int(rng.integers(8)), int(rng.integers(16))
    poisoned["loss_mask"][r, t] = np.nan
    before_p, before_o = host(params), host(opt)
    params, opt, m = step(params, opt, poisoned, jax.random.key(1))
    assert float(m["skipped_nonfinite"]) == 1 and int(m["nonfinite_stage"]) == STAGE_LOSS
    assert_bit_identical(host(params), before_p)
    assert_bit_identical(host(opt), before_o)
    guard = NonFiniteGuard(3)
    event = guard.observe(2, host(m), ["sft-row-3"])
    assert event is not None and event.stage == "loss term" and "loss" in event.terms
    # The next clean step trains: the parameters move and the loss is finite.
    params, opt, m = step(params, opt, batch(), jax.random.key(2))
    assert float(m["skipped_nonfinite"]) == 0 and math.isfinite(float(m["loss"]))
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(host(params["train"])),
                                                       jax.tree.leaves(before_p["train"]))]
    assert any(moved)


def test_guard_counts_consecutive_skips_and_names_step_and_stage():
    guard = NonFiniteGuard(3)
    assert guard.observe(1, {"loss": 0.5, "skipped_nonfinite": 0.0}, ["a"]) is None
    assert guard.last_good_step == 1
    e = guard.observe(2, {"loss": 0.5, "skipped_nonfinite": 0.0}, ["s2-p0-k0", "s2-p0-k1"], ["s2-p0-k1"])
    assert e is not None and e.stage == "reward" and e.sample_ids == ("s2-p0-k1",)
    assert not guard.should_stop and guard.last_good_step == 1
    e = guard.observe(3, {"loss": 1.0, "grad_norm": float("inf"), "grpo/kl": float("nan"),
                          "skipped_nonfinite": 1.0, "nonfinite_stage": float(STAGE_GRADIENT)},
                      ["s3-p0-k0", "s3-p0-k1"])
    assert e.stage == "gradient" and e.terms == ("grad_norm", "grpo/kl") and e.sample_ids == ("s3-p0-k0", "s3-p0-k1")
    assert not guard.should_stop and guard.consecutive == 2
    guard.observe(4, {"loss": float("nan"), "skipped_nonfinite": 1.0, "nonfinite_stage": float(STAGE_LOSS)},
                  ["s4-p1-k2"])
    assert guard.should_stop
    msg = guard.stop_message()
    assert "step 4" in msg and "loss term" in msg and "s4-p1-k2" in msg and "Last clean step: 1" in msg
    assert "train.max_consecutive_nonfinite = 3" in msg
    assert guard.metrics() == {"train/skipped_nonfinite": 2.0, "train/nonfinite_reward_steps": 1.0,
                               "train/consecutive_nonfinite": 3.0}
    # A clean step resets the run of such steps, not the totals; the state survives a checkpoint.
    guard.observe(5, {"loss": 0.1, "skipped_nonfinite": 0.0}, [])
    assert not guard.should_stop and guard.last_good_step == 5
    again = NonFiniteGuard(3)
    again.load_state_dict(guard.state_dict())
    assert again.metrics() == guard.metrics() and again.last_good_step == 5
    assert nonfinite_metric_names({"a": 1.0, "b": float("nan"), "skipped_nonfinite": 1.0, "s": "text"}) == ["b"]
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="train.max_consecutive_nonfinite"):
            NonFiniteGuard(bad)


class PoisonOnce:
    """Wraps the trainer's jitted step: at step ``at`` one advantage of the batch becomes NaN, so
    the real step sees a NaN loss (the fault of a broken judge or a bad sampler log-prob)."""

    def __init__(self, step_fn, trainer, at):
        self.step_fn, self.trainer, self.at = step_fn, trainer, at

    def __call__(self, params, opt_state, batch, rng):
        if self.trainer.step + 1 == self.at:
            batch = dict(batch)
            adv = np.array(batch["advantages"], np.float32)
            adv[tuple(np.argwhere(np.asarray(batch["loss_mask"]) > 0)[0])] = np.nan   # on a trained token
            batch["advantages"] = adv
        return self.step_fn(params, opt_state, batch, rng)

    def __getattr__(self, name):     # everything else is the wrapped step's
        return getattr(self.step_fn, name)


@pytest.mark.slow
def test_evolve_driver_skips_counts_and_stops_with_a_checkpoint(tmp_path, caplog):
    import dataclasses
    import logging

    from genevolve_jax.train.runtime.preemption import RunStopped
    from tests.fixtures.toy_task import toy_run_config, toy_trainer

    cfg = toy_run_config(tmp_path / "run", steps=8, group=4, save_every=100)
    cfg.train.max_consecutive_nonfinite = 2
    trainer = toy_trainer(cfg)
    try:
        trainer.train_step = PoisonOnce(trainer.train_step, trainer, at=2)
        trainer.train_one_step()
        before_p, before_o = host(trainer.params), host(trainer.opt_state)
        with caplog.at_level(logging.WARNING, logger="genevolve_jax.train.runtime.nonfinite"):
            m = trainer.train_one_step()
        assert m["skipped_nonfinite"] == 1 and m["train/skipped_nonfinite"] == 1 and not math.isfinite(m["loss"])
        assert_bit_identical(host(trainer.params), before_p)
        assert_bit_identical(host(trainer.opt_state), before_o)
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "step 2: non-finite loss term" in logged and "s2-p0-k0" in logged
        m = trainer.train_one_step()                        # clean again: trains, the run of skips resets
        assert m["skipped_nonfinite"] == 0 and m["train/consecutive_nonfinite"] == 0
        assert m["train/skipped_nonfinite"] == 1

        # From step 4 on the judge returns NaN for one rollout a step: the step's update is skipped
        # (bit for bit), the sample masked and counted, and after two such steps in a row the run
        # stops with a checkpoint.
        inner = trainer.rollout

        class NaNReward:
            def collect(self, step, prompts, group_ids=None):
                samples, info = inner.collect(step, prompts, group_ids)
                return [dataclasses.replace(s, reward=float("nan")) if i == 1 else s
                        for i, s in enumerate(samples)], info

        trainer.rollout = NaNReward()
        before_p, before_o = host(trainer.params), host(trainer.opt_state)
        m = trainer.train_one_step()                        # step 4: skipped, parameters untouched
        assert m["train/update_skipped_reward"] == 1 and m["train/consecutive_nonfinite"] == 1
        assert_bit_identical(host(trainer.params), before_p)
        assert_bit_identical(host(trainer.opt_state), before_o)
        with pytest.raises(RunStopped) as stop:
            trainer.run()
        assert stop.value.exit_code == RunStopped.NON_FINITE and stop.value.step == 5
        msg = stop.value.message
        assert "step 5: non-finite reward" in msg and "s5-p0-k1" in msg and "Last clean step: 3" in msg
        assert f"saved checkpoint step 5 under {trainer.ckpt.directory}" in msg
        assert 5 in trainer.ckpt.all_steps()
        rows = trainer.logger.history
        assert [r.get("masked/non_finite_reward") for r in rows[-2:]] == [1, 1]
    finally:
        trainer.close()
