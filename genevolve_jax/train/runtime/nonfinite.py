"""Non-finite updates: found inside the jitted step, counted and acted on outside it.

Inside the step (train/runtime/step.py, :func:`keep_if_finite`): when the loss or the global gradient norm
is NaN or infinite, the step returns the parameters and optimiser state it was given, bit for bit
(a ``jnp.where`` per leaf, fused by XLA into the update), with the metrics ``skipped_nonfinite``
(1.0 / 0.0) and ``nonfinite_stage`` (:data:`STAGE_LOSS`, :data:`STAGE_GRADIENT` or 0). The loss is
checked first: a NaN loss makes the gradient NaN too, and the loss is the earlier cause.

Why not ``optax.apply_if_finite``: it wraps the optimiser, which changes the optimiser state's
tree (checkpoints, shardings and the step counter lookup would all move) and checks the gradient
only, not the loss.

Outside (:class:`NonFiniteGuard`, host side, one per run): a reward that is not finite is found
before the advantages by the mask stage (train/rl/masking.py), which masks it (a NaN reward would
make its whole group's advantages NaN) and names it to this guard. Every skipped update is logged with
its batch's sample ids and counted (``train/skipped_nonfinite``), every step with a non-finite
reward too (``train/nonfinite_reward_steps``); after ``max_consecutive`` such steps in a row the
guard says stop, and :meth:`NonFiniteGuard.stop_message` names the step, the stage (reward, loss
term, gradient) and the last clean step.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

STAGE_NONE, STAGE_LOSS, STAGE_GRADIENT = 0, 1, 2
STAGE_REWARD = "reward"
STAGE_NAMES = {STAGE_LOSS: "loss term", STAGE_GRADIENT: "gradient"}
SKIPPED = "skipped_nonfinite"   # metric names of the jitted step
STAGE = "nonfinite_stage"


# --- inside the jitted step ------------------------------------------------------------------------
def nonfinite_stage(loss: jax.Array, grad_norm: jax.Array) -> jax.Array:
    """int32 scalar: :data:`STAGE_LOSS` when the loss is not finite, else :data:`STAGE_GRADIENT`
    when the gradient norm is not finite, else :data:`STAGE_NONE`."""
    return jnp.where(~jnp.isfinite(loss), STAGE_LOSS,
                     jnp.where(~jnp.isfinite(grad_norm), STAGE_GRADIENT, STAGE_NONE)).astype(jnp.int32)


def keep_if_finite(stage: jax.Array, new: Any, old: Any) -> Any:
    """``new`` when ``stage`` is :data:`STAGE_NONE`, else ``old`` (same tree), leaf by leaf."""
    ok = stage == STAGE_NONE
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


# --- host side ---------------------------------------------------------------------------------------
def nonfinite_metric_names(metrics: Mapping[str, Any]) -> list[str]:
    """Names of the step's float metrics that are NaN or infinite (which loss terms blew up)."""
    out = []
    for name, value in metrics.items():
        if name in (SKIPPED, STAGE):
            continue
        try:
            if not math.isfinite(float(value)):
                out.append(name)
        except (TypeError, ValueError):
            continue
    return sorted(out)


@dataclasses.dataclass(frozen=True)
class NonFiniteEvent:
    """One skipped step: where it went non-finite and on which samples."""
    step: int
    stage: str                      # "reward", "loss term" or "gradient"
    terms: tuple[str, ...] = ()     # non-finite metrics (loss terms) of the step
    sample_ids: tuple[str, ...] = ()

    def describe(self) -> str:
        terms = f" ({', '.join(self.terms)})" if self.terms else ""
        ids = list(self.sample_ids)
        shown = ", ".join(ids[:16]) + (f" … {len(ids) - 16} more" if len(ids) > 16 else "")
        return f"step {self.step}: non-finite {self.stage}{terms}; samples: {shown or 'none recorded'}"


class NonFiniteGuard:
    """Counts skipped steps and says when to stop (see the module docstring).

    ``max_consecutive``: stop after this many skipped steps in a row (>= 1)."""

    def __init__(self, max_consecutive: int, *, last_good_step: int = 0):
        if not isinstance(max_consecutive, int) or isinstance(max_consecutive, bool) or max_consecutive < 1:
            raise ValueError(f"train.max_consecutive_nonfinite must be an int >= 1, got {max_consecutive!r}")
        self.max_consecutive = max_consecutive
        self.last_good_step = int(last_good_step)
        self.total_skipped = 0         # updates skipped
        self.reward_steps = 0          # steps with a non-finite reward (those samples masked)
        self.consecutive = 0           # steps in a row with either
        self.last_event: NonFiniteEvent | None = None

    def observe(self, step: int, metrics: Mapping[str, Any], sample_ids: Sequence[str],
                nonfinite_reward_ids: Sequence[str] = ()) -> NonFiniteEvent | None:
        """After the train step of ``step``, with its host metrics, the ids of the batch's samples
        and those whose reward was not finite (masked before the advantages, see
        train/rl/masking.py): an event when the update was skipped (stage "loss term" or
        "gradient") or a reward was not finite (stage "reward"); None for a clean step."""
        if float(metrics.get(SKIPPED, 0.0)) > 0:
            self.total_skipped += 1
            stage = STAGE_NAMES.get(int(metrics.get(STAGE, STAGE_GRADIENT)), "gradient")
            return self._event(NonFiniteEvent(int(step), stage, tuple(nonfinite_metric_names(metrics)),
                                              tuple(str(i) for i in sample_ids)))
        if nonfinite_reward_ids:
            self.reward_steps += 1
            return self._event(NonFiniteEvent(int(step), STAGE_REWARD, (), tuple(str(i) for i in nonfinite_reward_ids)))
        self.consecutive = 0
        self.last_good_step = int(step)
        return None

    def _event(self, event: NonFiniteEvent) -> NonFiniteEvent:
        self.consecutive += 1
        self.last_event = event
        what = "masked the samples with non-finite rewards" if event.stage == STAGE_REWARD else "skipped the update"
        log.warning("%s: %s (%d such steps in a row)", what, event.describe(), self.consecutive)
        return event

    @property
    def should_stop(self) -> bool:
        return self.consecutive >= self.max_consecutive

    def stop_message(self) -> str:
        e = self.last_event
        what = e.describe() if e is not None else "no event"
        return (f"stopping: {self.consecutive} consecutive steps with non-finite values "
                f"(train.max_consecutive_nonfinite = {self.max_consecutive}); last: {what}. Last clean step: "
                f"{self.last_good_step}; skipped updates changed no parameter")

    def metrics(self) -> dict[str, float]:
        return {"train/skipped_nonfinite": float(self.total_skipped),
                "train/nonfinite_reward_steps": float(self.reward_steps),
                "train/consecutive_nonfinite": float(self.consecutive)}

    # Saved in the checkpoint meta, so a resumed run keeps counting where it stopped.
    def state_dict(self) -> dict:
        return {"total_skipped": self.total_skipped, "reward_steps": self.reward_steps,
                "consecutive": self.consecutive, "last_good_step": self.last_good_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.total_skipped = int(state.get("total_skipped", 0))
        self.reward_steps = int(state.get("reward_steps", 0))
        self.consecutive = int(state.get("consecutive", 0))
        self.last_good_step = int(state.get("last_good_step", 0))
