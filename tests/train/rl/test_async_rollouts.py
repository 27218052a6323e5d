"""Asynchronous steps (rl.max_staleness = N ≥ 1, train/rl/async_rollouts.py): a producer thread
rolls out the coming steps while the trainer updates. Checked here: the producer's order, version
gate and hand-off (no JAX); the stale-group drop against a plain reference; and a real toy run at
N = 1 that is SIGTERMed mid-run and resumed: every prompt of the data order trains exactly once,
every sample carries the version that made it, only its on-policy rollouts train the SDL term
(loss.sdl.max_staleness = 0), no producer thread outlives either run, and a failing rollout phase
stops the run with its error and the producer gone. (N = 0 never builds a
producer: the synchronous step is the code path it was.)"""
import dataclasses
import os
import random
import signal
import threading
import types

import jax
import numpy as np
import pytest

from genevolve_jax.train.rl.async_rollouts import RolloutJob, RolloutProducer, drop_stale, with_policy_version
from genevolve_jax.train.rl.pipeline import fresh_guides
from genevolve_jax.train.rl.records import RolloutSample, StepRollouts
from genevolve_jax.train.runtime.preemption import RunStopped
from tests.fixtures.toy_task import (TOY_GUIDE, TOY_TARGETS, CyclingPrompts, FixedGuideExperience, TokenChoicePhase,
                                    toy_model, toy_run_config)


def producer_threads():
    return [t for t in threading.enumerate() if t.name == "rollout-producer"]


# --- the producer alone --------------------------------------------------------------------------------
def test_producer_runs_jobs_in_order_on_the_newest_weights_it_may_use():
    """A trainer's loop at N = 2 against the producer: jobs start only once their version is
    published, pick up the newest published weights between jobs (pushed exactly once each), and
    come back in step order with that version."""
    n, steps = 2, 7
    events, pushed = [], []

    def collect(job):
        events.append(("collect", job.step))
        return [job.step], {"step": job.step}

    producer = RolloutProducer(collect, version=0)
    for t in range(1, n + 2):
        producer.submit(RolloutJob(t, (t,), {"position": t - 1}, t - 1 - n))
    for t in range(1, steps + 1):
        got = producer.take(t)
        assert got.samples == (t,) and got.job.step == t
        assert t - 1 - n <= got.version <= t - 1            # the gate and causality
        events.append(("publish", t))

        def push(version=t):
            pushed.append(version)
        producer.publish(t, push)
        if t + n + 1 <= steps:
            producer.submit(RolloutJob(t + n + 1, (t + n + 1,), {}, t - n))   # min_version (t + n + 1) − 1 − n
    assert producer.close(timeout_s=10) and not producer_threads()
    assert pushed == sorted(set(pushed)) and pushed                 # each pushed once, never an older after a newer
    for t in range(1, steps + 1):                                   # never collected before its version existed
        start = events.index(("collect", t))
        need = t - 1 - n
        assert need <= 0 or events.index(("publish", need)) < start


def test_producer_hands_a_failed_job_to_the_trainer_and_stops():
    def collect(job):
        if job.step == 2:
            raise RuntimeError("render service gone")
        return [], {}

    producer = RolloutProducer(collect, version=0)
    for t in (1, 2, 3):
        producer.submit(RolloutJob(t, (), {}, 0))
    producer.take(1)
    with pytest.raises(RuntimeError, match="render service gone"):
        producer.take(2)
    with pytest.raises(RuntimeError, match="stopped before step 3"):
        producer.take(3)
    assert producer.close(timeout_s=10) and not producer_threads()


def test_drop_stale_matches_a_plain_reference():
    rng = random.Random(7)
    for _ in range(20):
        k, groups, trainer_v, n = rng.randint(2, 4), rng.randint(1, 6), rng.randint(3, 9), rng.randint(1, 3)
        samples = [RolloutSample(f"g{g}k{j}", g, [1], [1], [0.0], 1.0, policy_version=rng.randint(0, trainer_v))
                   for g in range(groups) for j in range(k)]
        kept, dropped, lags = drop_stale(StepRollouts(tuple(samples), tuple(range(groups)), {}), k, trainer_v, n)
        want = [g for g in range(groups) if trainer_v - min(s.policy_version for s in samples[g * k:(g + 1) * k]) <= n]
        assert list(kept.prompts) == want and dropped == groups - len(want)
        assert [s.group for s in kept.samples] == [g for g in want for _ in range(k)]
        assert all(lag <= n for lag in lags) and len(lags) == len(want)
    assert {s.policy_version for s in with_policy_version(samples, 5)} == {5}


def test_fresh_guides_matches_a_plain_reference():
    rng = random.Random(11)
    for _ in range(20):
        trainer_v, n = rng.randint(2, 6), rng.randint(0, 2)
        samples = [RolloutSample(f"s{i}", i, [1], [1], [0.0], 1.0, policy_version=rng.randint(0, trainer_v))
                   for i in range(rng.randint(1, 8))]
        guides = [rng.choice([None, f"guide {i}"]) for i in range(len(samples))]
        kept, stale = fresh_guides(samples, guides, trainer_v, n)
        want = [g if trainer_v - s.policy_version <= n else None for s, g in zip(samples, guides)]
        assert kept == want and stale == sum(g is not None and w is None for g, w in zip(guides, want))


# --- a real toy run at N = 1 -------------------------------------------------------------------------------
UNIQUE_PROMPTS = [[a, b, 3, 4] for a in (1, 5, 9) for b in (2, 6, 7, 17)]   # 12 distinct prompts


class RecordingPhase(TokenChoicePhase):
    """The toy task, recording each collect's (step, prompts, weight version the engine held);
    ``sigterm_at``: send this process SIGTERM while collecting that step; ``fail_at``: raise."""

    def __init__(self, *a, sigterm_at=None, fail_at=None, nan_from=None, **kw):
        super().__init__(*a, **kw)
        self.collected, self.sigterm_at, self.fail_at, self.nan_from = [], sigterm_at, fail_at, nan_from

    def collect(self, step, prompts, group_ids=None):
        self.collected.append((step, [tuple(p) for p in prompts], self.engine.weight_version))
        if step == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if step == self.fail_at:
            raise RuntimeError(f"rollout phase failed at step {step}")
        samples, info = super().collect(step, prompts, group_ids)
        if self.nan_from is not None and step >= self.nan_from:     # a judge that answers NaN
            samples = [dataclasses.replace(x, reward=float("nan")) for x in samples]
        return samples, info


def async_trainer(workdir, steps, max_nonfinite=3, experience=None, sdl=0.0, **phase_kw):
    from genevolve_jax.train.rl.trainer import EvolveTrainer

    cfg = toy_run_config(str(workdir), steps=steps, group=2, save_every=100, sdl=sdl)
    cfg.rl.max_staleness = 1
    cfg.train.max_consecutive_nonfinite = max_nonfinite
    holder = {}

    def phase(t):
        holder["phase"] = RecordingPhase(t.engine, 2, TOY_TARGETS, guide_ids=TOY_GUIDE, **phase_kw)
        return holder["phase"]

    trainer = EvolveTrainer(cfg, model=toy_model(), tokenizer=types.SimpleNamespace(pad_token_id=0),
                            rollout_phase=phase, prompt_source=CyclingPrompts(UNIQUE_PROMPTS, 2), progress=False,
                            devices=jax.devices()[:1], experience=experience)
    return trainer, holder["phase"]


def trained(phase, first_step, last_step):
    """The prompts of each step trained, from the last collect of that step."""
    by_step = {step: prompts for step, prompts, _ in phase.collected}
    return [p for s in range(first_step, last_step + 1) for p in by_step[s]]


def test_a_stale_run_is_preempted_and_resumed_training_every_prompt_once(tmp_path):
    steps = 4
    # With SDL on and a guide for every request: the guides of rollouts one version old are taken
    # (loss.sdl.max_staleness = 0), so only step 1's on-policy rollouts train the SDL term.
    trainer, phase = async_trainer(tmp_path, steps, sigterm_at=3, experience=FixedGuideExperience(), sdl=1.0)
    assert trainer.old_logprobs_route == "sampler"           # π_old of a stale rollout: the behaviour policy
    with pytest.raises(RunStopped) as stop:
        trainer.run()
    assert not producer_threads()                            # gone before run() returned
    stopped = trainer.step
    assert stop.value.exit_code == RunStopped.PREEMPTED and 2 <= stopped < steps
    assert any(s > stopped for s, _, _ in phase.collected)   # a job collected ahead, not trained, not saved
    history = trainer.logger.history
    for row in history:
        assert row["rollout/staleness_max"] <= 1 and row["rollout/dropped_stale"] == 0
    # Each job was generated with a policy at most one step behind the one that trained it (in
    # practice exactly one: the next job starts while the trainer updates), never a newer one.
    assert history[0]["rollout/staleness_max"] == 0
    assert history[0]["sdl/samples"] == 4 and "experience/guides_stale" not in history[0]
    for row in history[1:]:
        assert row["sdl/samples"] == 0 and row["experience/guides_stale"] == 4
    versions = [(s, v) for s, _, v in phase.collected if s <= stopped]
    assert [s for s, _ in versions] == list(range(1, stopped + 1))
    assert all(max(0, s - 2) <= v <= s - 1 or (s, v) == (1, 0) for s, v in versions), versions
    first = trained(phase, 1, stopped)
    trainer.close()

    resumed, phase2 = async_trainer(tmp_path, steps, experience=FixedGuideExperience(), sdl=1.0)
    assert resumed.step == stopped
    resumed.run()
    resumed.close()
    assert not producer_threads()
    second = trained(phase2, stopped + 1, steps)
    order = [tuple(UNIQUE_PROMPTS[i % len(UNIQUE_PROMPTS)]) for i in range(2 * steps)]
    assert first + second == order                           # every prompt of the data order, once, in order
    assert min(s for s, _, _ in phase2.collected) == stopped + 1
    assert np.isfinite([row["loss"] for row in resumed.logger.history]).all()


def test_a_failing_rollout_phase_stops_the_run_and_its_producer(tmp_path):
    trainer, _ = async_trainer(tmp_path, 4, fail_at=1)
    try:
        with pytest.raises(RuntimeError, match="failed at step 1"):
            trainer.run()
        assert not producer_threads() and trainer.step == 0
    finally:
        trainer.close()


def test_a_non_finite_stop_stops_the_producer_mid_queue(tmp_path):
    """NaN rewards from step 1 on: each update is skipped, and the second in a row stops the run
    while the producer is rolling out the steps ahead; it is stopped and joined before run() ends."""
    trainer, phase = async_trainer(tmp_path, 6, max_nonfinite=2, nan_from=1)
    try:
        with pytest.raises(RunStopped) as stop:
            trainer.run()
        assert stop.value.exit_code == RunStopped.NON_FINITE and trainer.step == 2
        assert not producer_threads()
        assert max(s for s, _, _ in phase.collected) in (2, 3)   # 3: the producer had started the step ahead
    finally:
        trainer.close()

