"""Independent float64 references for the loss tests: plain Python loops over tokens, written from
METHOD.md's formulas, and central finite differences for gradients."""
import math

import numpy as np


def rel_err(a, b) -> float:
    """max |a − b| / max |b| (norm-wise relative error)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def finite_diff(fn, x, h=1e-6):
    """Central differences of a scalar float64 function of an array."""
    x = np.array(x, np.float64)
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, dn = x.copy(), x.copy()
        up[i] += h
        dn[i] -= h
        g[i] = (fn(up) - fn(dn)) / (2 * h)
    return g


def aggregate(values, mask, mode):
    b, t = mask.shape
    if mode == "token-mean":
        n = sum(mask[i, j] for i in range(b) for j in range(t))
        s = sum(values[i][j] for i in range(b) for j in range(t) if mask[i, j])
        return s / n if n else 0.0
    per_seq = []
    for i in range(b):
        toks = [values[i][j] for j in range(t) if mask[i, j]]
        if not toks:
            continue
        per_seq.append(sum(toks) if mode == "seq-mean-token-sum" else sum(toks) / len(toks))
    return sum(per_seq) / len(per_seq) if per_seq else 0.0


def tis_weight(old, sampler, cap):
    """Truncated importance sampling (verl's token TIS): min(π_old / π_sampler, C)."""
    return min(math.exp(old - sampler), cap)


def grpo(lp, old, ref, adv, mask, valid, *, eps_low, eps_high, dual_c, beta, estimator, clamp,
         agg, sampler=None, tis_cap=None):
    """With ``tis_cap``: each token's policy-gradient term times :func:`tis_weight` of ``old``
    against ``sampler`` (held constant: the finite differences move ``lp`` alone)."""
    b, t = mask.shape
    m = np.array([[bool(mask[i, j]) and bool(valid[i]) for j in range(t)] for i in range(b)])
    vals = [[0.0] * t for _ in range(b)]
    for i in range(b):
        for j in range(t):
            if not m[i, j]:
                continue
            a = float(adv[i])
            r = math.exp(lp[i, j] - old[i, j])
            loss = max(-a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high))
            if dual_c and a < 0:
                loss = min(loss, -a * dual_c)
            if tis_cap is not None:
                loss *= tis_weight(old[i, j], sampler[i, j], tis_cap)
            if beta:
                x = ref[i, j] - lp[i, j]
                kl = {"k1": -x, "k2": 0.5 * x * x, "k3": math.exp(x) - x - 1}[estimator]
                if clamp:
                    kl = min(max(kl, -clamp), clamp)
                loss += beta * kl
            vals[i][j] = loss
    return aggregate(vals, m, agg)


def group_advantages(rewards, valid, eps, scale, ddof):
    out = np.zeros_like(rewards, np.float64)
    for g in range(rewards.shape[0]):
        idx = [k for k in range(rewards.shape[1])
               if valid[g, k] and math.isfinite(rewards[g, k])]
        if not idx:
            continue
        vals = [float(rewards[g, k]) for k in idx]
        mean = sum(vals) / len(vals)
        n = len(vals) - ddof
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / n) if n > 0 else 0.0
        for k in idx:
            out[g, k] = (rewards[g, k] - mean) / (std + eps) if scale else rewards[g, k] - mean
    return out


def topk_mask(lp_s, lp_e, mask, has_bundle, frac):
    b, t = mask.shape
    sel = np.zeros((b, t), bool)
    for i in range(b):
        if not has_bundle[i]:
            continue
        pos = [j for j in range(t) if mask[i, j]]
        k = math.ceil(round(frac * len(pos), 9))
        # Largest gap first; equal gaps keep position order.
        pos.sort(key=lambda j: -abs(float(lp_e[i, j]) - float(lp_s[i, j])))
        for j in pos[:k]:
            sel[i, j] = True
    return sel


def sampled_divergence(ell, kind="k3", beta=0.5):
    """f(r), r = π_E/π_S = exp(−ℓ), written from each divergence's definition as E_{x∼π_S}[·]:
    KL(π_S‖π_E) = E[−log r] (+ r − 1, which has mean 0); KL(π_E‖π_S) = E[r log r] (− r + 1);
    JSD = β KL(π_E‖M) + (1−β) KL(π_S‖M) = E[β r log(r/s) − (1−β) log s], s = M/π_S."""
    x = -ell                                   # log r
    r = math.exp(x) if x < 700 else math.inf
    if kind == "k3":
        return r - 1 - x
    if kind == "forward":
        return r * x - r + 1 if r < math.inf else math.inf
    s = beta * r + 1 - beta
    return beta * r * (x - math.log(s)) - (1 - beta) * math.log(s)


def sdl(lp_s, lp_e, old, sel, *, clamp, rho_max, cap, kind="k3", beta=0.5):
    total, n = 0.0, 0
    for i, j in zip(*np.nonzero(sel)):
        d = sampled_divergence(lp_s[i, j] - lp_e[i, j], kind, beta)
        d = min(max(d, -clamp), clamp)
        rho = min(math.exp(lp_s[i, j] - old[i, j]), rho_max)
        total += min(rho * d, cap)
        n += 1
    return total / n if n else 0.0
