"""`genevolve sft`: the SFT cold start (METHOD.md §5) over the sharded train step.

LM only (vision tower and projector frozen, ``train.freeze_vision``), loss on assistant tokens,
AdamW at lr 1e-5 with a cosine schedule and 2% warmup for ``data.sft.num_epochs`` (2) epochs, from
the grain SFT pipeline (packed, checkpointable). Checkpoints (params, optimiser, step, RNG, the data
iterator's state) go through the same orbax manager as the evolve loop, so a killed SFT resumes
where it stopped. At the end the model is written as an orbax model checkpoint (``genevolve train``
starts from it: ``--config.model.path=<workdir>/model``) and, optionally, in HF format.
"""
from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp

from genevolve_jax.train.checkpoint import TrainCheckpointer, abstract_like, export_hf, rng_from_json, rng_to_json
from genevolve_jax.train.observability import RunLogger

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def count_steps(pipeline) -> int:
    """Batches in one pass over the configured epochs (the schedule needs the total)."""
    return sum(1 for _ in pipeline.iterator())


class SFTTrainer:
    def __init__(self, cfg, *, workdir: str | None = None, tokenizer=None, model=None, progress: bool | None = None,
                 devices=None):
        from genevolve_jax.data.sft import SFTPipeline
        from genevolve_jax.sharding.mesh import mesh_from_config
        from genevolve_jax.train.config import validate as validate_train
        from genevolve_jax.train.run_config import validate_sft_run
        from genevolve_jax.train.run_setup import build_tokenizer, check_mesh, compiler_options, model_source
        from genevolve_jax.train.state import create_train_state, is_vision_path
        from genevolve_jax.train.step import TrainStep, sft_loss_fn

        if devices is None:
            from genevolve_jax.train.run_setup import mesh_devices
            devices = mesh_devices(cfg.sharding)
        validate_sft_run(cfg.sft_run)
        tc = validate_train(cfg.sft)
        check_mesh(cfg.sharding, cfg.data.sft.rows_per_batch // tc.grad_accum_steps,
                   "data.sft.rows_per_batch / sft.grad_accum_steps", len(devices) if devices is not None else None)
        self.cfg = cfg
        self.workdir = os.path.abspath(workdir or cfg.workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg.model)
        self.pipeline = SFTPipeline(cfg.data, self.tokenizer)
        total = cfg.sft_run.max_steps or count_steps(self.pipeline)
        if total < 1:
            raise ValueError("the SFT data gives no batch; add rows or lower data.sft.rows_per_batch")
        self.total_steps = total
        tc.schedule.total_steps = total
        mesh = mesh_from_config(cfg.sharding, devices)
        source = model if model is not None else model_source(cfg.model, self.tokenizer)
        freeze = is_vision_path if tc.freeze_vision else None
        self.setup, self.params, self.opt_state = create_train_state(source, tc, mesh, cfg.sharding.strategy,
                                                                     freeze=freeze)
        self.step_fn = TrainStep(self.setup, sft_loss_fn(tc.logprob_chunk_size), compute_dtype=_DTYPES[tc.compute_dtype],
                                 grad_accum_steps=tc.grad_accum_steps, compiler_options=compiler_options(cfg.model))
        self.data = self.pipeline.iterator()
        c = cfg.checkpoint
        self.ckpt = TrainCheckpointer(os.path.join(self.workdir, "sft_checkpoints"), save_every=c.save_every,
                                      keep=c.keep, async_save=c.async_save)
        show = cfg.logging.progress if progress is None else progress
        self.logger = RunLogger(os.path.join(self.workdir, "sft_logs"), total_steps=total,
                                tensorboard=cfg.logging.tensorboard, progress=show, description="sft")
        self.rng = jax.random.key(int(cfg.seed))
        self.step = 0
        self.losses: list[float] = []
        if c.resume and self.ckpt.latest_step() is not None:
            self.restore()

    def _meta(self) -> dict:
        return {"rng": rng_to_json(self.rng), "data": self.data.get_state(), "losses": list(self.losses)}

    def restore(self) -> int:
        r = self.ckpt.restore(abstract_like(self.params, self.setup.param_shardings),
                              abstract_like(self.opt_state, self.setup.opt_shardings))
        self.params, self.opt_state, self.step = r.params, r.opt_state, r.step
        self.rng = rng_from_json(r.meta["rng"])
        self.data.set_state(r.meta["data"])
        self.losses = list(r.meta.get("losses", []))
        return r.step

    def train_one_step(self) -> dict[str, Any] | None:
        try:
            batch = next(self.data)
        except StopIteration:
            return None
        batch = dict(batch)
        n_traj = int(batch.pop("num_trajectories", 0))
        self.rng, key = jax.random.split(self.rng)
        self.params, self.opt_state, mets = self.step_fn(self.params, self.opt_state, batch, key)
        mets = {k: float(v) for k, v in jax.device_get(mets).items()}
        self.step += 1
        mets["trajectories"] = n_traj
        if not math.isfinite(mets["loss"]):
            raise FloatingPointError(f"SFT loss is {mets['loss']} at step {self.step}")
        self.losses.append(mets["loss"])
        self.logger.log(self.step, mets)
        if self.ckpt.should_save(self.step):
            self.ckpt.save(self.step, self.params, self.opt_state, self._meta())
        return mets

    def run(self) -> dict[str, Any]:
        from genevolve_jax.models.loading import save_model

        self.logger.start(self.step)
        try:
            while self.step < self.total_steps:
                if self.train_one_step() is None:
                    break
            if self.step not in self.ckpt.all_steps():
                self.ckpt.save(self.step, self.params, self.opt_state, self._meta(), force=True)
            self.ckpt.wait()
            out_dir = self.cfg.sft_run.output or os.path.join(self.workdir, "model")
            model = self.setup.merge(jax.tree.map(jnp.asarray, jax.device_get(self.params)))
            save_model(out_dir, model, overwrite=True)
            self.tokenizer.save_pretrained(os.path.join(out_dir, "hf_assets"))
            out = {"steps": self.step, "losses": list(self.losses), "model": out_dir,
                   "summary": self.pipeline.summary()}
            if self.cfg.sft_run.export_hf:
                path = os.path.join(self.workdir, "sft_hf_export")
                export_hf(self.setup, self.params, path, dtype=self.cfg.sft_run.export_dtype, tokenizer=self.tokenizer)
                out["hf_export"] = path
            return out
        finally:
            self.logger.close()

    def close(self) -> None:
        self.ckpt.close()
        self.logger.close()

