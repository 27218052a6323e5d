"""Learning on the embedded agent task, end to end: the SFT cold start on the synthetic teacher set
(one subject, once searched and answered with the fact, once answered at once), then GRPO through
the real agent loop, offline tools, JaxEngine and the offline rule judge, which gives 1.0 to a
gen_prompt that carries a fact only a search finds and 0.25 to one without it. GRPO (tiny_cpu's
settings: lr 3e-4 cosine over the run, temperature 0.7, KL β = 1e-3) must raise the mean reward
above the start policy's under the same seeds (what the run draws at lr = 0), by moving the
policy's first decision towards searching."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genevolve_jax.config_loader import apply_overrides, load_config
from genevolve_jax.jobs.sft import run_sft_config
from genevolve_jax.train.rl.pipeline import step_metrics
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


def start_policy_rewards(trainer, prompts, steps):
    """The mean reward of the start policy's rollouts under the seeds of each of ``steps``: what a
    run with lr = 0 would score at those steps (its policy never moves), without its updates."""
    out = []
    for step in steps:
        samples, _ = trainer.rollout.collect(step, prompts)
        out.append(step_metrics(samples)["reward/mean"])
    return np.asarray(out)


STEPS = 4


@pytest.mark.slow
def test_grpo_raises_the_mean_reward_above_the_start_policy_under_the_same_seeds(sft_model, tmp_path):
    model_path, prompts_path = sft_model
    cfg = task_config(tmp_path, **{"model.path": model_path})
    cfg.data.rl.paths = [prompts_path]
    prompts = [json.loads(line) for line in open(prompts_path)]
    trainer = EvolveTrainer(cfg, progress=False, num_steps=STEPS)
    try:
        before = decision_probs(trainer, [p["question"] for p in prompts])
        # The control: the start policy resampled under the seeds of the run's steps 2-4, which
        # is what the same run at lr = 0 draws (its step 1 is the learning run's own step 1).
        control = start_policy_rewards(trainer, prompts, range(2, STEPS + 1))
        unchanged = decision_probs(trainer, [p["question"] for p in prompts])
        metrics = [trainer.train_one_step() for _ in range(STEPS)]
        after = decision_probs(trainer, [p["question"] for p in prompts])
    finally:
        trainer.close()
    rewards = np.array([m["reward/mean"] for m in metrics])
    rewards0 = np.concatenate([rewards[:1], control])
    print(f"reward lr=3e-4: {rewards.round(3)}; start policy: {rewards0.round(3)}; P(search): "
          f"{before[:, 0].round(3)} -> {after[:, 0].round(3)}")
    # The cold start learnt both behaviours: each first decision has real probability.
    assert np.all(before[:, 0] > 0.15) and np.all(before[:, 1] > 0.15), before
    # Collecting rollouts does not move the policy.
    np.testing.assert_array_equal(unchanged, before)
    # The first step's rollouts are well-formed, and the rule judge tells searching (1.0) from
    # answering at once (0.25).
    first = metrics[0]
    assert first["termination/answer"] >= 6, first
    assert first["reward/max"] == pytest.approx(1.0) and first["reward/mean"] < 0.8, first
    assert first["rollout/logprob_mismatch"] < 1e-4        # sampler and trainer agree before any update
    # Learning: the mean reward of the last three steps rises well above the first step's, and
    # above the start policy's under the same steps' seeds.
    # Measured (2026-12-07): 0.44 0.62 0.59 0.69 at lr 3e-4 (last three 0.64); the start policy
    # under the seeds of steps 1-4: 0.44 0.41 0.31 0.47 (steps 2-4: 0.40).
    late, late0 = rewards[-3:].mean(), rewards0[-3:].mean()
    assert late - rewards[0] >= 0.15, (rewards, rewards0)
    assert late - late0 >= 0.15, (rewards, rewards0)
    # It got there by searching first more often (measured 0.33 → 0.57).
    assert np.all(after[:, 0] - before[:, 0] > 0.1), (before, after)
