"""GRPO loss and group advantages against float64 loop references, and the sampler correction
(truncated importance sampling, rl.sampler_correction = "tis") against its float64 formula."""
import math

import jax
import numpy as np
import pytest

from genevolve_jax.train.losses import default_loss_config, group_advantages, grpo_loss
from genevolve_jax.train.losses.grpo import grpo_loss_weighted
from genevolve_jax.train.rl.loss_weights import loss_weights, weights_view
from tests.train.losses import _reference as ref
from tests.train.losses.support import (assert_matches_reference, loss_config, near, policy_logprobs, token_mask,
                                        value_and_grad)

B, T = 4, 10


def _batch(seed):
    rng = np.random.default_rng(seed)
    lp = policy_logprobs(rng, (B, T), 1.5, 1.0)
    old = near(rng, lp, 0.3)  # ratios inside and outside the clip range
    ref_lp = near(rng, lp, 0.5)
    adv = rng.normal(size=B).astype(np.float32)
    mask = token_mask(rng, (B, T), 0.7)
    mask[:, 0] = True
    mask[2, :] = False  # one sequence without policy tokens
    valid = np.array([True, True, True, False])  # one trajectory flagged
    return lp, old, ref_lp, adv, mask, valid


@pytest.mark.parametrize("agg,estimator,dual_c,clamp", [
    ("seq-mean-token-sum", "k3", 0.0, 10.0),  # the paper's setting
    ("token-mean", "k1", 3.0, 0.0),
    ("seq-mean-token-mean", "k2", 3.0, 0.05),
])
def test_loss_and_gradient_match_float64_reference(agg, estimator, dual_c, clamp):
    # kl_coef larger than the paper's 1e-3 so the KL term is visible in the check.
    cfg = loss_config(grpo={"aggregation": agg, "kl_estimator": estimator, "dual_clip_c": dual_c,
                            "kl_clamp": clamp, "kl_coef": 0.1})
    lp, old, ref_lp, adv, mask, valid = _batch(1)
    (loss, metrics), grad = value_and_grad(
        lambda x: grpo_loss(x, old, adv, mask, cfg, ref_logprobs=ref_lp, sample_valid=valid), lp)
    kw = dict(eps_low=0.2, eps_high=0.28, dual_c=dual_c, beta=0.1, estimator=estimator,
              clamp=clamp, agg=agg)
    f64 = [np.float64(x) for x in (lp, old, ref_lp, adv)]
    assert_matches_reference(loss, grad, lambda x: ref.grpo(x, *f64[1:], mask, valid, **kw), f64[0],
                             loss_tol=1e-6, grad_tol=1e-5)
    # Observation/padding tokens and flagged trajectories get exactly zero gradient.
    off = ~(mask & valid[:, None])
    assert not np.any(np.asarray(grad)[off])
    # Clip fraction: tokens whose clipped term is the active (larger) one.
    m = mask & valid[:, None]
    ratio = np.exp(np.float64(lp) - old)
    a = np.broadcast_to(adv[:, None], (B, T))
    clipped = -a * np.clip(ratio, 0.8, 1.28) > -a * ratio
    assert float(metrics["grpo/clip_frac"]) == pytest.approx(clipped[m].mean(), abs=1e-6)
    assert 0 < float(metrics["grpo/clip_frac"]) < 1
    assert float(metrics["grpo/tokens"]) == m.sum()
    assert float(metrics["grpo/masked_seqs"]) == 1


def test_empty_mask_gives_zero_loss_and_zero_gradient():
    cfg = default_loss_config()
    lp, old, ref_lp, adv, _, _ = _batch(2)
    lp[0, 0] = np.inf  # garbage on a masked position must not leak
    for agg in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
        cfg.grpo.aggregation = agg
        (loss, metrics), grad = value_and_grad(
            lambda x: grpo_loss(x, old, adv, np.zeros((B, T)), cfg, ref_logprobs=ref_lp), lp)
        assert float(loss) == 0.0 and not np.any(np.asarray(grad))
        assert all(np.isfinite(float(v)) for v in metrics.values())


def test_per_token_advantages_and_paper_kl_coefficient():
    cfg = default_loss_config()  # β = 1e-3, k3, seq-mean-token-sum
    lp, old, ref_lp, _, mask, _ = _batch(3)
    rng = np.random.default_rng(3)
    adv_tok = rng.normal(size=(B, T)).astype(np.float32)
    adv_row = adv_tok[:, :1]
    loss, loss_b, loss_bt = jax.jit(lambda x: [
        grpo_loss(x, old, a, mask, cfg, ref_logprobs=ref_lp)[0]
        for a in (adv_tok, adv_row[:, 0], np.repeat(adv_row, T, 1))])(lp)
    # A [B, T] advantage equal along each row matches the [B] form.
    assert float(loss_b) == pytest.approx(float(loss_bt), rel=1e-6)
    assert np.isfinite(float(loss))
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(lp, old, adv_row[:, 0], mask, cfg)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(lp, old, adv_tok[:, :3], mask, cfg, ref_logprobs=ref_lp)


@pytest.mark.parametrize("scale,ddof", [(True, 1), (True, 0), (False, 1)])
def test_group_advantages_match_reference(scale, ddof):
    rng = np.random.default_rng(4)
    rewards = rng.random((5, 6)).astype(np.float32)
    valid = rng.random((5, 6)) < 0.8
    valid[0] = False                      # a group with no valid member
    valid[1] = [True] + [False] * 5       # one valid member
    rewards[2] = 0.5                      # all-equal rewards
    rewards[3, 2] = np.nan                # non-finite reward: treated as invalid
    got = group_advantages(rewards, valid, eps=1e-6, scale_by_std=scale, std_ddof=ddof)
    want = ref.group_advantages(np.float64(rewards), valid, 1e-6, scale, ddof)
    assert np.isfinite(np.asarray(got)).all()
    assert ref.rel_err(got, want) <= 1e-6
    assert not np.any(np.asarray(got)[0]) and not np.any(np.asarray(got)[1:3])
    flat = group_advantages(rewards.reshape(-1), valid.reshape(-1), group_size=6, eps=1e-6,
                            scale_by_std=scale, std_ddof=ddof)
    np.testing.assert_array_equal(np.asarray(flat).reshape(5, 6), got)


def test_group_advantages_paper_example_and_errors():
    # K = 6 rollouts: Â = (R − mean)/(std + eps) with the unbiased std.
    r = np.array([[0.2, 0.4, 0.6, 0.8, 1.0, 0.0]], np.float32)
    got = np.asarray(group_advantages(r))
    mean, std = 0.5, math.sqrt(sum((x - 0.5) ** 2 for x in r[0].tolist()) / 5)
    np.testing.assert_allclose(got[0], (r[0] - mean) / (std + 1e-6), rtol=1e-6)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(np.zeros(7), group_size=6)
    with pytest.raises(ValueError, match="valid"):
        group_advantages(r, np.ones((1, 5), bool))


# -- the sampler correction: w = min(π_old / π_sampler, C) on each policy-gradient term -----------------
TIS_METRICS = ("tis/weight_mean", "tis/truncated_frac", "tis/weight_max")


def _tis_batch(seed):
    """_batch plus the engine's log-probs: π_old / π_sampler from about 0.1 to 10 (below 1, inside
    the cap and truncated), and garbage wherever nothing trains (NaN, −inf, SGLang's float32
    floor, a ratio of e^50): it must reach neither the loss nor a metric."""
    lp, old, ref_lp, adv, mask, valid = _batch(seed)
    rng = np.random.default_rng(100 + seed)
    sampler = near(rng, old, 0.8)
    off = ~(mask & valid[:, None])
    sampler[off] = rng.choice(np.array([np.nan, -np.inf, -3.4e38, -50.0], np.float32), int(off.sum()))
    return lp, old, ref_lp, adv, mask, valid, sampler


def tis_metrics_reference(old, sampler, m, cap) -> dict[str, float]:
    """The three metrics over the trained tokens ``m``, in float64: the mean of the weights the loss
    applies, the fraction whose ratio exceeds C, and the largest ratio before truncation."""
    r = np.exp(np.float64(old[m]) - np.float64(sampler[m]))
    return {"tis/weight_mean": float(np.minimum(r, cap).mean()), "tis/truncated_frac": float((r > cap).mean()),
            "tis/weight_max": float(r.max())}


def one_trajectory_per_row(mask, valid, agg):
    """The train step's weight fields (train/rl/loss_weights.py) for rows that each hold one
    trajectory, ``valid`` [B] marking those that train."""
    shape = mask.shape
    trained = np.broadcast_to(valid[:, None], shape).astype(np.float32)
    return loss_weights(mask.astype(np.float32), np.ones(shape, np.int32), trained, np.zeros(shape, np.float32),
                        aggregation=agg, topk_frac=0.1)


@pytest.mark.parametrize("agg,dual_c", [("seq-mean-token-sum", 0.0), ("token-mean", 3.0)])
def test_tis_loss_gradient_and_metrics_match_float64(agg, dual_c):
    """The loss, its gradient and the tis/* metrics against the float64 formula (KL on: it is not
    weighted), in the mean form and in the train step's weighted form split over two micro-batches
    (loss and means add up, the max is a max)."""
    cap = 2.0
    cfg = loss_config(grpo={"aggregation": agg, "dual_clip_c": dual_c, "kl_coef": 0.1})
    lp, old, ref_lp, adv, mask, valid, sampler = _tis_batch(11)
    m = mask & valid[:, None]
    (loss, metrics), grad = value_and_grad(
        lambda x: grpo_loss(x, old, adv, mask, cfg, ref_logprobs=ref_lp, sample_valid=valid,
                            sampler_logprobs=sampler, tis_cap=cap), lp)
    kw = dict(eps_low=0.2, eps_high=0.28, dual_c=dual_c, beta=0.1, estimator="k3", clamp=10.0, agg=agg,
              sampler=np.float64(sampler), tis_cap=cap)
    f64 = [np.float64(x) for x in (lp, old, ref_lp, adv)]
    assert_matches_reference(loss, grad, lambda x: ref.grpo(x, *f64[1:], mask, valid, **kw), f64[0],
                             loss_tol=1e-6, grad_tol=1e-5)
    want = tis_metrics_reference(old, sampler, m, cap)
    for name in TIS_METRICS:
        assert float(metrics[name]) == pytest.approx(want[name], rel=1e-6, abs=1e-7), name
    # The draw reaches every regime: weights below 1, inside the cap, and truncated.
    r = np.exp(np.float64(old[m]) - sampler[m])
    assert (r < 1).any() and ((r > 1) & (r < cap)).any() and 0 < want["tis/truncated_frac"] < 0.5
    # Without the correction the loss is another number (the weights are not all 1).
    plain = grpo_loss(lp, old, adv, mask, cfg, ref_logprobs=ref_lp, sample_valid=valid)
    assert abs(float(plain[0]) - float(loss)) > 1e-3 and not set(TIS_METRICS) & set(plain[1])

    weights = one_trajectory_per_row(mask, valid, agg)
    adv_bt = np.broadcast_to(adv[:, None], mask.shape).astype(np.float32)
    halves = []
    for rows in (slice(0, B // 2), slice(B // 2, B)):
        w = weights_view({k: v[rows] for k, v in weights.items()})
        halves.append(jax.jit(lambda x, o, a, r, s, w: grpo_loss_weighted(x, o, a, w, cfg, ref_logprobs=r,
                                                                            sampler_logprobs=s, tis_cap=cap))(
            lp[rows], old[rows], adv_bt[rows], ref_lp[rows], sampler[rows], w))
    assert sum(float(h[0]) for h in halves) == pytest.approx(float(loss), rel=1e-6)
    for name in ("tis/weight_mean", "tis/truncated_frac"):
        assert sum(float(h[1][name]) for h in halves) == pytest.approx(want[name], rel=1e-6), name
    assert max(float(h[1]["tis/weight_max"]) for h in halves) == pytest.approx(want["tis/weight_max"], rel=1e-6)


def test_tis_edges_at_the_cap_all_truncated_and_nothing_trained():
    """A ratio exactly at C is C and not truncated; with every ratio above C (or the sampler's
    log-prob at SGLang's float32 floor) the loss and gradient are C times the uncorrected ones;
    with no trained token the metrics are 0; a NaN from the sampler on a trained token makes the
    loss NaN (the step's non-finite guard skips that update, never training on it); the cap needs
    the sampler's log-probs."""
    cap = math.exp(0.75)                 # log C is a float32 number: "exactly at C" is representable
    cfg = loss_config(grpo={"kl_coef": 0.0})
    lp, _, _, adv, mask, valid, garbage = _tis_batch(12)
    m = mask & valid[:, None]
    rng = np.random.default_rng(12)
    old = (-np.round(rng.uniform(0.1, 3.0, mask.shape) * 64) / 64).astype(np.float32)   # exact in float32
    fn = jax.jit(jax.value_and_grad(lambda x, s, c: grpo_loss(x, old, adv, mask, cfg, sample_valid=valid,
                                                              sampler_logprobs=s, tis_cap=c), has_aux=True),
                 static_argnums=2)
    (plain, _), plain_grad = jax.jit(jax.value_and_grad(
        lambda x: grpo_loss(x, old, adv, mask, cfg, sample_valid=valid), has_aux=True))(lp)

    at_cap = np.where(m, old - np.float32(0.75), garbage)
    assert ((old - at_cap)[m] == np.float32(0.75)).all()
    (loss, mets), grad = fn(lp, at_cap, cap)
    assert float(mets["tis/truncated_frac"]) == 0.0
    assert float(mets["tis/weight_mean"]) == pytest.approx(cap, rel=1e-6)
    assert float(mets["tis/weight_max"]) == pytest.approx(cap, rel=1e-6)
    assert float(loss) == pytest.approx(cap * float(plain), rel=1e-6)

    above = np.where(rng.random(mask.shape) < 0.5, old - np.float32(3.0), np.float32(-3.4e38))
    (loss, mets), grad = fn(lp, np.where(m, above, garbage), cap)
    assert float(mets["tis/truncated_frac"]) == 1.0 and float(mets["tis/weight_mean"]) == pytest.approx(cap, rel=1e-6)
    assert float(mets["tis/weight_max"]) == pytest.approx(math.exp(20.0), rel=1e-6)   # the clamp of the log-ratio
    assert float(loss) == pytest.approx(cap * float(plain), rel=1e-6)
    np.testing.assert_allclose(np.asarray(grad), cap * np.asarray(plain_grad), rtol=1e-6, atol=1e-9)
    assert np.abs(np.asarray(plain_grad)).max() > 1e-3

    (loss, mets), grad = jax.jit(jax.value_and_grad(lambda x: grpo_loss(
        x, old, adv, np.zeros_like(mask), cfg, sampler_logprobs=garbage, tis_cap=cap), has_aux=True))(lp)
    assert float(loss) == 0.0 and not np.asarray(grad).any()
    assert all(float(mets[k]) == 0.0 for k in TIS_METRICS)

    nan_on_trained = np.where(m, old - 0.1, garbage)
    nan_on_trained[tuple(np.argwhere(m)[0])] = np.nan
    assert np.isnan(float(fn(lp, nan_on_trained, cap)[0][0]))
    with pytest.raises(ValueError, match="sampler_logprobs"):
        grpo_loss(lp, old, adv, mask, cfg, tis_cap=cap)
