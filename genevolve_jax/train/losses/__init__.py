"""Pure loss functions of arrays for SFT, GRPO and SDL; each returns (loss, metrics)."""
from genevolve_jax.train.losses.common import aggregate
from genevolve_jax.train.losses.config import default_loss_config, validate
from genevolve_jax.train.losses.grpo import advantages_from_config, group_advantages, grpo_loss, kl_penalty
from genevolve_jax.train.losses.sdl import evolve_loss, sdl_loss, topk_token_mask
from genevolve_jax.train.losses.sft import sft_loss, sft_loss_from_hidden

__all__ = ["aggregate", "default_loss_config", "validate", "advantages_from_config",
           "group_advantages", "grpo_loss", "kl_penalty", "evolve_loss",
           "sdl_loss", "topk_token_mask", "sft_loss", "sft_loss_from_hidden"]
