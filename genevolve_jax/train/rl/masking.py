"""The mask stage of an evolve step: every rule that takes a rollout out of the loss, with its
reason, applied before group advantages are computed (:func:`mask_stage`, one call per step).

Why before: a masked sample must not count in its group. Were it masked after the advantages, its
group-mates would be normalised against a reward that does not train. The rollout phase has
already masked what it saw (engine errors, cut-off trajectories, judge failures, services down past
their retries); this stage adds the trainer's rules, per sample first:

- ``non_finite_reward``: a NaN or infinite reward (a judge that returned garbage);
- ``repeated`` (``loss.grpo.mask_repeated``): a trajectory that repeats its tool calls (METHOD.md §6);
- ``too_long_for_batch``: longer than a packed row (``rl.max_tokens_per_row``); its tokens are
  cut to a stub (a masked sample gets no row, and the stub keeps the record small);
- ``image_unreadable`` / ``image_token_mismatch``: its images cannot be decoded, or do not match
  its image placeholders (train/rl/sample_images.py);

then per group:

- ``group_mostly_masked`` (``rl.outage.max_group_masked_fraction``): in a group that lost more than
  that fraction of its samples, the rest are masked too: the survivors' advantages would be
  normalised against a handful of rewards (an outage, usually, hence the field's section).

A NaN or infinite reward also makes the step's update skip (train/runtime/nonfinite.py counts it):
:attr:`MaskedStep.nonfinite_reward_ids` names those samples.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Iterable, Mapping, Sequence

from genevolve_jax.train.rl.records import (NON_FINITE_REWARD, REPEATED, TOO_LONG_FOR_BATCH, MaskedSamples,
                                            RolloutSample, StepRollouts, mask_kind)
from genevolve_jax.train.rl.sample_images import ImageBatchSpec, SampleImages, prepare_images

GROUP_MOSTLY_MASKED = "group_mostly_masked"

STUB_TOKENS = 8   # what is left of a too-long sample's tokens


@dataclasses.dataclass(frozen=True)
class MaskRules:
    max_tokens_per_row: int
    mask_repeated: bool = True
    image_spec: ImageBatchSpec | None = None
    max_group_masked_fraction: float = 1.0     # 1.0: never mask a group for its losses

    @classmethod
    def from_config(cls, cfg, image_spec: ImageBatchSpec | None) -> "MaskRules":
        return cls(int(cfg.rl.max_tokens_per_row), bool(cfg.loss.grpo.mask_repeated), image_spec,
                   float(cfg.rl.outage.max_group_masked_fraction))


@dataclasses.dataclass(frozen=True)
class MaskedStep:
    """A step's rollouts after the mask stage."""
    samples: tuple[RolloutSample, ...]       # group-major, as collected, masks applied
    counts: Mapping[str, int]                # masked samples per reason kind: the rollout phase's and this stage's
    images: Mapping[str, SampleImages]       # decoded images of the samples that train, by sample id
    nonfinite_reward_ids: tuple[str, ...]    # samples whose reward was NaN / inf: the update is skipped
    masked_groups: int                       # groups masked whole by the group rule

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    def metrics(self) -> dict[str, float]:
        """``masked/<kind>`` per reason kind and ``outage/masked_groups``."""
        out = {f"masked/{kind}": n for kind, n in self.counts.items()}
        out["outage/masked_groups"] = float(self.masked_groups)
        return out


def mask_stage(rollouts: StepRollouts, rules: MaskRules, group_size: int) -> MaskedStep:
    """Every mask rule over a step's rollouts: per sample (:func:`mask_samples`), then per group
    (:func:`mask_groups`). Pure apart from reading image files."""
    per_sample, images = mask_samples(rollouts.samples, rules)
    samples, groups, newly = mask_groups(per_sample.samples, group_size, rules.max_group_masked_fraction)
    counts = collections.Counter(dict(rollouts.info.get("masked_reasons") or {}))
    counts.update(per_sample.counts)
    if newly:
        counts[GROUP_MOSTLY_MASKED] += newly
    trained = {s.sample_id for s in samples if s.trains}
    return MaskedStep(tuple(samples), dict(counts), {k: v for k, v in images.items() if k in trained},
                      tuple(nonfinite_reward_ids((s.sample_id, s.reward) for s in rollouts.samples)), groups)


def _stub(s: RolloutSample) -> RolloutSample:
    n = STUB_TOKENS
    return dataclasses.replace(s, token_ids=list(s.token_ids[:n]), loss_mask=[0] * min(n, len(s.token_ids)),
                               logprobs=[0.0] * min(n, len(s.token_ids)), prompt_length=min(s.prompt_length, n),
                               images=(), teacher_prompt=None)


def mask_samples(samples: Sequence[RolloutSample],
                 rules: MaskRules) -> tuple[MaskedSamples, dict[str, SampleImages]]:
    """(samples with the trainer's masks applied and the count per reason kind, the decoded images
    of the samples that still train, by sample id). Pure apart from reading image files."""
    out, counts, images = [], collections.Counter(), {}
    for s in samples:
        reason = None
        if s.reward is not None and not math.isfinite(float(s.reward)):
            reason = f"{NON_FINITE_REWARD}: {s.reward!r}"
        elif s.valid and rules.mask_repeated and s.stats.get("repeated_calls", 0) > 0:
            reason = f"{REPEATED}: {s.stats.get('repeated_calls')} repeated call(s)"
        if len(s.token_ids) > rules.max_tokens_per_row:
            n = len(s.token_ids)
            s = _stub(s)
            if s.valid:
                reason = reason or (f"{TOO_LONG_FOR_BATCH}: {n} tokens, more than "
                                    f"rl.max_tokens_per_row={rules.max_tokens_per_row}")
        if reason is None and s.valid:
            got = prepare_images(s, rules.image_spec)
            if isinstance(got, str):
                reason = got
            elif got is not None:
                images[s.sample_id] = got
        if reason is not None:
            s = s.masked(reason)
            counts[mask_kind(reason)] += 1
        out.append(s)
    return MaskedSamples(tuple(out), dict(counts)), images


def mask_groups(samples: Sequence[RolloutSample], group_size: int,
                max_masked_fraction: float) -> tuple[list[RolloutSample], int, int]:
    """(samples, groups masked, samples newly masked): in each group (``group_size`` consecutive
    samples) whose share of samples that do not train exceeds ``max_masked_fraction``, the ones
    that still train are masked with ``group_mostly_masked: <n> of <K> masked (<kinds>)``. Pure."""
    if group_size < 1 or len(samples) % group_size:
        raise ValueError(f"{len(samples)} samples do not split into groups of {group_size}")
    out, groups, newly = [], 0, 0
    for g in range(0, len(samples), group_size):
        group = list(samples[g:g + group_size])
        lost = [s for s in group if not s.trains]
        if lost and len(lost) / group_size > max_masked_fraction and len(lost) < group_size:
            kinds = sorted({mask_kind(s.mask_reason) for s in lost})
            why = f"{GROUP_MOSTLY_MASKED}: {len(lost)} of {group_size} masked ({', '.join(kinds)})"
            newly += group_size - len(lost)
            group = [s.masked(why) if s.trains else s for s in group]
            groups += 1
        out.extend(group)
    return out, groups, newly


def nonfinite_reward_ids(samples: Iterable[tuple[str, float | None]]) -> list[str]:
    """Ids of the (sample id, reward) pairs whose reward is present but NaN or infinite, or not a
    number at all (``None`` is a masked sample, not an error)."""
    out = []
    for sample_id, reward in samples:
        if reward is None:
            continue
        try:
            finite = math.isfinite(float(reward))
        except (TypeError, ValueError):
            finite = False
        if not finite:
            out.append(str(sample_id))
    return out
