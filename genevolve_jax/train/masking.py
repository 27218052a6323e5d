"""The mask stage of an evolve step: every rule that takes a rollout out of the loss, with its
reason, applied before group advantages are computed.

Why before: a masked sample must not count in its group. Were it masked after the advantages, its
group-mates would be normalised against a reward that does not train. The rollout phase has
already masked what it saw (engine errors, cut-off trajectories, judge failures); this stage adds
the trainer's rules:

- ``non_finite_reward``: a NaN or infinite reward (a judge that returned garbage);
- ``repeated`` (``loss.grpo.mask_repeated``): a trajectory that repeats its tool calls (METHOD.md §6);
- ``too_long_for_batch``: longer than a packed row (``rl.max_tokens_per_row``); its tokens are
  cut to a stub (a masked sample gets no row, and the stub keeps the record small);
- ``image_unreadable`` / ``image_token_mismatch``: its images cannot be decoded, or do not match
  its image placeholders (batch_assembly.prepare_images).
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Sequence

from genevolve_jax.train.batch_assembly import ImageBatchSpec, SampleImages, prepare_images
from genevolve_jax.train.records import (NON_FINITE_REWARD, REPEATED, TOO_LONG_FOR_BATCH, MaskedSamples,
                                         RolloutSample, mask_kind)

STUB_TOKENS = 8   # what is left of a too-long sample's tokens


@dataclasses.dataclass(frozen=True)
class MaskRules:
    max_tokens_per_row: int
    mask_repeated: bool = True
    image_spec: ImageBatchSpec | None = None

    @classmethod
    def from_config(cls, cfg, image_spec: ImageBatchSpec | None) -> "MaskRules":
        return cls(int(cfg.rl.max_tokens_per_row), bool(cfg.loss.grpo.mask_repeated), image_spec)


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
