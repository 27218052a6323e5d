"""The trajectory record: everything training needs from one rollout, as one JSON line.

A trajectory is a sequence of token segments: the prompt (system + request), then alternating
policy turns (sampled; loss mask 1, with the sampler's log-probs) and observations (tool responses,
format errors, the final-step instruction; mask 0). Alongside: the decoded turns with their parsed
calls and timings, the images the tools returned (with their IMG ids), the images shown to the
policy as pixels (in placeholder order), the termination code, the finalised program and, when the
sample must not be trained on, the mask reason.

``replay_turns`` gives the policy token ids turn by turn, so a ScriptedEngine can re-run the exact
trajectory through the loop (the offline tools are deterministic).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

TERMINATIONS = ("answer", "max_rounds", "format_error", "too_long", "error")
SEGMENT_KINDS = ("prompt", "policy", "observation")


@dataclasses.dataclass
class Segment:
    kind: str
    token_ids: list[int]
    logprobs: list[float] | None = None  # policy segments only
    images: list[str] = dataclasses.field(default_factory=list)  # files behind this segment's placeholders

    def __post_init__(self):
        if self.kind not in SEGMENT_KINDS:
            raise ValueError(f"segment kind must be one of {SEGMENT_KINDS}, got {self.kind!r}")
        if self.kind == "policy" and (self.logprobs is None or len(self.logprobs) != len(self.token_ids)):
            raise ValueError("a policy segment needs one logprob per token")


@dataclasses.dataclass
class Turn:
    """One round: what the policy wrote, what it asked for, and what came back."""
    round: int
    text: str
    kind: str  # tool_call | answer | format_error | cut_off | aborted
    finish_reason: str
    num_tokens: int
    gen_seconds: float
    tool_name: str | None = None
    arguments: dict | None = None
    tool_seconds: float | None = None
    error: str | None = None
    detail: str = ""
    observation: str | None = None
    img_ids: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Trajectory:
    traj_id: str
    request: str
    segments: list[Segment] = dataclasses.field(default_factory=list)
    turns: list[Turn] = dataclasses.field(default_factory=list)
    images: list[dict] = dataclasses.field(default_factory=list)  # every ImageRef the tools returned
    termination: str | None = None
    program: dict | None = None
    masked: bool = False
    mask_reason: str = ""
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    # -- flat views for training -----------------------------------------------------------------
    def token_ids(self) -> list[int]:
        return [t for s in self.segments for t in s.token_ids]

    def loss_mask(self) -> list[int]:
        return [1 if s.kind == "policy" else 0 for s in self.segments for _ in s.token_ids]

    def logprobs(self) -> list[float]:
        """Sampler log-probs aligned with :meth:`token_ids` (0.0 where the mask is 0)."""
        return [lp for s in self.segments
                for lp in (s.logprobs if s.kind == "policy" else [0.0] * len(s.token_ids))]

    def with_prompt(self, prompt_ids: list[int]) -> tuple[list[int], list[int]]:
        """(token ids, loss mask) with the prompt segment replaced, e.g. by the teacher's prompt whose
        system prompt carries a decision guide (``AgentLoop.prompt_ids(request, guide)``); the
        policy and observation tokens are the student's own."""
        rest = [s for s in self.segments if s.kind != "prompt"]
        ids = list(prompt_ids) + [t for s in rest for t in s.token_ids]
        mask = [0] * len(prompt_ids) + [1 if s.kind == "policy" else 0 for s in rest for _ in s.token_ids]
        return ids, mask

    def context_images(self) -> list[str]:
        """Files shown as pixels, in the order of their placeholders."""
        return [p for s in self.segments for p in s.images]

    @property
    def prompt_length(self) -> int:
        return sum(len(s.token_ids) for s in self.segments if s.kind == "prompt")

    @property
    def response_length(self) -> int:
        return sum(len(s.token_ids) for s in self.segments if s.kind != "prompt")

    def replay_turns(self) -> list[list[int]]:
        return [list(s.token_ids) for s in self.segments if s.kind == "policy"]

    # -- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict) -> "Trajectory":
        missing = [k for k in ("traj_id", "request", "segments", "turns", "termination") if k not in d]
        if missing:
            raise ValueError(f"trajectory record lacks key(s) {missing}")
        if d["termination"] is not None and d["termination"] not in TERMINATIONS:
            raise ValueError(f"trajectory {d['traj_id']}: termination must be one of {TERMINATIONS}, "
                             f"got {d['termination']!r}")
        fields = {k: v for k, v in d.items() if k not in ("segments", "turns")}
        return cls(segments=[Segment(**s) for s in d["segments"]], turns=[Turn(**t) for t in d["turns"]],
                   **fields)

    @classmethod
    def from_json(cls, line: str) -> "Trajectory":
        return cls.from_dict(json.loads(line))
