"""The evolve step's stages: masking comes before advantages for every reason a sample can be
masked; π_old by the cheapest correct route (the step's own log-probs when on-policy, equal to a
recompute; a recompute when several updates share a batch)."""
import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from PIL import Image

from genevolve_jax.models.qwen3_vl import config as qwen_config
from genevolve_jax.sharding.mesh import make_mesh
from genevolve_jax.train.losses.config import default_loss_config
from genevolve_jax.train.losses.step_losses import EvolveLoss
from genevolve_jax.train.rl.batch_assembly import assemble_evolve_batch
from genevolve_jax.train.rl.config import default_rl_config
from genevolve_jax.train.rl.logprob_forward import LogprobForward, resolve_old_logprobs
from genevolve_jax.train.rl.masking import MaskRules, mask_samples
from genevolve_jax.train.rl.pipeline import sample_advantages
from genevolve_jax.train.rl.records import RolloutSample
from genevolve_jax.train.rl.sample_images import ImageBatchSpec
from genevolve_jax.train.runtime import step_config
from genevolve_jax.train.runtime.state import create_train_state, opt_state_shardings
from genevolve_jax.train.runtime.step import TrainStep
from tests.fixtures.toy_task import TOY_VOCAB, toy_model, toy_run_config, toy_trainer

FAST = {"xla_backend_optimization_level": 0}
K, P = 6, 3
SPEC = ImageBatchSpec.for_model(qwen_config.tiny(vocab_size=TOY_VOCAB).replace(image_token_id=60, video_token_id=61))


def text_sample(rng, sid, group, reward, n=None, **kw):
    n = int(rng.integers(6, 14)) if n is None else n
    ids = rng.integers(1, 50, n).tolist()
    mask = [0, 0] + [1] * (n - 2)
    lp = [0.0, 0.0] + (-rng.random(n - 2)).tolist()
    return RolloutSample(sid, group, ids, mask, lp, reward, True, prompt_length=2, **kw)


def masked_variant(reason, s, tmp_path):
    """``s`` changed so that exactly one mask rule takes it out, and the rule's kind."""
    if reason == "error":                                        # masked by the rollout phase itself
        return s.masked("error: engine abort"), "error"
    if reason == "non_finite_reward":
        return dataclasses.replace(s, reward=float("nan")), reason
    if reason == "repeated":
        return dataclasses.replace(s, stats={"repeated_calls": 2}), reason
    if reason == "too_long_for_batch":
        n = 80
        return dataclasses.replace(s, token_ids=[7] * n, loss_mask=[0, 0] + [1] * (n - 2),
                                   logprobs=[0.0] * n), reason
    if reason == "image_unreadable":
        return dataclasses.replace(s, images=[str(tmp_path / "missing.png")]), reason
    if reason == "image_token_mismatch":                         # an image but no placeholder for it
        path = tmp_path / "real.png"
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(path)
        return dataclasses.replace(s, images=[str(path)]), reason
    raise AssertionError(reason)


def reference_advantages(rewards, cfg) -> np.ndarray:
    """GRPO's group normalisation in float64: Â = (R − mean) / (std + eps)."""
    r = np.asarray(rewards, np.float64)
    std = r.std(ddof=cfg.grpo.adv_std_ddof) if len(r) > cfg.grpo.adv_std_ddof else 0.0
    return (r - r.mean()) / (std + cfg.grpo.adv_eps)


@pytest.mark.parametrize("reason", ["error", "non_finite_reward", "repeated", "too_long_for_batch",
                                    "image_unreadable", "image_token_mismatch"])
def test_a_masked_sample_does_not_count_in_its_group(reason, tmp_path):
    rng = np.random.default_rng(abs(hash(reason)) % 2**32)
    cfg = default_loss_config()
    samples = [text_sample(rng, f"s{g}-{k}", g, float(rng.random())) for g in range(P) for k in range(K)]
    g, k = int(rng.integers(P)), int(rng.integers(K))
    victim = g * K + k
    samples[victim], kind = masked_variant(reason, samples[victim], tmp_path)
    masked, _ = mask_samples(samples, MaskRules(max_tokens_per_row=64, image_spec=SPEC))
    out = masked.samples
    assert not out[victim].valid and out[victim].reward is None and out[victim].mask_reason.startswith(kind)
    assert sum(not s.valid for s in out) == 1
    if reason != "error":                      # the phase's own masks are counted where it masked
        assert masked.counts == {kind: 1}
    adv = sample_advantages(out, P, K, cfg).reshape(P, K)
    rest = [out[g * K + j].reward for j in range(K) if j != k]
    np.testing.assert_allclose(np.delete(adv[g], k), reference_advantages(rest, cfg), rtol=1e-5, atol=1e-6)
    for other in set(range(P)) - {g}:          # the other groups are untouched
        np.testing.assert_allclose(adv[other], reference_advantages([s.reward for s in out[other * K:(other + 1) * K]],
                                                                    cfg), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask_repeated", [True, False])
def test_repeated_tool_calls_follow_the_mask_switch(mask_repeated, tmp_path):
    """loss.grpo.mask_repeated on: a trajectory that repeats its tool calls leaves the loss; off: it trains."""
    rng = np.random.default_rng(11)
    loss = default_loss_config()
    loss.grpo.mask_repeated = mask_repeated
    cfg = ml_collections.ConfigDict({"rl": default_rl_config(), "loss": loss})
    cfg.rl.max_tokens_per_row = 64
    samples = [text_sample(rng, f"s0-{k}", 0, float(rng.random())) for k in range(K)]
    victim = int(rng.integers(K))
    samples[victim], kind = masked_variant("repeated", samples[victim], tmp_path)
    masked, _ = mask_samples(samples, MaskRules.from_config(cfg, SPEC))
    assert [s.valid for s in masked.samples] == [k != victim or not mask_repeated for k in range(K)]
    assert masked.counts == ({kind: 1} if mask_repeated else {})


def test_old_logprob_routes():
    assert resolve_old_logprobs("auto", 1) == "on_policy"
    assert resolve_old_logprobs("auto", 2) == "recompute"
    assert resolve_old_logprobs("sampler", 3) == "sampler"
    with pytest.raises(ValueError, match="rl.old_logprobs"):
        resolve_old_logprobs("cached", 1)


def _state(mesh):
    c = step_config.default_config()
    c.optimizer.learning_rate, c.schedule.warmup_ratio = 1e-2, 0.0
    return create_train_state(toy_model(), step_config.validate(c), mesh, "fsdp", total_steps=10)


class Recorded(NamedTuple):
    grads: Any
    count: jax.Array


def gradient_recorder() -> optax.GradientTransformation:
    """An optimiser that keeps the step's gradient (Σ over micro-batches of ∇loss_sum / Σ weight,
    what AdamW would be given) as its state and changes no parameter."""
    def init(params):
        return Recorded(jax.tree.map(jnp.zeros_like, params), jnp.zeros([], jnp.int32))

    def update(grads, state, params=None):
        return jax.tree.map(jnp.zeros_like, grads), Recorded(grads, state.count + 1)
    return optax.GradientTransformation(init, update)


def recording_setup(setup, params):
    """``setup`` with the gradient recorder as its optimiser, and the recorder's first state."""
    tx = gradient_recorder()
    shapes = jax.eval_shape(tx.init, params["train"])
    shardings = opt_state_shardings(shapes, setup.param_shardings["train"], params["train"], setup.mesh)
    return (dataclasses.replace(setup, tx=tx, opt_shardings=shardings),
            jax.jit(tx.init, out_shardings=shardings)(params["train"]))


def test_on_policy_pi_old_equals_the_recomputed_one():
    """No π_old in the batch: the step takes the stop-gradient of its own log-probs. Loss, metrics
    and the gradient the optimiser gets equal those of the same step given π_old from a separate
    forward (1e-6), over two micro-batches, with KL, SDL and the sampler correction on (the 8B
    config's route: "auto" π_old and "tis"), and the tis/* metrics are the float64 formula's of the
    recomputed π_old against the sampler's log-probs."""
    rng = np.random.default_rng(7)
    cap = 2.0
    cfg = default_loss_config()
    cfg.logprob.chunk_size = 32
    cfg.logprob.rl_temperature = 0.7
    samples = [text_sample(rng, f"s{i}", i // 4, float(rng.random()), teacher_prompt=rng.integers(1, 50, 5).tolist())
               for i in range(8)]
    adv = sample_advantages(samples, 2, 4, cfg)
    on_policy = assemble_evolve_batch(samples, adv, seq_len=32, row_multiple=4, loss_cfg=cfg, old_logprobs=False)
    assert "old_logprobs" not in on_policy and "sampler_logprobs" in on_policy
    mesh = make_mesh({"fsdp": 2}, jax.devices()[:2])
    noise = 0.05 * rng.random(on_policy["targets"].shape)
    sampler_noise = rng.normal(0.0, 0.8, on_policy["targets"].shape).astype(np.float32)
    setup, params, _ = _state(mesh)                  # the same params for both routes (nothing donated)
    setup, recorder_state = recording_setup(setup, params)
    pre_update = np.asarray(LogprobForward(setup, cfg, jnp.float32)(params, on_policy))
    results = []
    for recompute in (False, True):
        batch = dict(on_policy)
        batch["ref_logprobs"] = pre_update - noise
        # An engine whose kernels differ: its log-probs are the trainer's, give or take N(0, 0.8²).
        batch["sampler_logprobs"] = pre_update + sampler_noise
        if recompute:
            batch["old_logprobs"] = pre_update
        step = TrainStep(setup, EvolveLoss(cfg, tis_cap=cap), grad_accum_steps=2, donate=False,
                         compiler_options=FAST)
        new_params, recorded, mets = step(params, recorder_state, batch, jax.random.key(0))
        assert int(recorded.count) == 1 and float(mets["grad_norm"]) > 0
        results.append((jax.tree.map(np.asarray, recorded.grads), {k: float(v) for k, v in mets.items()}))
    (g_on, m_on), (g_re, m_re) = results
    for key in ("loss", "grad_norm", "grpo/loss", "sdl/loss", "grpo/kl", "tis/weight_mean", "tis/truncated_frac",
                "tis/weight_max"):
        np.testing.assert_allclose(m_on[key], m_re[key], rtol=1e-6, atol=1e-7, err_msg=key)
    assert m_on["sdl/samples"] > 0
    trained = on_policy["weight_token"] > 0
    ratio = np.exp(-np.float64(sampler_noise[trained]))            # π_old / π_sampler of the trained tokens
    assert m_on["tis/weight_mean"] == pytest.approx(np.minimum(ratio, cap).mean(), rel=1e-5)
    assert m_on["tis/truncated_frac"] == pytest.approx((ratio > cap).mean(), abs=1e-6)
    assert m_on["tis/weight_max"] == pytest.approx(ratio.max(), rel=1e-5)
    assert 0 < m_on["tis/truncated_frac"] < 0.5
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g_re))
    assert scale > 1e-4
    # The recorded gradient is the step's: its global norm is the grad_norm metric.
    np.testing.assert_allclose(np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in jax.tree.leaves(g_re))),
                               m_re["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_on), jax.tree.leaves(g_re)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * scale)


def test_micro_batched_logprob_forward_equals_the_whole_batch():
    """LogprobForward(micro_batches=m) (the trainer passes train.grad_accum_steps) runs the rows in
    m slices; the log-probs are the whole-batch forward's, row for row."""
    rng = np.random.default_rng(31)
    cfg = default_loss_config()
    cfg.logprob.chunk_size = 32
    samples = [text_sample(rng, f"s{i}", i // 4, float(rng.random()), n=int(rng.integers(6, 30))) for i in range(12)]
    batch = assemble_evolve_batch(samples, sample_advantages(samples, 3, 4, cfg), seq_len=32, row_multiple=4,
                                  loss_cfg=cfg)
    mesh = make_mesh({"fsdp": 2}, jax.devices()[:2])
    setup, params, _ = _state(mesh)
    whole = np.asarray(LogprobForward(setup, cfg, jnp.float32)(params, batch))
    for m in (2, 4):
        got = np.asarray(LogprobForward(setup, cfg, jnp.float32, micro_batches=m)(params, batch))
        np.testing.assert_allclose(got, whole, rtol=0, atol=1e-6)
    assert np.abs(whole[batch["loss_mask"] > 0]).min() > 0


@pytest.mark.slow
def test_two_updates_per_batch_recompute_pi_old_and_the_second_ratio_moves(tmp_path):
    cfg = toy_run_config(tmp_path / "two", steps=1, lr=3e-2)
    cfg.rl.updates_per_batch = 2
    trainer = toy_trainer(cfg)
    try:
        assert trainer.old_logprobs_route == "recompute"
        m = trainer.train_one_step()
    finally:
        trainer.close()
    assert m["rollout/old_logprobs_forward"] == 1.0
    assert abs(m["grpo/ratio_mean"] - 1.0) > 1e-4 and m["grpo/approx_kl_old"] > 1e-8   # the second update's
    # One update per batch (on-policy: no π_old forward, the engine's log-probs the trainer's) is
    # asserted on the toy trainer of test_trainer.py::test_reward_rises_and_lr_zero_does_not.


def test_row_length_is_the_shortest_bucket_holding_the_longest_rollout():
    """rl.row_length_buckets: rows are k/n of the budget, the least k that holds the step's longest
    trained rollout; masked rollouts do not count, and longer than the budget is refused."""
    from genevolve_jax.train.rl.batch_assembly import choose_row_length, row_lengths
    assert row_lengths(1024, 4) == [256, 512, 768, 1024]
    assert row_lengths(1000, 3) == [336, 672, 1000]      # k/n rounded up to 16 tokens, capped at the budget
    assert row_lengths(1024, 1) == [1024]
    rng = np.random.default_rng(11)
    lengths = row_lengths(1024, 4)
    for _ in range(20):
        sizes = rng.integers(20, 1024, size=int(rng.integers(1, 9)))
        samples = [text_sample(rng, f"s{i}", 0, 1.0, n=int(n)) for i, n in enumerate(sizes)]
        longest = max(len(s.token_ids) for s in samples)
        got = choose_row_length(samples, lengths)
        assert got >= longest and all(x < longest for x in lengths if x < got)
        # A masked sample longer than the rest does not stretch the rows.
        masked = dataclasses.replace(text_sample(rng, "m", 0, 1.0, n=1000), valid=False)
        assert choose_row_length(samples + [masked], lengths) == got
        batch = assemble_evolve_batch(samples + [masked], [0.5] * (len(samples) + 1), seq_len=got)
        assert batch["input_ids"].shape[1] == got
    with pytest.raises(ValueError, match="more than the longest row 512"):
        choose_row_length([text_sample(rng, "x", 0, 1.0, n=600)], [256, 512])
