"""Training checkpoints: an orbax CheckpointManager over (params, optimiser state, metadata).

Each saved step holds three items:
- ``params``: ``{"train", "frozen"}`` parameter trees (orbax StandardSave, sharded arrays);
- ``opt_state``: the optax state;
- ``meta``: JSON with the step, the RNG key data, the data iterator's state, the experience memory
  and the reward history (for the curve), so a killed run resumes exactly.

Saves are asynchronous (the step loop continues while arrays are written) every ``save_every``
steps, keeping the last ``keep``. A restore takes the *abstract* target of the current run
(:func:`abstract_like`: shapes, dtypes and the current shardings), so a checkpoint written under
one mesh/strategy restores under another: orbax reads each shard the new layout needs.

Trust. Orbax writes a step under ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>`` only
after every item is written (``AtomicRenameTemporaryPath`` on local and POSIX file systems), so a
process killed mid-save leaves a tmp directory that is never listed as a step (and is removed at
the next start, ``cleanup_tmp_directories``). A listed step can still fail to restore: a file
truncated or deleted afterwards, a tree that does not fit. :meth:`TrainCheckpointer.restore` then
logs the step and the reason, tries the next older step, and moves the steps it skipped to
``<directory>/unrestorable/`` (with a ``REASON.txt``) so that the run can save those step numbers
again. On several processes every attempt's outcome is agreed (any process failing fails it for
all), so no process restores a step another skipped.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from genevolve_jax.config_checks import Checker

log = logging.getLogger(__name__)

UNRESTORABLE_DIR = "unrestorable"
EXPORT_DTYPES = ("float32", "bfloat16")   # of the HF exports (sft_run, rl, rl.sglang)


def default_checkpoint_config() -> ml_collections.ConfigDict:
    """The ``checkpoint`` section (all ours)."""
    return ml_collections.ConfigDict({"save_every": 50, "keep": 3, "async_save": True, "resume": True})


def validate_checkpoint(cfg) -> ml_collections.ConfigDict:
    check = Checker("checkpoint")
    check.integer(cfg.save_every, "save_every", 1, ">= 1")
    check.integer(cfg.keep, "keep", 1, ">= 1")
    check.boolean(cfg.async_save, "async_save")
    check.boolean(cfg.resume, "resume")
    return cfg


class CheckpointError(ValueError):
    """A checkpoint that does not fit the run (missing item, wrong tree or metadata)."""


class UnrestorableStep(CheckpointError):
    """One saved step that does not restore; ``reason`` says why in one line."""

    def __init__(self, directory: str, step: int, reason: str):
        self.step, self.reason = step, reason
        super().__init__(f"checkpoint step {step} under {directory} {reason}")


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of ``tree`` carrying ``shardings`` (a tree of the same structure whose
    leaves sit where ``tree`` holds arrays or nnx Variables)."""
    from flax import nnx

    def one(sharding, x):
        if isinstance(x, nnx.Variable):
            v = x.get_value()
            return x.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, shardings, tree)


def rng_to_json(key: jax.Array) -> dict:
    data = np.asarray(jax.random.key_data(key))
    return {"impl": str(jax.random.key_impl(key)), "data": data.tolist(), "dtype": str(data.dtype)}


def rng_from_json(d: dict) -> jax.Array:
    try:
        data = np.asarray(d["data"], dtype=d.get("dtype", "uint32"))
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint meta key 'rng' is malformed: {exc}") from None
    return jax.random.wrap_key_data(data)


def _jsonable(obj: Any) -> Any:
    """Make iterator states JSON-safe (bytes → latin-1 tagged strings, numpy → python)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bytes):
        return {"__bytes__": obj.decode("latin-1")}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def _unjson(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__bytes__"}:
            return obj["__bytes__"].encode("latin-1")
        return {k: _unjson(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unjson(v) for v in obj]
    return obj


@dataclasses.dataclass(frozen=True)
class SkippedStep:
    """A saved step that did not restore, and why (the first line of the error)."""
    step: int
    reason: str
    moved_to: str | None = None   # where it was set aside (``<directory>/unrestorable/<step>-<time>``)

    def log_line(self) -> str:
        where = f"; moved to {self.moved_to}" if self.moved_to else ""
        return f"checkpoint step {self.step} skipped: {self.reason}{where}"


@dataclasses.dataclass
class Restored:
    step: int
    params: Any
    opt_state: Any
    meta: dict
    skipped: list[SkippedStep] = dataclasses.field(default_factory=list)  # newer steps that failed


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(exc).__name__}: {line[:limit]}"


class TrainCheckpointer:
    """Async keep-last-k checkpoints of a train run under ``directory``."""

    def __init__(self, directory: str | os.PathLike, *, save_every: int = 50, keep: int = 3,
                 async_save: bool = True, collective=None):
        """``collective``: the run's train.collective.Collective (every process agrees on which step
        restores); None is one process."""
        import orbax.checkpoint as ocp

        from genevolve_jax.sharding.collective import SingleProcess
        self.collective = collective or SingleProcess()

        if save_every < 1:
            raise ValueError(f"checkpoint.save_every must be >= 1, got {save_every}")
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = save_every
        # cleanup_tmp_directories: a save killed midway left ``<step>.orbax-checkpoint-tmp``;
        # it is never listed as a step, and is removed here so the step can be saved again.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self._ocp = ocp
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("params", "opt_state", "meta"))

    def should_save(self, step: int) -> bool:
        return step > 0 and step % self.save_every == 0

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, params, opt_state, meta: dict, *, force: bool = False) -> bool:
        """Start an async save of this step (returns at once; arrays are copied first, so the step
        loop may donate them). ``meta`` must be JSON-serialisable after :func:`_jsonable`."""
        ocp = self._ocp
        meta = _jsonable(dict(meta, step=int(step)))
        try:
            json.dumps(meta)
        except TypeError as exc:
            raise CheckpointError(f"checkpoint meta is not JSON-serialisable: {exc}") from None
        return self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, abstract_params, abstract_opt_state, step: int | None = None) -> Restored:
        """Restore into the given abstract trees (their shardings).

        With ``step``, that step or a :class:`CheckpointError`. Without, the newest step that
        restores: each newer one that fails is logged (step and reason), listed in
        ``Restored.skipped`` and moved to ``<directory>/unrestorable/``. When none restores, the
        error names every step and its reason."""
        if step is not None:
            return self._restore_step(int(step), abstract_params, abstract_opt_state)
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint under {self.directory}")
        failed: list[SkippedStep] = []
        for candidate in steps:
            error: UnrestorableStep | None = None
            try:
                out = self._restore_step(candidate, abstract_params, abstract_opt_state)
            except UnrestorableStep as exc:
                error = exc
            if self.collective.all_processes(error is None):
                return dataclasses.replace(out, skipped=self._set_aside(failed))
            reason = error.reason if error is not None else "restored here but not on another process"
            failed.append(SkippedStep(candidate, reason))
            older = [s for s in steps if s < candidate]
            log.warning("checkpoint step %d under %s %s; %s", candidate, self.directory, reason,
                        f"trying step {older[0]}" if older else "no older step to try")
        lines = "; ".join(f"step {f.step}: {f.reason}" for f in failed)
        raise CheckpointError(f"no checkpoint under {self.directory} restores: {lines}")

    def _restore_step(self, step: int, abstract_params, abstract_opt_state) -> Restored:
        ocp = self._ocp
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params),
                opt_state=ocp.args.StandardRestore(abstract_opt_state), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as exc:
            # Orbax raises these for a tree or an item that does not match, and for a JSON file cut short.
            raise UnrestorableStep(self.directory, step, "does not fit this run (model, its layer layout "
                                   "model.scan_layers, optimiser or strategy tree differs) or is damaged: "
                                   f"{_first_line(exc)}") from exc
        except Exception as exc:  # noqa: BLE001 — tensorstore read errors arrive as a bare Exception
            if "RESOURCE_EXHAUSTED" in str(exc):  # out of device memory: the step may be fine, say so
                raise
            raise UnrestorableStep(self.directory, step, "cannot be read (a truncated or missing file): "
                                   f"{_first_line(exc)}") from exc
        meta = out["meta"]
        if not isinstance(meta, dict):
            raise UnrestorableStep(self.directory, step, f"has a meta of type {type(meta).__name__}, not a JSON object")
        meta = _unjson(dict(meta))
        if int(meta.get("step", -1)) != int(step):
            raise UnrestorableStep(self.directory, step, f"has a meta that says step {meta.get('step')!r}")
        return Restored(int(step), out["params"], out["opt_state"], meta)

    def _set_aside(self, failed: list[SkippedStep]) -> list[SkippedStep]:
        """Move the steps that did not restore out of the manager's listing (process 0 moves;
        everyone waits), so that the resumed run saves those step numbers afresh."""
        if not failed:
            return []
        dest_root = os.path.join(self.directory, UNRESTORABLE_DIR)
        out = []
        for f in failed:
            dest = os.path.join(dest_root, f"{f.step}-{time.strftime('%Y%m%dT%H%M%S')}")
            if self.collective.is_writer:
                os.makedirs(dest_root, exist_ok=True)
                src = os.path.join(self.directory, str(f.step))
                if os.path.isdir(src):
                    shutil.move(src, dest)
                    with open(os.path.join(dest, "REASON.txt"), "w") as fh:
                        fh.write(f.reason + "\n")
            out.append(dataclasses.replace(f, moved_to=dest))
            log.warning("%s", out[-1].log_line())
        self.collective.barrier("genevolve_checkpoint_set_aside")
        self.manager.reload()
        return out

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def export_hf(model, path: str | os.PathLike, *, dtype: str = "bfloat16", tokenizer=None) -> list[str]:
    """HF-format export of the policy ``model`` (config.json + safetensors, read tensor by tensor),
    plus the tokenizer.

    Written under ``<path>.partial`` and renamed when complete (:func:`hf_io.atomic_directory`), so
    ``path`` never holds a half-written export, whatever kills the process."""
    from genevolve_jax.models.hf_io import atomic_directory, save_pretrained

    with atomic_directory(path) as partial:
        written = save_pretrained(model, partial, dtype=dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
    return written
