"""Per-token loss weights of the evolve batch, computed on the host from the whole step's counts.

GRPO's aggregations and SDL's top-token mean divide by counts over the *whole* rollout batch (the
number of trained tokens, of trained trajectories, a trajectory's own token count, the top tokens
of every bundled trajectory). Inside the train step a micro-batch sees only some of the rows, so
those counts must come from outside: this module turns them into per-token weights, and the loss
(train/losses/grpo.py ``grpo_loss_weighted``, sdl.py ``sdl_loss_weighted``) is then a plain
weighted sum. Sums add over any split of the rows into micro-batches, and over any packing of
trajectories into rows, so accumulation is exact (tests/train/losses/test_accumulation.py).

Fields (all [R, T], aligned with ``targets``; 0 on padding and on masked trajectories):
  weight_grpo    the aggregation's weight of each trained policy token:
                 token-mean 1/N_tok; seq-mean-token-sum 1/N_seq; seq-mean-token-mean 1/(n_i·N_seq)
  weight_token   1/N_tok on trained policy tokens (token means of the metrics)
  weight_seq     1 on trajectory i's first policy token (exact trajectory counts)
  weight_sample  1/(len_i·N) on every token of the N trajectories in the rows (sample fractions)
  weight_sdl     1/K on the SDL candidates (trained policy tokens of bundled trajectories), K = Σ k_i
  sdl_k          int32 k_i = ceil(topk_frac·n_i) of a bundled trajectory at its candidates
  bundle         1 on every token of a trajectory with a bundle
where n_i counts trajectory i's policy tokens (targets), N_tok = Σ n_i and N_seq the trajectories
with n_i > 0, over trained trajectories. Rows hold trajectories as segments (``segment_ids``).
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np

WEIGHT_FIELDS = ("weight_grpo", "weight_token", "weight_seq", "weight_sample", "weight_sdl", "sdl_k", "bundle")
AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


def ceil_fraction(frac: float, n: np.ndarray) -> np.ndarray:
    """ceil(frac · n) in exact integer arithmetic (0.1 · 30 is 3, not 4), as the SDL loss defines it."""
    f = Fraction(frac).limit_denominator(10_000)
    p, q = f.numerator, f.denominator
    return (np.asarray(n, np.int64) * p + (q - 1)) // q


def loss_weights(loss_mask: np.ndarray, segment_ids: np.ndarray, trained: np.ndarray, bundle: np.ndarray, *,
                 aggregation: str, topk_frac: float) -> dict[str, np.ndarray]:
    """The weight fields above. ``loss_mask`` [R, T] marks policy targets; ``segment_ids`` [R, T]
    (0 = padding); ``trained`` and ``bundle`` [R, T] are 1 on every token of a trajectory that is
    trained / carries a bundle (constant over its segment)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"loss.grpo.aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if not 0 < topk_frac <= 1:
        raise ValueError(f"loss.sdl.topk_frac must be in (0, 1], got {topk_frac!r}")
    mask = (np.asarray(loss_mask) != 0)
    seg = np.asarray(segment_ids, np.int64)
    rows, length = seg.shape
    real = seg > 0
    key = (np.arange(rows)[:, None] * (length + 1) + seg)          # one id per (row, segment)
    _, inverse = np.unique(key, return_inverse=True)
    inverse = inverse.reshape(seg.shape)
    n_seg = int(inverse.max()) + 1
    flat = inverse.ravel()
    seg_len = np.bincount(flat, weights=real.ravel().astype(np.float64), minlength=n_seg)
    n_pol = np.bincount(flat, weights=(mask & real).ravel().astype(np.float64), minlength=n_seg)
    seg_trained = np.zeros(n_seg, bool)
    seg_bundle = np.zeros(n_seg, bool)
    seg_trained[flat] = (np.asarray(trained) != 0).ravel() & real.ravel()
    seg_bundle[flat] = (np.asarray(bundle) != 0).ravel() & real.ravel()
    is_real = seg_len > 0

    trained_tok = mask & real & seg_trained[inverse]
    n_tok = float(trained_tok.sum())
    n_seqs = float(np.sum(seg_trained & (n_pol > 0)))
    n_samples = float(np.sum(is_real))

    tok = np.where(trained_tok, 1.0 / max(n_tok, 1.0), 0.0)
    if aggregation == "token-mean":
        grpo = tok
    elif aggregation == "seq-mean-token-sum":
        grpo = np.where(trained_tok, 1.0 / max(n_seqs, 1.0), 0.0)
    else:
        grpo = np.where(trained_tok, 1.0 / (np.maximum(n_pol[inverse], 1.0) * max(n_seqs, 1.0)), 0.0)
    policy = mask & real
    first = policy & (np.cumsum(policy, axis=1) == _segment_start_counts(policy, inverse) + 1)
    seq = first.astype(np.float64)
    sample = np.where(real, 1.0 / (np.maximum(seg_len[inverse], 1.0) * max(n_samples, 1.0)), 0.0)
    k_seg = ceil_fraction(topk_frac, n_pol.astype(np.int64)) * (seg_trained & seg_bundle)
    cand = trained_tok & seg_bundle[inverse]
    sdl = np.where(cand, 1.0 / max(float(k_seg.sum()), 1.0), 0.0)
    f32 = np.float32
    return {"weight_grpo": grpo.astype(f32), "weight_token": tok.astype(f32), "weight_seq": seq.astype(f32),
            "weight_sample": sample.astype(f32), "weight_sdl": sdl.astype(f32),
            "sdl_k": np.where(cand, k_seg[inverse], 0).astype(np.int32),
            "bundle": (real & seg_bundle[inverse]).astype(f32)}


def _segment_start_counts(policy: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """At each token, the row's policy-token count before its segment starts (segments are
    contiguous), so that ``cumsum == this + 1`` marks a segment's first policy token."""
    before = np.cumsum(policy, axis=1) - policy
    starts = np.zeros(int(inverse.max()) + 1, np.int64)
    # The first token of each segment in row-major order holds the count before that segment.
    flat_inv, flat_before = inverse.ravel(), before.ravel()
    idx = np.unique(flat_inv, return_index=True)[1]
    starts[flat_inv[idx]] = flat_before[idx]
    return starts[inverse]


def weights_view(batch) -> dict:
    """The loss functions' view of a batch's weight fields (names without the ``weight_`` prefix)."""
    return {"grpo": batch["weight_grpo"], "token": batch["weight_token"], "seq": batch["weight_seq"],
            "sample": batch["weight_sample"], "sdl": batch["weight_sdl"], "sdl_k": batch["sdl_k"],
            "bundle": batch["bundle"]}
