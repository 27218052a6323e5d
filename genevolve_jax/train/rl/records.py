"""The records an evolve step passes between its stages. They are immutable: a stage that changes
a sample returns a new one (``dataclasses.replace``), so what one stage saw cannot be changed
behind its back by the next.

- :class:`RolloutSample`: one rollout as the trainer needs it, whoever produced it.
- :class:`StepRollouts`: a step's samples (group-major: prompt i's K rollouts are
  ``samples[i·K:(i+1)·K]``), the prompts in group order and the rollout phase's info.
- :class:`MaskedSamples`: samples after the mask stage's per-sample rules, with the count per reason
  (train/rl/masking.py's :class:`~genevolve_jax.train.rl.masking.MaskedStep` is the whole stage's).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

# Mask reasons the trainer itself applies (the rollout phase adds its own: error, too_long, judge …).
REPEATED = "repeated"                        # a trajectory that repeats its tool calls (METHOD.md §6)
TOO_LONG_FOR_BATCH = "too_long_for_batch"    # longer than rl.max_tokens_per_row
IMAGE_UNREADABLE = "image_unreadable"        # a file is missing or does not decode
IMAGE_TOKEN_MISMATCH = "image_token_mismatch"  # placeholders do not match the images' grids
NON_FINITE_REWARD = "non_finite_reward"      # a reward that is NaN or infinite


@dataclasses.dataclass(frozen=True)
class RolloutSample:
    """One rollout. Token lists are aligned: ``loss_mask`` is 1 on the policy's sampled tokens and
    ``logprobs`` holds the sampler's log-prob there (0 elsewhere)."""
    sample_id: str
    group: int                          # index of its prompt in the step (GRPO group)
    token_ids: Sequence[int]
    loss_mask: Sequence[int]
    logprobs: Sequence[float]
    reward: float | None                # None: masked (no trustworthy reward)
    valid: bool = True                  # False: masked from the loss (error, cut off, judge failure)
    mask_reason: str = ""
    prompt_length: int = 0              # tokens of the prompt segment
    teacher_prompt: Sequence[int] | None = None   # prompt ids with the decision guide, when retrieved
    request: str = ""
    stats: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # trajectory, reward record, image path
    images: Sequence[Any] = ()          # files, PIL images or bytes behind its image placeholders, in order
    policy_version: int = 0             # the policy that generated it: the weights after this step
                                        # (rl.max_staleness, train/rl/async_rollouts.py)

    def __post_init__(self):
        n = len(self.token_ids)
        if len(self.loss_mask) != n or len(self.logprobs) != n:
            raise ValueError(f"sample {self.sample_id}: token_ids ({n}), loss_mask ({len(self.loss_mask)}) and "
                             f"logprobs ({len(self.logprobs)}) must have the same length")

    def masked(self, reason: str) -> "RolloutSample":
        """This sample, masked from the loss with ``reason`` ("<kind>: <detail>")."""
        return dataclasses.replace(self, valid=False, reward=None, mask_reason=reason)

    def with_teacher_prompt(self, prompt: Sequence[int] | None) -> "RolloutSample":
        return dataclasses.replace(self, teacher_prompt=None if prompt is None else list(prompt))

    @property
    def trains(self) -> bool:
        """Valid with a reward: it counts in its group's advantages and in the loss."""
        return self.valid and self.reward is not None

    @property
    def has_bundle(self) -> bool:
        return self.teacher_prompt is not None

    def teacher_ids(self) -> tuple[list[int], list[int]]:
        """(teacher token ids, teacher policy mask): the guided prompt, then the student's own tokens."""
        if self.teacher_prompt is None:
            return list(self.token_ids), list(self.loss_mask)
        rest = slice(self.prompt_length, None)
        return (list(self.teacher_prompt) + list(self.token_ids[rest]),
                [0] * len(self.teacher_prompt) + list(self.loss_mask[rest]))


def mask_kind(reason: str) -> str:
    """The counted kind of a mask reason ("error: server 500" → "error")."""
    return reason.split(":")[0].strip() or "masked"


@dataclasses.dataclass(frozen=True)
class StepRollouts:
    """One step's rollouts on every host: group-major samples, prompts in group order, and the
    rollout phase's info (``time/*``, ``masked_reasons`` counted where the phase masked,
    ``reward_dims``)."""
    samples: tuple[RolloutSample, ...]
    prompts: tuple[Any, ...]
    info: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class MaskedSamples:
    """Samples after the mask stage and the number masked there per reason kind."""
    samples: tuple[RolloutSample, ...]
    counts: Mapping[str, int]
