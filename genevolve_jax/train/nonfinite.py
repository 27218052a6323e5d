"""Non-finite updates: found inside the jitted step, counted and acted on outside it.

Inside the step (train/step.py, :func:`keep_if_finite`): when the loss or the global gradient norm
is NaN or infinite, the step returns the parameters and optimiser state it was given, bit for bit
(a ``jnp.where`` per leaf, fused by XLA into the update), with the metrics ``skipped_nonfinite``
(1.0 / 0.0) and ``nonfinite_stage`` (:data:`STAGE_LOSS`, :data:`STAGE_GRADIENT` or 0). The loss is
checked first: a NaN loss makes the gradient NaN too, and the loss is the earlier cause.

Why not ``optax.apply_if_finite``: it wraps the optimiser, which changes the optimiser state's
tree (checkpoints, shardings and the step counter lookup would all move) and checks the gradient
only, not the loss.

Outside (:class:`NonFiniteGuard`, host side, one per run): rewards are checked before the
advantages (a NaN reward would make its whole group's advantages NaN); a step with a non-finite
reward is not trained. Every skipped step is logged with its sample ids and counted
(``train/skipped_nonfinite``); after ``max_consecutive`` skipped steps in a row the guard says
stop, and :meth:`NonFiniteGuard.stop_message` names the step, the stage (reward, loss term,
gradient) and the last step that trained.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Iterable, Mapping, Sequence

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
def nonfinite_reward_ids(samples: Iterable[tuple[str, float | None]]) -> list[str]:
    """Ids of the (sample id, reward) pairs whose reward is present but NaN or infinite
    (``None`` is a masked sample, not an error)."""
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
        self.total_skipped = 0
        self.consecutive = 0
        self.last_event: NonFiniteEvent | None = None

    def check_rewards(self, step: int, samples: Iterable[tuple[str, float | None]]) -> NonFiniteEvent | None:
        """Before the advantages: an event (the step must not train) when a reward is not finite."""
        bad = nonfinite_reward_ids(samples)
        if not bad:
            return None
        return self._skipped(NonFiniteEvent(int(step), STAGE_REWARD, (), tuple(bad)))

    def after_step(self, step: int, metrics: Mapping[str, Any], sample_ids: Sequence[str]) -> NonFiniteEvent | None:
        """After the train step, with its host metrics: an event when the step skipped its update."""
        if float(metrics.get(SKIPPED, 0.0)) <= 0:
            self.consecutive = 0
            self.last_good_step = int(step)
            return None
        stage = STAGE_NAMES.get(int(metrics.get(STAGE, STAGE_GRADIENT)), "gradient")
        return self._skipped(NonFiniteEvent(int(step), stage, tuple(nonfinite_metric_names(metrics)),
                                            tuple(str(i) for i in sample_ids)))

    def _skipped(self, event: NonFiniteEvent) -> NonFiniteEvent:
        self.total_skipped += 1
        self.consecutive += 1
        self.last_event = event
        log.warning("skipped the update of %s (%d in a row, %d in all)", event.describe(), self.consecutive,
                    self.total_skipped)
        return event

    @property
    def should_stop(self) -> bool:
        return self.consecutive >= self.max_consecutive

    def stop_message(self) -> str:
        e = self.last_event
        what = e.describe() if e is not None else "no event"
        return (f"stopping: {self.consecutive} consecutive steps with non-finite values "
                f"(train.max_consecutive_nonfinite = {self.max_consecutive}); last: {what}. The parameters are "
                f"those after step {self.last_good_step}, the last step that trained.")

    def metrics(self) -> dict[str, float]:
        return {"train/skipped_nonfinite": float(self.total_skipped),
                "train/consecutive_nonfinite": float(self.consecutive)}

    # Saved in the checkpoint meta, so a resumed run keeps counting where it stopped.
    def state_dict(self) -> dict:
        return {"total_skipped": self.total_skipped, "consecutive": self.consecutive,
                "last_good_step": self.last_good_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.total_skipped = int(state.get("total_skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))
        self.last_good_step = int(state.get("last_good_step", 0))
