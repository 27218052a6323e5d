"""GRPO: group-normalised advantages and the clipped policy-gradient loss with a reference KL.

Per policy token, with r = π/π_old and advantage A of its trajectory (METHOD.md §6):
  pg   = max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high)), and with dual-clip c > 1, for A < 0,
         pg = min(pg, −A·c);
  kl   = k1: log π − log π_ref;  k2: ½(log π − log π_ref)²;
         k3: exp(log π_ref − log π) − (log π_ref − log π) − 1; optionally clamped to [−C, C];
  loss = aggregate(w·pg + β·kl) over the loss mask, which covers only the policy's own tokens and
         drops trajectories flagged error / truncated / repeated.

w is 1, or with a sampler correction (``rl.sampler_correction = "tis"``) the truncated importance
weight of the token, as verl ships it (token-level TIS, verl/trainer/ppo/rollout_corr_helper.py):
  w = min(π_old / π_sampler, C), a constant (no gradient flows through it),
where π_sampler is the log-prob the rollout engine recorded for the token and C the cap
(``rl.tis_cap``). The tokens were drawn by the engine, whose kernels (bf16, its own attention and
sampler) are not the trainer's: w moves the policy-gradient term from the engine's distribution to
π_old's. Only the policy-gradient term is weighted (verl weights ``pg_losses`` alone, after the
dual clip); the KL term and SDL are not. A log-ratio outside ±LOG_RATIO_LIMIT is clamped first, so
a sampler log-prob at SGLang's float32 floor gives w = C, not inf; a NaN one gives a NaN loss,
which the step's non-finite guard skips and counts (train/runtime/nonfinite.py).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

from genevolve_jax.train.losses.common import (F32, aggregate, as_mask, check_same_shape, masked, masked_mean,
                                               sample_mask, weighted_sum, constant_weight_mean)

# exp() arguments are kept inside ±LOG_RATIO_LIMIT: a log-ratio beyond it is already garbage, and
# this keeps float32 finite (the gradient there is zero, as for any clipped token).
LOG_RATIO_LIMIT = 20.0


def group_advantages(rewards: jax.Array, valid: jax.Array | None = None, *,
                     group_size: int | None = None, eps: float = 1e-6,
                     scale_by_std: bool = True, std_ddof: int = 1) -> jax.Array:
    """Â = (R − mean_group R) / (std_group R + eps), or R − mean with ``scale_by_std=False``
    (Dr.GRPO).

    ``rewards`` is [P, K] or flat [P·K] with ``group_size=K`` (consecutive members form a group).
    Statistics use only the valid members; invalid members, members with a non-finite reward and
    groups without a valid member get advantage 0. A group with one valid member (or all-equal
    rewards) gives 0. Returns float32 in the shape of ``rewards``.
    """
    r = jnp.asarray(rewards, F32)
    shape = r.shape
    if r.ndim == 1:
        if not group_size or shape[0] % group_size:
            raise ValueError(f"flat rewards of length {shape[0]} need a group_size dividing it, "
                             f"got {group_size!r}")
        r = r.reshape(-1, group_size)
    elif r.ndim != 2:
        raise ValueError(f"rewards must be [P, K] or [P*K], got shape {shape}")
    if std_ddof not in (0, 1):
        raise ValueError(f"std_ddof must be 0 or 1, got {std_ddof!r}")
    ok = jnp.isfinite(r)
    if valid is not None:
        if jnp.shape(valid) != shape:
            raise ValueError(f"valid must have the shape of rewards {shape}, got "
                             f"{jnp.shape(valid)}")
        ok = ok & (jnp.asarray(valid).reshape(r.shape) != 0)
    w = ok.astype(F32)
    r = jnp.where(ok, r, 0.0)
    n = w.sum(axis=1, keepdims=True)
    mean = (w * r).sum(axis=1, keepdims=True) / jnp.maximum(n, 1.0)
    centred = jnp.where(ok, r - mean, 0.0)
    adv = centred
    if scale_by_std:
        dof = n - std_ddof
        var = jnp.where(dof > 0, (centred ** 2).sum(axis=1, keepdims=True) / jnp.maximum(dof, 1.0),
                        0.0)
        adv = centred / (jnp.sqrt(var) + eps)
    return adv.reshape(shape)


def advantages_from_config(rewards, valid, cfg: ml_collections.ConfigDict,
                           group_size: int | None = None) -> jax.Array:
    g = cfg.grpo
    return group_advantages(rewards, valid, group_size=group_size, eps=g.adv_eps,
                            scale_by_std=g.adv_scale_by_std, std_ddof=g.adv_std_ddof)


def kl_penalty(logprobs: jax.Array, ref_logprobs: jax.Array, estimator: str,
               clamp: float = 0.0) -> jax.Array:
    """Per-token KL(π‖π_ref) estimate from sampled-token log-probs."""
    diff = ref_logprobs - logprobs
    if estimator == "k1":
        kl = -diff
    elif estimator == "k2":
        kl = 0.5 * diff ** 2
    elif estimator == "k3":
        d = jnp.clip(diff, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
        kl = jnp.exp(d) - d - 1.0
    else:
        raise ValueError(f"kl estimator must be k1, k2 or k3, got {estimator!r}")
    if clamp > 0:
        kl = jnp.clip(kl, -clamp, clamp)
    return kl


def truncated_importance_weights(old_logprobs: jax.Array, sampler_logprobs: jax.Array,
                                 cap: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(w, truncated, ratio) per token: w = min(π_old / π_sampler, ``cap``) under stop-gradient,
    ``truncated`` 1 where π_old / π_sampler > cap (compared in log space, so a ratio exactly at the
    cap is not truncated), ``ratio`` the untruncated π_old / π_sampler (log-ratio clamped to
    ±LOG_RATIO_LIMIT). Inputs are the masked float32 log-probs of :func:`grpo_token_terms`."""
    log_ratio = jax.lax.stop_gradient(jnp.clip(old_logprobs - sampler_logprobs, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    over = log_ratio > math.log(cap)
    ratio = jnp.exp(log_ratio)
    return jnp.where(over, jnp.asarray(cap, F32), ratio), over.astype(F32), ratio


def grpo_token_terms(logprobs: jax.Array, old_logprobs: jax.Array, adv: jax.Array, m: jax.Array,
                     cfg: ml_collections.ConfigDict, ref_logprobs: jax.Array | None = None, *,
                     sampler_logprobs: jax.Array | None = None, tis_cap: float | None = None) -> dict[str, jax.Array]:
    """Per-token GRPO terms over the float mask ``m`` [B, T] (advantages ``adv`` [B, T]): the
    token loss w·pg + β·kl and the quantities the metrics report. Masked positions hold constants.
    ``tis_cap`` None: w = 1; else w is :func:`truncated_importance_weights` of π_old against
    ``sampler_logprobs`` (the module docstring)."""
    g = cfg.grpo
    shape = jnp.shape(logprobs)
    lp = masked(logprobs, m)
    old = masked(jax.lax.stop_gradient(old_logprobs), m)
    adv = masked(jnp.broadcast_to(adv, shape), m)

    log_ratio = jnp.clip(lp - old, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = jnp.exp(log_ratio)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * jnp.clip(ratio, 1.0 - g.clip_eps_low, 1.0 + g.clip_eps_high)
    pg = jnp.maximum(pg_unclipped, pg_clipped)
    clipped = (pg_clipped > pg_unclipped).astype(F32)
    dual_clipped = jnp.zeros(shape, F32)
    if g.dual_clip_c > 0:
        bound = -adv * g.dual_clip_c
        dual = (adv < 0) & (pg > bound)
        dual_clipped = dual.astype(F32)
        pg = jnp.where(adv < 0, jnp.minimum(pg, bound), pg)
    tis = {}
    if tis_cap is not None:
        if sampler_logprobs is None:
            raise ValueError("a sampler correction (tis_cap) needs sampler_logprobs")
        w, truncated, sampler_ratio = truncated_importance_weights(old, masked(sampler_logprobs, m), float(tis_cap))
        pg = w * pg
        tis = {"tis_weight": w, "tis_truncated": truncated, "tis_ratio": sampler_ratio}

    token_loss = pg
    kl = jnp.zeros(shape, F32)
    if g.kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("grpo.kl_coef > 0 needs ref_logprobs")
        ref = masked(jax.lax.stop_gradient(ref_logprobs), m)
        kl = kl_penalty(lp, ref, g.kl_estimator, g.kl_clamp)
        token_loss = pg + g.kl_coef * kl
    return {"token_loss": token_loss, "pg": pg, "kl": kl, "clipped": clipped, "dual_clipped": dual_clipped,
            "ratio": ratio, "approx_kl_old": 0.5 * (lp - old) ** 2, "adv": adv, **tis}


def _check_advantages(advantages, shape) -> jax.Array:
    adv = jnp.asarray(advantages, F32)
    if adv.shape == shape[:1]:
        return adv[:, None]
    if adv.shape != shape:
        raise ValueError(f"advantages must be [B] or [B, T] for logprobs {shape}, got {adv.shape}")
    return adv


def grpo_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array,
              mask: jax.Array, cfg: ml_collections.ConfigDict, *,
              ref_logprobs: jax.Array | None = None, sample_valid: jax.Array | None = None,
              entropy: jax.Array | None = None, sampler_logprobs: jax.Array | None = None,
              tis_cap: float | None = None):
    """Clipped GRPO loss and its metrics, aggregated over this batch (``cfg.grpo.aggregation``).

    logprobs, old_logprobs, ref_logprobs [B, T] (sampled-token log-probs under the policy, the
    rollout policy and the reference); advantages [B] (one per trajectory) or [B, T]; mask [B, T]
    on the policy's tokens; sample_valid [B] (0 drops a whole trajectory); entropy [B, T] is
    only reported. ``cfg`` is the loss config (:func:`default_loss_config`). ``tis_cap`` (with
    ``sampler_logprobs`` [B, T], the engine's): truncated importance sampling (module docstring).
    Returns (loss scalar, metrics dict of scalars). The train step uses :func:`grpo_loss_weighted`
    (the same terms with host-computed weights, exact over micro-batches and packed rows).
    """
    g = cfg.grpo
    shape = jnp.shape(logprobs)
    check_same_shape({"old_logprobs": old_logprobs, "mask": mask, "ref_logprobs": ref_logprobs,
                      "entropy": entropy, "sampler_logprobs": sampler_logprobs}, shape)
    adv = _check_advantages(advantages, shape)
    m = sample_mask(mask, sample_valid)
    t = grpo_token_terms(logprobs, old_logprobs, adv, m, cfg, ref_logprobs, sampler_logprobs=sampler_logprobs,
                         tis_cap=tis_cap)
    loss = aggregate(t["token_loss"], m, g.aggregation)

    valid_seqs = (m.sum(axis=1) > 0).astype(F32).sum()
    metrics = {
        "grpo/loss": jax.lax.stop_gradient(loss),
        "grpo/pg_loss": jax.lax.stop_gradient(aggregate(t["pg"], m, g.aggregation)),
        "grpo/kl": masked_mean(t["kl"], m),
        "grpo/clip_frac": masked_mean(t["clipped"], m),
        "grpo/dual_clip_frac": masked_mean(t["dual_clipped"], m),
        "grpo/ratio_mean": masked_mean(t["ratio"], m),
        "grpo/approx_kl_old": masked_mean(t["approx_kl_old"], m),
        "grpo/adv_mean": masked_mean(t["adv"], m),
        "grpo/tokens": m.sum(),
        "grpo/seqs": valid_seqs,
        "grpo/masked_seqs": (as_mask(mask).sum(axis=1) > 0).astype(F32).sum() - valid_seqs,
    }
    if entropy is not None:
        metrics["grpo/entropy"] = masked_mean(entropy, m)
    if "tis_weight" in t:
        metrics.update({"tis/weight_mean": masked_mean(t["tis_weight"], m),
                        "tis/truncated_frac": masked_mean(t["tis_truncated"], m),
                        "tis/weight_max": tis_weight_max(t, m)})
    return loss, metrics


def tis_weight_max(terms: dict, m: jax.Array) -> jax.Array:
    """``tis/weight_max``: the largest π_old / π_sampler over the mask *before* truncation (verl's
    ``rollout_is_max``): how far the worst token was, above the cap exactly when some token was
    truncated (``tis/truncated_frac`` > 0). 0 without a token."""
    return jax.lax.stop_gradient(jnp.max(jnp.where(m > 0, terms["tis_ratio"], 0.0)))


def grpo_loss_weighted(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array,
                       weights, cfg: ml_collections.ConfigDict, *, ref_logprobs: jax.Array | None = None,
                       entropy: jax.Array | None = None, sampler_logprobs: jax.Array | None = None,
                       tis_cap: float | None = None):
    """GRPO as a weighted token sum: (Σ w_agg·(w·pg + β·kl), metrics as weighted sums).

    ``advantages`` [B, T] (each token carries its trajectory's); ``weights`` a
    :class:`~genevolve_jax.train.rl.loss_weights.TokenWeights` view: ``grpo`` (the aggregation's
    per-token weight, 0 off the valid policy tokens), ``token`` (1/N on the step's valid policy
    tokens: token means) and ``seq`` (1 on a trajectory's first policy token: trajectory counts).
    Masked trajectories have no row in a packed batch (``samples/masked`` counts them). Every value is a
    sum, so micro-batches add up to the one-batch numbers exactly, except ``tis/weight_max``, a
    maximum (``EvolveLoss.max_metrics``). ``tis_cap``: truncated importance sampling against
    ``sampler_logprobs`` (module docstring), with ``tis/weight_mean`` (of the truncated weights the
    loss applies), ``tis/truncated_frac`` and ``tis/weight_max`` (:func:`tis_weight_max`) over the
    trained policy tokens."""
    w_agg, w_tok = weights["grpo"], weights["token"]
    m = (w_tok != 0).astype(F32)
    t = grpo_token_terms(logprobs, old_logprobs, advantages, m, cfg, ref_logprobs, sampler_logprobs=sampler_logprobs,
                         tis_cap=tis_cap)
    loss = weighted_sum(t["token_loss"], w_agg)
    metrics = {
        "grpo/loss": jax.lax.stop_gradient(loss),
        "grpo/pg_loss": jax.lax.stop_gradient(weighted_sum(t["pg"], w_agg)),
        "grpo/tokens": m.sum(),
        "grpo/seqs": jnp.sum(weights["seq"] * m),
    }
    for name in ("kl", "clip_frac", "dual_clip_frac", "ratio_mean", "approx_kl_old", "adv_mean"):
        term = {"clip_frac": "clipped", "dual_clip_frac": "dual_clipped", "ratio_mean": "ratio",
                "adv_mean": "adv"}.get(name, name)
        metrics[f"grpo/{name}"] = constant_weight_mean(t[term], m, w_tok)
    if entropy is not None:
        metrics["grpo/entropy"] = constant_weight_mean(entropy, m, w_tok)
    if "tis_weight" in t:
        metrics.update({"tis/weight_mean": constant_weight_mean(t["tis_weight"], m, w_tok),
                        "tis/truncated_frac": constant_weight_mean(t["tis_truncated"], m, w_tok),
                        "tis/weight_max": tis_weight_max(t, m)})
    return loss, metrics
