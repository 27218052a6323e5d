"""The loss functions the sharded train step minimises (``train.step.LossFunction``).

- :class:`SFTLoss`: the SFT cold start on assistant tokens (METHOD.md §5), ``loss.sft.*`` and
  ``loss.logprob.*`` (chunk size, SFT temperature). It returns a token sum and the token count, so
  gradient accumulation is exact.
- :class:`EvolveLoss`: L = L_GRPO + λ·L_SDL (METHOD.md §6–7) in one forward of the policy and one
  stop-gradient forward of the guided teacher row (same weights), both through the fused log-prob
  op; images are encoded once and the teacher row reuses them. π_old is the batch's
  ``old_logprobs`` or, when the batch carries none (an on-policy step: one optimiser step over the
  rollout batch), the stop-gradient of the step's own log-probs: the ratio is then exactly 1 and
  no forward is spent on it. With a sampler correction (``tis_cap``), each token's
  policy-gradient term is weighted by min(π_old / π_sampler, C) (train/losses/grpo.py): on-policy,
  π_old is that same stop-gradient forward, the pre-update policy, so the weight equals the one a
  recompute forward would give (tests/train/rl/test_pipeline.py). Its terms are weighted token sums
  with the normalisers of the whole step computed on the host (train/rl/loss_weights.py), so
  micro-batches of packed rows add up to the one-batch loss, gradient and metrics exactly.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from genevolve_jax.models.lora import adapter_dropout
from genevolve_jax.ops.fused_logprob import token_logprobs
from genevolve_jax.train.losses.sdl import evolve_loss_weighted
from genevolve_jax.train.losses.sft import sft_loss_from_hidden
from genevolve_jax.train.rl.loss_weights import weights_view
from genevolve_jax.train.runtime.batch_layout import hidden_states_of, row_images_of, teacher_view
from genevolve_jax.train.runtime.step import LossFunction


class SFTLoss(LossFunction):
    """loss_sum = token-mean NLL × tokens, weight = tokens (exact over micro-batches)."""

    def __init__(self, loss_cfg=None, *, chunk_size: int | None = None):
        """``loss_cfg`` None: the paper's defaults; ``chunk_size`` overrides loss.logprob.chunk_size."""
        if loss_cfg is None:
            from genevolve_jax.train.losses.config import default_loss_config
            loss_cfg = default_loss_config()
        if chunk_size is not None:
            loss_cfg = loss_cfg.copy_and_resolve_references()
            loss_cfg.logprob.chunk_size = int(chunk_size)
        if loss_cfg.sft.aggregation != "token-mean":
            # Packed rows hold several trajectories: a per-row mean is not a per-trajectory mean.
            raise ValueError(f"loss.sft.aggregation must be 'token-mean' for the packed train step, got "
                             f"{loss_cfg.sft.aggregation!r} (packed rows hold several trajectories)")
        self.cfg = loss_cfg

    def __call__(self, model, batch, rng):
        hidden = hidden_states_of(model, batch, dropout_key=rng if adapter_dropout(model) else None)
        kernel = model.lm_head_kernel().astype(hidden.dtype)
        mask = batch["loss_mask"].astype(jnp.float32)
        loss, mets = sft_loss_from_hidden(hidden, kernel, batch["targets"], mask, self.cfg)
        tokens = jnp.sum(mask)
        # Only sums are returned as metrics: the step adds them over micro-batches.
        return loss * tokens, tokens, {"sft/bad_targets": mets["sft/bad_targets"]}


def policy_logprobs(model, batch: Mapping[str, Any], loss_cfg, *, entropy: bool = False, image_features=None,
                    dropout_key=None):
    """Log-probs [B, T] of ``batch["targets"]`` at the RL temperature (and the entropy [B, T] when
    asked), through the model's packed-row forward and the fused op (``dropout_key``: adapter
    dropout; None, for every forward but the trained one, is deterministic)."""
    hidden = hidden_states_of(model, batch, image_features, dropout_key)
    kernel = model.lm_head_kernel().astype(hidden.dtype)
    return token_logprobs(hidden, kernel, batch["targets"], chunk_size=int(loss_cfg.logprob.chunk_size),
                          temperature=float(loss_cfg.logprob.rl_temperature), return_entropy=entropy)


def teacher_logprobs(model, batch: Mapping[str, Any], loss_cfg, image_features=None) -> jax.Array:
    """[B, T] stop-gradient log-probs of the student's tokens under the teacher rows, gathered into
    student positions (``teacher_index``). ``image_features``: the student's encoded row images."""
    feats = None if image_features is None else jax.tree.map(jax.lax.stop_gradient, image_features)
    view = teacher_view(batch)
    hidden = jax.lax.stop_gradient(hidden_states_of(model, view, feats))
    kernel = jax.lax.stop_gradient(model.lm_head_kernel()).astype(hidden.dtype)
    row = token_logprobs(hidden, kernel, view["targets"], chunk_size=int(loss_cfg.logprob.chunk_size),
                         temperature=float(loss_cfg.logprob.rl_temperature))
    return jnp.take_along_axis(row, batch["teacher_index"], axis=1)


class EvolveLoss(LossFunction):
    """GRPO + λ·SDL as weighted token sums: every normaliser of the step (tokens, trajectories,
    SDL's top-token counts) is in the batch's weight fields (train/rl/loss_weights.py), so a
    micro-batch returns its share of the one-batch loss, and its metrics are sums or exact
    weighted means. The weight is the micro-batch's share of ``row_weight`` (Σ over the step = 1)."""

    max_metrics = ("rollout/logprob_mismatch_max", "tis/weight_max")

    def __init__(self, loss_cfg, *, sdl: bool | None = None, tis_cap: float | None = None):
        """``tis_cap``: C of the sampler correction (``rl.sampler_correction = "tis"``, the value of
        train/rl/config.py ``tis_cap_of``), or None for none: GRPO's policy-gradient term of each
        token is weighted by min(π_old / π_sampler, C), π_sampler the batch's ``sampler_logprobs``."""
        self.cfg = loss_cfg
        self.use_sdl = (loss_cfg.sdl.coef > 0) if sdl is None else bool(sdl)
        self.tis_cap = None if tis_cap is None else float(tis_cap)

    def __call__(self, model, batch, rng):
        images = row_images_of(batch)
        # Adapter dropout (model.lora.dropout > 0) acts on the trained forward alone: the teacher
        # rows (a stop-gradient target) and their image features stay deterministic.
        drop = adapter_dropout(model)
        policy_key, vision_key = jax.random.split(rng) if drop else (None, None)
        feats = None if images is None else model.encode_row_images(images, vision_key)
        lp, ent = policy_logprobs(model, batch, self.cfg, entropy=True, image_features=feats, dropout_key=policy_key)
        plain_feats = feats if images is None or not drop else model.encode_row_images(images)
        # On-policy (no π_old in the batch): π_old is the pre-update policy's log-probs, held fixed:
        # this forward's own (the ratio is then exactly 1), or with adapter dropout a deterministic
        # forward, the policy that sampled (sampling and π_old recomputes never drop out).
        if "old_logprobs" in batch:
            old = batch["old_logprobs"]
        elif drop:
            old = jax.lax.stop_gradient(policy_logprobs(model, batch, self.cfg, image_features=plain_feats))
        else:
            old = jax.lax.stop_gradient(lp)
        teacher_lp = teacher_logprobs(model, batch, self.cfg, plain_feats) if self.use_sdl else None
        cfg = self.cfg if self.use_sdl or self.cfg.sdl.coef == 0 else _without_sdl(self.cfg)
        weights = weights_view(batch)
        loss, metrics = evolve_loss_weighted(lp, old, batch["advantages"], batch["segment_ids"], weights, cfg,
                                             ref_logprobs=batch.get("ref_logprobs"), teacher_logprobs=teacher_lp,
                                             entropy=ent, sampler_logprobs=batch.get("sampler_logprobs"),
                                             tis_cap=self.tis_cap)
        if "sampler_logprobs" in batch:  # the sampler's health check, at no extra forward
            metrics.update(logprob_mismatch(batch["sampler_logprobs"], lp, weights["token"]))
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        return loss, jnp.sum(batch["row_weight"].astype(jnp.float32)), metrics


def _without_sdl(loss_cfg):
    cfg = loss_cfg.copy_and_resolve_references()
    cfg.sdl.coef = 0.0
    return cfg


def logprob_mismatch(sampler_lp, trainer_lp, token_weight) -> dict[str, jax.Array]:
    """Mean (a weighted sum: ``token_weight`` is 1/N on the step's trained policy tokens) and max
    |sampler − trainer| log-prob: the health check of a sampler (its temperature, precision,
    weight sync); 0 when there is no such token."""
    sel = token_weight != 0
    diff = jnp.where(sel, jnp.abs(sampler_lp.astype(jnp.float32) - jax.lax.stop_gradient(trainer_lp)), 0.0)
    return {"rollout/logprob_mismatch": jnp.sum(diff) * jnp.max(token_weight), "rollout/logprob_mismatch_max": jnp.max(diff)}
