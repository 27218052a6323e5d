"""The reward mix R = (1−α)·R_img + α·R_text, the program gate, and the per-sample reward record.

A record either carries a reward (possibly a legitimate 0 for an empty program) or is masked with
the reason; a masked sample has ``reward = None`` and must not enter the policy loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def mix_reward(r_img: float, r_text: float, alpha: float = 0.5) -> float:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return (1.0 - alpha) * float(r_img) + alpha * float(r_text)


def program_violation(program: Any, min_references: int = 1, max_references: int = 5) -> str | None:
    """Why a program earns zero reward without being judged, or None if it may be judged."""
    if not isinstance(program, dict):
        return "invalid_program: not a JSON object"
    prompt = program.get("gen_prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return "empty_program: gen_prompt is empty"
    refs = program.get("reference_images") or []
    if not isinstance(refs, list):
        return "invalid_program: reference_images is not a list"
    if not min_references <= len(refs) <= max_references:
        return f"reference_count_out_of_range: {len(refs)} not in [{min_references}, {max_references}]"
    return None


@dataclass
class RewardRecord:
    """What the trainer and the logs get for one sample."""
    sample_id: str
    reward: float | None
    masked: bool = False
    reason: str = ""                 # why masked or why zero; empty for an ordinary judged reward
    r_img: float | None = None
    r_text: float | None = None
    judge: str = ""                  # "vlm" or "rule (proxy)"
    proxy: bool = False              # True when the scores come from the offline rule judge
    details: dict = field(default_factory=dict)  # per-dimension scores, rationales, cache flags
    image_path: str | None = None    # the rendered image, when it was kept on disk
    render_done_at: float | None = None  # time.perf_counter() when its render arrived (None: not rendered)

    def __post_init__(self) -> None:
        if self.masked and self.reward is not None:
            raise ValueError(f"masked sample {self.sample_id} must not carry a reward")
        if not self.masked and self.reward is None:
            raise ValueError(f"unmasked sample {self.sample_id} needs a reward")

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def log_line(self) -> str:
        tag = "[proxy] " if self.proxy else ""
        if self.masked:
            return f"{tag}{self.sample_id}: MASKED ({self.reason})"
        parts = [f"R={self.reward:.4f}"]
        if self.r_img is not None:
            parts.append(f"R_img={self.r_img:.4f}")
        if self.r_text is not None:
            parts.append(f"R_text={self.r_text:.4f}")
        suffix = f" ({self.reason})" if self.reason else ""
        return f"{tag}{self.sample_id}: {' '.join(parts)} judge={self.judge}{suffix}"


def masked(sample_id: str, reason: str, judge: str, proxy: bool = False, **details: Any) -> RewardRecord:
    return RewardRecord(sample_id, None, True, reason, judge=judge, proxy=proxy, details=dict(details))
