"""`genevolve sft`: the SFT cold start (METHOD.md §5) over the sharded train step.

LM only (vision tower and projector frozen, ``sft.freeze_vision``), loss on assistant tokens
(``loss.sft``, log-probs through the fused op at ``loss.logprob.sft_temperature`` in chunks of
``loss.logprob.chunk_size``), AdamW at lr 1e-5 with a cosine schedule and 2% warmup for
``data.sft.num_epochs`` (2) epochs, from the grain SFT pipeline (packed, checkpointable).
Checkpoints (params, optimiser, step, RNG, the data iterator's state) go through the same orbax
manager as the evolve loop (train/runtime/driver.py), so a killed SFT resumes where it stopped. At the end
the model is written as an orbax model checkpoint (``genevolve train`` starts from it:
``--config.model.path=<workdir>/model``) and, optionally, in HF format.
"""
from __future__ import annotations

import os
from typing import Any

import jax

from genevolve_jax.train.losses.step_losses import SFTLoss
from genevolve_jax.train.runtime.driver import Driver


def count_steps(pipeline) -> int:
    """Batches in one pass over the configured epochs (the schedule needs the total)."""
    return sum(1 for _ in pipeline.iterator())


class SFTTrainer(Driver):
    def __init__(self, cfg, *, workdir: str | None = None, tokenizer=None, model=None, progress: bool | None = None,
                 devices=None, collective=None):
        from genevolve_jax.data.sft import SFTPipeline
        from genevolve_jax.sharding.collective import make_collective
        from genevolve_jax.train.runtime.model_setup import build_tokenizer, check_mesh
        from genevolve_jax.train.runtime.step_config import resolve_micro_batches
        from genevolve_jax.train.runtime.step_config import validate as validate_train
        from genevolve_jax.train.sft.config import validate_sft_run

        collective = collective or make_collective()
        if devices is None:
            devices = collective.mesh_devices(cfg.sharding)
        validate_sft_run(cfg.sft_run)
        n_devices = len(devices) if devices is not None else None
        # sft.grad_accum_steps -1: one packed row per batch shard per micro-batch, from the mesh.
        tc = resolve_micro_batches(validate_train(cfg.sft), cfg.data.sft.rows_per_batch,
                                   check_mesh(cfg.sharding, n_devices=n_devices))
        check_mesh(cfg.sharding, cfg.data.sft.rows_per_batch // tc.grad_accum_steps,
                   "data.sft.rows_per_batch / sft.grad_accum_steps", n_devices)
        tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg.model)
        self.pipeline = SFTPipeline(cfg.data, tokenizer)
        total = cfg.sft_run.max_steps or count_steps(self.pipeline)
        if total < 1:
            raise ValueError("the SFT data gives no batch; add rows or lower data.sft.rows_per_batch")
        super().__init__(cfg, train_cfg=tc, total_steps=total, loss=SFTLoss(cfg.loss),
                         workdir=workdir or cfg.workdir, checkpoint_dir="sft_checkpoints", log_dir="sft_logs",
                         description="sft", tokenizer=tokenizer, model=model, devices=devices, progress=progress,
                         collective=collective)
        self.data = self.pipeline.iterator()
        self.resume_if_any()

    def meta(self) -> dict:
        return {**super().meta(), "data": self.data.get_state()}

    def load_meta(self, meta: dict) -> None:
        super().load_meta(meta)
        self.data.set_state(meta["data"])

    def train_one_step(self) -> dict[str, Any] | None:
        position = self.data.get_state()     # names the batch in a non-finite report (SFT rows carry no ids)
        try:
            batch = dict(next(self.data))
        except StopIteration:
            return None
        n_traj = int(batch.pop("num_trajectories", 0))
        self.rng, key = jax.random.split(self.rng)
        self.params, self.opt_state, mets = self.train_step(self.params, self.opt_state, batch, key)
        mets = {k: float(v) for k, v in jax.device_get(mets).items()}
        self.step += 1
        mets["trajectories"] = n_traj
        # A non-finite loss or gradient skipped the update inside the step; the driver stops after
        # train.max_consecutive_nonfinite of them in a row (train/runtime/nonfinite.py).
        self.nonfinite.observe(self.step, mets, [f"sft batch at data state {str(position)[:300]}"])
        mets.update(self.nonfinite.metrics())
        self.losses.append(mets["loss"])
        self.logger.log(self.step, mets)
        if self.ckpt.should_save(self.step):
            self.save()
        return mets

    def export(self) -> dict[str, Any]:
        from genevolve_jax.models.loading import save_model

        out_dir = self.cfg.sft_run.output or os.path.join(self.workdir, "model")
        model = self.collective.local_model(self.setup, self.params)

        def write():
            save_model(out_dir, model, overwrite=True)
            self.tokenizer.save_pretrained(os.path.join(out_dir, "hf_assets"))
            return out_dir
        out = {"model": self.collective.on_writer(write), "summary": self.pipeline.summary()}
        if self.cfg.sft_run.export_hf:
            out["hf_export"] = self.export_hf(os.path.join(self.workdir, "sft_hf_export"), self.cfg.sft_run.export_dtype)
        return out
