"""SDL loss, its top-k token mask and the total GRPO + λ·SDL loss against float64 references."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genevolve_jax.train.losses import (default_loss_config, evolve_loss, grpo_loss, sdl_loss,
                                        topk_token_mask)
from tests.train.losses import _reference as ref
from tests.train.losses.support import (assert_matches_reference, loss_config, near, policy_logprobs, token_mask,
                                        value_and_grad)

B, T = 4, 24


def _batch(seed):
    rng = np.random.default_rng(seed)
    lp_s = policy_logprobs(rng, (B, T), 1.2, 1.5)
    lp_e = np.minimum(near(rng, lp_s, 1.5), 0).astype(np.float32)   # the teacher: a log-prob is <= 0
    old = near(rng, lp_s, 0.9)
    mask = token_mask(rng, (B, T), 0.8)
    has_bundle = np.array([True, True, False, True])
    return lp_s, lp_e, old, mask, has_bundle


def test_loss_and_gradient_match_float64_reference():
    # topk_frac: more tokens in the check than the paper's 10%; token_cap: hit by some tokens.
    cfg = loss_config(sdl={"topk_frac": 0.5, "token_cap": 4.0})
    lp_s, lp_e, old, mask, bundle = _batch(1)

    (loss, metrics), grad = value_and_grad(lambda x: sdl_loss(x, lp_e, old, mask, bundle, cfg), lp_s)
    sel = ref.topk_mask(lp_s, lp_e, mask, bundle, 0.5)
    kw = dict(clamp=10.0, rho_max=2.0, cap=4.0)
    f64 = [np.float64(x) for x in (lp_s, lp_e, old)]
    # The mask is fixed (no gradient), so the reference gradient holds it fixed too.
    assert_matches_reference(loss, grad, lambda x: ref.sdl(x, f64[1], f64[2], sel, **kw), f64[0],
                             loss_tol=1e-6, grad_tol=1e-5)
    assert not np.any(np.asarray(grad)[~sel])
    assert float(metrics["sdl/tokens"]) == sel.sum()
    # The check covered every branch: capped, ρ-clipped and plain tokens.
    ell = f64[0] - f64[1]
    k3 = np.minimum(np.exp(-ell) - 1 + ell, 10.0)
    rho = np.exp(f64[0] - f64[2])
    assert (rho[sel] > 2).any() and (np.minimum(rho, 2) * k3 > 4)[sel].any()
    assert ((rho < 2) & (np.minimum(rho, 2) * k3 < 4))[sel].any()


def test_k3_clamp_and_extreme_values():
    cfg = loss_config(sdl={"topk_frac": 1.0, "token_cap": 1e6})
    lp_s = np.array([[-1e4, -0.1, -30.0, -2.0]], np.float32)
    lp_e = np.array([[0.0, -1e4, -0.5, -2.0]], np.float32)
    old = lp_s.copy()
    mask = np.ones((1, 4), bool)
    (loss, m), grad = value_and_grad(lambda x: sdl_loss(x, lp_e, old, mask, np.array([True]), cfg), lp_s)
    assert np.isfinite(float(loss)) and np.isfinite(np.asarray(grad)).all()
    sel = np.ones((1, 4), bool)
    want = ref.sdl(np.float64(lp_s), np.float64(lp_e), np.float64(old), sel, clamp=10.0,
                   rho_max=2.0, cap=1e6)
    assert ref.rel_err(loss, want) <= 1e-6
    # Clamped tokens (|k3| > 10) pass no gradient through k3; ρ = 1 with slope 1 remains.
    assert float(m["sdl/clamp_frac"]) == 0.75


@pytest.mark.parametrize("frac", [0.1, 0.25, 1 / 3, 0.5, 1.0, 0.01])
def test_topk_selects_exactly_ceil_frac_n(frac):
    rng = np.random.default_rng(int(frac * 1000))
    b, t = 6, 40
    lp_s = rng.normal(size=(b, t)).astype(np.float32)
    lp_e = rng.normal(size=(b, t)).astype(np.float32)
    lp_s[0, :10] = -np.arange(10) / 8  # exact ties in the gap (dyadic): earlier positions win
    lp_e[0, :10] = lp_s[0, :10] + 1.0
    counts = [40, 30, 7, 1, 0, 20]
    mask = np.zeros((b, t), bool)
    for i, n in enumerate(counts):
        mask[i, rng.permutation(t)[:n]] = True
    mask[0] = True
    bundle = np.array([True, True, True, True, True, False])
    sel = np.asarray(topk_token_mask(lp_s, lp_e, mask, bundle, frac))
    for i, n in enumerate(counts):
        want = math.ceil(round(frac * n, 9)) if bundle[i] else 0
        assert sel[i].sum() == want, (frac, n)
    np.testing.assert_array_equal(sel > 0, ref.topk_mask(lp_s, lp_e, mask, bundle, frac))
    assert not np.any(sel[~mask])


def test_no_bundle_or_empty_mask_gives_zero_loss_and_gradient():
    cfg = default_loss_config()
    lp_s, lp_e, old, mask, _ = _batch(2)
    lp_s[0, 0] = -np.inf
    step = jax.jit(jax.value_and_grad(
        lambda x, msk, bundle: sdl_loss(x, lp_e, old, msk, bundle, cfg), has_aux=True))
    for bundle, msk in ((np.zeros(B, bool), mask), (np.ones(B, bool), np.zeros((B, T), bool))):
        (loss, metrics), grad = step(jnp.asarray(lp_s), msk, bundle)
        assert float(loss) == 0.0 and not np.any(np.asarray(grad))
        assert float(metrics["sdl/tokens"]) == 0
        assert all(np.isfinite(float(v)) for v in metrics.values())


@pytest.mark.parametrize("kind", ["forward", "jsd"])
def test_other_divergences_match_float64_reference(kind):
    """Loss and gradient of each sampled-token divergence, through the same ρ, clamp, cap and top-k
    path as k3, against the reference's own f (written from each divergence's definition)."""
    seed = int(np.random.default_rng().integers(1 << 30))
    beta = float(np.random.default_rng(seed).uniform(0.2, 0.8))
    cfg = loss_config(sdl={"divergence": kind, "jsd_beta": beta, "topk_frac": 0.5, "token_cap": 1.5})
    lp_s, lp_e, old, mask, bundle = _batch(seed)

    (loss, metrics), grad = value_and_grad(lambda x: sdl_loss(x, lp_e, old, mask, bundle, cfg), lp_s)
    sel = ref.topk_mask(lp_s, lp_e, mask, bundle, 0.5)
    kw = dict(clamp=10.0, rho_max=2.0, cap=1.5, kind=kind, beta=beta)
    f64 = [np.float64(x) for x in (lp_s, lp_e, old)]
    assert_matches_reference(loss, grad, lambda x: ref.sdl(x, f64[1], f64[2], sel, **kw), f64[0],
                             loss_tol=1e-5, grad_tol=1e-4, context=seed)
    assert not np.any(np.asarray(grad)[~sel])
    assert float(metrics["sdl/divergence"]) >= 0   # each token's term is >= 0 by construction
    d = np.array([ref.sampled_divergence(a - b, kind, beta) for a, b in zip(f64[0][sel], f64[1][sel])])
    assert (d >= 0).all() and (d > 0).any()


def _exact_divergence(lp_s, lp_e, kind, beta):
    """Full-vocabulary divergence of two log-prob vectors, float64."""
    p, q = np.exp(lp_s), np.exp(lp_e)
    if kind == "k3":
        return float(np.sum(p * (lp_s - lp_e)))            # KL(π_S‖π_E)
    if kind == "forward":
        return float(np.sum(q * (lp_e - lp_s)))            # KL(π_E‖π_S)
    m = beta * q + (1 - beta) * p
    return float(beta * np.sum(q * np.log(q / m)) + (1 - beta) * np.sum(p * np.log(p / m)))


@pytest.mark.parametrize("kind", ["k3", "forward", "jsd"])
def test_sampled_token_divergence_is_the_full_vocabulary_divergence(kind):
    """What "forward" (and k3, jsd) means: with every vocabulary entry as one token drawn from a
    uniform π_old (ρ = V·π_S), the SDL loss with ρ, clamp and cap out of the way equals the exact
    divergence between the student and teacher distributions, and its gradient with respect to the
    student's logits equals the exact divergence's gradient (float64, central differences)."""
    rng = np.random.default_rng()
    v, beta = 7, float(rng.uniform(0.2, 0.8))
    z_s, z_e = rng.normal(0, 1.0, v), rng.normal(0, 1.0, v)
    log_softmax = lambda z: z - np.log(np.sum(np.exp(z - z.max()))) - z.max()  # noqa: E731
    cfg = loss_config(sdl={"divergence": kind, "jsd_beta": beta, "topk_frac": 1.0, "rho_max": 1e6,
                           "token_cap": 1e6, "k3_clamp": 1e6})
    lp_e = jnp.asarray(log_softmax(z_e)[None], jnp.float32)
    old = jnp.full((1, v), -np.log(v), jnp.float32)
    ones = np.ones((1, v), bool)

    def loss(z):
        return sdl_loss(jax.nn.log_softmax(z)[None], lp_e, old, ones, np.array([True]), cfg)[0]

    value, grad = jax.jit(jax.value_and_grad(loss))(jnp.asarray(z_s, jnp.float32))
    exact = lambda z: _exact_divergence(log_softmax(z), log_softmax(z_e), kind, beta)  # noqa: E731
    assert_matches_reference(value, grad, exact, z_s, loss_tol=1e-5, grad_tol=1e-4)
    if kind == "forward":   # the textbook gradient of KL(q‖softmax(z)): softmax(z) − q
        np.testing.assert_allclose(grad, np.exp(log_softmax(z_s)) - np.exp(log_softmax(z_e)), atol=1e-6)


def test_forward_divergence_trains_through_the_total_loss():
    """sdl.divergence = "forward" passes validation and runs in the jitted GRPO + λ·SDL loss."""
    from genevolve_jax.train.losses import validate
    cfg = validate(default_loss_config(), prefix="loss")
    cfg.sdl.divergence = "forward"
    validate(cfg, prefix="loss")
    lp_s, lp_e, old, mask, bundle = _batch(4)
    adv = np.random.default_rng(4).normal(size=B).astype(np.float32)
    (loss, metrics), grad = value_and_grad(lambda lp: evolve_loss(
        lp, old, adv, mask, cfg, ref_logprobs=old, teacher_logprobs=lp_e, has_bundle=bundle), lp_s)
    assert np.isfinite(float(loss)) and float(metrics["sdl/tokens"]) > 0
    assert np.isfinite(np.asarray(grad)).all()


def test_total_is_grpo_plus_lambda_sdl():
    cfg = default_loss_config()  # λ = 2
    lp_s, lp_e, old, mask, bundle = _batch(3)
    ref_lp = lp_s + 0.1
    adv = np.random.default_rng(3).normal(size=B).astype(np.float32)
    valid = np.array([True, False, True, True])

    def total(lp):
        return evolve_loss(lp, old, adv, mask, cfg, ref_logprobs=ref_lp, teacher_logprobs=lp_e,
                           has_bundle=bundle, sample_valid=valid)

    (loss, metrics), grad = value_and_grad(total, lp_s)
    g_loss, s_loss = jax.jit(lambda x: (
        grpo_loss(x, old, adv, mask, cfg, ref_logprobs=ref_lp, sample_valid=valid)[0],
        sdl_loss(x, lp_e, old, mask, bundle, cfg, sample_valid=valid)[0]))(lp_s)
    assert float(loss) == pytest.approx(float(g_loss) + 2.0 * float(s_loss), rel=1e-6)
    assert float(metrics["loss"]) == pytest.approx(float(loss))
    assert "grpo/clip_frac" in metrics and "sdl/tokens" in metrics
    assert not np.any(np.asarray(grad)[1])  # the flagged trajectory
    with pytest.raises(ValueError, match="teacher_logprobs"):
        evolve_loss(lp_s, old, adv, mask, cfg, ref_logprobs=ref_lp)
