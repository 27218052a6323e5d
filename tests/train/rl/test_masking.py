"""The mask stage (train/rl/masking.py): per-sample rules, the group rule, the non-finite rewards it
names, and the counts it reports, over randomised steps."""
import math

import numpy as np
import pytest

from genevolve_jax.train.rl.masking import GROUP_MOSTLY_MASKED, MaskRules, mask_groups, mask_stage, nonfinite_reward_ids
from genevolve_jax.train.rl.records import NON_FINITE_REWARD, REPEATED, TOO_LONG_FOR_BATCH, RolloutSample, StepRollouts


def _sample(sid, group, trains, reason=""):
    return RolloutSample(sid, group, [1, 2, 3], [0, 1, 1], [0.0, -0.5, -0.5], 0.5 if trains else None, trains,
                         reason)


def test_mostly_masked_groups_never_train():
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    k, groups, limit = 6, 12, 0.5
    samples, expected_masked_groups = [], 0
    for g in range(groups):
        lost = int(rng.integers(0, k + 1))
        flags = [True] * (k - lost) + [False] * lost
        rng.shuffle(flags)
        kinds = ["render_failed", "judge_failed", "error"]
        samples += [_sample(f"g{g}-{j}", g, f, "" if f else f"{kinds[j % 3]}: down") for j, f in enumerate(flags)]
        expected_masked_groups += int(0 < lost < k and lost / k > limit)
    out, n, newly = mask_groups(samples, k, limit)
    assert n == expected_masked_groups and len(out) == len(samples)
    assert newly == sum(a.trains for a in samples) - sum(a.trains for a in out)
    for g in range(groups):
        before, after = samples[g * k:(g + 1) * k], out[g * k:(g + 1) * k]
        lost = sum(not s.trains for s in before)
        if lost / k > limit:
            assert not any(s.trains for s in after)
            for b, a in zip(before, after):
                if b.trains:
                    assert a.mask_reason.startswith(f"{GROUP_MOSTLY_MASKED}: {lost} of {k} masked")
                else:
                    assert a == b                                 # its own reason is kept
        else:
            assert after == before
    assert mask_groups(samples, k, 1.0)[1:] == (0, 0)      # 1.0: never
    with pytest.raises(ValueError, match="groups of 4"):
        mask_groups(samples[:5], 4, 0.5)


def test_nonfinite_reward_ids_finds_nan_and_inf_but_not_masked_samples():
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    rewards = list(rng.uniform(0, 1, 24))
    bad = sorted(rng.choice(24, 5, replace=False).tolist())
    for i, v in zip(bad, (np.nan, np.inf, -np.inf, float("nan"), np.float32(np.nan))):
        rewards[i] = v
    rewards[[i for i in range(24) if i not in bad][0]] = None     # masked: not an error
    pairs = [(f"s1-p{i // 6}-k{i % 6}", r) for i, r in enumerate(rewards)]
    assert nonfinite_reward_ids(pairs) == [f"s1-p{i // 6}-k{i % 6}" for i in bad]
    assert nonfinite_reward_ids([("a", 0.0), ("b", None), ("c", 1)]) == []
    assert nonfinite_reward_ids([("a", "garbage")]) == ["a"]


def test_mask_stage_applies_every_rule_once_and_counts_each_kind():
    """One call masks per sample, then per group; the counts add the rollout phase's own; the
    non-finite rewards are named (the update will be skipped) and their samples never train."""
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    k, groups, limit, budget = 4, 10, 0.5, 12
    samples = []
    for g in range(groups):
        for j in range(k):
            kind = rng.choice(["ok", "ok", "ok", "nan", "repeat", "long", "phase"])
            n = budget + 3 if kind == "long" else 6
            reward = float("nan") if kind == "nan" else (None if kind == "phase" else float(rng.uniform()))
            stats = {"repeated_calls": 2} if kind == "repeat" else {}
            samples.append(RolloutSample(f"s-{g}-{j}", g, list(range(n)), [0, 0] + [1] * (n - 2), [0.0] * n, reward,
                                         kind != "phase", "error: down" if kind == "phase" else "", 2,
                                         stats=stats))
    phase_masked = sum(not s.valid for s in samples)
    # As the rollout phase reports it: a count per kind that occurred.
    phase_reasons = {"error": phase_masked} if phase_masked else {}
    rollouts = StepRollouts(tuple(samples), tuple(range(groups)), {"masked_reasons": phase_reasons})
    out = mask_stage(rollouts, MaskRules(budget, True, None, limit), k)

    assert [s.sample_id for s in out.samples] == [s.sample_id for s in samples]     # order kept
    assert out.nonfinite_reward_ids == tuple(s.sample_id for s in samples
                                             if s.reward is not None and not math.isfinite(s.reward))
    by_reason = {}
    for s in out.samples:
        if not s.valid:
            by_reason[s.mask_reason.split(":")[0]] = by_reason.get(s.mask_reason.split(":")[0], 0) + 1
    assert dict(out.counts) == by_reason                         # every masked sample counted once, by kind
    assert out.counts.get("error", 0) == phase_masked
    for s, o in zip(samples, out.samples):
        if s.reward is not None and not math.isfinite(s.reward):
            assert o.mask_reason.startswith(NON_FINITE_REWARD)
        elif s.valid and s.stats.get("repeated_calls"):
            assert o.mask_reason.startswith(REPEATED)
        elif s.valid and len(s.token_ids) > budget:
            assert o.mask_reason.startswith(TOO_LONG_FOR_BATCH) and len(o.token_ids) < budget
    # The group rule saw the per-sample masks: a group left with at most half trains whole or not at all.
    masked_groups = 0
    for g in range(groups):
        group = out.samples[g * k:(g + 1) * k]
        lost = sum(not s.trains for s in group)
        assert lost <= k * limit or lost == k
        masked_groups += any(s.mask_reason.startswith(GROUP_MOSTLY_MASKED) for s in group)
    assert out.masked_groups == masked_groups
    assert out.metrics()["outage/masked_groups"] == masked_groups
    assert all(f"masked/{kind}" in out.metrics() for kind in out.counts)
