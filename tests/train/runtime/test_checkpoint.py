"""Training checkpoints: a run killed with SIGKILL after a save resumes with the same losses as an
uninterrupted run; a checkpoint written under fsdp restores under tp (8 simulated devices) with
every value intact; bad checkpoints fail with a clear error."""
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genevolve_jax.sharding.mesh import make_mesh
from genevolve_jax.train.losses.step_losses import SFTLoss
from genevolve_jax.train.runtime import step_config
from genevolve_jax.train.runtime.checkpoint import (CheckpointError, TrainCheckpointer, abstract_like, rng_from_json,
                                                    rng_to_json)
from genevolve_jax.train.runtime.state import create_train_state, is_vision_path
from genevolve_jax.train.runtime.step import TrainStep
from tests.fixtures.toy_task import toy_model, toy_run_config, toy_trainer

FAST = {"xla_backend_optimization_level": 0}

KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from tests.fixtures.toy_task import toy_run_config, toy_trainer
    cfg = toy_run_config(sys.argv[1], steps=4, save_every=2)
    trainer = toy_trainer(cfg)
    while True:
        trainer.train_one_step()
        if trainer.step == 2:
            trainer.ckpt.wait()               # the save of step 2 is on disk
            print("KILLING", trainer.losses, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
""")


def host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted(tmp_path):
    straight = toy_trainer(toy_run_config(tmp_path / "straight", steps=4, save_every=2))
    try:
        for _ in range(4):
            straight.train_one_step()
    finally:
        straight.close()

    killed_dir = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(killed_dir)], capture_output=True, text=True,
                          timeout=900, env=dict(os.environ))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "KILLING" in proc.stdout

    resumed = toy_trainer(toy_run_config(killed_dir, steps=4, save_every=2))
    try:
        assert resumed.step == 2 and resumed.prompts.position == 2 * 2
        np.testing.assert_allclose(resumed.losses, straight.losses[:2], rtol=0, atol=0)
        while resumed.step < 4:
            resumed.train_one_step()
    finally:
        resumed.close()
    print("losses uninterrupted", straight.losses, "\nlosses resumed     ", resumed.losses)
    np.testing.assert_allclose(resumed.losses, straight.losses, rtol=1e-6, atol=1e-7)
    for key in ("grad_norm", "reward/mean", "grpo/entropy"):
        got = [h[key] for h in resumed.logger.history]
        want = [h[key] for h in straight.logger.history]
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=key)
    np.testing.assert_array_equal(host(resumed.params["train"]), host(straight.params["train"]))


def _train_cfg():
    c = step_config.default_config()
    c.optimizer.learning_rate = 1e-2
    c.schedule.warmup_ratio = 0.0
    return step_config.validate(c)


def _batch(seed=0, rows=8, length=16, vocab=64):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (rows, length)).astype(np.int32)
    return {"input_ids": ids, "targets": np.roll(ids, -1, axis=1), "loss_mask": (rng.random((rows, length)) < 0.7)
            .astype(np.float32), "segment_ids": np.ones((rows, length), np.int32),
            "position_ids": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, 3, length)).copy()}


def test_checkpoint_saved_under_fsdp_restores_under_tp(tmp_path):
    model = toy_model(seed=1)
    mesh_a = make_mesh({"fsdp": 8})
    setup_a, params, opt = create_train_state(model, _train_cfg(), mesh_a, "fsdp", total_steps=4, freeze=is_vision_path)
    step_a = TrainStep(setup_a, SFTLoss(chunk_size=32), compiler_options=FAST)
    params, opt, _ = step_a(params, opt, _batch(0), jax.random.key(0))   # non-trivial Adam moments
    saved_p, saved_o = host(params), host(opt)
    key = jax.random.key(7)
    ckpt = TrainCheckpointer(tmp_path / "ck", save_every=1, keep=2)
    ckpt.save(1, params, opt, {"rng": rng_to_json(key), "data": {"position": 3, "blob": b"\x00\xff"}})
    ckpt.close()

    mesh_b = make_mesh({"data": 4, "tensor": 2})
    setup_b, fresh_p, fresh_o = create_train_state(toy_model(seed=2), _train_cfg(), mesh_b, "tp", total_steps=4,
                                                   freeze=is_vision_path)
    ckpt_b = TrainCheckpointer(tmp_path / "ck", save_every=1, keep=2)
    r = ckpt_b.restore(abstract_like(fresh_p, setup_b.param_shardings), abstract_like(fresh_o, setup_b.opt_shardings))
    ckpt_b.close()
    assert r.step == 1 and r.meta["data"] == {"position": 3, "blob": b"\x00\xff"}
    np.testing.assert_array_equal(jax.random.key_data(rng_from_json(r.meta["rng"])), jax.random.key_data(key))
    jax.tree.map(np.testing.assert_array_equal, host(r.params), saved_p)
    jax.tree.map(np.testing.assert_array_equal, host(r.opt_state), saved_o)
    # The arrays now live in the tp layout, and the tp step runs on them.
    for got, want in zip(jax.tree.leaves(r.params), jax.tree.leaves(setup_b.param_shardings)):
        assert got.sharding.is_equivalent_to(want, got.ndim)
    assert any("tensor" in str(s.spec) for s in jax.tree.leaves(setup_b.param_shardings["train"]))
    step_b = TrainStep(setup_b, SFTLoss(chunk_size=32), compiler_options=FAST)
    _, _, m_b = step_b(r.params, r.opt_state, _batch(1), jax.random.key(0))
    _, _, m_a = step_a(jax.tree.map(jnp.asarray, params), opt, _batch(1), jax.random.key(0))
    np.testing.assert_allclose(float(m_b["loss"]), float(m_a["loss"]), rtol=1e-5)


def test_keep_last_k_and_bad_restores(tmp_path):
    model = toy_model(seed=3)
    mesh = make_mesh({"fsdp": 8})
    setup, params, opt = create_train_state(model, _train_cfg(), mesh, "fsdp", total_steps=4, freeze=is_vision_path)
    ckpt = TrainCheckpointer(tmp_path / "ck", save_every=2, keep=2)
    assert [s for s in range(1, 7) if ckpt.should_save(s)] == [2, 4, 6]
    for s in (2, 4, 6):
        ckpt.save(s, params, opt, {"rng": rng_to_json(jax.random.key(s))})
    ckpt.wait()
    assert ckpt.all_steps() == [4, 6] and ckpt.latest_step() == 6
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        ckpt.save(8, params, opt, {"bad": object()})
    # A tree that does not match (the vision tower trained too) is refused with a clear message.
    setup2, p2, o2 = create_train_state(model, _train_cfg(), mesh, "fsdp", total_steps=4, freeze=None)
    with pytest.raises(CheckpointError, match="does not fit this run"):
        ckpt.restore(abstract_like(p2, setup2.param_shardings), abstract_like(o2, setup2.opt_shardings))
    ckpt.close()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        TrainCheckpointer(tmp_path / "empty").restore(params, opt)
    with pytest.raises(ValueError, match="checkpoint.keep must be >= 1"):
        TrainCheckpointer(tmp_path / "x", keep=0)
