"""Learning on the embedded agent task, end to end: the SFT cold start on the synthetic teacher set
(one subject, once searched and answered with the fact, once answered at once), then GRPO through
the real agent loop, offline tools, JaxEngine and the offline rule judge, which gives 1.0 to a
gen_prompt that carries a fact only a search finds and 0.25 to one without it. GRPO (tiny_cpu's
settings: lr 3e-4 cosine over the run, temperature 0.7, KL β = 1e-3) must raise the mean reward
by a margin that the same run with lr = 0, same seeds, does not reach, by moving the policy's
first decision towards searching."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genevolve_jax.config_loader import apply_overrides, load_config
from genevolve_jax.jobs.sft import run_sft_config
from genevolve_jax.train.rl.trainer import EvolveTrainer
from genevolve_jax.train.runtime.batch_layout import hidden_states_of

SEARCH_THINK = "<think>Look up facts about the subject.</think>"
DIRECT_THINK = "<think>The request is clear enough to answer directly.</think>"


def task_config(workdir, **overrides):
    cfg = load_config("tiny_cpu")
    cfg.workdir = str(workdir)
    cfg.synthetic.num_prompts = 1
    cfg.synthetic.num_sft = 2                  # one subject × (search, answer at once): two rows of 640
    cfg.data.sft.rows_per_batch = 1
    cfg.data.sft.row_len = cfg.data.sft.cutoff_len = 640
    cfg.data.sft.num_epochs = 60              # loss 0.17 after 40 epochs, 0.01 after 60 (measured)
    cfg.data.rl.prompts_per_step = 1
    cfg.train.grad_accum_steps = 1
    cfg.agent.loop.engine_batch_size = cfg.engine.max_slots = 8
    cfg.rl.export_hf = False
    cfg.sft_run.export_hf = False
    cfg.experience.enabled = False            # GRPO alone (SDL has its own tests)
    cfg.checkpoint.save_every = 1000
    cfg.logging.sample_every = 0
    cfg.logging.progress = False
    return apply_overrides(cfg, [f"--config.{key}={value!r}" for key, value in overrides.items()])


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("agent_task")
    cfg = task_config(root / "sft")
    out = run_sft_config(cfg, progress=False)
    assert out["losses"][-1] < 0.1, out["losses"][-5:]     # the teacher set is learnt
    return out["model"], cfg.data.rl.paths[0] if cfg.data.rl.paths else str(root / "sft" / "data" / "rl_prompts.jsonl")


def decision_probs(trainer, requests):
    """P(first think token of searching) and P(… of answering at once) after "<think>"."""
    tok = trainer.tokenizer
    think = tok.encode("<think>", add_special_tokens=False)
    search_id = tok.encode(SEARCH_THINK, add_special_tokens=False)[len(think)]
    direct_id = tok.encode(DIRECT_THINK, add_special_tokens=False)[len(think)]
    assert search_id != direct_id
    model = trainer.setup.merge(trainer.params)
    out = []
    for request in requests:
        p = next_token_probs(model, np.asarray([trainer.rollout.loop.prompt_ids(request) + think], np.int32))
        out.append((float(p[search_id]), float(p[direct_id])))
    return np.asarray(out)


@nnx.jit
def next_token_probs(model, ids):
    n = ids.shape[1]
    batch = {"input_ids": ids, "segment_ids": jnp.ones_like(ids),
             "position_ids": jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (1, 3, n))}
    return jax.nn.softmax(hidden_states_of(model, batch)[0, -1] @ model.lm_head_kernel())


def run_grpo(workdir, model_path, prompts_path, lr, steps):
    cfg = task_config(workdir, **{"model.path": model_path})
    cfg.data.rl.paths = [prompts_path]
    cfg.train.optimizer.learning_rate = lr     # set after validation: lr = 0 is the control run
    requests = [json.loads(line)["question"] for line in open(prompts_path)]
    trainer = EvolveTrainer(cfg, progress=False, num_steps=steps)
    try:
        before = decision_probs(trainer, requests)
        metrics = [trainer.train_one_step() for _ in range(steps)]
        after = decision_probs(trainer, requests)
    finally:
        trainer.close()
    return before, after, metrics


STEPS, CONTROL_STEPS = 4, 2


@pytest.mark.slow
def test_grpo_raises_the_mean_reward_and_lr_zero_does_not(sft_model, tmp_path):
    model_path, prompts_path = sft_model
    # The control needs fewer steps: at lr = 0 the policy never moves, so its steps are draws of
    # the start policy under the run's seeds; its first equals the learning run's first (asserted
    # below), and two (16 rollouts) give the mean reward it stays at.
    before, after, metrics = run_grpo(tmp_path / "lr", model_path, prompts_path, 3e-4, steps=STEPS)
    before0, after0, metrics0 = run_grpo(tmp_path / "lr0", model_path, prompts_path, 0.0, steps=CONTROL_STEPS)
    rewards = np.array([m["reward/mean"] for m in metrics])
    rewards0 = np.array([m["reward/mean"] for m in metrics0])
    print(f"reward lr=3e-4: {rewards.round(3)}; lr=0: {rewards0.round(3)}; P(search) lr=3e-4: "
          f"{before[:, 0].round(3)} -> {after[:, 0].round(3)}; lr=0: {before0[:, 0].round(3)} -> {after0[:, 0].round(3)}")
    # The cold start learnt both behaviours: each first decision has real probability.
    assert np.all(before[:, 0] > 0.15) and np.all(before[:, 1] > 0.15), before
    # Same seeds, same start: the first step's rollouts are identical in both runs, well-formed,
    # and the rule judge tells searching (1.0) from answering at once (0.25).
    assert rewards[0] == pytest.approx(rewards0[0])
    first = metrics[0]
    assert first["termination/answer"] >= 6, first
    assert first["reward/max"] == pytest.approx(1.0) and first["reward/mean"] < 0.8, first
    assert first["rollout/logprob_mismatch"] < 1e-4        # sampler and trainer agree before any update
    # Learning: the mean reward of the last three steps rises well above the first step's, and
    # above the lr = 0 run's (the start policy resampled under the same seeds: its mean over its steps).
    # Measured (2026-12-07): 0.44 0.62 0.59 0.69 at lr 3e-4 (last three 0.64); 0.44 0.41 (mean 0.42) at lr 0.
    late, late0 = rewards[-3:].mean(), rewards0.mean()
    assert late - rewards[0] >= 0.15, (rewards, rewards0)
    assert late - late0 >= 0.15 and (late - rewards[0]) - (late0 - rewards0[0]) >= 0.15, (rewards, rewards0)
    # It got there by searching first more often (measured 0.33 → 0.57); lr = 0 leaves the policy
    # exactly where it was.
    assert np.all(after[:, 0] - before[:, 0] > 0.1), (before, after)
    assert np.abs(after0 - before0).max() < 1e-5, (before0, after0)
