"""Visual Experience Distillation (SDL) loss, METHOD.md §7.

The teacher is the policy itself scored on a context that carries the retrieved experience
bundle; it scores the student's own sampled tokens. Per policy token:
  ℓ   = log π_S − sg(log π_E),  r = π_E / π_S = exp(−ℓ)
  d   = clamp(f(r), −C, C)                                (C = 10)
  ρ   = min(π_S / sg(π_S,old), ρ_max)                    (ρ_max = 2; ρ carries gradient)
  L   = Σ m^E · min(ρ·d, c_tok) / Σ m^E
where m^E keeps only samples that retrieved a bundle and, within each, the ceil(frac·n) tokens
(frac = 10%) with the largest |log π_E − log π_S|.

The step has, per position, the log-probs of one token: the sampled one. A divergence between the
student and teacher distributions is estimated there as E_{x∼π_S}[f(r(x))] with f convex and
f(1) = f'(1) = 0, so that every token's term is ≥ 0 (``cfg.sdl.divergence``):
  "k3"       f = r − 1 − log r                    E = KL(π_S‖π_E), reverse (the paper's k3)
  "forward"  f = r log r − r + 1                  E = KL(π_E‖π_S)
  "jsd"      f = β r log r − s log s, s = βr + 1 − β
                                                  E = β·KL(π_E‖M) + (1−β)·KL(π_S‖M), M = β π_E + (1−β) π_S
The tokens come from the rollout policy, and ρ = π_S/π_S,old reweights them to π_S. Since ρ
carries the gradient (∇ρ = ρ ∇log π_S), E_{π_old}[∇(ρ f)] = Σ_x ∇π_S(x) (f − r f')(r(x)), which is
the gradient of the full-vocabulary divergence itself: unclamped and uncapped, the estimate and its
gradient are unbiased for every choice (tests/train/losses/test_sdl.py checks this against exact
sums over a small vocabulary).
"""
from __future__ import annotations

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import ml_collections

from genevolve_jax.train.losses.common import (F32, as_mask, check_same_shape, masked,
                                               masked_mean, sample_mask)
from genevolve_jax.train.losses.grpo import grpo_loss

# Largest exp() argument used: beyond it k3 is far above any sane clamp, and float32 stays finite.
_EXP_LIMIT = 80.0


def _ceil_fraction(frac: float, n: jax.Array) -> jax.Array:
    """ceil(frac · n) in exact integer arithmetic (0.1 · 30 is 3, not 4).

    frac is taken as the nearest fraction p/q with q ≤ 10⁴, so p·n stays inside int32 for
    n ≤ 200k tokens per sample.
    """
    f = Fraction(frac).limit_denominator(10_000)
    p, q = f.numerator, f.denominator
    return (n * p + (q - 1)) // q


def topk_token_mask(student_logprobs: jax.Array, teacher_logprobs: jax.Array, mask: jax.Array,
                    has_bundle: jax.Array, frac: float) -> jax.Array:
    """m^E [B, T] float32: per sample with a bundle, its ceil(frac·n) masked tokens (n = its mask
    count) with the largest |log π_E − log π_S|; ties go to the earlier position."""
    if not 0 < frac <= 1:
        raise ValueError(f"topk frac must be in (0, 1], got {frac!r}")
    m = as_mask(mask)
    gap = jnp.abs(masked(teacher_logprobs, m) - masked(student_logprobs, m))
    gap = jax.lax.stop_gradient(jnp.where(jnp.isfinite(gap), gap, jnp.finfo(F32).max))
    score = jnp.where(m > 0, gap, -jnp.inf)
    order = jnp.argsort(-score, axis=1, stable=True)           # best first
    rank = jnp.argsort(order, axis=1, stable=True)             # rank of each position
    n = m.sum(axis=1).astype(jnp.int32)
    k = _ceil_fraction(frac, n) * (jnp.asarray(has_bundle) != 0).astype(jnp.int32)
    return ((rank < k[:, None]) & (m > 0)).astype(F32)


def sampled_token_divergence(ell: jax.Array, kind: str, jsd_beta: float = 0.5) -> jax.Array:
    """f(r) at r = exp(−ℓ), ℓ = log π_S − log π_E of the sampled token (module docstring).

    exp() arguments are capped at 80: beyond it the term is far above any sane clamp, and float32
    stays finite (its gradient there is zero, as the clamp's would be)."""
    log_r = jnp.minimum(-ell, _EXP_LIMIT)
    r = jnp.exp(log_r)
    if kind == "k3":
        return r - 1.0 + ell
    if kind == "forward":
        return r * log_r - r + 1.0
    if kind == "jsd":
        if not 0.0 < jsd_beta < 1.0:
            raise ValueError(f"sdl.jsd_beta must be in (0, 1), got {jsd_beta!r}")
        log_s = jnp.logaddexp(math.log(jsd_beta) + log_r, math.log1p(-jsd_beta))
        return jsd_beta * r * log_r - jnp.exp(log_s) * log_s
    raise ValueError(f"sdl.divergence must be one of ('k3', 'forward', 'jsd'), got {kind!r}")


def sdl_loss(student_logprobs: jax.Array, teacher_logprobs: jax.Array,
             old_logprobs: jax.Array, mask: jax.Array, has_bundle: jax.Array,
             cfg: ml_collections.ConfigDict, *, sample_valid: jax.Array | None = None):
    """SDL loss and metrics.

    student_logprobs, teacher_logprobs, old_logprobs [B, T]: sampled-token log-probs under the
    student (with gradient), the bundle-conditioned teacher and the rollout policy; mask [B, T] on
    the policy's tokens; has_bundle [B]; sample_valid [B] drops masked trajectories. The per-token
    divergence is ``cfg.sdl.divergence`` (see :func:`sampled_token_divergence`). Returns
    (loss, metrics).
    """
    s = cfg.sdl
    shape = jnp.shape(student_logprobs)
    check_same_shape({"teacher_logprobs": teacher_logprobs, "old_logprobs": old_logprobs,
                      "mask": mask}, shape)
    if jnp.shape(has_bundle) != shape[:1]:
        raise ValueError(f"has_bundle must have shape {shape[:1]}, got {jnp.shape(has_bundle)}")

    m = sample_mask(mask, sample_valid)
    lp_s = masked(student_logprobs, m)
    lp_e = masked(jax.lax.stop_gradient(teacher_logprobs), m)
    lp_old = masked(jax.lax.stop_gradient(old_logprobs), m)
    m_e = topk_token_mask(lp_s, lp_e, m, has_bundle, s.topk_frac)

    div = sampled_token_divergence(lp_s - lp_e, s.divergence, float(s.jsd_beta))
    div_c = jnp.clip(div, -s.k3_clamp, s.k3_clamp)
    rho = jnp.minimum(jnp.exp(jnp.minimum(lp_s - lp_old, _EXP_LIMIT)), s.rho_max)
    per_token = jnp.minimum(rho * div_c, s.token_cap)
    n_tok = m_e.sum()
    loss = (m_e * per_token).sum() / jnp.maximum(n_tok, 1.0)

    bundle = (jnp.asarray(has_bundle) != 0).astype(F32)
    metrics = {
        "sdl/loss": jax.lax.stop_gradient(loss),
        "sdl/tokens": n_tok,
        "sdl/samples": ((m_e.sum(axis=1) > 0).astype(F32)).sum(),
        "sdl/bundle_frac": bundle.mean(),
        "sdl/divergence": masked_mean(div, m_e),
        "sdl/rho": masked_mean(rho, m_e),
        "sdl/clamp_frac": masked_mean((jnp.abs(div) > s.k3_clamp).astype(F32), m_e),
        "sdl/cap_frac": masked_mean((rho * div_c > s.token_cap).astype(F32), m_e),
        "sdl/gap": masked_mean(jnp.abs(lp_e - lp_s), m_e),
    }
    return loss, metrics


def evolve_loss(logprobs, old_logprobs, advantages, mask, cfg: ml_collections.ConfigDict, *,
                ref_logprobs=None, teacher_logprobs=None, has_bundle=None, sample_valid=None,
                entropy=None):
    """L = L_GRPO + λ·L_SDL (λ = cfg.sdl.coef) with both metric sets and "loss" (the total).

    With λ = 0 the SDL term is skipped and the teacher inputs may be None.
    """
    loss, metrics = grpo_loss(logprobs, old_logprobs, advantages, mask, cfg,
                              ref_logprobs=ref_logprobs, sample_valid=sample_valid,
                              entropy=entropy)
    if cfg.sdl.coef > 0:
        if teacher_logprobs is None or has_bundle is None:
            raise ValueError("sdl.coef > 0 needs teacher_logprobs and has_bundle")
        l_sdl, m_sdl = sdl_loss(logprobs, teacher_logprobs, old_logprobs, mask, has_bundle, cfg,
                                sample_valid=sample_valid)
        loss = loss + cfg.sdl.coef * l_sdl
        metrics.update(m_sdl)
    metrics["loss"] = jax.lax.stop_gradient(loss)
    return loss, metrics
