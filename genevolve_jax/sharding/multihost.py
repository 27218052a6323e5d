"""The multi-process :class:`~genevolve_jax.sharding.collective.Collective`: what an evolve step does
across hosts, over jax's multi-process collectives.

A ``genevolve train`` over several processes (``make_collective`` picks this class) runs the same pipeline as one
process; where they differ, :class:`MultiProcess` does:

1. Each process reads ITS prompts (the prompt pool's host shard, ``data.sharding``) and rolls them
   out through a HOST-LOCAL engine (its own devices, no collectives), with GLOBAL group indices:
   local prompt g of shard i of n is global prompt ``g·n + i``. So the step's global prompt order,
   the sample ids and the sampling seeds are those of a single-host run over the same data.
2. :meth:`MultiProcess.gather_rollouts`: every process all-gathers every process's samples
   (pickled; images travel as their files' bytes) and orders them by global group; from there on
   every process holds the identical global list, and masking, advantages, batch assembly and the
   sharded train step run unchanged. Objects cross hosts through host memory only
   (:mod:`~genevolve_jax.sharding.host_exchange`: TCP to process 0, no device array), and
   :meth:`MultiProcess.exchange_metrics` reports the bytes of each step (``multihost/gathered_bytes``).
3. :meth:`MultiProcess.on_writer`: the experience stage (a summariser that calls a model is not
   deterministic across hosts) and pushes to shared SGLang servers run on process 0; the result is
   broadcast, which is also the barrier the others wait at. An exception raised there is broadcast
   in its place and raised again on every process, so none waits for a timeout. After a push to
   SGLang every process adopts process 0's table of server weight versions
   (``Collective.sync_engine``).
4. :meth:`MultiProcess.engine_params`: :func:`host_local_params` turns the fsdp-sharded global
   params into an array tree on this host's devices, one bucket (``rl.sync_bucket_bytes``) per
   jitted reshard (no host-memory copy), in the layout the host's engine wants.
5. :meth:`MultiProcess.export_hf`: every process writes the safetensors files of its share of the
   tensors, which reach it by all-to-all, one bucket per round; process 0 writes the index and the
   config (models/hf_sharded_export.py says why this, rather than gathering to process 0).
"""
from __future__ import annotations

import atexit
import collections
import dataclasses
import io
import math
import os
import pickle
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from genevolve_jax.models.layers import LoRAParam
from genevolve_jax.sharding import weight_stream
from genevolve_jax.sharding.collective import Collective, model_in_layout, params_in_layout
from genevolve_jax.sharding.host_exchange import HostExchange
from genevolve_jax.train.rl.records import IMAGE_UNREADABLE, RolloutSample, StepRollouts


# --- objects between processes, through host memory --------------------------------------------
def _bootstrap_broadcast(data: bytes | None) -> bytes:
    """Process 0's bytes on every process over jax's collectives: used once, to hand the host
    exchange its address and token (a few hundred bytes); nothing else crosses this way."""
    source = jax.process_index() == 0
    sent = np.frombuffer(data, np.uint8) if source else np.zeros(0, np.uint8)
    n = int(np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(sent.size, np.int32))))
    out = np.asarray(multihost_utils.broadcast_one_to_all(sent if source else np.zeros(n, np.uint8)))
    return data if source else out.tobytes()


_EXCHANGE: list[HostExchange] = []


def host_exchange() -> HostExchange:
    """This process's :class:`~genevolve_jax.sharding.host_exchange.HostExchange`, set up at the
    first call (a collective: every process makes its first cross-host call at the same point)."""
    if not _EXCHANGE:
        _EXCHANGE.append(HostExchange(jax.process_index(), jax.process_count(), _bootstrap_broadcast))
        # Closed before jax.distributed's own exit handler (atexit runs the last registered first),
        # which waits at a barrier for every process: a process that exits on an error closes its
        # connections, so the others raise at their next exchange and reach that barrier too.
        atexit.register(_EXCHANGE[0].close)
    return _EXCHANGE[0]


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in process order, on every process: pickled, and all-gathered
    through host memory (the host exchange; no device array at any point)."""
    return [pickle.loads(b) for b in host_exchange().allgather(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))]


def broadcast_object(obj: Any = None) -> Any:
    """Process 0's ``obj`` on every process (the others pass anything, e.g. None), through host memory.

    Why: results computed on process 0 alone (the experience stage, a server reload) must be the
    same on every process. A collective, so it is also a barrier."""
    if jax.process_index() == 0:
        host_exchange().broadcast(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        return obj
    return pickle.loads(host_exchange().broadcast(None))


class WriterActionError(RuntimeError):
    """Process 0's writer-only action raised an exception that cannot be rebuilt here (its class
    does not unpickle on this process); the message names its type and repeats its message."""


def _outcome(fn: Callable[[], Any]) -> tuple[Any, bytes, BaseException | None]:
    """``fn()`` on the writer: (result, what the others get, the exception it raised or None).
    Pickling the result is part of the action: a result that does not pickle fails everywhere."""
    try:
        result = fn()
        return result, pickle.dumps((True, result), protocol=pickle.HIGHEST_PROTOCOL), None
    except BaseException as exc:       # noqa: BLE001 - re-raised by the caller, after the others hear of it
        kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
        try:   # the exception itself when it survives the trip (same class, same message)
            sent = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
            back = pickle.loads(sent)
            if type(back) is not type(exc) or str(back) != str(exc):
                sent = None
        except Exception:               # noqa: BLE001 - a class that does not pickle: type and message go
            sent = None
        return None, pickle.dumps((False, (kind, str(exc), sent)), protocol=pickle.HIGHEST_PROTOCOL), exc


def _raise_writer_failure(kind: str, message: str, sent: bytes | None) -> None:
    exc: BaseException | None = None
    if sent is not None:
        try:
            exc = pickle.loads(sent)
        except Exception:               # noqa: BLE001 - its class is not importable here
            exc = None
    if exc is None:
        raise WriterActionError(f"{kind}: {message}")
    exc.add_note(f"raised by process 0 in a writer-only action; raised again on process {jax.process_index()}")
    raise exc


# --- samples ---------------------------------------------------------------------------------------
def _load_image(data: bytes):
    from genevolve_jax.processing.image import load_image
    return load_image(io.BytesIO(data))


class _ImageBytes:
    """A file's bytes that unpickle as a decoded PIL image: an image travels compressed, and the
    receiver needs neither the sender's file system nor a second code path (batch assembly takes
    PIL images as well as paths)."""

    def __init__(self, data: bytes):
        self.data = data

    def __reduce__(self):
        return _load_image, (self.data,)


def portable_samples(samples: Sequence[RolloutSample], *, embed_rendered: bool = False) -> list[RolloutSample]:
    """``samples`` made readable on another host: the files behind their image placeholders travel
    as bytes (a sample whose file cannot be read is masked here, by its owner, with
    ``image_unreadable``, so that no process reads it differently), and with ``embed_rendered`` the
    rendered image (``extra["image_path"]``) travels as ``extra["image_bytes"]`` for sample dumps."""
    out = []
    for s in samples:
        images, unreadable = [], None
        for im in s.images:
            if isinstance(im, (str, os.PathLike)):
                try:
                    with open(im, "rb") as f:
                        im = _ImageBytes(f.read())
                except OSError as exc:
                    unreadable = f"{IMAGE_UNREADABLE}: {im} ({type(exc).__name__})"
            images.append(im)
        extra = dict(s.extra)
        path = extra.get("image_path") if embed_rendered else None
        if path and os.path.exists(path):
            with open(path, "rb") as f:
                extra["image_bytes"] = (os.path.splitext(path)[1] or ".png", f.read())
        s = dataclasses.replace(s, images=tuple(images), extra=extra)
        out.append(s.masked(unreadable) if unreadable and s.valid else s)
    return out


def order_samples(per_process: Sequence[Sequence]) -> list:
    """Concatenate per-process sample lists and order them by global group. The sort is stable
    and a group lives on one process, so rollout k of a group stays at position k."""
    merged = [s for samples in per_process for s in samples]
    return sorted(merged, key=lambda s: int(s.group))


def gather_samples(samples: Sequence, payload: Any = None) -> tuple[list, list]:
    """Every process's samples, ordered by global group, plus each process's ``payload`` (in
    process order). Why: advantages, the experience stage and the train step need the whole step's
    samples, and every process must assemble exactly the same batch for the sharded step."""
    got = allgather_objects((list(samples), payload))
    return order_samples([g[0] for g in got]), [g[1] for g in got]


def merge_rollout_infos(infos: Sequence[dict], weights: Sequence[float]) -> dict:
    """One step's rollout info from every process's: ``time/*`` is the slowest process's (the step
    waits for it), ``masked_reasons`` add up, ``reward_dims`` are means weighted by each process's
    judged samples (exact when every judged sample reports every dimension); other keys: process 0's."""
    out = dict(infos[0]) if infos else {}
    for key in {k for info in infos for k in info}:
        vals = [(info[key], w) for info, w in zip(infos, weights) if key in info]
        if key.startswith("time/"):
            out[key] = max(float(v) for v, _ in vals)
        elif key == "masked_reasons":
            total: collections.Counter = collections.Counter()
            for v, _ in vals:
                total.update(dict(v or {}))
            out[key] = dict(total)
        elif key == "reward_dims":
            sums: dict[str, float] = collections.defaultdict(float)
            mass: dict[str, float] = collections.defaultdict(float)
            for v, w in vals:
                for name, x in (v or {}).items():
                    sums[name] += float(x) * w
                    mass[name] += w
            out[key] = {name: sums[name] / mass[name] if mass[name] else 0.0 for name in sums}
    return out


# --- params on this host -----------------------------------------------------------------------------
def _sorted_local() -> list:
    return sorted(jax.local_devices(), key=lambda d: d.id)


_TWINS: dict = {}


def _twin_mesh(local_mesh: Mesh) -> Mesh:
    """A global mesh ("hosts", "replicas", *local axes) over every device: process p's block
    arranges p's devices as ``local_mesh`` arranges this process's (by position among the
    process's devices, sorted by id), and when the local mesh uses only some of a process's
    devices the others form further replicas of that arrangement. A sharding over the local axes
    then puts, on every host, the shards that ``local_mesh``'s sharding would."""
    key = (local_mesh.devices.shape, local_mesh.axis_names, tuple(d.id for d in local_mesh.devices.flat))
    if key in _TWINS:
        return _TWINS[key]
    layout = twin_layout(local_mesh, _sorted_local())
    # Every process must build the same global mesh: check that they all arrange alike.
    seen = allgather_objects(layout.tolist())
    if any(x != seen[0] for x in seen):
        raise ValueError("host_local_params: the processes' local meshes arrange their devices differently")
    twin = twin_mesh(layout, jax.devices(), local_mesh.axis_names)
    _TWINS[key] = twin
    return twin


def twin_layout(local_mesh: Mesh, local: Sequence) -> np.ndarray:
    """[replicas, *local_mesh.shape]: replica 0 is ``local_mesh``'s devices by position among
    ``local`` (its process's devices, sorted by id); the process's other devices form further
    replicas of the same arrangement."""
    position = {d.id: i for i, d in enumerate(local)}
    try:
        ordinals = np.vectorize(lambda d: position[d.id], otypes=[np.int64])(local_mesh.devices)
    except KeyError:
        raise ValueError("host_local_params: the local mesh must use only this process's devices") from None
    if len(local) % ordinals.size:
        raise ValueError(f"host_local_params: a local mesh of {ordinals.size} devices does not tile this "
                         f"process's {len(local)} devices")
    others = [i for i in range(len(local)) if i not in set(ordinals.flat)]
    return np.stack([ordinals] + [np.asarray(others[k:k + ordinals.size]).reshape(ordinals.shape)
                                  for k in range(0, len(others), ordinals.size)])


def twin_mesh(layout: np.ndarray, devices: Sequence, axis_names: Sequence[str]) -> Mesh:
    """The global mesh ("hosts", "replicas", *axis_names) over ``devices`` (every process's, real or
    a deviceless target's): ``layout[r]`` arranges, by position among a process's devices sorted
    by id, the devices of replica r of the local mesh (replica 0: the local mesh itself)."""
    by_process = collections.defaultdict(list)
    for d in devices:
        by_process[d.process_index].append(d)
    counts = {p: len(v) for p, v in by_process.items()}
    if len(set(counts.values())) != 1 or sorted(counts) != list(range(len(counts))):
        raise ValueError(f"host_local_params: every process must hold as many devices, got {counts}")
    grid = np.empty((len(by_process),) + layout.shape, dtype=object)
    for p in range(len(by_process)):
        devs = sorted(by_process[p], key=lambda d: d.id)
        grid[p] = np.vectorize(lambda i: devs[i], otypes=[object])(layout)
    names = ("hosts", "replicas") + tuple(axis_names)
    return Mesh(grid, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


_COPIERS: dict = {}


def _place_on_host(pieces, inputs, targets, moved) -> list:
    """One bucket of :func:`host_local_params`: one jitted program reads the global inputs and
    writes the pieces in the global twin of each target (replicated across hosts, laid out like
    the target within each); each host keeps the shards on its local mesh as a local array."""
    every = set(jax.devices())
    for x in inputs:
        if set(x.sharding.device_set) != every:
            raise ValueError("host_local_params: the arrays must span every device of every process "
                             f"(got {len(x.sharding.device_set)} of {len(every)})")
    twins = tuple(NamedSharding(_twin_mesh(sh.mesh), sh.spec) for sh in targets)
    key = (tuple(pieces), twins)
    if key not in _COPIERS:
        _COPIERS[key] = jax.jit(weight_stream.selector(pieces), out_shardings=list(twins))
    out = _COPIERS[key](list(inputs))
    mine = []
    for x, sh in zip(out, targets):
        keep = set(sh.mesh.devices.flat)
        mine.append(jax.make_array_from_single_device_arrays(
            x.shape, sh, [s.data for s in x.addressable_shards if s.device in keep]))
    moved()   # ``out``, with the copies on this host's devices outside the local mesh, is still alive
    return mine


def host_local_params(tree, shardings, *, bucket_bytes: int | None = None) -> Any:
    """A copy of ``tree`` (global arrays over every device, e.g. fsdp-sharded across processes) on
    THIS process's devices, laid out by ``shardings`` (one NamedSharding over a local mesh, or a
    matching tree), moved at most ``bucket_bytes`` at a time (None: in one program).

    Why not ``process_allgather``: it returns numpy, so on GPU/TPU every host pulls the whole model
    into host memory and then copies it back to its devices. Here each bucket is one jitted
    reshard that targets a global twin of the local sharding (replicated across hosts, laid out
    like the local mesh within each), and each host keeps the shards on its local mesh as a local
    array: device-to-device collectives, no host copy. Devices of the host outside the local mesh
    hold a copy of the bucket while it moves (the twin must span every device), so buckets bound
    that too. A collective: every process must call it. The result owns fresh buffers (the next
    train step may donate ``tree``)."""
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree
    if isinstance(shardings, NamedSharding):
        local = [shardings] * len(leaves)
    else:
        local = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
        if len(local) != len(leaves):
            raise ValueError(f"host_local_params: {len(local)} shardings for {len(leaves)} arrays")
    pieces = [weight_stream.piece(leaves, i) for i in range(len(leaves))]
    return jax.tree.unflatten(treedef, weight_stream.stream_to_layout(leaves, pieces, local, bucket_bytes,
                                                                      _place_on_host))


def local_mesh(sizes: dict | None = None) -> Mesh:
    """A 4-axis mesh over this process's devices (default: its first device)."""
    from genevolve_jax.sharding.logical import MESH_AXES
    from genevolve_jax.sharding.mesh import make_mesh
    sizes = {a: int((sizes or {}).get(a, 1)) for a in MESH_AXES}
    n = math.prod(sizes.values())
    devices = _sorted_local()
    if n > len(devices):
        raise ValueError(f"engine.mesh asks for {n} devices, this process has {len(devices)}")
    return make_mesh(sizes, devices[:n])


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


class MultiProcess(Collective):
    """Several processes, each with its own devices, train one global state (module docstring)."""

    def __init__(self):
        self._reported = 0        # the host exchange's byte count at the last exchange_metrics()

    @property
    def process_index(self) -> int:
        return jax.process_index()

    @property
    def process_count(self) -> int:
        return jax.process_count()

    def check_prompt_shard(self, shard: tuple[int, int], source: str) -> None:
        """Every global prompt must belong to exactly one process: the shard counts equal the
        number of processes and the shard indices are a permutation of them."""
        shards = allgather_objects(tuple(int(x) for x in shard))
        n = self.process_count
        if {c for _, c in shards} != {n} or sorted(i for i, _ in shards) != list(range(n)):
            raise ValueError(f"{source}: a multi-process run needs one prompt shard per process ({n}), got "
                             f"(shard_index, shard_count) per process {list(shards)}; set data.sharding="
                             f"'jax_process' ('none' makes every host roll out the same prompts)")

    def gather_rollouts(self, samples, info, prompts, group_ids, *, group_size, step, embed_rendered=False):
        judged = sum(1 for s in samples if s.trains)
        mine = portable_samples(samples, embed_rendered=embed_rendered and not self.is_writer)
        merged, payloads = gather_samples(mine, {"prompts": list(zip(group_ids, prompts)), "info": info,
                                                 "judged": judged})
        by_group = sorted((gp for pl in payloads for gp in pl["prompts"]), key=lambda gp: gp[0])
        sizes = collections.Counter(int(s.group) for s in merged)
        if [g for g, _ in by_group] != list(range(len(by_group))) or len(sizes) != len(by_group) or \
                any(sizes.get(g, 0) != group_size for g in range(len(by_group))):
            raise ValueError(f"step {step}: the processes' rollouts do not cover global prompts "
                             f"0..{len(by_group) - 1} with {group_size} rollouts each (groups seen: "
                             f"{dict(sorted(sizes.items()))})")
        info = merge_rollout_infos([pl["info"] for pl in payloads], [pl["judged"] for pl in payloads])
        return StepRollouts(tuple(merged), tuple(p for _, p in by_group), info)

    def on_writer(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on process 0, its result on every process. An exception in ``fn`` (or a result
        that does not pickle) is raised again on every process, same class and message (or a
        WriterActionError naming both), as soon as process 0 has it: nobody waits for a timeout."""
        if self.is_writer:
            result, sent, failure = _outcome(fn)
            host_exchange().broadcast(sent)
            if failure is not None:
                raise failure
            return result
        ok, value = pickle.loads(host_exchange().broadcast(None))
        if not ok:
            _raise_writer_failure(*value)
        return value

    def on_writer_shared(self, fn: Callable[[], Any], adopt: Callable[[Any], None]) -> Any:
        out = self.on_writer(fn)
        if not self.is_writer:
            adopt(out)
        return out

    def engine_params(self, model, shardings=None, *, bucket_bytes=None, dtype=None):
        if shardings is None:
            return host_local_params(nnx.state(model, nnx.Param), _replicated(local_mesh()), bucket_bytes=bucket_bytes)
        return params_in_layout(model, shardings, bucket_bytes, _place_on_host, dtype)

    def mesh_devices(self, sharding_cfg):
        return None   # a multi-process mesh spans every process's devices

    def local_model(self, setup, params, shardings=None, *, bucket_bytes=None, dtype=None):
        if shardings is None:
            mesh = local_mesh()
            # The policy's parameters without adapters: the tree of the merged model it will be.
            base = nnx.state(setup.merge(params), nnx.All(nnx.Param, nnx.Not(LoRAParam)))
            shardings = jax.tree.map(lambda _: _replicated(mesh), base)
        return model_in_layout(setup, params, shardings, bucket_bytes, _place_on_host, dtype)

    def export_hf(self, model, path, *, dtype, bucket_bytes, config=None, write_extra=None):
        from genevolve_jax.models import hf_io, hf_sharded_export
        config = config or model.config
        plan = hf_sharded_export.plan_export(config, self.process_count, dtype=dtype)
        partial = self.on_writer(lambda: hf_io.begin_directory(path))
        # Every process writes into the directory process 0 created: it must see it.
        if not self.all_processes(os.path.isdir(partial)):
            if self.is_writer:
                hf_io.abort_directory(path)
            raise RuntimeError(f"HF export to {os.path.abspath(path)}: process {self.process_index} "
                               f"{'sees' if os.path.isdir(partial) else 'does not see'} the directory {partial} that "
                               "process 0 created, and some process does not; every process writes its share of "
                               "the export, so the path must be on a file system that every host mounts")
        error = None
        try:
            hf_sharded_export.write_share(model, partial, plan, bucket_bytes)
        except Exception as exc:   # noqa: BLE001 — every process learns of it below, then raises
            error = exc
        if self.any_process(error is not None):
            if self.is_writer:
                hf_io.abort_directory(path)
            if error is not None:
                raise error
            raise RuntimeError(f"HF export to {os.path.abspath(path)}: another process failed to write its share")

        def finish():
            hf_sharded_export.write_metadata(partial, plan, config)
            if write_extra is not None:
                write_extra(partial)
            return hf_io.commit_directory(path)
        return self.on_writer(finish)

    # Decisions that change what a process does next must come out the same on every process:
    # one boolean all-gather each (a collective: every process calls it, in the same order).
    def any_process(self, flag):
        return any(allgather_objects(bool(flag)))

    def all_processes(self, flag):
        return all(allgather_objects(bool(flag)))

    def barrier(self, name):
        names = allgather_objects(str(name))
        if len(set(names)) > 1:
            raise RuntimeError(f"barrier: the processes wait at different barriers, per process {names}")

    def exchange_metrics(self):
        moved = _EXCHANGE[0].moved_bytes if _EXCHANGE else 0     # local: never sets the exchange up
        since, self._reported = moved - self._reported, moved
        return {"multihost/gathered_bytes": float(since)}
