"""Log-prob forwards outside the train step: the frozen reference policy, and π_old when it must
be computed before the update.

π_old (``rl.old_logprobs``):
- "auto": with one optimiser step per rollout batch (``rl.updates_per_batch`` = 1, however many
  micro-batches) π_old is the current policy: the step uses the stop-gradient of its own
  log-probs (train/losses/step_losses.py) and no forward is spent. With several updates per batch
  π_old is recomputed once, before the first update. Either way π_old is the pre-update policy
  under the trainer's kernels, which is what the sampler correction (``rl.sampler_correction``)
  compares with the engine's log-probs: on-policy its weight min(π_old / π_sampler, C) is a
  constant of the step's own forward, the same number a recompute would give.
- "sampler": the log-probs the rollout engine recorded (the JaxEngine's are the trainer's to 1e-5
  in fp32 and a mean 8.3e-4 from them in bf16 on the CPU; see train/rl/config.py, also for other
  backends and for what SGLang returns).
- "recompute": one jitted forward of the pre-update params over the assembled batch.
In every mode the step logs ``rollout/logprob_mismatch`` between the sampler and the trainer.
"""
from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding

from genevolve_jax.sharding import logical
from genevolve_jax.train.losses.step_losses import policy_logprobs
from genevolve_jax.train.runtime.batch_layout import ROW_IMAGE_FIELDS, batch_shardings
from genevolve_jax.train.runtime.step import cast_floating, join_micro_batches, split_micro_batches

OLD_LOGPROB_MODES = ("auto", "sampler", "recompute")
_FORWARD_FIELDS = ("input_ids", "targets", "segment_ids", "position_ids", *ROW_IMAGE_FIELDS)


class LogprobForward:
    """Jitted ``(params, batch) -> log-probs [B, T]`` of the batch's student targets under the given
    params (same model function, dtype and temperature as the train step); compiled once per batch
    layout. The result is a global array sharded over the batch axes.

    ``micro_batches``: the rows go through the model in that many slices, one after another (the
    train step's split, ``train.grad_accum_steps``), so the forward's activations are those of a
    micro-batch, not of the whole batch. Planned on 8 × H100 for the 8B RL batch (48 × 32,768):
    the whole-batch forward's temporaries were 28.8 GiB a device, over the trainer's 43.8 GiB
    budget next to the step's state. A batch whose rows do not split into ``micro_batches`` (the
    trainer's always do: row counts are multiples of grad_accum) goes whole."""

    def __init__(self, setup, loss_cfg, compute_dtype, micro_batches: int = 1, compiler_options=None):
        self.setup, self.loss_cfg, self.compute_dtype = setup, loss_cfg, compute_dtype
        self.micro_batches = int(micro_batches)
        self.compiler_options = dict(compiler_options or {})   # as the train step's (XLA's memory limit)
        self._compiled: dict = {}

    def forward(self, params, batch):
        """The pure function :meth:`jitted` compiles."""
        model = self.setup.merge(cast_floating(params, self.compute_dtype))
        m = self.micro_batches
        if m == 1 or batch["targets"].shape[0] % m:
            return policy_logprobs(model, batch, self.loss_cfg)
        micro = {k: split_micro_batches(v, m) for k, v in batch.items()}
        return join_micro_batches(jax.lax.map(lambda mb: policy_logprobs(model, mb, self.loss_cfg), micro))

    @staticmethod
    def view(batch: Mapping[str, object]) -> dict:
        """The fields of ``batch`` this forward reads (student rows and their image blocks)."""
        return {k: batch[k] for k in _FORWARD_FIELDS if k in batch}

    def jitted(self, view: Mapping[str, object]):
        """The ``jax.jit`` (explicit in/out shardings) that :meth:`__call__` runs for ``view``'s
        layout (arrays or ``jax.ShapeDtypeStruct``s): ``genevolve plan`` lowers this very function."""
        s = self.setup
        key = tuple((k, tuple(v.shape)) for k, v in sorted(view.items()))
        if key not in self._compiled:
            out = NamedSharding(s.mesh, logical.partition_spec((logical.BATCH, logical.SEQ), s.rules, s.mesh,
                                                               view["targets"].shape))
            self._compiled[key] = jax.jit(self.forward, in_shardings=(s.param_shardings,
                                                                       batch_shardings(view, s.mesh, s.rules)),
                                          out_shardings=out, compiler_options=self.compiler_options or None)
        return self._compiled[key]

    def __call__(self, params, batch: Mapping[str, np.ndarray]) -> jax.Array:
        s = self.setup
        view = self.view(batch)
        fn = self.jitted(view)
        shardings = batch_shardings(view, s.mesh, s.rules)
        placed = {k: jax.make_array_from_callback(np.shape(v), shardings[k], lambda idx, h=np.asarray(v): h[idx])
                  for k, v in view.items()}
        with logical.use_rules(s.mesh, s.rules):
            return fn(params, placed)

    @property
    def compiles(self) -> int:
        """Batch layouts compiled so far."""
        return len(self._compiled)


def resolve_old_logprobs(mode: str, updates_per_batch: int, behaviour_lags: bool = False) -> str:
    """The π_old route a run takes: "on_policy" (no forward), "sampler" or "recompute".

    ``behaviour_lags``: the rollouts may come from an older policy than the one trained
    (``rl.max_staleness`` ≥ 1) and no sampler correction weighs that in; "auto" then takes π_old
    from the sampler, the behaviour policy, so that the ratio π / π_old sees the lag. (With
    ``rl.sampler_correction = "tis"`` π_old stays the trainer's and the truncated weight
    min(π_old / π_sampler, C) carries the lag instead: the decoupled objective.)"""
    if mode not in OLD_LOGPROB_MODES:
        raise ValueError(f"rl.old_logprobs must be one of {OLD_LOGPROB_MODES}, got {mode!r}")
    if mode == "auto":
        if behaviour_lags:
            return "sampler"
        return "on_policy" if updates_per_batch == 1 else "recompute"
    return mode


def old_logprobs_route_of(rl_cfg) -> str:
    """:func:`resolve_old_logprobs` of an ``rl`` section (the trainer's and the plan's route)."""
    lags = int(rl_cfg.max_staleness) > 0 and rl_cfg.sampler_correction == "none"
    return resolve_old_logprobs(rl_cfg.old_logprobs, int(rl_cfg.updates_per_batch), behaviour_lags=lags)
