"""What differs between a one-process and a many-process evolve step, in one object.

The step's stages (train/rl/pipeline.py) are written once. Where hosts must cooperate they call a
:class:`Collective`:

- :meth:`Collective.gather_rollouts`: this host rolled out its share of the step's prompts; every
  host gets every host's samples, in global group order;
- :meth:`Collective.on_writer`: run a function on process 0 (the experience stage, a push to
  shared servers) and give its result to every process; an exception it raises is raised on every
  process;
- :meth:`Collective.sync_engine`: the rollout engine samples with new weights from now on, on every
  process, and every process holds the outcome (SGLang's per-server weight versions);
- :meth:`Collective.engine_params`: the policy's current weights as a fresh copy on THIS host's
  devices, in the layout its rollout engine wants;
- :meth:`Collective.exchange_metrics`: the bytes that crossed between hosts in the step;
- :meth:`Collective.export_hf`: the policy as an HF directory (the final export, the weight sync
  to SGLang servers).

Weights leave the trainer's layout bucket by bucket (sharding/weight_stream.py, bucket
``rl.sync_bucket_bytes``): a sync, an export or an engine's construction holds the run's resident
state plus one bucket, never a second copy of the model.

:class:`SingleProcess` does each of these directly; ``sharding.multihost.MultiProcess`` does them
across processes (objects through host memory, parameters over jax's collectives).
:func:`make_collective` picks one.
"""
from __future__ import annotations

import abc
import os
from typing import Any, Callable, Sequence, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from genevolve_jax.models.lora import merged_model
from genevolve_jax.models.qwen3_vl.layer_layout import is_stacked, leaf_rows, with_layout_of
from genevolve_jax.rollout.engine import RolloutEngine
from genevolve_jax.sharding import weight_stream
from genevolve_jax.train.rl.records import RolloutSample, StepRollouts

T = TypeVar("T")


class Collective(abc.ABC):
    """The cross-host operations of an evolve step (see the module docstring)."""

    @property
    @abc.abstractmethod
    def process_index(self) -> int:
        """This process's index (0 writes metrics, samples and exports)."""

    @property
    @abc.abstractmethod
    def process_count(self) -> int:
        """How many processes train together."""

    @property
    def is_writer(self) -> bool:
        return self.process_index == 0

    def group_ids(self, num_local: int, shard: tuple[int, int]) -> list[int]:
        """Global prompt indices within the step of this host's local prompts 0..num_local-1: the
        inverse of the strided host shard of data/rows.py (shard i of n reads i, i+n, …), so sample
        ids and seeds are those of a one-host run over the same data."""
        index, count = shard
        return [g * count + index for g in range(num_local)]

    @abc.abstractmethod
    def check_prompt_shard(self, shard: tuple[int, int], source: str) -> None:
        """Refuse a run in which the processes' prompt shards do not cover every prompt once."""

    @abc.abstractmethod
    def gather_rollouts(self, samples: Sequence[RolloutSample], info: dict, prompts: Sequence[Any],
                        group_ids: Sequence[int], *, group_size: int, step: int,
                        embed_rendered: bool = False) -> StepRollouts:
        """Every host's samples (group-major, identical on every process), the prompts in group
        order and the merged rollout info. ``embed_rendered``: rendered images travel as bytes
        (for process 0's sample dumps)."""

    @abc.abstractmethod
    def on_writer(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on process 0 only; its (picklable) result on every process. When ``fn``
        raises, every process raises: the same exception class with the same message."""

    @abc.abstractmethod
    def on_writer_shared(self, fn: Callable[[], T], adopt: Callable[[T], None]) -> T:
        """:meth:`on_writer`, for state that ``fn`` changed on process 0 and every process must hold
        (the experience memory): each other process calls ``adopt(result)``. Returns the result."""

    def sync_engine(self, engine: RolloutEngine, push: Callable[[], dict | None]) -> dict[str, float]:
        """Run ``push`` (``engine.update_weights(params, step)``, or ``engine.reload_weights(path,
        step)`` of an export) where it must run, and return its metrics on every process. An engine
        on this host's devices is pushed to by every process for itself. An engine that serves every
        host (SGLang URLs listing every host's servers) is pushed to by process 0 alone, and the
        others adopt its weight-sync state (which server holds which step), so that every process
        stops sending rollouts to a server that is behind and reports the same lag; when the push
        raises (WeightLagError, a failed reload), every process raises it."""
        if not engine.serves_every_host:
            return dict(push() or {})

        def push_and_state():
            return dict(push() or {}), engine.weight_sync_state()
        metrics, _ = self.on_writer_shared(push_and_state, adopt=lambda out: engine.adopt_weight_sync_state(out[1]))
        return metrics

    def exchange_metrics(self) -> dict[str, float]:
        """What crossed between processes since the last call (``multihost/gathered_bytes``: the
        pickled bytes of every gather and broadcast); nothing for one process."""
        return {}

    @abc.abstractmethod
    def engine_params(self, model: nnx.Module, shardings=None, *, bucket_bytes: int | None = None,
                      dtype=None) -> nnx.State:
        """A fresh copy of ``model``'s ``nnx.Param`` state on this host's devices, laid out by
        ``shardings`` (a tree of NamedShardings over a mesh of this host's devices, whose layer
        layout it takes: stacked or a list), moved at most ``bucket_bytes`` at a time (None: at
        once), floating-point leaves in ``dtype`` (None: as the trainer holds them; cast on the
        trainer's devices before they move); when ``shardings`` is None, as it is (one process) / replicated on this host's first
        device (several). Fresh buffers: the next train step donates the trainer's."""

    @abc.abstractmethod
    def mesh_devices(self, sharding_cfg) -> list | None:
        """The devices the run's mesh uses; None: all of them (``sharding.mesh`` over every device)."""

    @abc.abstractmethod
    def local_model(self, setup, params, shardings=None, *, bucket_bytes: int | None = None,
                    dtype=None) -> nnx.Module:
        """The policy on this host's devices: with ``shardings`` (as in :meth:`engine_params`), its
        parameters moved into them bucket by bucket, in their layer layout (a rollout engine's
        model); without, as the trainer holds it (one process) / replicated on this host's first
        device (several)."""

    @abc.abstractmethod
    def export_hf(self, model: nnx.Module, path: str, *, dtype: str, bucket_bytes: int, config=None,
                  write_extra: Callable[[str], None] | None = None) -> str:
        """Write ``model`` (the trainer's, as it is laid out) as an HF directory at ``path``,
        atomically (models/hf_io.atomic_directory), with ``config`` (default: the model's) and
        ``write_extra(directory)`` run by process 0 before the directory is complete (a tokenizer).
        Every process calls it; returns the absolute path."""

    @abc.abstractmethod
    def any_process(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on at least one (stop for a preemption)."""

    @abc.abstractmethod
    def all_processes(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on all of them (a checkpoint step restores)."""

    @abc.abstractmethod
    def barrier(self, name: str) -> None:
        """Wait until every process gets here (after process 0 moved files the others will read)."""


def _fresh_copy(tree):
    """A copy with its own buffers (jit outputs are new)."""
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t))(tree)


def params_in_layout(model: nnx.Module, shardings, bucket_bytes: int | None,
                     place: weight_stream.Placer, dtype=None) -> nnx.State:
    """``model``'s ``nnx.Param`` state in the layout of ``shardings`` (its layer layout, and a
    NamedSharding per leaf), moved bucket by bucket by ``place`` (weight_stream.stream_to_layout),
    floating-point leaves in ``dtype`` (None: as they are; weight_stream.float_pieces).
    A stacked trainer feeding a list-layout engine sends rows of its stacked parameters, so the
    list is never built whole in the trainer's layout first."""
    state = nnx.state(model, nnx.Param)
    if is_stacked(shardings) and not is_stacked(state):   # stacking takes every row at once
        state = nnx.state(with_layout_of(model, shardings), nnx.Param)
    if is_stacked(state) == is_stacked(shardings):
        template = state
    else:
        from genevolve_jax.models.hf_io import abstract_split
        template = abstract_split(model.config.replace(scan_layers=False))[1]
    sources = jax.tree.leaves(state)
    targets = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    pieces = weight_stream.float_pieces(sources, leaf_rows(state, shardings), dtype)
    arrays = weight_stream.stream_to_layout(sources, pieces, targets, bucket_bytes, place)
    return jax.tree.unflatten(jax.tree.structure(template), arrays)


def model_in_layout(setup, params, shardings, bucket_bytes: int | None, place: weight_stream.Placer,
                    dtype=None) -> nnx.Module:
    """The policy with its parameters in ``shardings`` (:func:`params_in_layout`, in ``dtype``) and
    its other variables (usually none) replicated on the same mesh. LoRA adapters are merged
    into the base first (models/lora.py): engines and exports hold the plain model they make."""
    from genevolve_jax.models.hf_io import abstract_split
    model = merged_model(setup.merge(params))
    state = params_in_layout(model, shardings, bucket_bytes, place, dtype)
    graphdef, _, rest = abstract_split(model.config.replace(scan_layers=is_stacked(shardings)))
    if jax.tree.leaves(setup.rest):
        if is_stacked(shardings) != bool(model.config.scan_layers):
            raise ValueError("local_model: the model holds non-parameter state; only parameters change layout")
        mesh = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))[0].mesh
        leaves, treedef = jax.tree.flatten(setup.rest)
        pieces = [weight_stream.piece(leaves, i) for i in range(len(leaves))]
        moved = weight_stream.stream_to_layout(leaves, pieces, [NamedSharding(mesh, PartitionSpec())] * len(leaves),
                                               bucket_bytes, place)
        rest = jax.tree.unflatten(treedef, moved)
    return nnx.merge(graphdef, state, rest)


_SELECTS: dict = {}


def _place_here(pieces, inputs, targets, moved) -> list:
    """One bucket in one process: the pieces taken by one jitted program, then put where they go
    (the engine's mesh may be other devices than the trainer's)."""
    key = tuple(pieces)
    if key not in _SELECTS:
        _SELECTS[key] = jax.jit(weight_stream.selector(pieces))
    taken = _SELECTS[key](list(inputs))
    out = [jax.device_put(a, sh) for a, sh in zip(taken, targets)]
    moved()
    return out


class SingleProcess(Collective):
    """One process holds every device: every operation is local."""

    @property
    def process_index(self) -> int:
        return 0

    @property
    def process_count(self) -> int:
        return 1

    def check_prompt_shard(self, shard: tuple[int, int], source: str) -> None:
        if tuple(shard) != (0, 1):
            raise ValueError(f"{source}: a one-process run reads every prompt, got shard (index, count) = "
                             f"{tuple(shard)}")

    def gather_rollouts(self, samples, info, prompts, group_ids, *, group_size, step, embed_rendered=False):
        order = sorted(range(len(prompts)), key=lambda i: group_ids[i])
        by_group = sorted(samples, key=lambda s: int(s.group))   # stable: rollout k stays k-th
        return StepRollouts(tuple(by_group), tuple(prompts[i] for i in order), dict(info))

    def on_writer(self, fn):
        return fn()

    def on_writer_shared(self, fn, adopt):
        return fn()    # the one process is the writer: its state is already the shared state

    def engine_params(self, model, shardings=None, *, bucket_bytes=None, dtype=None):
        if shardings is None:
            return _fresh_copy(nnx.state(model, nnx.Param))
        return params_in_layout(model, shardings, bucket_bytes, _place_here, dtype)

    def mesh_devices(self, sharding_cfg):
        # Every axis fixed and asking for fewer devices than are present (tiny_cpu's one-device
        # mesh on a machine with 8): the first ones.
        sizes = [int(sharding_cfg.mesh.get(a, 1)) for a in sharding_cfg.mesh.keys()]
        if -1 in sizes:
            return None
        n = 1
        for s in sizes:
            n *= s
        return jax.devices()[:n] if n < jax.device_count() else None

    def local_model(self, setup, params, shardings=None, *, bucket_bytes=None, dtype=None):
        if shardings is None:
            return merged_model(setup.merge(params))
        return model_in_layout(setup, params, shardings, bucket_bytes, _place_here, dtype)

    def export_hf(self, model, path, *, dtype, bucket_bytes, config=None, write_extra=None):
        # One process reads each tensor straight from its shards into host memory (save_pretrained
        # streams them one at a time): no device holds more than one tensor's row of a stack.
        from genevolve_jax.models.hf_io import atomic_directory, save_pretrained
        with atomic_directory(path) as partial:
            save_pretrained(model, partial, dtype=dtype, config=config)
            if write_extra is not None:
                write_extra(partial)
        return os.path.abspath(path)

    def any_process(self, flag):
        return bool(flag)

    def all_processes(self, flag):
        return bool(flag)

    def barrier(self, name):
        pass


def make_collective() -> Collective:
    """SingleProcess in a one-process job, else MultiProcess."""
    if jax.process_count() == 1:
        return SingleProcess()
    from genevolve_jax.sharding.multihost import MultiProcess
    return MultiProcess()
