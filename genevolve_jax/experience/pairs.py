"""Best/worst pairs per GRPO group: the material Visual Experience Distillation summarises.

METHOD.md §7: in each group τ⁺ = argmax R and τ⁻ = argmin R over the judged (unmasked) rollouts; the
pair is used only if R(τ⁺) − R(τ⁻) ≥ 0.20, and not when what separates them is a protocol failure
(a format error, running out of rounds or tokens, no program, an invalid program). Such a pair
would only teach "follow the protocol", which the GRPO reward already teaches, and would fill the
memory with guidance about nothing visual. Ties go to the earlier rollout, so the choice is
deterministic.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterable, Mapping, Sequence

# Trajectory terminations (agent.trajectory.TERMINATIONS) that are protocol failures.
FAILED_TERMINATIONS = ("format_error", "max_rounds", "too_long", "error")
# Zero-reward reasons (reward.mix.program_violation) that are protocol failures, not visual ones.
FAILED_PROGRAM_REASONS = ("empty_program", "invalid_program", "reference_count_out_of_range")
# Float slack on the gap test: 0.7 − 0.5 is 0.19999999999999996 in binary floating point.
GAP_EPS = 1e-9


def field_of(record: Any, key: str, default=None):
    """``key`` of a trajectory, turn or reward record, which arrives as its object or as its dict."""
    return record.get(key, default) if isinstance(record, Mapping) else getattr(record, key, default)


def protocol_failure(trajectory: Any = None, reward_reason: str = "") -> str | None:
    """Why a rollout failed the protocol, or None. ``trajectory`` is an agent Trajectory (or its
    dict); ``reward_reason`` is the reward record's reason (e.g. ``empty_program: …``)."""
    if trajectory is not None:
        term = field_of(trajectory, "termination")
        if term in FAILED_TERMINATIONS:
            return f"termination:{term}"
        if term == "answer" and field_of(trajectory, "program") is None:
            return "no_program"
    kind = (reward_reason or "").split(":", 1)[0].strip()
    if kind in FAILED_PROGRAM_REASONS:
        return kind
    return None


@dataclasses.dataclass
class Candidate:
    """One rollout of a group as pair selection sees it."""
    sample_id: str
    request: str
    reward: float | None                # None: masked (no trustworthy reward)
    trajectory: Any = None              # agent.trajectory.Trajectory (or dict), shown to the summariser
    failure: str | None = None          # protocol_failure(...) of this rollout

    @classmethod
    def from_rollout(cls, sample_id: str, request: str, trajectory: Any, reward_record: Any) -> "Candidate":
        """From an agent Trajectory and a reward.mix.RewardRecord."""
        masked = bool(field_of(reward_record, "masked", False)) or bool(field_of(trajectory, "masked", False))
        reward = None if masked else field_of(reward_record, "reward")
        return cls(sample_id, request, None if reward is None else float(reward), trajectory,
                   protocol_failure(trajectory, field_of(reward_record, "reason", "") or ""))


@dataclasses.dataclass
class Pair:
    group_id: str
    best: Candidate
    worst: Candidate

    @property
    def gap(self) -> float:
        return float(self.best.reward) - float(self.worst.reward)

    @property
    def request(self) -> str:
        return self.best.request


@dataclasses.dataclass
class PairStats:
    groups: int = 0
    pairs: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def to_dict(self) -> dict:
        return {"groups": self.groups, "pairs": self.pairs, **{f"skipped_{k}": v for k, v in self.skipped.items()}}


def select_pair(group: Sequence[Candidate], group_id: str = "", *, min_gap: float = 0.20,
                skip_protocol_failures: bool = True) -> tuple[Pair | None, str]:
    """(pair, "") or (None, why not): empty, too_few_judged, gap_below_min, protocol_failure."""
    judged = [c for c in group if c.reward is not None]
    if not group:
        return None, "empty"
    if len(judged) < 2:
        return None, "too_few_judged"
    best = max(judged, key=lambda c: c.reward)   # max/min keep the first of equal keys
    worst = min(judged, key=lambda c: c.reward)
    if best is worst or best.reward - worst.reward < min_gap - GAP_EPS:
        return None, "gap_below_min"
    if skip_protocol_failures and (best.failure or worst.failure):
        return None, "protocol_failure"
    return Pair(group_id, best, worst), ""


def select_pairs(groups: Mapping[str, Sequence[Candidate]] | Iterable[Sequence[Candidate]], *,
                 min_gap: float = 0.20, skip_protocol_failures: bool = True) -> tuple[list[Pair], PairStats]:
    """One pair at most per group, in group order, with counts of what was skipped and why."""
    items = groups.items() if isinstance(groups, Mapping) else ((str(i), g) for i, g in enumerate(groups))
    stats, pairs = PairStats(), []
    for group_id, group in items:
        stats.groups += 1
        pair, why = select_pair(list(group), str(group_id), min_gap=min_gap,
                                skip_protocol_failures=skip_protocol_failures)
        if pair is None:
            stats.skipped[why] += 1
        else:
            pairs.append(pair)
            stats.pairs += 1
    return pairs, stats
