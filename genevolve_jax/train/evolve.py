"""`genevolve train`: the self-evolution loop (GRPO + Visual Experience Distillation), METHOD.md §6–7.

One step:
  prompts (grain, checkpointable) → rollout phase: P × K rollouts through the engine, rendered and
  judged → group advantages → experience: best/worst pairs → summariser → memory (≤ 8 inserts);
  retrieval per request → decision guide → teacher row (guide in the system prompt, the student's
  own tokens after it) → reference forward (frozen params, separate jit) → the sharded train step
  (one jitted function: policy forward + teacher forward under stop-gradient, both through the
  fused log-prob op, GRPO + λ·SDL, AdamW) → weight sync to the engine → async checkpoint,
  metrics, sample dumps.

Everything is built from one run config (configs/tiny_cpu.py and friends); any piece can be
passed in instead (a rollout phase, a prompt source, an experience stage, an engine), which is how
the tests drive the real step with toy tasks.
"""
from __future__ import annotations

import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from genevolve_jax.train.batch_assembly import (ImageBatchSpec, OldLogprobs, RolloutSample, assemble_evolve_batch,
                                                evolve_loss_fn, mask_unreadable_images, reference_logprobs_fn)
from genevolve_jax.train.checkpoint import TrainCheckpointer, abstract_like, export_hf, rng_from_json, rng_to_json
from genevolve_jax.train.losses import advantages_from_config
from genevolve_jax.train.observability import RunLogger
from genevolve_jax.train.rollout_phase import step_metrics
from genevolve_jax.train.run_config import validate_evolve_run

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def group_rewards(samples: Sequence[RolloutSample], num_groups: int, group_size: int):
    """[P, K] rewards (0 where masked) and validity from group-major samples."""
    if len(samples) != num_groups * group_size:
        raise ValueError(f"the rollout phase returned {len(samples)} samples, expected "
                         f"{num_groups} prompts × {group_size} rollouts")
    r = np.array([0.0 if s.reward is None else float(s.reward) for s in samples], np.float32)
    v = np.array([s.valid and s.reward is not None for s in samples], bool)
    return r.reshape(num_groups, group_size), v.reshape(num_groups, group_size)


class EvolveTrainer:
    def __init__(self, cfg, *, workdir: str | None = None, rollout_phase=None, prompt_source=None,
                 experience=None, engine=None, model=None, tokenizer=None, progress: bool | None = None,
                 num_steps: int | None = None, devices=None):
        from genevolve_jax.sharding.mesh import mesh_from_config
        from genevolve_jax.train.run_setup import build_tokenizer, compiler_options, model_source
        from genevolve_jax.train.state import create_train_state, is_vision_path
        from genevolve_jax.train.step import TrainStep

        if devices is None:
            from genevolve_jax.train.run_setup import mesh_devices
            devices = mesh_devices(cfg.sharding)
        validate_evolve_run(cfg, len(devices) if devices is not None else None)
        self.cfg = cfg
        self.workdir = os.path.abspath(workdir or cfg.workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.num_steps = int(num_steps or cfg.rl.num_steps)
        self.group_size = int(cfg.rl.group_size)
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg.model)
        self.pad_id = int(getattr(self.tokenizer, "pad_token_id", 0) or 0)
        self.compute_dtype = _DTYPES[cfg.train.compute_dtype]
        mesh = mesh_from_config(cfg.sharding, devices)
        source = model if model is not None else model_source(cfg.model, self.tokenizer)
        freeze = is_vision_path if cfg.train.freeze_vision else None
        # The schedule spans the run (as SFT's spans its epochs): a cosine decays to its floor at
        # the last step whatever rl.num_steps is.
        train_cfg = cfg.train.copy_and_resolve_references()
        train_cfg.schedule.total_steps = self.num_steps
        self.setup, self.params, self.opt_state = create_train_state(source, train_cfg, mesh, cfg.sharding.strategy,
                                                                     freeze=freeze)
        self.model_config = self.setup.merge(self.params).config
        opts = compiler_options(cfg.model)
        self.use_kl = cfg.loss.grpo.kl_coef > 0
        # The reference is the starting policy (SFT output), frozen, sharded like the policy.
        self.ref_params = jax.jit(lambda t: jax.tree.map(jnp.copy, t),
                                  out_shardings=self.setup.param_shardings)(self.params) if self.use_kl else None
        self.train_step = TrainStep(self.setup, evolve_loss_fn(cfg.loss), compute_dtype=self.compute_dtype,
                                    grad_accum_steps=cfg.train.grad_accum_steps, compiler_options=opts)
        self.ref_fn = reference_logprobs_fn(self.setup, cfg.loss, self.compute_dtype) if self.use_kl else None
        self.engine = engine if engine is not None else self._make_engine()
        # Pieces may be given built, or as factories of the trainer (they need its engine/tokenizer).
        build = lambda piece: piece(self) if callable(piece) and not hasattr(piece, "collect") \
            and not hasattr(piece, "get_state") and not hasattr(piece, "guides") else piece  # noqa: E731
        self.rollout = build(rollout_phase) if rollout_phase is not None else self._make_rollout_phase()
        self.prompts = build(prompt_source) if prompt_source is not None else self._make_prompt_source()
        self.experience = build(experience) if experience is not None else self._make_experience()
        c = cfg.checkpoint
        self.ckpt = TrainCheckpointer(os.path.join(self.workdir, "checkpoints"), save_every=c.save_every,
                                      keep=c.keep, async_save=c.async_save)
        show = cfg.logging.progress if progress is None else progress
        self.logger = RunLogger(self.workdir, total_steps=self.num_steps, tensorboard=cfg.logging.tensorboard,
                                sample_every=cfg.logging.sample_every, progress=show, description="evolve")
        self.rng = jax.random.key(int(cfg.seed))
        self.step = 0
        self.losses: list[float] = []
        if jax.process_count() > 1:  # prompt shards per process, host-array log-prob forwards
            from genevolve_jax.train import multihost
            multihost.prepare_trainer(self)
        if c.resume and self.ckpt.latest_step() is not None:
            self.restore()

    # -- construction of the default pieces ------------------------------------------------------
    def _make_engine(self):
        if jax.process_count() > 1 and self.cfg.rl.engine in ("simple", "jax"):  # on this host's devices
            from genevolve_jax.train import multihost
            return multihost.host_local_engine(self)
        if self.cfg.rl.engine == "simple":
            from genevolve_jax.train.policy_sampler import PolicySampler
            a = self.cfg.agent
            return PolicySampler(self.setup, self.params, max_batch=a.loop.engine_batch_size,
                                 max_new_tokens=a.round_max_tokens)
        if self.cfg.rl.engine == "sglang":
            from genevolve_jax.rollout.sglang_engine import SGLangEngine
            s = self.cfg.rl.sglang
            engine = SGLangEngine.from_config(s)
            # Fail here, before any rollout, when no server answers (errors name rl.sglang.urls).
            engine.wait_healthy(float(s.health_wait_s), field="rl.sglang.urls")
            # The servers may hold another checkpoint: the first train_one_step pushes ours first
            # (not here, so that a resumed run pushes only its restored weights).
            self._engine_stale = bool(s.sync_at_start)
            return engine
        from genevolve_jax.rollout.jax_engine import JaxEngine
        engine = JaxEngine(self.setup.merge(self._sampler_copy()), self.tokenizer, self.cfg.engine)
        return engine

    def _sampler_copy(self):
        """A fresh copy of the params in the train layout (the engine reshards it to its own); a
        copy, because the next train step donates ``self.params``."""
        return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=self.setup.param_shardings)(self.params)

    def _make_rollout_phase(self):
        from genevolve_jax.agent.loop import AgentLoop
        from genevolve_jax.agent.tools import make_backend
        from genevolve_jax.render.factory import build_renderer
        from genevolve_jax.reward.scorer import RewardScorer
        from genevolve_jax.train.rollout_phase import AgentRolloutPhase

        loop = AgentLoop(self.engine, self.tokenizer, make_backend(self.cfg.agent.tools), self.cfg.agent,
                         seed=int(self.cfg.seed))
        reward_cfg = self.cfg.reward.copy_and_resolve_references()
        if not reward_cfg.cache_dir:  # keep rendered images on disk: sample dumps copy them
            reward_cfg.cache_dir = os.path.join(self.workdir, "render_cache")
        scorer = RewardScorer.from_config(reward_cfg, renderer=build_renderer(self.cfg.render),
                                          render_throughput=self.cfg.render.throughput)
        g = self.cfg.loss.grpo
        return AgentRolloutPhase(loop, scorer, self.group_size, render_seed=int(self.cfg.rl.render_seed),
                                 mask_truncated=bool(g.mask_truncated), mask_error=bool(g.mask_error))

    def _make_prompt_source(self):
        from genevolve_jax.data.prompts import PromptPool
        return PromptPool(self.cfg.data).iterator()

    def _make_experience(self):
        if not self.cfg.experience.enabled or self.cfg.loss.sdl.coef <= 0:
            return None
        from genevolve_jax.experience.summariser import make_summariser
        from genevolve_jax.train.rollout_phase import ExperienceStage, policy_generate_fn

        s = self.cfg.experience.summariser
        many = policy_generate_fn(self.engine, self.tokenizer, s.max_tokens, s.temperature) \
            if s.backend == "policy" else None
        return ExperienceStage(self.cfg.experience, summariser=make_summariser(s, generate_many=many))

    # -- one step --------------------------------------------------------------------------------
    def _teacher_prompt(self, sample: RolloutSample, guide: str) -> list[int]:
        if hasattr(self.rollout, "teacher_prompt"):
            return list(self.rollout.teacher_prompt(sample, guide))
        return list(self.rollout.loop.prompt_ids(sample.request, guide))

    def _image_spec(self):
        """How rollout images become trainer inputs; the processor is the engine's (it fixed how many
        placeholders each image got); engines without one (SGLang) use the default processor, which
        is SGLang's for Qwen3-VL."""
        if getattr(self, "_image_spec_cached", None) is None:
            self._image_spec_cached = ImageBatchSpec.for_model(
                self.model_config, getattr(self.engine, "image_processor", None), int(self.cfg.rl.patch_multiple))
        return self._image_spec_cached

    def train_one_step(self) -> dict[str, Any]:
        times: dict[str, float] = {}
        if getattr(self, "_engine_stale", False):  # rl.sglang.sync_at_start: push the starting weights
            self.sync_weights()
        t = time.perf_counter()
        prompts = next(self.prompts)
        step = self.step + 1
        if jax.process_count() > 1:  # this host's prompts, then every host's samples (train/multihost.py)
            from genevolve_jax.train import multihost
            samples, info, prompts = multihost.collect_global(self, step, prompts)
        else:
            samples, info = self.rollout.collect(step, prompts)
        times["time/rollout_s"] = time.perf_counter() - t
        num_groups = len(prompts)
        too_long = repeated = 0
        if self.cfg.loss.grpo.mask_repeated:  # METHOD.md §6: trajectories that repeat are masked
            for s in samples:
                if s.valid and s.stats.get("repeated_calls", 0) > 0:
                    s.valid, s.reward, s.mask_reason = False, None, "repeated"
                    repeated += 1
        for s in samples:
            if len(s.token_ids) > self.cfg.rl.max_seq_len:
                s.valid, s.reward, s.mask_reason = False, None, "too_long_for_batch"
                s.token_ids, s.loss_mask, s.logprobs = s.token_ids[:8], [0] * 8, [0.0] * 8
                s.prompt_length = min(s.prompt_length, 8)
                too_long += 1

        img_masked: dict[str, int] = {}  # before advantages: such a sample must not count in its group
        mask_unreadable_images(samples, img_masked)

        t = time.perf_counter()
        rewards, valid = group_rewards(samples, num_groups, self.group_size)
        adv = np.asarray(advantages_from_config(rewards, valid, self.cfg.loss)).reshape(-1)
        times["time/advantage_s"] = time.perf_counter() - t

        exp_metrics: dict[str, Any] = {}
        if self.experience is not None:
            t = time.perf_counter()
            groups = [samples[i * self.group_size:(i + 1) * self.group_size] for i in range(num_groups)]
            if jax.process_count() > 1:  # process 0 runs it, every process gets its result
                from genevolve_jax.train import multihost
                guides, m = multihost.experience_on_process0(self.experience, groups, samples, step)
            else:
                exp_metrics.update(self.experience.update(groups, step))
                guides, m = self.experience.guides([s.request for s in samples])
            exp_metrics.update(m)
            for s, guide in zip(samples, guides):
                if guide is not None and s.valid:
                    s.teacher_prompt = self._teacher_prompt(s, guide)
            times["time/experience_s"] = time.perf_counter() - t

        t = time.perf_counter()
        batch = assemble_evolve_batch(samples, adv, pad_id=self.pad_id, length_multiple=self.cfg.rl.length_multiple,
                                      image_spec=self._image_spec(), masked=img_masked)
        times["time/assemble_s"] = time.perf_counter() - t
        t = time.perf_counter()  # π_old: the sampler's or recomputed (rl.old_logprobs); mismatch logged either way
        if getattr(self, "_old_logprobs", None) is None:
            self._old_logprobs = OldLogprobs(self.setup, self.cfg.loss, self.compute_dtype, self.cfg.rl.old_logprobs,
                                             fn=self.ref_fn)
        logprob_metrics = self._old_logprobs(self.params, batch)
        times["time/old_logprobs_s"] = time.perf_counter() - t
        if self.use_kl:
            t = time.perf_counter()
            batch["ref_logprobs"] = np.asarray(self.ref_fn(self.ref_params, batch))
            times["time/reference_s"] = time.perf_counter() - t

        t = time.perf_counter()
        self.rng, key = jax.random.split(self.rng)
        self.params, self.opt_state, mets = self.train_step(self.params, self.opt_state, batch, key)
        mets = {k: float(v) for k, v in jax.device_get(mets).items()}
        times["time/train_step_s"] = time.perf_counter() - t

        t = time.perf_counter()
        self.sync_weights(step)
        times["time/weight_sync_s"] = time.perf_counter() - t
        times.update(self.last_sync_metrics)
        self.step = step
        self.losses.append(mets["loss"])

        metrics: dict[str, Any] = {**mets, **step_metrics(samples), **exp_metrics, **logprob_metrics, **times}
        metrics.update({k: v for k, v in info.items() if k.startswith("time/")})
        for name, value in (info.get("reward_dims") or {}).items():
            metrics[name] = value
        masked = dict(info.get("masked_reasons") or {})
        if too_long:
            masked["too_long_for_batch"] = masked.get("too_long_for_batch", 0) + too_long
        if repeated:
            masked["repeated"] = masked.get("repeated", 0) + repeated
        for reason, n in img_masked.items():
            masked[reason] = masked.get(reason, 0) + n
        for reason, n in masked.items():
            metrics[f"masked/{reason}"] = n
        self.logger.log(step, metrics)
        if self.logger.should_dump(step):
            self.logger.dump_samples(step, samples, self.cfg.logging.samples_per_dump)
        if self.ckpt.should_save(step):
            self.save()
        return metrics

    def sync_weights(self, step: int | None = None) -> None:
        """Weight sync to the rollout engine. In-process engines get a fresh copy (the next train
        step donates params). SGLang servers reload an HF export of the policy from
        rl.sglang.weights_dir, tagged weight_version=str(step); the export and reload seconds land
        in ``self.last_sync_metrics``."""
        if jax.process_count() > 1:  # host-local copies; SGLang: process 0 pushes (train/multihost.py)
            from genevolve_jax.train import multihost
            return multihost.sync_weights(self, step)
        self.last_sync_metrics: dict[str, float] = {}
        self._engine_stale = False
        if self.engine is None or not hasattr(self.engine, "update_weights"):
            return
        from genevolve_jax.rollout.sglang_engine import DiskWeightSync, SGLangEngine
        from genevolve_jax.train.policy_sampler import PolicySampler
        if isinstance(self.engine, SGLangEngine):
            # One process here; multihost.sync_weights gathers to process 0, which pushes, and
            # broadcasts the timings.
            if getattr(self, "_weight_sync", None) is None:
                self._weight_sync = DiskWeightSync.from_config(self.engine, self.cfg.rl.sglang, self.workdir)
            version = str(self.step if step is None else step)
            self.last_sync_metrics = self._weight_sync.push(self.setup.merge(self.params), version)
        elif isinstance(self.engine, PolicySampler):
            self.engine.update_weights(self.params)
        else:
            from flax import nnx
            self.engine.update_weights(nnx.state(self.setup.merge(self._sampler_copy()), nnx.Param))

    # -- checkpoints -------------------------------------------------------------------------------
    def _meta(self) -> dict:
        meta = {"rng": rng_to_json(self.rng), "losses": list(self.losses),
                "history": self.logger.history[-10000:]}
        if hasattr(self.prompts, "get_state"):
            meta["data"] = self.prompts.get_state()
        if self.experience is not None:
            meta["memory"] = self.experience.state_dict()
        return meta

    def save(self, force: bool = False) -> None:
        self.ckpt.save(self.step, self.params, self.opt_state, self._meta(), force=force)

    def restore(self, step: int | None = None) -> int:
        abs_params = abstract_like(self.params, self.setup.param_shardings)
        abs_opt = abstract_like(self.opt_state, self.setup.opt_shardings)
        r = self.ckpt.restore(abs_params, abs_opt, step)
        self.params, self.opt_state, self.step = r.params, r.opt_state, r.step
        self.rng = rng_from_json(r.meta["rng"])
        self.losses = list(r.meta.get("losses", []))
        self.logger.history = list(r.meta.get("history", []))
        if "data" in r.meta and hasattr(self.prompts, "set_state"):
            self.prompts.set_state(r.meta["data"])
        if "memory" in r.meta and self.experience is not None:
            self.experience.load_state_dict(r.meta["memory"])
        self.sync_weights()
        return r.step

    # -- the run -----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.logger.start(self.step)
        try:
            while self.step < self.num_steps:
                self.train_one_step()
            if self.step not in self.ckpt.all_steps():
                self.save(force=True)
            self.ckpt.wait()
            out: dict[str, Any] = {"steps": self.step, "losses": list(self.losses),
                                   "rewards": [h.get("reward/mean") for h in self.logger.history],
                                   "checkpoints": self.ckpt.all_steps()}
            curve = self.logger.reward_curve()
            if curve:
                out["reward_curve"] = curve
            if self.cfg.rl.export_hf:
                path = os.path.join(self.workdir, "hf_export")
                if jax.process_count() > 1:  # every process joins the gather, process 0 writes
                    from genevolve_jax.train import multihost
                    multihost.export_hf(self, path)
                else:
                    export_hf(self.setup, self.params, path, dtype=self.cfg.rl.export_dtype, tokenizer=self.tokenizer)
                out["hf_export"] = path
            return out
        finally:
            self.logger.close()

    def close(self) -> None:
        self.ckpt.close()
        self.logger.close()
        if self.engine is not None and hasattr(self.engine, "close"):
            self.engine.close()
