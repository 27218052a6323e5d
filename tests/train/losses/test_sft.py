"""SFT loss on assistant tokens, from log-probs and end to end through the fused op."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genevolve_jax.train.losses import sft_loss, sft_loss_from_hidden
from tests.train.losses import _reference as ref
from tests.train.losses.support import (assert_matches_reference, loss_config, policy_logprobs, token_mask,
                                        value_and_grad)


def _np_sft(h, w, y, mask):
    """−(1/Σm) Σ m log softmax(h W)[y], full logits in float64."""
    z = np.einsum("btd,dv->btv", np.float64(h), np.float64(w))
    z = z - z.max(-1, keepdims=True)
    ls = z - np.log(np.exp(z).sum(-1, keepdims=True))
    total, n = 0.0, 0
    for i, j in zip(*np.nonzero(mask)):
        total -= ls[i, j, y[i, j]]
        n += 1
    return total / n if n else 0.0


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_loss_and_gradient_from_logprobs(agg):
    cfg = loss_config(sft={"aggregation": agg})
    rng = np.random.default_rng(0)
    lp = policy_logprobs(rng, (3, 9), 1.0, 2.0)
    mask = token_mask(rng, (3, 9), 0.6)
    mask[0, 0] = True
    (loss, metrics), grad = value_and_grad(lambda x: sft_loss(x, mask, cfg), lp)
    nll = lambda x: ref.aggregate([[-float(v) for v in row] for row in x], mask, agg)  # noqa: E731
    assert_matches_reference(loss, grad, nll, np.float64(lp), loss_tol=1e-6, grad_tol=1e-5)
    assert float(metrics["sft/tokens"]) == mask.sum()


def test_end_to_end_through_fused_op_matches_full_logits():
    cfg = loss_config(logprob={"chunk_size": 16})
    rng = np.random.default_rng(1)
    b, t, d, v = 2, 8, 12, 41
    h = rng.normal(size=(b, t, d)).astype(np.float32)
    w = (rng.normal(size=(d, v)) / 2).astype(np.float32)
    y = rng.integers(0, v, size=(b, t)).astype(np.int32)
    mask = rng.random((b, t)) < 0.5  # assistant tokens only
    mask[0, 0] = True
    y[1, 2], mask[1, 2] = -100, False  # an ignored prompt position

    step = jax.jit(jax.value_and_grad(
        lambda h, w, m: sft_loss_from_hidden(h, w, y, m, cfg), argnums=(0, 1), has_aux=True))
    (loss, metrics), (dh, dw) = step(jnp.asarray(h), jnp.asarray(w), mask)
    assert_matches_reference(loss, dw, lambda x: _np_sft(h, x, y, mask), np.float64(w), loss_tol=1e-6,
                             grad_tol=1e-5, step=1e-5)
    assert not np.any(np.asarray(dh)[~mask])  # no gradient from non-assistant tokens
    assert float(metrics["sft/bad_targets"]) == 0
    # An out-of-vocabulary target under the mask is counted, not trained on silently.
    mask[1, 2] = True
    (_, metrics), _ = step(jnp.asarray(h), jnp.asarray(w), mask)
    assert float(metrics["sft/bad_targets"]) == 1
    # Empty mask: zero loss, zero gradient.
    (loss, _), (dh, dw) = step(jnp.asarray(h), jnp.asarray(w), np.zeros((b, t), bool))
    assert float(loss) == 0 and not np.any(np.asarray(dh)) and not np.any(np.asarray(dw))
