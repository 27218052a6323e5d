"""GRPO with LoRA on the toy task: the KL reference is the base with the adapters off (no copy of
the weights), the JaxEngine samples with the merged weights and its log-probs equal the trainer's
unmerged forward, the base never moves, checkpoints hold the adapters and the optimiser state (not
the base), and a resume equals the uninterrupted run."""
import os

import jax
import numpy as np
import pytest
from flax import nnx

from genevolve_jax.models import peft_io
from genevolve_jax.models.layers import LoRAParam
from tests.fixtures.toy_task import toy_model, toy_run_config, toy_trainer
from tests.fixtures.lora import HEADED_LORA

STEPS = 2


def lora_run_config(workdir):
    cfg = toy_run_config(str(workdir), kl=0.05, steps=STEPS, save_every=1)
    cfg.checkpoint.keep = STEPS
    cfg.checkpoint.async_save = False
    return cfg


def host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The uninterrupted run: (config, base model, trainer after STEPS steps, per-step metrics)."""
    cfg = lora_run_config(tmp_path_factory.mktemp("lora_rl"))
    model = toy_model(lora=HEADED_LORA)
    base = host(nnx.state(model, nnx.Not(LoRAParam)))
    trainer = toy_trainer(cfg, model=model)
    metrics = [trainer.train_one_step() for _ in range(STEPS)]
    trainer.ckpt.wait()
    yield cfg, base, trainer, metrics
    trainer.close()


def test_reference_is_the_base_and_the_engine_samples_the_trainers_policy(run):
    cfg, base, trainer, metrics = run
    assert trainer.lora_on and trainer.ref_params is None       # no second copy of the weights
    first, second = metrics
    # Step 1 samples and trains the base itself (B = 0): the policy is its reference.
    assert first["grpo/kl"] == 0.0
    # Step 2 samples with the merged weights of step 1's adapters; the trainer's forward adds them
    # unmerged. Equal log-probs, and a policy that has left its reference.
    assert second["grpo/kl"] > 0
    for m in metrics:
        assert m["rollout/logprob_mismatch"] < 1e-5 and m["rollout/logprob_mismatch_max"] < 1e-4, m
    frozen = host(trainer.params["frozen"])
    assert jax.tree.structure(frozen) == jax.tree.structure(base)
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(base)):
        np.testing.assert_array_equal(a, b)
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(host(trainer.params["train"]))) > 0
    # The PEFT export of the run's adapters reads back into fresh ones as they are.
    out = trainer.export_adapter(os.path.join(cfg.workdir, "hf_adapter"))
    fresh = toy_model(lora=HEADED_LORA)
    peft_io.load_adapter(fresh, out)
    for a, b in zip(jax.tree.leaves(host(nnx.state(fresh, LoRAParam))), jax.tree.leaves(host(trainer.params["train"]))):
        np.testing.assert_array_equal(a, b)
    # The reference the step used: the live base buffers, adapters zero.
    ref = trainer.reference_params()
    assert ref["frozen"] is trainer.params["frozen"]
    assert all(not np.any(x) for x in jax.tree.leaves(host(ref["train"])))


def test_checkpoints_hold_adapters_and_a_resume_equals_the_run(run):
    cfg, _, trainer, metrics = run
    step_dir = os.path.join(trainer.ckpt.directory, str(STEPS), "params")
    saved = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(step_dir) for f in fs)
    adapters = sum(x.nbytes for x in jax.tree.leaves(trainer.params["train"]))
    base = sum(x.nbytes for x in jax.tree.leaves(trainer.params["frozen"]))
    assert adapters <= saved < base / 4, (saved, adapters, base)
    resumed = toy_trainer(cfg, model=toy_model(lora=HEADED_LORA))   # resume: the last step, STEPS
    try:
        assert resumed.step == STEPS
        resumed.restore(STEPS - 1)
        last = resumed.train_one_step()
        assert last["loss"] == pytest.approx(metrics[-1]["loss"], rel=1e-6, abs=1e-7)
        for a, b in zip(jax.tree.leaves(host(resumed.params)), jax.tree.leaves(host(trainer.params))):
            np.testing.assert_array_equal(a, b)
    finally:
        resumed.close()
