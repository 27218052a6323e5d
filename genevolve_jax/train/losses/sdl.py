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

from genevolve_jax.train.losses.common import (F32, as_mask, check_same_shape, masked, masked_mean, sample_mask,
                                               weighted_sum, constant_weight_mean)
from genevolve_jax.train.losses.grpo import grpo_loss, grpo_loss_weighted

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


def segment_topk_mask(student_logprobs: jax.Array, teacher_logprobs: jax.Array, mask: jax.Array,
                      segment_ids: jax.Array, k: jax.Array) -> jax.Array:
    """m^E [B, T] float32 for packed rows: in each segment, the ``k`` masked tokens with the
    largest |log π_E − log π_S| (ties to the earlier position), ``k`` [B, T] being the segment's
    count at each of its tokens (computed on the host: ceil(frac·n) of its n policy tokens, 0
    without a bundle). Sorting by (segment, −gap) and subtracting each segment's first sorted
    index gives the rank inside the segment in O(T log T), never a T × T comparison."""
    m = as_mask(mask)
    gap = jnp.abs(masked(teacher_logprobs, m) - masked(student_logprobs, m))
    gap = jax.lax.stop_gradient(jnp.where(jnp.isfinite(gap), gap, jnp.finfo(F32).max))
    score = jnp.where(m > 0, gap, -jnp.inf)
    seg = jnp.asarray(segment_ids, jnp.int32)
    by_score = jnp.argsort(-score, axis=1, stable=True)
    seg_sorted = jnp.take_along_axis(seg, by_score, axis=1)
    by_seg = jnp.argsort(seg_sorted, axis=1, stable=True)     # segment-major, best first inside
    order = jnp.take_along_axis(by_score, by_seg, axis=1)
    seg_ordered = jnp.take_along_axis(seg, order, axis=1)
    first = jax.vmap(lambda s: jnp.searchsorted(s, s, side="left"))(seg_ordered)
    rank_sorted = jnp.arange(seg.shape[1], dtype=jnp.int32)[None, :] - first.astype(jnp.int32)
    rank = jnp.zeros_like(rank_sorted).at[jnp.arange(seg.shape[0])[:, None], order].set(rank_sorted)
    return ((rank < jnp.asarray(k, jnp.int32)) & (m > 0)).astype(F32)


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


def sdl_token_terms(lp_s: jax.Array, lp_e: jax.Array, lp_old: jax.Array, cfg: ml_collections.ConfigDict):
    """(f(r), clamped f(r), ρ, per-token loss min(ρ·clamp(f), c_tok)) from masked log-probs."""
    s = cfg.sdl
    div = sampled_token_divergence(lp_s - lp_e, s.divergence, float(s.jsd_beta))
    div_c = jnp.clip(div, -s.k3_clamp, s.k3_clamp)
    rho = jnp.minimum(jnp.exp(jnp.minimum(lp_s - lp_old, _EXP_LIMIT)), s.rho_max)
    return div, div_c, rho, jnp.minimum(rho * div_c, s.token_cap)


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

    div, div_c, rho, per_token = sdl_token_terms(lp_s, lp_e, lp_old, cfg)
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
                entropy=None, sampler_logprobs=None, tis_cap=None):
    """L = L_GRPO + λ·L_SDL (λ = cfg.sdl.coef) with both metric sets and "loss" (the total).

    With λ = 0 the SDL term is skipped and the teacher inputs may be None. ``tis_cap`` weights
    GRPO's policy-gradient term only (train/losses/grpo.py).
    """
    loss, metrics = grpo_loss(logprobs, old_logprobs, advantages, mask, cfg,
                              ref_logprobs=ref_logprobs, sample_valid=sample_valid,
                              entropy=entropy, sampler_logprobs=sampler_logprobs, tis_cap=tis_cap)
    if cfg.sdl.coef > 0:
        if teacher_logprobs is None or has_bundle is None:
            raise ValueError("sdl.coef > 0 needs teacher_logprobs and has_bundle")
        l_sdl, m_sdl = sdl_loss(logprobs, teacher_logprobs, old_logprobs, mask, has_bundle, cfg,
                                sample_valid=sample_valid)
        loss = loss + cfg.sdl.coef * l_sdl
        metrics.update(m_sdl)
    metrics["loss"] = jax.lax.stop_gradient(loss)
    return loss, metrics


def sdl_loss_weighted(student_logprobs: jax.Array, teacher_logprobs: jax.Array, old_logprobs: jax.Array,
                      segment_ids: jax.Array, weights, cfg: ml_collections.ConfigDict):
    """SDL as a weighted token sum over packed rows: (Σ w_sdl·m^E·ℓ_tok, metrics as sums).

    ``weights`` (train/rl/loss_weights.py): ``sdl_k`` [B, T] the top-token count of each token's
    segment (0 without a bundle or when masked), ``sdl`` 1/Σk on the candidate tokens (valid
    policy tokens of bundled trajectories), ``seq`` 1 on a trajectory's first policy token and
    ``sample`` 1/(n·N) on every token of the N real trajectories."""
    w_sdl = weights["sdl"]
    cand = (w_sdl != 0).astype(F32)
    lp_s = masked(student_logprobs, cand)
    lp_e = masked(jax.lax.stop_gradient(teacher_logprobs), cand)
    lp_old = masked(jax.lax.stop_gradient(old_logprobs), cand)
    m_e = segment_topk_mask(lp_s, lp_e, cand, segment_ids, weights["sdl_k"])
    div, div_c, rho, per_token = sdl_token_terms(lp_s, lp_e, lp_old, cfg)
    loss = weighted_sum(per_token, m_e * w_sdl)
    s = cfg.sdl
    metrics = {
        "sdl/loss": jax.lax.stop_gradient(loss),
        "sdl/tokens": m_e.sum(),
        "sdl/samples": jnp.sum(weights["seq"] * cand * (weights["sdl_k"] > 0)),
        "sdl/bundle_frac": jnp.sum(weights["sample"] * weights["bundle"]),
        "sdl/divergence": constant_weight_mean(div, m_e, w_sdl),
        "sdl/rho": constant_weight_mean(rho, m_e, w_sdl),
        "sdl/clamp_frac": constant_weight_mean((jnp.abs(div) > s.k3_clamp).astype(F32), m_e, w_sdl),
        "sdl/cap_frac": constant_weight_mean((rho * div_c > s.token_cap).astype(F32), m_e, w_sdl),
        "sdl/gap": constant_weight_mean(jnp.abs(lp_e - lp_s), m_e, w_sdl),
    }
    return loss, metrics


def evolve_loss_weighted(logprobs, old_logprobs, advantages, segment_ids, weights, cfg: ml_collections.ConfigDict, *,
                         ref_logprobs=None, teacher_logprobs=None, entropy=None, sampler_logprobs=None,
                         tis_cap=None):
    """L = L_GRPO + λ·L_SDL as weighted token sums (exact over micro-batches and packed rows):
    :func:`grpo_loss_weighted` plus λ·:func:`sdl_loss_weighted`, with "loss" the total.
    ``tis_cap`` weights GRPO's policy-gradient term only: SDL's ρ already reweights its tokens
    from π_old to π_S, and verl corrects the policy loss alone."""
    loss, metrics = grpo_loss_weighted(logprobs, old_logprobs, advantages, weights, cfg,
                                       ref_logprobs=ref_logprobs, entropy=entropy,
                                       sampler_logprobs=sampler_logprobs, tis_cap=tis_cap)
    if cfg.sdl.coef > 0:
        if teacher_logprobs is None:
            raise ValueError("sdl.coef > 0 needs teacher_logprobs")
        l_sdl, m_sdl = sdl_loss_weighted(logprobs, teacher_logprobs, old_logprobs, segment_ids, weights, cfg)
        loss = loss + cfg.sdl.coef * l_sdl
        metrics.update(m_sdl)
    metrics["loss"] = jax.lax.stop_gradient(loss)
    return loss, metrics
