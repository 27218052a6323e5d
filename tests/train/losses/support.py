"""What the loss tests share: random log-prob batches, loss configs built from per-section
overrides, the jitted value-and-gradient call, and the check of a loss and its gradient against a
float64 reference (``_reference.py``) and its central differences."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from genevolve_jax.train.losses import default_loss_config
from tests.train.losses import _reference as ref


def loss_config(**sections):
    """``default_loss_config()`` with fields overridden per section:
    ``loss_config(sdl={"topk_frac": 0.5}, grpo={"kl_coef": 0.1})``."""
    cfg = default_loss_config()
    for section, fields in sections.items():
        for name, value in fields.items():
            cfg[section][name] = value
    return cfg


def policy_logprobs(rng: np.random.Generator, shape, gamma_shape: float, gamma_scale: float) -> np.ndarray:
    """Log-probs of sampled tokens, −Gamma(k, θ): mostly moderate, a long tail of unlikely tokens."""
    return (-rng.gamma(gamma_shape, gamma_scale, size=shape)).astype(np.float32)


def near(rng: np.random.Generator, logprobs: np.ndarray, sigma: float) -> np.ndarray:
    """Another policy's log-probs of the same tokens (old, reference, teacher): + N(0, σ²)."""
    return (logprobs + rng.normal(0, sigma, size=logprobs.shape)).astype(np.float32)


def token_mask(rng: np.random.Generator, shape, frac: float) -> np.ndarray:
    """Each token in the loss with probability ``frac``."""
    return rng.random(shape) < frac


def value_and_grad(loss_fn, x, *args):
    """``((loss, metrics), d loss / d x)`` of ``loss_fn(x, *args) -> (loss, metrics)``, jitted."""
    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(jnp.asarray(x), *args)


def assert_matches_reference(loss, grad, reference, x64: np.ndarray, *, loss_tol: float, grad_tol: float,
                             step: float = 1e-6, context=None) -> None:
    """``loss`` equals ``reference(x64)`` and ``grad`` its central differences, each within a
    norm-wise relative error (``context`` goes into the failure message, e.g. a random seed)."""
    assert ref.rel_err(loss, reference(x64)) <= loss_tol, context
    assert ref.rel_err(grad, ref.finite_diff(reference, x64, h=step)) <= grad_tol, context
