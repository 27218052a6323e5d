"""Learning on the embedded agent task, end to end: the SFT cold start on the synthetic teacher set
(each subject once searched and answered with the fact, once answered at once), then GRPO through
the real agent loop, offline tools, JaxEngine and the offline rule judge, which rewards only a
gen_prompt that carries a fact a search finds. GRPO must move the policy's first decision towards
searching; the same run with lr = 0 must not move it."""
import json

import jax
import numpy as np
import pytest

from genevolve_jax.config_loader import load_config
from genevolve_jax.jobs.sft import run_sft_config
from genevolve_jax.train.evolve import EvolveTrainer
from genevolve_jax.train.step import lm_head_kernel, qwen3vl_hidden_states

SEARCH_THINK = "<think>Look up facts about the subject.</think>"
DIRECT_THINK = "<think>The request is clear enough to answer directly.</think>"


def task_config(workdir, **overrides):
    cfg = load_config("tiny_cpu")
    cfg.workdir = str(workdir)
    cfg.synthetic.num_prompts = 1
    cfg.synthetic.num_sft = 2                  # one subject × (search, answer at once): one packed row
    cfg.data.sft.rows_per_batch = 1
    cfg.data.sft.row_len = cfg.data.sft.cutoff_len = 640
    cfg.sft.global_batch_size = 1
    cfg.data.sft.num_epochs = 120
    cfg.data.rl.prompts_per_step = 1
    cfg.train.global_batch_size = 8
    cfg.rl.export_hf = False
    cfg.sft_run.export_hf = False
    cfg.experience.enabled = False            # GRPO with tiny_cpu's KL to the SFT policy (β = 1.0)
    cfg.train.schedule.kind = "constant"
    cfg.checkpoint.save_every = 1000
    cfg.logging.sample_every = 0
    cfg.logging.progress = False
    for key, value in overrides.items():
        section, field = key.split(".", 1) if "." in key else (None, key)
        target = cfg if section is None else cfg[section]
        *parents, leaf = field.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return cfg


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
        ids = np.asarray([trainer.rollout.loop.prompt_ids(request) + think], np.int32)
        n = ids.shape[1]
        batch = {"input_ids": ids, "segment_ids": np.ones_like(ids),
                 "position_ids": np.broadcast_to(np.arange(n, dtype=np.int32), (1, 3, n)).copy()}
        p = jax.nn.softmax(qwen3vl_hidden_states(model, batch)[0, -1] @ lm_head_kernel(model))
        out.append((float(p[search_id]), float(p[direct_id])))
    return np.asarray(out)


def run_grpo(workdir, model_path, prompts_path, lr, steps):
    cfg = task_config(workdir, **{"model.path": model_path})
    cfg.data.rl.paths = [prompts_path]
    cfg.train.optimizer.learning_rate = lr
    requests = [json.loads(line)["question"] for line in open(prompts_path)]
    trainer = EvolveTrainer(cfg, progress=False)
    try:
        before = decision_probs(trainer, requests)
        metrics = [trainer.train_one_step() for _ in range(steps)]
        after = decision_probs(trainer, requests)
    finally:
        trainer.close()
    return before, after, metrics, trainer


@pytest.mark.slow
def test_grpo_moves_the_decision_towards_searching(sft_model, tmp_path):
    model_path, prompts_path = sft_model
    steps = 2
    before, after, metrics, trainer = run_grpo(tmp_path / "lr", model_path, prompts_path, 5e-4, steps)
    before0, after0, metrics0, _ = run_grpo(tmp_path / "lr0", model_path, prompts_path, 0.0, steps)
    print(f"P(search) lr=5e-4: {before[:, 0].round(3)} -> {after[:, 0].round(3)}; "
          f"lr=0: {before0[:, 0].round(3)} -> {after0[:, 0].round(3)}")
    # The cold start learnt both behaviours: each first decision is taken about half the time.
    assert np.all(before[:, 0] > 0.2) and np.all(before[:, 1] > 0.2), before
    # The rollouts are well-formed agent trajectories and the rule judge rewards searching.
    first = metrics[0]
    assert first["termination/answer"] >= 6, first
    samples = trainer.logger.history[0]
    assert first["reward/max"] == pytest.approx(1.0) and first["reward/mean"] > 0.2, samples
    assert first["grpo/approx_kl_old"] < 1e-6              # sampler and trainer agree before any update
    # GRPO raises the probability of searching on every prompt; lr = 0 leaves it where it was.
    gain = after[:, 0] - before[:, 0]
    assert np.all(gain > 0.04), (before, after)
    assert np.abs(after0 - before0).max() < 1e-5, (before0, after0)
    # Same seeds, same start: the first step's rollouts are identical in both runs.
    assert metrics[0]["reward/mean"] == pytest.approx(metrics0[0]["reward/mean"])
