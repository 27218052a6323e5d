"""ops.precision: a rounding to bf16 that the code names happens in every compiled program.

The program is the shape of the RMSNorm that transformers writes (x / rms(x) rounded to bf16,
then times the weight, rounded again), here through ``narrow`` and ``widen``. With plain casts,
XLA:CPU computed it with one rounding for 64 rows and with two for one row (a quarter of the
values one bf16 step apart; the batch-size switch is XLA's, not ours).
"""

import jax
import jax.numpy as jnp
import numpy as np

from genevolve_jax.ops.precision import narrow, widen


def two_roundings(x, scale):
    x32 = widen(x)
    y = narrow(x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6), x.dtype)
    return narrow(widen(scale) * widen(y), x.dtype)


def bf16(a: np.ndarray) -> np.ndarray:
    """float64 -> the nearest bf16 (through float32: the two roundings agree except on ties of the
    float32 value, which random data does not hit) -> float64."""
    return np.asarray(jnp.asarray(a.astype(np.float32)).astype(jnp.bfloat16), np.float64)


def test_a_named_rounding_is_kept_whatever_the_batch():
    seed = int(np.random.SeedSequence().entropy % 2 ** 32)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(3 * rng.standard_normal((64, 16, 4, 16)), jnp.bfloat16)
    scale = jnp.asarray(1 + 0.1 * rng.standard_normal(16), jnp.bfloat16)
    f = jax.jit(two_roundings)
    many, one = np.asarray(f(x, scale), np.float64), np.asarray(f(x[:1], scale), np.float64)
    np.testing.assert_array_equal(many[:1], one, err_msg=f"seed {seed}")
    x64, s64 = np.asarray(x, np.float64), np.asarray(scale, np.float64)
    expected = bf16(s64 * bf16(x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + 1e-6)))
    # float32 against float64 before the first rounding tips a value now and then (0 to 1 in 65,536)
    assert np.mean(many != expected) < 1e-3, (seed, np.mean(many != expected))


def test_in_float32_narrow_and_widen_are_plain_casts():
    x = jnp.asarray(np.random.default_rng(0).standard_normal(8), jnp.float32)
    np.testing.assert_array_equal(narrow(x, jnp.float32), x)
    np.testing.assert_array_equal(widen(x), x)
    b = x.astype(jnp.bfloat16)
    assert widen(b).dtype == jnp.float32 and narrow(x, jnp.bfloat16).dtype == jnp.bfloat16
    np.testing.assert_array_equal(widen(b), b.astype(jnp.float32))
    np.testing.assert_array_equal(narrow(x, jnp.bfloat16), b)
