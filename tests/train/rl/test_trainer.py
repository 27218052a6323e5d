"""The evolve loop on a toy task (reward = choosing target tokens) with the real pieces: the
sampler with weight sync, GRPO advantages, teacher rows, the jitted GRPO + λ·SDL step through the
fused op, checkpoints; and the config checks that must fail before anything compiles. (The agent
path end to end through the CLI: tests/test_config_fields_read.py::test_the_readme_run_writes_every_output.)"""


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from genevolve_jax.config_loader import load_config
from genevolve_jax.ops.fused_logprob import token_kl
from genevolve_jax.sharding.mesh import MeshError
from genevolve_jax.train.rl.batch_assembly import assemble_evolve_batch, place_samples
from genevolve_jax.train.rl.config import validate_evolve_run
from genevolve_jax.train.rl.records import RolloutSample
from genevolve_jax.train.rl.trainer import EvolveTrainer
from genevolve_jax.train.runtime.batch_layout import hidden_states_of
from tests.fixtures.toy_task import TOY_GUIDE, TOY_PROMPTS, FixedGuideExperience, toy_run_config, toy_trainer

PROMPTS, GUIDE = TOY_PROMPTS, list(TOY_GUIDE)


def toy_config(workdir, **kw):
    return toy_run_config(str(workdir), **kw)


def run_rewards(cfg, **kw):
    trainer = toy_trainer(cfg, **kw)
    try:
        rewards = [trainer.train_one_step()["reward/mean"] for _ in range(cfg.rl.num_steps)]
    finally:
        trainer.close()
    return np.array(rewards), trainer


@pytest.mark.slow
def test_reward_rises_and_lr_zero_does_not(tmp_path):
    steps = 8
    learn, trainer = run_rewards(toy_config(tmp_path / "lr", steps=steps))
    still, _ = run_rewards(toy_config(tmp_path / "lr0", lr=1e-12, steps=steps))
    gain = learn[-3:].mean() - learn[:3].mean()
    gain0 = still[-3:].mean() - still[:3].mean()
    print(f"toy rewards lr=1e-2: {np.round(learn, 3).tolist()}\ntoy rewards lr~0:   {np.round(still, 3).tolist()}")
    assert gain > 0.2, learn
    assert gain > gain0 + 0.15, (learn, still)
    assert abs(gain0) < 0.15, still
    # Sampler/trainer agreement: on the first step the engine's log-probs are the trainer's. (π/π_old
    # is 1 by construction here: on-policy, π_old is the stop-gradient of the step's own π, and no
    # forward is spent on it; with the JaxEngine there is no sampler correction.)
    assert trainer.old_logprobs_route == "on_policy"
    first = trainer.logger.history[0]
    assert first["rollout/logprob_mismatch"] < 1e-5 and first["rollout/logprob_mismatch_max"] < 1e-4
    assert first["rollout/old_logprobs_forward"] == 0.0 and "tis/weight_mean" not in first
    # Same seeds: the first step (before any update) samples the same tokens in both runs.
    assert learn[0] == pytest.approx(still[0])
    lines = (tmp_path / "lr" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == steps and '"grpo/clip_frac"' in lines[0] and '"time/train_step_s"' in lines[0]


@nnx.jit
def last_hidden(model, ids, length):
    """[1, 1, D] hidden state at position ``length`` − 1 of ``ids`` [1, T], the rest padding (its
    own segment 0, after the context: a causal row never sees it). One compile for all contexts."""
    t = ids.shape[1]
    batch = {"input_ids": ids, "segment_ids": (jnp.arange(t) < length).astype(jnp.int32)[None],
             "position_ids": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, 3, t))}
    return jax.lax.dynamic_slice_in_dim(hidden_states_of(model, batch), length - 1, 1, axis=1)


def guided_kl(trainer, contexts):
    """Mean forward KL(teacher ‖ student) on the next token of held-out contexts, where the
    teacher sees the guide before the same context."""
    model = trainer.setup.merge(trainer.params)
    kernel = model.lm_head_kernel()
    width = len(GUIDE) + max(map(len, contexts))
    out = []
    for ctx in contexts:
        def hidden(ids):
            padded = np.zeros((1, width), np.int32)
            padded[0, :len(ids)] = ids
            return last_hidden(model, padded, len(ids))
        hs, ht = hidden(ctx), hidden(GUIDE + ctx)
        kl, _ = token_kl(hs, kernel, ht, np.zeros((1, 1), np.int32), kind="forward", chunk_size=32)
        out.append(float(kl[0, 0]))
    return float(np.mean(out))


@pytest.mark.slow
def test_sdl_alone_moves_student_toward_teacher(tmp_path):
    cfg = toy_config(tmp_path, lr=3e-3, sdl=2.0, steps=6)
    cfg.loss.sdl.topk_frac = 1.0             # every policy token carries the distillation loss
    trainer = toy_trainer(cfg, experience=FixedGuideExperience())
    trainer.rollout.targets = set()          # every reward 0 → every advantage 0: GRPO contributes nothing
    held_out = [[3, 1, 4, 1, 5], [2, 7, 1, 8], [6, 6, 2, 4, 9, 1]]
    try:
        before = guided_kl(trainer, held_out)
        sdl = [trainer.train_one_step()["sdl/loss"] for _ in range(cfg.rl.num_steps)]
        after = guided_kl(trainer, held_out)
    finally:
        trainer.close()
    print(f"held-out teacher-student KL {before:.4f} -> {after:.4f}; sdl loss {np.round(sdl, 4).tolist()}")
    assert after < 0.7 * before, (before, after)
    assert np.mean(sdl[-3:]) < np.mean(sdl[:3])


def test_teacher_index_aligns_teacher_tokens_with_student_targets():
    rng = np.random.default_rng(3)
    samples = []
    for i in range(3):
        p = rng.integers(1, 50, 3 + i).tolist()
        resp = rng.integers(1, 50, 5).tolist()
        obs = rng.integers(1, 50, 2).tolist()
        ids = p + resp[:3] + obs + resp[3:]
        mask = [0] * len(p) + [1] * 3 + [0] * 2 + [1] * 2
        lp = [0.0] * len(p) + (-rng.random(3)).tolist() + [0.0] * 2 + (-rng.random(2)).tolist()
        guide = rng.integers(1, 50, 4 + 2 * i).tolist() if i != 1 else None
        samples.append(RolloutSample(f"s{i}", 0, ids, mask, lp, 0.5, prompt_length=len(p), teacher_prompt=guide))
    # All three packed into one row of 64 tokens (4 rows: num_rows).
    b = assemble_evolve_batch(samples, [0.1, 0.2, 0.3], seq_len=64, num_rows=4)
    assert place_samples(samples, 64) == [[2, 0, 1]] and b["targets"].shape == (4, 64)
    m = b["loss_mask"][0] > 0
    # The teacher's target at the gathered position is the student's target, token for token.
    np.testing.assert_array_equal(b["teacher_targets"][0][b["teacher_index"][0][m]], b["targets"][0][m])
    offset = 0
    for i in (2, 0, 1):
        s, n = samples[i], len(samples[i].token_ids)
        seg = slice(offset, offset + n)
        np.testing.assert_allclose(b["sampler_logprobs"][0, seg][m[seg]],
                                   [x for x, k in zip(s.logprobs[1:], s.loss_mask[1:]) if k])
        assert (b["bundle"][0, seg] == float(s.has_bundle)).all()
        assert (b["advantages"][0, seg][m[seg]] == [0.1, 0.2, 0.3][i]).all()
        offset += n
    assert b["loss_mask"][1:].sum() == 0 and b["weight_grpo"][1:].sum() == 0


def test_bad_configs_fail_before_compile(tmp_path):
    cfg = toy_config(tmp_path)
    cfg.rl.group_size = 1
    with pytest.raises(ValueError, match="rl.group_size must be >= 2"):
        validate_evolve_run(cfg)
    cfg = toy_config(tmp_path)
    cfg.sharding.mesh.fsdp = 16
    with pytest.raises(MeshError, match="multiply to 16 devices"):
        EvolveTrainer(cfg, model=object(), tokenizer=None)
    cfg = toy_config(tmp_path, mesh={"fsdp": -1})
    cfg.data.rl.prompts_per_step = 3
    cfg.rl.group_size = 3                    # 9 rows over 8 fsdp devices
    with pytest.raises(MeshError, match="does not divide"):
        EvolveTrainer(cfg, model=object(), tokenizer=None)
    cfg = toy_config(tmp_path)
    cfg.agent.sampling.temperature = 0.7     # linked: sets loss.logprob.rl_temperature too
    assert cfg.loss.logprob.rl_temperature == 0.7
    cfg.agent.sampling = ml_collections.ConfigDict({**cfg.agent.sampling.to_dict(), "temperature": 1.0})
    with pytest.raises(ValueError, match="rl_temperature"):   # a replaced section breaks the link
        validate_evolve_run(cfg)
    with pytest.raises(ValueError, match="rl.group_size must be >= 2"):
        load_config("tiny_cpu", ["--config.rl.group_size=1"])
