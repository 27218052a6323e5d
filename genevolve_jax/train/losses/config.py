"""Hyperparameters of the SFT, GRPO and SDL losses, with the paper's values as defaults.

Sources (../shared/METHOD.md): §5 SFT, §6 GRPO, §7 Visual Experience Distillation. Values marked
"ours" are our choice where the paper is silent.
"""
from __future__ import annotations

import ml_collections

from genevolve_jax.config_checks import Checker, is_int, is_number

AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
KL_ESTIMATORS = ("k1", "k2", "k3")
SDL_DIVERGENCES = ("k3", "forward", "jsd")


def default_loss_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()

    # How token log-probs are computed (genevolve_jax.ops.fused_logprob).
    cfg.logprob = ml_collections.ConfigDict()
    cfg.logprob.chunk_size = 8192       # vocab columns per chunk (ours)
    cfg.logprob.rl_temperature = 0.7    # RL sampling temperature; ratios use the same softmax
    cfg.logprob.sft_temperature = 1.0

    cfg.sft = ml_collections.ConfigDict()
    cfg.sft.aggregation = "token-mean"  # L = -(1/Σm) Σ m log π (paper)

    cfg.grpo = ml_collections.ConfigDict()
    cfg.grpo.adv_eps = 1e-6             # Â = (R - mean) / (std + eps)
    cfg.grpo.adv_scale_by_std = True    # False: Dr.GRPO, Â = R - mean
    cfg.grpo.adv_std_ddof = 1           # ours: unbiased group std (as torch.std)
    cfg.grpo.clip_eps_low = 0.20        # paper
    cfg.grpo.clip_eps_high = 0.28       # paper
    cfg.grpo.dual_clip_c = 0.0          # 0 disables; else > 1 bounds the loss of A < 0 tokens
    cfg.grpo.kl_coef = 1e-3             # β (paper)
    cfg.grpo.kl_estimator = "k3"        # k1 | k2 (mse) | k3 (low_var_kl, paper)
    cfg.grpo.kl_clamp = 10.0            # ours: |kl| clamp per token; 0 disables
    cfg.grpo.aggregation = "seq-mean-token-sum"  # paper
    cfg.grpo.mask_error = True          # drop trajectories that ended in an error (paper)
    cfg.grpo.mask_truncated = True      # ... that were cut off (paper)
    cfg.grpo.mask_repeated = True       # ... that repeat themselves (paper)

    cfg.sdl = ml_collections.ConfigDict()
    cfg.sdl.coef = 2.0                  # λ in L = L_GRPO + λ L_SDL (paper)
    # Per-token divergence of the student from the teacher, estimated on the sampled token
    # (train/losses/sdl.py): k3 = KL(π_S‖π_E) (paper), forward = KL(π_E‖π_S), jsd = their
    # β-skewed Jensen–Shannon divergence.
    cfg.sdl.divergence = "k3"
    cfg.sdl.jsd_beta = 0.5              # teacher weight of the JSD mixture (ours)
    cfg.sdl.k3_clamp = 10.0             # k3(ℓ) clamped to [-10, 10] (paper)
    cfg.sdl.rho_max = 2.0               # ρ = min(π_S / π_S,old, 2) (paper)
    cfg.sdl.token_cap = 10.0            # c_tok (ours; not reported)
    cfg.sdl.topk_frac = 0.10            # top 10% of a sample's tokens by |log π_E - log π_S|
    # (ours) SDL trains a rollout at most this many policy versions older than the policy being
    # trained (rl.max_staleness >= 1); an older one trains on GRPO alone. 0: on-policy rollouts
    # only, the paper's setting, which turns SDL off at rl.max_staleness >= 1 (README
    # "Asynchronous steps": SDL on rollouts one version old broke the tiny run's learning).
    cfg.sdl.max_staleness = 0
    return cfg


def validate(cfg: ml_collections.ConfigDict, prefix: str = "") -> ml_collections.ConfigDict:
    """Reject invalid values with an error naming the field; returns ``cfg``.

    ``prefix`` is where this config sits in a larger one (e.g. "loss"), so that errors name the
    full dotted path: ``loss.grpo.clip_eps_low must be >= 0 and < 1, got -0.1``.
    """
    check = Checker(prefix)
    for section in ("logprob", "sft", "grpo", "sdl"):
        if section not in cfg:
            raise ValueError(f"loss config {prefix or '(root)'} is missing the section {section!r}")
    lp, g, s = cfg.logprob, cfg.grpo, cfg.sdl

    check(is_int(lp.chunk_size) and lp.chunk_size > 0, "logprob.chunk_size", "a positive int", lp.chunk_size)
    for name in ("rl_temperature", "sft_temperature"):
        check(is_number(lp[name]) and lp[name] > 0, f"logprob.{name}", "a finite number > 0", lp[name])

    check.one_of(cfg.sft.aggregation, "sft.aggregation", AGGREGATIONS)

    check(is_number(g.adv_eps) and g.adv_eps > 0, "grpo.adv_eps", "> 0", g.adv_eps)
    check.boolean(g.adv_scale_by_std, "grpo.adv_scale_by_std")
    check(g.adv_std_ddof in (0, 1) and is_int(g.adv_std_ddof), "grpo.adv_std_ddof", "0 or 1", g.adv_std_ddof)
    check(is_number(g.clip_eps_low) and 0 <= g.clip_eps_low < 1, "grpo.clip_eps_low", ">= 0 and < 1",
          g.clip_eps_low)
    check(is_number(g.clip_eps_high) and g.clip_eps_high >= 0, "grpo.clip_eps_high", ">= 0", g.clip_eps_high)
    check(is_number(g.dual_clip_c) and (g.dual_clip_c == 0 or g.dual_clip_c > 1), "grpo.dual_clip_c",
          "0 (off) or > 1", g.dual_clip_c)
    check(is_number(g.kl_coef) and g.kl_coef >= 0, "grpo.kl_coef", ">= 0", g.kl_coef)
    check.one_of(g.kl_estimator, "grpo.kl_estimator", KL_ESTIMATORS)
    check(is_number(g.kl_clamp) and g.kl_clamp >= 0, "grpo.kl_clamp", ">= 0 (0 = off)", g.kl_clamp)
    check.one_of(g.aggregation, "grpo.aggregation", AGGREGATIONS)
    for name in ("mask_error", "mask_truncated", "mask_repeated"):
        check.boolean(g[name], f"grpo.{name}")

    check(is_number(s.coef) and s.coef >= 0, "sdl.coef", ">= 0", s.coef)
    check.one_of(s.divergence, "sdl.divergence", SDL_DIVERGENCES)
    check(is_number(s.jsd_beta) and 0 < s.jsd_beta < 1, "sdl.jsd_beta", "in (0, 1)", s.jsd_beta)
    check(is_number(s.k3_clamp) and s.k3_clamp > 0, "sdl.k3_clamp", "> 0", s.k3_clamp)
    check(is_number(s.rho_max) and s.rho_max > 0, "sdl.rho_max", "> 0", s.rho_max)
    check(is_number(s.token_cap) and s.token_cap > 0, "sdl.token_cap", "> 0", s.token_cap)
    check(is_number(s.topk_frac) and 0 < s.topk_frac <= 1, "sdl.topk_frac", "in (0, 1]", s.topk_frac)
    check(is_int(s.max_staleness) and s.max_staleness >= 0, "sdl.max_staleness", "an int >= 0 (0: on-policy only)",
          s.max_staleness)
    return cfg


def validate_loss(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The ``loss`` section of a run config, with errors naming ``loss.<field>``."""
    return validate(cfg, prefix="loss")
