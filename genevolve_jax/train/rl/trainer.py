"""`genevolve train`: the self-evolution loop (GRPO + Visual Experience Distillation), METHOD.md §6–7.

:meth:`EvolveTrainer.train_one_step` is the step, read top to bottom as the stages of
train/rl/pipeline.py over immutable records:

    collect rollouts → mask → group advantages → experience → teacher rows → assemble
    → sharded update → weight sync

The same code runs on one host and on many: what differs lives in the trainer's
:class:`~genevolve_jax.sharding.collective.Collective`. Everything is built from one run config
(configs/); a rollout phase, a prompt source, an experience stage, an engine, a model or a
tokenizer may be passed in instead (tests drive the real step with toy tasks this way).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from genevolve_jax.data.prompts import PromptSource
from genevolve_jax.models.qwen3_vl.config import HEAD_LORA_TARGET, TEXT_LORA_TARGETS
from genevolve_jax.rollout.engine import RolloutEngine
from genevolve_jax.train.losses.step_losses import EvolveLoss
from genevolve_jax.train.rl.async_rollouts import with_policy_version
from genevolve_jax.train.rl.batch_assembly import (assemble_evolve_batch, batch_row_multiple, choose_row_length,
                                                   drop_oversized_teachers, row_lengths)
from genevolve_jax.train.rl.config import rollouts_per_step, tis_cap_of, validate_evolve_run
from genevolve_jax.train.rl.logprob_forward import LogprobForward, old_logprobs_route_of
from genevolve_jax.train.rl.masking import MaskRules, mask_stage
from genevolve_jax.train.rl.outage import OutagePolicy, health_checks_for_run
from genevolve_jax.train.rl.pipeline import (RolloutPhase, attach_teacher_prompts, collect_rollouts, experience_guides,
                                             fresh_guides, sample_advantages, step_metrics)
from genevolve_jax.train.rl.sample_images import ImageBatchSpec
from genevolve_jax.train.runtime.compile_log import CompileLog
from genevolve_jax.train.runtime.driver import Driver
from genevolve_jax.train.runtime.nonfinite import SKIPPED, STAGE
from genevolve_jax.train.runtime.step_config import resolve_micro_batches


@contextlib.contextmanager
def _timed(times: dict, name: str):
    t = time.perf_counter()
    yield
    times[f"time/{name}_s"] = time.perf_counter() - t


class EvolveTrainer(Driver):
    def __init__(self, cfg, *, workdir: str | None = None,
                 rollout_phase: RolloutPhase | Callable[["EvolveTrainer"], RolloutPhase] | None = None,
                 prompt_source: PromptSource | None = None, experience=None, engine: RolloutEngine | None = None,
                 model=None, tokenizer=None, progress: bool | None = None, num_steps: int | None = None,
                 devices=None, collective=None):
        from genevolve_jax.sharding.collective import make_collective
        from genevolve_jax.train.runtime.model_setup import build_tokenizer

        collective = collective or make_collective()
        if devices is None:
            devices = collective.mesh_devices(cfg.sharding)
        shards = validate_evolve_run(cfg, len(devices) if devices is not None else None)
        # grad_accum_steps -1: one packed row per batch shard per micro-batch, from the mesh.
        train_cfg = resolve_micro_batches(cfg.train, rollouts_per_step(cfg), shards)
        tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg.model)
        super().__init__(cfg, train_cfg=train_cfg, total_steps=int(num_steps or cfg.rl.num_steps),
                         loss=EvolveLoss(cfg.loss, tis_cap=tis_cap_of(cfg.rl)), workdir=workdir or cfg.workdir,
                         checkpoint_dir="checkpoints", log_dir="", description="evolve", tokenizer=tokenizer,
                         model=model, devices=devices, progress=progress, collective=collective)
        self.group_size = int(cfg.rl.group_size)
        self.pad_id = int(tokenizer.pad_token_id or 0)
        # The policy's config as engines and exports hold it (LoRA adapters merged: no lora).
        self.model_config = self.setup.merge(self.params).config.replace(lora=None)
        self.use_kl = cfg.loss.grpo.kl_coef > 0
        self.updates_per_batch = int(cfg.rl.updates_per_batch)
        # rl.max_staleness >= 1: a producer thread rolls out the coming steps (started on the first step).
        self.max_staleness = int(cfg.rl.max_staleness)
        self.producer = None
        self.dropped_stale = 0
        self.sdl_max_staleness = int(cfg.loss.sdl.max_staleness)
        self._next_job_step = 0
        # π_old: on-policy (the step's own log-probs), the sampler's, or one forward before the update.
        self.old_logprobs_route = old_logprobs_route_of(cfg.rl)
        self.logprob_forward = LogprobForward(self.setup, cfg.loss, self.compute_dtype,
                                              micro_batches=int(train_cfg.grad_accum_steps),
                                              compiler_options=self.train_step.compiler_options)
        # Packed rows of rl.max_tokens_per_row; row counts from a few buckets (train/runtime/compile_log.py).
        self.row_multiple = batch_row_multiple(self.setup.mesh, self.setup.rules, train_cfg.grad_accum_steps)
        self.compile_log = CompileLog()
        # The KL reference is the starting policy (SFT output), frozen, sharded like the policy: a
        # copy of it, or with LoRA the base itself with the adapters off (reference_params).
        self.ref_params = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=self.setup.param_shardings)(
            self.params) if self.use_kl and not self.lora_on else None
        self.engine = engine if engine is not None else self._make_engine()
        self.engine_version = -1 if (cfg.rl.engine == "sglang" and cfg.rl.sglang.sync_at_start) else 0
        # Adapters alone reach an engine that takes them when they sit where SGLang's Qwen3-VL
        # applies LoRA (the language model's projections, and lm_head, which its LoRA manager wraps
        # outside the model's pattern); vision-block adapters go merged, in full exports.
        lora = self.setup.merge(self.params).config.lora
        self.sync_adapters_only = (self.lora_on and self.engine.adapter_sync
                                   and set(lora.targets) <= set(TEXT_LORA_TARGETS + (HEAD_LORA_TARGET,)))
        if self.sync_adapters_only:
            self.engine.check_adapters(lora)
        if rollout_phase is None:
            self.rollout = self._make_rollout_phase()
        elif isinstance(rollout_phase, RolloutPhase):
            self.rollout = rollout_phase
        else:   # a factory of the trainer: the phase needs its engine
            self.rollout = rollout_phase(self)
        self.prompts = prompt_source if prompt_source is not None else self._make_prompt_source()
        self.collective.check_prompt_shard(self.prompts.shard, "data.sharding")
        self.experience = experience if experience is not None else self._make_experience()
        self.image_spec = ImageBatchSpec.for_model(self.model_config, self.engine.image_processor,
                                                   int(cfg.rl.patch_multiple))
        self.mask_rules = MaskRules.from_config(cfg, self.image_spec)
        # Services down past their retries: wait for them, recollect, never train a mostly masked group.
        self.outage = OutagePolicy(cfg.rl.outage, health_checks_for_run(cfg, self.engine))
        # A guide must not add image placeholders to the teacher row (its images are the student's).
        self.placeholder_ids = (self.model_config.image_token_id, self.model_config.video_token_id)
        self.resume_if_any()

    # -- construction of the default pieces ------------------------------------------------------
    def _make_engine(self) -> RolloutEngine:
        if self.cfg.rl.engine == "sglang":
            from genevolve_jax.rollout.sglang_engine import SGLangEngine
            s = self.cfg.rl.sglang
            # A LoRA adapter version stays loaded while requests of the steps behind may use it.
            engine = SGLangEngine.from_config(s, model_config=self.model_config,
                                              weights_dir=s.weights_dir or os.path.join(self.workdir, "sglang_weights"),
                                              adapters_kept=int(self.cfg.rl.max_staleness) + 1)
            # Fail here, before any rollout, when no server answers (errors name rl.sglang.urls).
            engine.wait_healthy(float(s.health_wait_s), field="rl.sglang.urls")
            return engine
        from genevolve_jax.rollout.engine_functions import sampling_shardings
        from genevolve_jax.rollout.jax_engine import JaxEngine
        # The weights go to the engine's layout bucket by bucket, in the engine's dtype (the
        # trainer's compute dtype), as fresh buffers (the next train step donates the trainer's):
        # the devices never hold a second whole model on the way.
        shardings = sampling_shardings(self.model_config, self.cfg.engine)
        model = self.collective.local_model(self.setup, self.params, shardings,
                                            bucket_bytes=int(self.cfg.rl.sync_bucket_bytes), dtype=self.compute_dtype)
        return JaxEngine(model, self.tokenizer, self.cfg.engine, weight_dtype=self.compute_dtype)

    def _make_rollout_phase(self) -> RolloutPhase:
        from genevolve_jax.agent.loop import AgentLoop
        from genevolve_jax.agent.tools import make_backend
        from genevolve_jax.render.factory import build_renderer
        from genevolve_jax.reward.scorer import RewardScorer
        from genevolve_jax.train.rl.rollout_phase import AgentRolloutPhase

        loop = AgentLoop(self.engine, self.tokenizer, make_backend(self.cfg.agent.tools), self.cfg.agent,
                         seed=int(self.cfg.seed))
        reward_cfg = self.cfg.reward.copy_and_resolve_references()
        if not reward_cfg.cache_dir:  # keep rendered images on disk: sample dumps copy them
            reward_cfg.cache_dir = os.path.join(self.workdir, "render_cache")
        scorer = RewardScorer.from_config(reward_cfg, renderer=build_renderer(self.cfg.render),
                                          render_throughput=self.cfg.render.throughput)
        g = self.cfg.loss.grpo
        return AgentRolloutPhase(loop, scorer, self.group_size, render_seed=int(self.cfg.rl.render_seed),
                                 mask_truncated=bool(g.mask_truncated), mask_error=bool(g.mask_error),
                                 stream_rewards=bool(self.cfg.rl.stream_rewards))

    def _make_prompt_source(self) -> PromptSource:
        from genevolve_jax.data.prompts import PoolPrompts
        return PoolPrompts(self.cfg.data)

    def _make_experience(self):
        if not self.cfg.experience.enabled or self.cfg.loss.sdl.coef <= 0:
            return None
        from genevolve_jax.experience.stage import ExperienceStage
        from genevolve_jax.experience.summariser import make_summariser
        from genevolve_jax.train.rl.rollout_phase import policy_generate_fn

        s = self.cfg.experience.summariser
        many = policy_generate_fn(self.engine, self.tokenizer, s.max_tokens, s.temperature) \
            if s.backend == "policy" else None
        return ExperienceStage(self.cfg.experience, summariser=make_summariser(s, generate_many=many))

    # -- one step --------------------------------------------------------------------------------
    def train_one_step(self) -> dict[str, Any]:
        cfg, k, times = self.cfg, self.group_size, {}
        step = self.step + 1
        metrics: dict[str, Any] = {}
        if self.engine_version != self.step:   # a restored or fresh state the engine does not hold yet
            metrics.update(self.sync_weights(self.step))

        if self.max_staleness == 0:
            prompts = next(self.prompts)

            def collect():   # rollouts, then the mask stage; the outage policy calls it again after a wait
                with _timed(times, "rollout"):
                    got = collect_rollouts(self.rollout, self.collective, step, prompts, self.prompts.shard,
                                           group_size=k, embed_rendered=self.logger.should_dump(step))
                got = dataclasses.replace(got, samples=tuple(with_policy_version(got.samples, self.engine_version)))
                masked = mask_stage(got, self.mask_rules, k)
                return (got, masked), masked.counts, masked.num_samples
        else:
            collect = self._queued_rollouts(step, times, metrics)

        (rollouts, masked), outage_metrics = self.outage.collect(collect, self.collective.on_writer)
        metrics.update(outage_metrics)
        samples = list(masked.samples)
        # A reward that was NaN/inf is masked by the mask stage and counted by the non-finite guard.
        bad_rewards = list(masked.nonfinite_reward_ids)
        with _timed(times, "advantage"):
            advantages = sample_advantages(samples, len(rollouts.prompts), k, cfg.loss)
        if self.experience is not None:
            with _timed(times, "experience"):
                guides, exp_metrics = experience_guides(self.experience, self.collective, rollouts, samples, k, step)
                # SDL on rollouts of an older policy (rl.max_staleness >= 1) only up to loss.sdl.max_staleness.
                guides, stale = fresh_guides(samples, guides, self.step, self.sdl_max_staleness)
                samples, refused = attach_teacher_prompts(samples, guides, self.rollout, self.placeholder_ids)
            metrics.update(exp_metrics, **refused)
            if stale:
                metrics["experience/guides_stale"] = stale
        with _timed(times, "assemble"):
            budget = int(cfg.rl.max_tokens_per_row)
            samples, long_guides = drop_oversized_teachers(samples, budget)
            length = choose_row_length(samples, row_lengths(budget, int(cfg.rl.row_length_buckets)))
            batch = assemble_evolve_batch(samples, advantages, seq_len=length, pad_id=self.pad_id,
                                          row_multiple=self.row_multiple, loss_cfg=cfg.loss,
                                          image_spec=self.image_spec, images=masked.images,
                                          old_logprobs=self.old_logprobs_route == "sampler")
        if long_guides:
            metrics["experience/guides_dropped_too_long"] = long_guides
        if bad_rewards:
            # A judge that returned NaN/inf: this step's rewards cannot be trusted, so its update is
            # skipped (parameters and optimiser state unchanged) and counted with the sample ids.
            metrics.update({"loss": float("nan"), "train/update_skipped_reward": 1.0})
            if self.producer is not None:   # the same weights, as version `step`: the producer waits on it
                self.producer.publish(step, None)
                self.engine_version = step
        else:
            metrics.update(self.update(batch, times))
            with _timed(times, "weight_sync"):
                metrics.update(self.sync_weights(step) if self.producer is None else self.publish_weights(step))

        self.step = step
        self.losses.append(metrics["loss"])
        self.nonfinite.observe(step, metrics, [s.sample_id for s in samples if s.trains], bad_rewards)
        metrics.update(self.nonfinite.metrics())
        metrics.update(step_metrics(samples))
        metrics.update(masked.metrics())
        metrics.update({k: v for k, v in rollouts.info.items() if k.startswith("time/")})
        metrics.update(rollouts.info.get("reward_dims") or {})
        metrics.update(times)
        metrics.update(self.collective.exchange_metrics())
        self.logger.log(step, metrics)
        if self.logger.should_dump(step):
            self.logger.dump_samples(step, samples, cfg.logging.samples_per_dump)
        if self.ckpt.should_save(step):
            self.save()
        return metrics

    # -- asynchronous steps (rl.max_staleness >= 1; train/rl/async_rollouts.py) -------------------
    def _queued_rollouts(self, step: int, times: dict, metrics: dict) -> Callable:
        """The outage policy's collect function of an asynchronous step: the producer's rollouts
        of ``step`` (started here on the first step), handed to every process through the
        Collective, without groups too stale to train. A second call (the outage policy's
        recollect) rolls the same prompts out again on the current policy, as does a job whose
        every group was too stale."""
        from genevolve_jax.train.rl.async_rollouts import RolloutProducer, drop_stale, staleness_metrics

        k, n = self.group_size, self.max_staleness
        if self.producer is None:
            self.producer = RolloutProducer(self._produce, version=self.engine_version)
            self._next_job_step = step
        self._submit_jobs(step + n)
        taken = []    # the step's job once taken

        def collect():
            with _timed(times, "rollout_wait"):
                while True:
                    got = self._again(taken[0]) if taken else self.producer.take(step)
                    taken[:] = [got.job]
                    rollouts = self.collective.gather_rollouts(
                        with_policy_version(got.samples, got.version), got.info, got.job.prompts,
                        self.collective.group_ids(len(got.job.prompts), self.prompts.shard), group_size=k, step=step,
                        embed_rendered=self.logger.should_dump(step))
                    rollouts, dropped, kept = drop_stale(rollouts, k, self.step, n)
                    self.dropped_stale += dropped
                    if rollouts.samples:
                        break
            metrics.update(staleness_metrics(kept, dropped, self.dropped_stale, self.producer.depth,
                                             times["time/rollout_wait_s"]))
            masked = mask_stage(rollouts, self.mask_rules, k)
            return (rollouts, masked), masked.counts, masked.num_samples

        return collect

    def _again(self, job):
        """``job``'s prompts rolled out once more, first in the queue, on the newest policy."""
        self.producer.submit(dataclasses.replace(job, min_version=self.step), first=True)
        return self.producer.take(job.step)

    def _produce(self, job) -> tuple[list, dict]:
        """The producer thread's work: this host's rollouts of a job (no collective runs here)."""
        return self.rollout.collect(job.step, list(job.prompts),
                                    self.collective.group_ids(len(job.prompts), self.prompts.shard))

    def _submit_jobs(self, last: int) -> None:
        """Submit the jobs of the steps up to ``last`` (and the run's end). Only this thread reads
        the prompt source, so the data order is the synchronous run's."""
        from genevolve_jax.train.rl.async_rollouts import RolloutJob

        while self._next_job_step <= min(last, self.total_steps):
            t = self._next_job_step
            state = self.prompts.get_state()
            self.producer.submit(RolloutJob(t, tuple(next(self.prompts)), state, t - 1 - self.max_staleness))
            self._next_job_step += 1

    def publish_weights(self, step: int) -> dict[str, float]:
        """The weight sync of an asynchronous step. An engine that reloads an export (SGLang) is
        synced here as in a synchronous step (its servers take the weights between requests); a
        host-local engine gets a copy in its layout made now (the next train step donates the
        trainer's buffers), which the producer pushes between two jobs. The engine is not emptied
        first as in :meth:`sync_weights`: it may be sampling, so both copies are held a while."""
        if self.engine.weight_export is not None:
            out = self.sync_weights(step)
            self.producer.publish(step, None)
            return out
        engine, collective = self.engine, self.collective
        params = collective.engine_params(self.setup.merge(self.params), engine.weight_shardings,
                                          bucket_bytes=int(self.cfg.rl.sync_bucket_bytes), dtype=engine.weight_dtype)
        self.producer.publish(step, lambda: collective.sync_engine(engine, lambda: engine.update_weights(params, step)))
        self.engine_version = step
        return {}

    def stop_producer(self) -> None:
        """Stop the producer thread and wait for it (after its job in progress). A job that does
        not end soon is aborted by closing the engine, so that the run never hangs on exit."""
        if self.producer is None:
            return
        if not self.producer.close(timeout_s=30.0):
            self.engine.close()
            self.producer.close()
        self.producer = None

    def update(self, batch: dict, times: dict) -> dict[str, float]:
        """The sharded update: π_old when it needs a forward, the reference log-probs when KL is
        on, then ``rl.updates_per_batch`` optimiser steps over the batch. Logs the compile
        seconds these stages spent (``time/compile_s``) and the layouts compiled so far."""
        self.compile_log.take()      # compiles before the update (the engine's) are not counted here
        # Each forward is waited for inside its timer: JAX dispatches asynchronously, and without
        # the wait its time was billed to the train step (the README run's steady steps logged
        # time/reference_s 0.00 s; waited for, 0.7–1.2 s, and the train step as much less).
        # The forwards' outputs join a new dict: the assembled batch the caller holds stays as it was.
        if self.old_logprobs_route == "recompute":
            with _timed(times, "old_logprobs"):
                batch = {**batch, "old_logprobs": jax.block_until_ready(self.logprob_forward(self.params, batch))}
        if self.use_kl:
            with _timed(times, "reference"):
                ref = self.reference_params()
                batch = {**batch, "ref_logprobs": jax.block_until_ready(self.logprob_forward(ref, batch))}
        with _timed(times, "train_step"):
            skipped = stage = 0
            for _ in range(self.updates_per_batch):
                self.rng, key = jax.random.split(self.rng)
                self.params, self.opt_state, mets = self.train_step(self.params, self.opt_state, batch, key)
                # A skipped (non-finite) update among several counts for the step (train/runtime/nonfinite.py).
                skipped, stage = skipped + mets[SKIPPED], jnp.maximum(stage, mets[STAGE])
            mets = {name: float(v) for name, v in jax.device_get({**mets, SKIPPED: skipped, STAGE: stage}).items()}
        mets["rollout/old_logprobs_forward"] = float(self.old_logprobs_route == "recompute")
        times["time/compile_s"] = self.compile_log.take()
        mets["compile/train_step"] = float(self.train_step.compiled_layouts)
        mets["compile/logprob_forward"] = float(self.logprob_forward.compiles)
        mets["batch/rows"] = float(batch["row_weight"].shape[0])
        mets["batch/row_tokens"] = float(batch["input_ids"].shape[1])
        return mets

    def reference_params(self) -> dict:
        """The KL reference's params: the frozen copy, or with LoRA the current base (the same
        buffers; the step donates and returns them each update) with zero adapters."""
        if not self.lora_on:
            return self.ref_params
        from genevolve_jax.models.lora import adapters_off
        return {"train": adapters_off(self.params["train"]), "frozen": self.params["frozen"]}

    def sync_weights(self, step: int) -> dict[str, float]:
        """The engine samples with the current policy from now on (RolloutEngine.update_weights).
        Weights leave the trainer's layout one ``rl.sync_bucket_bytes`` bucket at a time. An engine
        that reloads from disk (SGLang servers, which serve every host) gets an HF export that
        every process writes its share of, then process 0 asks the servers to reload it and every
        process adopts the outcome (Collective.sync_engine); a host-local engine drops its weights
        and every process streams the new ones into its layout."""
        if self.sync_adapters_only:
            return self.sync_adapters(step)
        model = self.policy_model()
        bucket = int(self.cfg.rl.sync_bucket_bytes)
        export = self.engine.weight_export
        if export is not None:
            t0 = time.perf_counter()
            path = self.collective.export_hf(model, export.path(step), dtype=export.dtype, bucket_bytes=bucket,
                                             config=export.model_config or model.config)
            seconds = time.perf_counter() - t0
            out = {"time/weight_export_s": seconds,
                   **self.collective.sync_engine(self.engine, lambda: self.engine.reload_weights(path, step))}
        else:
            self.engine.release_weights()
            params = self.collective.engine_params(model, self.engine.weight_shardings, bucket_bytes=bucket,
                                                   dtype=self.engine.weight_dtype)
            out = self.collective.sync_engine(self.engine, lambda: self.engine.update_weights(params, step))
        self.engine_version = step
        return out

    def sync_adapters(self, step: int) -> dict[str, float]:
        """LoRA with an engine that takes adapters (SGLang servers): the base, once, when the engine
        may hold other weights (a fresh or restored run: the servers loaded their own model), then
        each step's adapters as a PEFT folder of a few MB (Driver.export_adapter) loaded under a
        name of their own (RolloutEngine.load_adapter). No full model per step."""
        from genevolve_jax.models.lora import adapters_off, merged_model
        export, out = self.engine.weight_export, {}
        if self.engine_version < 0:
            base = merged_model(self.setup.merge({"train": adapters_off(self.params["train"]),
                                                  "frozen": self.params["frozen"]}))
            path = self.collective.export_hf(base, export.path(step), dtype=export.dtype,
                                             bucket_bytes=int(self.cfg.rl.sync_bucket_bytes), config=self.model_config)
            out.update(self.collective.sync_engine(self.engine, lambda: self.engine.reload_weights(path, step)))
        t0 = time.perf_counter()
        # One rank for every module (a head rank of its own padded to): SGLang reads only ``r``.
        path = self.export_adapter(export.adapter_path(step), dtype=export.dtype, one_rank=True)
        out["time/adapter_export_s"] = time.perf_counter() - t0
        out.update(self.collective.sync_engine(self.engine, lambda: self.engine.load_adapter(path, step)))
        self.engine_version = step
        return out

    # -- checkpoints and the end of the run --------------------------------------------------------
    def meta(self) -> dict:
        meta = super().meta()
        # Asynchronous steps: the position before the first job not trained yet (its rollouts,
        # queued or under way, are not saved; a resume generates them again from here).
        pending = self.producer.pending() if self.producer is not None else []
        meta["data"] = pending[0].data_state if pending else self.prompts.get_state()
        meta["dropped_stale"] = self.dropped_stale
        meta["outage"] = self.outage.state_dict()
        if self.experience is not None:
            meta["memory"] = self.experience.state_dict()
        return meta

    def load_meta(self, meta: dict) -> None:
        super().load_meta(meta)
        if "data" in meta:
            self.prompts.set_state(meta["data"])
        self.outage.load_state_dict(meta.get("outage", {}))
        self.dropped_stale = int(meta.get("dropped_stale", 0))
        if "memory" in meta and self.experience is not None:
            self.experience.load_state_dict(meta["memory"])
        self.engine_version = -1      # the engine holds other weights than the restored ones

    def export(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rewards": [h.get("reward/mean") for h in self.logger.history]}
        curve = self.logger.reward_curve()
        if curve:
            out["reward_curve"] = curve
        if self.cfg.rl.export_hf:
            out["hf_export"] = self.export_hf(os.path.join(self.workdir, "hf_export"), self.cfg.rl.export_dtype)
            if self.lora_on:   # the adapters alone too, on the run's base (model.path)
                out["hf_adapter"] = self.export_adapter(os.path.join(self.workdir, "hf_adapter"))
        return out

    def run(self) -> dict[str, Any]:
        try:
            return super().run()
        finally:      # a stop, a preemption or an error: no producer thread outlives the run
            self.stop_producer()

    def close(self) -> None:
        self.stop_producer()
        super().close()
        self.engine.close()

