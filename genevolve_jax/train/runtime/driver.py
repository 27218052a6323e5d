"""What `genevolve sft` and `genevolve train` share: setup (tokenizer, mesh, sharded state, the
jitted step), checkpoints (save, restore, resume), the run loop with its logger, and the final
checkpoint and HF export. Each driver adds its own step (:meth:`Driver.train_one_step`) and the
extra state its checkpoints carry."""
from __future__ import annotations

import abc
import os
from typing import Any

import jax
import jax.numpy as jnp

from genevolve_jax.sharding.collective import Collective, make_collective
from genevolve_jax.train.runtime.checkpoint import (CheckpointError, TrainCheckpointer, abstract_like, rng_from_json,
                                                    rng_to_json)
from genevolve_jax.train.runtime.nonfinite import NonFiniteGuard
from genevolve_jax.train.runtime.observability import RunLogger
from genevolve_jax.train.runtime.preemption import PreemptionGuard, RunStopped
from genevolve_jax.train.runtime.step import LossFunction, TrainStep

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Driver(abc.ABC):
    """A training run over one sharded state.

    ``train_cfg`` is the optimiser section (``sft`` or ``train``); its schedule spans
    ``total_steps``. ``model`` and ``tokenizer`` may be given built (tests, notebooks); otherwise
    they come from ``cfg.model``."""

    def __init__(self, cfg, *, train_cfg, total_steps: int, loss: LossFunction, workdir: str, checkpoint_dir: str,
                 log_dir: str, description: str, tokenizer=None, model=None, devices=None,
                 progress: bool | None = None, collective: Collective | None = None):
        from genevolve_jax.sharding.mesh import mesh_from_config
        from genevolve_jax.models.lora import freeze_filter, has_adapters
        from genevolve_jax.train.runtime.model_setup import (compiler_options, device_compiler_options, lora_config,
                                                             model_source)
        from genevolve_jax.train.runtime.state import create_train_state, is_vision_path

        self.cfg = cfg
        self.collective = collective or make_collective()
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.total_steps = int(total_steps)
        self.tokenizer = tokenizer
        self.compute_dtype = DTYPES[train_cfg.compute_dtype]
        tc = train_cfg
        mesh = mesh_from_config(cfg.sharding, devices)
        source = model if model is not None else model_source(cfg.model, tokenizer, remat=tc.remat)
        # With LoRA only the adapters train: the base is frozen (no gradient, no optimiser state).
        self.lora_on = has_adapters(model) if model is not None else lora_config(cfg.model) is not None
        freeze = freeze_filter(self.lora_on, is_vision_path if tc.freeze_vision else None)
        self.setup, self.params, self.opt_state = create_train_state(source, tc, mesh, cfg.sharding.strategy,
                                                                     total_steps=self.total_steps, freeze=freeze)
        self.train_step = TrainStep(self.setup, loss, compute_dtype=self.compute_dtype,
                                    grad_accum_steps=tc.grad_accum_steps,
                                    compiler_options={**compiler_options(cfg.model), **device_compiler_options()})
        if self.collective.is_writer:   # the mesh and micro-batches derived from the device count (-1s)
            print(f"genevolve: {description} on {mesh.devices.size} devices of {self.collective.process_count} "
                  f"process(es): mesh {dict(mesh.shape)}, {tc.grad_accum_steps} micro-batch(es) a step", flush=True)
        c = cfg.checkpoint
        self.ckpt = TrainCheckpointer(os.path.join(self.workdir, checkpoint_dir), save_every=c.save_every,
                                      keep=c.keep, async_save=c.async_save, collective=self.collective)
        self.logger = RunLogger.from_config(os.path.join(self.workdir, log_dir), cfg.logging,
                                            total_steps=self.total_steps, description=description,
                                            progress=progress, run_config=cfg,
                                            is_writer=self.collective.is_writer)
        self.rng = jax.random.key(int(cfg.seed))
        self.step = 0
        self.losses: list[float] = []
        # Non-finite steps are skipped inside the jitted step; this counts them and says when to stop.
        self.nonfinite = NonFiniteGuard(int(tc.max_consecutive_nonfinite))
        # SIGTERM / SIGINT: stop at the next step boundary, agreed by every process (train/runtime/preemption.py).
        self.preemption = PreemptionGuard(agree=self.collective.any_process)

    # -- what a driver adds ----------------------------------------------------------------------
    @abc.abstractmethod
    def train_one_step(self) -> dict[str, Any] | None:
        """One optimiser step (None when the data ran out); advances :attr:`step`."""

    @abc.abstractmethod
    def export(self) -> dict[str, Any]:
        """Write the run's final artefacts; returns the entries for :meth:`run`'s result."""

    def meta(self) -> dict:
        """JSON-able state saved with every checkpoint next to params and optimiser state."""
        meta = {"rng": rng_to_json(self.rng), "losses": list(self.losses), "history": self.logger.history[-10000:],
                "nonfinite": self.nonfinite.state_dict()}
        if self.lora_on:
            meta["lora_base"] = self.lora_base()
        return meta

    def load_meta(self, meta: dict) -> None:
        if self.lora_on and meta.get("lora_base") != self.lora_base():
            raise CheckpointError(f"checkpoint adapters under {self.ckpt.directory} were trained on the base "
                                  f"{meta.get('lora_base')}, this run's is {self.lora_base()} "
                                  "(model.path / preset / seed)")
        self.rng = rng_from_json(meta["rng"])
        self.nonfinite.load_state_dict(meta.get("nonfinite", {}))
        self.losses = list(meta.get("losses", []))
        self.logger.history = list(meta.get("history", []))

    # -- checkpoints -----------------------------------------------------------------------------
    def lora_base(self) -> dict:
        """What the adapters of a LoRA checkpoint sit on: the run's model source (a checkpoint path,
        or a preset and seed), which rebuilds the frozen base exactly."""
        m = self.cfg.model
        return {"path": os.path.abspath(m.path) if m.path else "", "preset": "" if m.path else m.preset,
                "seed": 0 if m.path else int(m.seed), "param_dtype": m.param_dtype}

    def checkpointed(self, tree: dict) -> dict:
        """The part of a ``{"train", "frozen"}`` tree a checkpoint holds: with LoRA the adapters
        only (the frozen base comes from the model source, :meth:`lora_base`), else both."""
        return {"train": tree["train"]} if self.lora_on else tree

    def save(self, force: bool = False) -> None:
        self.ckpt.save(self.step, self.checkpointed(self.params), self.opt_state, self.meta(), force=force)

    def restore(self, step: int | None = None) -> int:
        params = abstract_like(self.checkpointed(self.params), self.checkpointed(self.setup.param_shardings))
        r = self.ckpt.restore(params, abstract_like(self.opt_state, self.setup.opt_shardings), step)
        self.params = {**self.params, **r.params}
        self.opt_state, self.step = r.opt_state, r.step
        self.load_meta(r.meta)
        for skipped in r.skipped:   # newer steps that did not restore (train/runtime/checkpoint.py)
            print(f"genevolve: {skipped.log_line()}; resumed from step {r.step}", flush=True)
        return r.step

    def resume_if_any(self) -> None:
        if self.cfg.checkpoint.resume and self.ckpt.latest_step() is not None:
            self.restore()

    def policy_model(self):
        """The policy as engines and exports see it: a plain model, LoRA adapters merged in."""
        from genevolve_jax.models.lora import merged_model
        return merged_model(self.setup.merge(self.params))

    def export_adapter(self, path: str, dtype: str = "float32", *, one_rank: bool = False) -> str:
        """The LoRA adapters as a PEFT folder (models/peft_io.py) on the run's base, tensors in
        ``dtype``: gathered to every host (they are small), written by process 0. ``one_rank``: every
        adapter padded to the largest rank (peft_io.save_adapter), for SGLang servers."""
        from jax.experimental import multihost_utils

        from genevolve_jax.models import peft_io
        train = multihost_utils.process_allgather(self.params["train"], tiled=True)
        model = self.setup.merge({"train": train, "frozen": self.params["frozen"]})
        base = self.lora_base()["path"]
        np_dtype = DTYPES[dtype]
        self.collective.on_writer(lambda: peft_io.save_adapter(model, path, base_model=base, dtype=np_dtype,
                                                                    one_rank=one_rank))
        return os.path.abspath(path)

    def export_hf(self, path: str, dtype: str) -> str:
        """An HF directory of the policy and its tokenizer (Collective.export_hf: every process
        writes its share, one ``rl.sync_bucket_bytes`` bucket at a time; process 0 the rest)."""
        tokenizer = self.tokenizer
        extra = None if tokenizer is None else tokenizer.save_pretrained
        return self.collective.export_hf(self.policy_model(), path, dtype=dtype,
                                         bucket_bytes=int(self.cfg.rl.sync_bucket_bytes), write_extra=extra)

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to ``total_steps``, save, export. Raises :class:`RunStopped` after saving the last
        completed step when preempted or after too many non-finite steps in a row."""
        self.logger.start(self.step)
        try:
            stop: RunStopped | None = None
            with self.preemption:
                while self.step < self.total_steps:
                    if self.train_one_step() is None:
                        break
                    if self.nonfinite.should_stop:
                        stop = RunStopped(self.nonfinite.stop_message(), exit_code=RunStopped.NON_FINITE,
                                          step=self.step, checkpoint_dir=self.ckpt.directory)
                        break
                    if self.preemption.should_stop(self.step):
                        why = self.preemption.signal_name or "a signal to another process"
                        stop = RunStopped(f"preempted ({why}) after step {self.step}", exit_code=RunStopped.PREEMPTED,
                                          step=self.step, checkpoint_dir=self.ckpt.directory)
                        break
            if self.step not in self.ckpt.all_steps():
                self.save(force=True)
            self.ckpt.wait()
            if stop is not None:   # saved; no export: a preempted job has seconds left
                stop.message += f"; saved checkpoint step {self.step} under {self.ckpt.directory}"
                print(f"genevolve: {stop.message}", flush=True)
                raise stop
            out: dict[str, Any] = {"steps": self.step, "losses": list(self.losses),
                                   "checkpoints": self.ckpt.all_steps()}
            out.update(self.export())
            return out
        finally:
            self.logger.close()

    def close(self) -> None:
        self.ckpt.close()
        self.logger.close()
