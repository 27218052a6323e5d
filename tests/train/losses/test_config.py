"""Loss config: the paper's defaults and early rejection of invalid values."""
import pytest

from genevolve_jax.train.losses import default_loss_config, validate
from tests.train.losses.support import loss_config


def test_defaults_are_the_papers_values():
    cfg = validate(default_loss_config())
    g, s = cfg.grpo, cfg.sdl
    assert (g.clip_eps_low, g.clip_eps_high, g.kl_coef, g.kl_estimator) == (0.2, 0.28, 1e-3, "k3")
    assert g.aggregation == "seq-mean-token-sum" and g.adv_scale_by_std
    assert g.mask_error and g.mask_truncated and g.mask_repeated
    assert (s.coef, s.k3_clamp, s.rho_max, s.topk_frac, s.divergence) == (2.0, 10.0, 2.0, 0.1,
                                                                          "k3")
    assert s.max_staleness == 0   # SDL on on-policy rollouts only (ours; the paper's step is synchronous)
    assert cfg.sft.aggregation == "token-mean" and cfg.logprob.rl_temperature == 0.7


@pytest.mark.parametrize("field,value,message", [
    ("grpo.clip_eps_low", -0.1, "grpo.clip_eps_low must be >= 0"),
    ("grpo.clip_eps_high", -0.01, "grpo.clip_eps_high must be >= 0"),
    ("grpo.adv_eps", 0.0, "grpo.adv_eps"),
    ("grpo.dual_clip_c", 0.5, "grpo.dual_clip_c"),
    ("grpo.kl_coef", -1e-3, "grpo.kl_coef"),
    ("grpo.kl_estimator", "k4", "grpo.kl_estimator"),
    ("grpo.kl_clamp", -1.0, "grpo.kl_clamp"),
    ("grpo.aggregation", "sum", "grpo.aggregation"),
    ("grpo.adv_std_ddof", 2, "grpo.adv_std_ddof"),
    ("sdl.topk_frac", 0.0, "sdl.topk_frac must be in \\(0, 1\\]"),
    ("sdl.topk_frac", 1.5, "sdl.topk_frac"),
    ("sdl.rho_max", 0.0, "sdl.rho_max"),
    ("sdl.token_cap", -1.0, "sdl.token_cap"),
    ("sdl.k3_clamp", float("nan"), "sdl.k3_clamp"),
    ("sdl.coef", -2.0, "sdl.coef"),
    ("sdl.divergence", "tv", "sdl.divergence"),
    ("sdl.divergence", "reverse", "sdl.divergence must be one of \\('k3', 'forward', 'jsd'\\)"),
    ("sdl.jsd_beta", 1.0, "sdl.jsd_beta"),
    ("sdl.max_staleness", -1, "sdl.max_staleness must be an int >= 0"),
    ("sft.aggregation", "seq", "sft.aggregation"),
    ("logprob.chunk_size", 0, "logprob.chunk_size"),
    ("logprob.rl_temperature", 0.0, "logprob.rl_temperature"),
])
def test_invalid_values_are_rejected_naming_the_field(field, value, message):
    section, name = field.split(".")
    cfg = loss_config(**{section: {name: value}})
    with pytest.raises(ValueError, match=f"^loss.{message}"):
        validate(cfg, prefix="loss")


def test_missing_section_is_rejected():
    cfg = default_loss_config()
    del cfg["sdl"]
    with pytest.raises(ValueError, match="sdl"):
        validate(cfg)
