"""The stages of one evolve step, each a function of records (METHOD.md §6–7, DESIGN.md decision 13):

    collect rollouts → mask → group advantages → experience → teacher rows → assemble
    → sharded update → weight sync

The mask stage is train/rl/masking.py, assembly train/rl/batch_assembly.py, the update
train/rl/logprob_forward.py and train/runtime/step.py; the others are here.
:meth:`genevolve_jax.train.rl.trainer.EvolveTrainer.train_one_step` calls them in this order. What
differs across hosts is the :class:`~genevolve_jax.sharding.collective.Collective` a stage is given,
never a branch inside it. The stages that touch files, threads or devices (collect, experience,
update, sync) say so; masking, advantages, teacher rows and assembly are pure functions of their
inputs.
"""
from __future__ import annotations

import abc
import collections
from typing import Any, Sequence

import numpy as np

from genevolve_jax.sharding.collective import Collective
from genevolve_jax.train.rl.records import RolloutSample, StepRollouts


class RolloutPhase(abc.ABC):
    """Produces a step's rollouts: the agent loop with renderer and judges
    (train/rl/rollout_phase.py), or a toy task in tests."""

    @abc.abstractmethod
    def collect(self, step: int, prompts: Sequence[Any],
                group_ids: Sequence[int]) -> tuple[list[RolloutSample], dict]:
        """``group_size`` rollouts of each prompt, group-major, rewards set (None when masked).
        ``group_ids`` are the prompts' global indices in the step: sample ids, seeds and groups
        follow them, so they do not depend on the number of hosts. ``info`` holds ``time/*``,
        ``masked_reasons`` and ``reward_dims``."""

    @abc.abstractmethod
    def teacher_prompt(self, sample: RolloutSample, guide: str) -> list[int]:
        """The prompt ids of ``sample``'s teacher row: its prompt with ``guide`` in the system prompt."""


# --- collect ------------------------------------------------------------------------------------------
def collect_rollouts(phase: RolloutPhase, collective: Collective, step: int, prompts: Sequence[Any],
                     shard: tuple[int, int], *, group_size: int, embed_rendered: bool = False) -> StepRollouts:
    """This host's rollouts of its prompts, then every host's (rollouts, renders, judges: I/O)."""
    group_ids = collective.group_ids(len(prompts), shard)
    samples, info = phase.collect(step, prompts, group_ids)
    return collective.gather_rollouts(samples, info, prompts, group_ids, group_size=group_size, step=step,
                                      embed_rendered=embed_rendered)


# --- advantages ---------------------------------------------------------------------------------------
def group_rewards(samples: Sequence[RolloutSample], num_groups: int, group_size: int):
    """[P, K] rewards (0 where masked) and validity from group-major samples."""
    if len(samples) != num_groups * group_size:
        raise ValueError(f"the rollout phase returned {len(samples)} samples, expected "
                         f"{num_groups} prompts × {group_size} rollouts")
    r = np.array([float(s.reward) if s.trains else 0.0 for s in samples], np.float32)
    v = np.array([s.trains for s in samples], bool)
    return r.reshape(num_groups, group_size), v.reshape(num_groups, group_size)


def sample_advantages(samples: Sequence[RolloutSample], num_groups: int, group_size: int, loss_cfg) -> np.ndarray:
    """[P·K] GRPO advantages of group-major samples, each normalised within its group's trainable
    samples (masked ones count in no group; losses/grpo.py ``group_advantages`` is the formula)."""
    from genevolve_jax.train.losses import advantages_from_config
    rewards, valid = group_rewards(samples, num_groups, group_size)
    return np.asarray(advantages_from_config(rewards, valid, loss_cfg), np.float32).reshape(-1)


# --- experience and teacher rows ----------------------------------------------------------------------
def experience_guides(experience, collective: Collective, rollouts: StepRollouts, samples: Sequence[RolloutSample],
                      group_size: int, step: int) -> tuple[list[str | None], dict]:
    """The experience stage on process 0 (summariser calls are not deterministic across hosts):
    learn from this step's groups, retrieve a guide per sample's request. Its guides, metrics and
    memory reach every process, so every process holds the same memory."""
    groups = [tuple(samples[i * group_size:(i + 1) * group_size]) for i in range(len(rollouts.prompts))]

    def run():
        metrics = dict(experience.update(groups, step))
        guides, m = experience.guides([s.request for s in samples])
        metrics.update(m)
        return list(guides), metrics, experience.state_dict()

    guides, metrics, _ = collective.on_writer_shared(run, adopt=lambda out: experience.load_state_dict(out[2]))
    return guides, metrics


def fresh_guides(samples: Sequence[RolloutSample], guides: Sequence[str | None], trainer_version: int,
                 max_staleness: int) -> tuple[list[str | None], int]:
    """(``guides`` without those of samples generated more than ``max_staleness`` policy versions
    before ``trainer_version``, how many were taken): such a sample gets no teacher row and trains
    on GRPO alone (``loss.sdl.max_staleness``). Pure."""
    out, stale = [], 0
    for s, guide in zip(samples, guides, strict=True):
        if guide is not None and trainer_version - s.policy_version > max_staleness:
            guide, stale = None, stale + 1
        out.append(guide)
    return out, stale


def attach_teacher_prompts(samples: Sequence[RolloutSample], guides: Sequence[str | None], phase: RolloutPhase,
                           forbidden_ids: Sequence[int] = ()) -> tuple[list[RolloutSample], dict]:
    """Samples with the teacher prompt of their guide (trainable samples with a guide only). A
    guide whose prompt would add image or video placeholders (token ids in ``forbidden_ids``) is
    refused: the teacher row must hold exactly the student's images."""
    out, refused = [], 0
    forbidden = set(int(t) for t in forbidden_ids)
    for s, guide in zip(samples, guides):
        if guide is not None and s.valid:
            prompt = list(phase.teacher_prompt(s, guide))
            extra = sum(t in forbidden for t in prompt) - sum(t in forbidden for t in s.token_ids[:s.prompt_length])
            if extra:
                refused += 1
            else:
                s = s.with_teacher_prompt(prompt)
        out.append(s)
    return out, ({"experience/guides_refused_placeholders": refused} if refused else {})


# --- metrics ------------------------------------------------------------------------------------------
def step_metrics(samples: Sequence[RolloutSample]) -> dict[str, Any]:
    """Reward, tool-call and skill statistics of a step's samples (after masking)."""
    judged = [s.reward for s in samples if s.trains]
    out: dict[str, Any] = {"reward/mean": sum(judged) / len(judged) if judged else 0.0,
                           "reward/max": max(judged) if judged else 0.0,
                           "samples/total": len(samples), "samples/masked": sum(not s.valid for s in samples)}
    stats = [s.stats for s in samples if s.stats]
    if stats:
        for key in ("tool_calls", "rounds", "format_errors", "response_tokens"):
            vals = [st.get(key, 0) for st in stats if isinstance(st.get(key, 0), (int, float))]
            if vals:
                out[f"agent/{key}"] = sum(vals) / len(vals)
        skills = collections.Counter(sk for st in stats for sk in st.get("skills", []))
        for name, n in skills.items():
            out[f"skills/{name}"] = n
        terms = collections.Counter(st.get("termination") for st in stats if st.get("termination"))
        for name, n in terms.items():
            out[f"termination/{name}"] = n
    return out
