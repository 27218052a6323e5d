"""GRPO loss and group advantages against float64 loop references."""
import math

import jax
import numpy as np
import pytest

from genevolve_jax.train.losses import default_loss_config, group_advantages, grpo_loss
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
