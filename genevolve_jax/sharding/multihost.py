"""The multi-process :class:`~genevolve_jax.sharding.collective.Collective`: what an evolve step does
across hosts, over jax's multi-process collectives.

A ``genevolve train`` over several processes (``make_collective`` picks this class) runs the same pipeline as one
process; where they differ, :class:`MultiProcess` does:

1. Each process reads ITS prompts (the prompt pool's host shard, ``data.sharding``) and rolls them
   out through a HOST-LOCAL engine (its own devices, no collectives), with GLOBAL group indices:
   local prompt g of shard i of n is global prompt ``g·n + i``. So the step's global prompt order,
   the sample ids and the sampling seeds are those of a single-host run over the same data.
2. :meth:`MultiProcess.gather_rollouts`: every process all-gathers every process's samples
   (pickled bytes, padded to the longest; images travel as bytes) and orders them by global group;
   from there on every process holds the identical global list, and masking, advantages, batch
   assembly and the sharded train step run unchanged.
3. :meth:`MultiProcess.on_writer`: the experience stage (a summariser that calls a model is not
   deterministic across hosts) and pushes to shared SGLang servers run on process 0; the result is
   broadcast, which is also the barrier the others wait at.
4. :meth:`MultiProcess.engine_params`: :func:`host_local_params` turns the fsdp-sharded global
   params into an array tree on this host's devices with one jitted reshard (no host-memory copy),
   in the layout the host's engine wants.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import math
import os
import pickle
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from genevolve_jax.sharding.collective import Collective
from genevolve_jax.train.rl.records import IMAGE_UNREADABLE, RolloutSample, StepRollouts


# --- objects over collectives -------------------------------------------------------------------
def _encode(obj: Any) -> np.ndarray:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    if len(data) >= 2 ** 31:
        raise ValueError(f"cannot send {len(data)} bytes between processes in one piece (limit 2 GiB)")
    return np.frombuffer(data, np.uint8)


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in process order, on every process.

    Why bytes: samples are ragged Python objects (token lists, trajectories, images), and the
    collectives move arrays of one shape. So each process pickles, the byte counts are gathered
    first, every buffer is padded to the longest, and one ``process_allgather`` moves them."""
    data = _encode(obj)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [pickle.loads(rows[p, :int(n)].tobytes()) for p, n in enumerate(sizes)]


def broadcast_object(obj: Any = None) -> Any:
    """Process 0's ``obj`` on every process (the others pass anything, e.g. None).

    Why: results computed on process 0 alone (the experience stage, a server reload) must be the
    same on every process. The length goes first so that the receivers can allocate the buffer.
    A collective, so it is also a barrier."""
    source = jax.process_index() == 0
    data = _encode(obj) if source else np.zeros(0, np.uint8)
    n = int(np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(data.size, np.int32))))
    out = np.asarray(multihost_utils.broadcast_one_to_all(data if source else np.zeros(n, np.uint8)))
    return obj if source else pickle.loads(out.tobytes())


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
    local = _sorted_local()
    position = {d.id: i for i, d in enumerate(local)}
    try:
        ordinals = np.vectorize(lambda d: position[d.id], otypes=[np.int64])(local_mesh.devices)
    except KeyError:
        raise ValueError("host_local_params: the local mesh must use only this process's devices") from None
    if len(local) % ordinals.size:
        raise ValueError(f"host_local_params: a local mesh of {ordinals.size} devices does not tile this "
                         f"process's {len(local)} devices")
    others = [i for i in range(len(local)) if i not in set(ordinals.flat)]
    layout = np.stack([ordinals] + [np.asarray(others[k:k + ordinals.size]).reshape(ordinals.shape)
                                    for k in range(0, len(others), ordinals.size)])
    # Every process must build the same global mesh: check that they all arrange alike.
    seen = allgather_objects(layout.tolist())
    if any(x != seen[0] for x in seen):
        raise ValueError("host_local_params: the processes' local meshes arrange their devices differently")
    by_process = collections.defaultdict(list)
    for d in jax.devices():
        by_process[d.process_index].append(d)
    grid = np.empty((jax.process_count(),) + layout.shape, dtype=object)
    for p in range(jax.process_count()):
        devs = sorted(by_process[p], key=lambda d: d.id)
        if len(devs) != len(local):
            raise ValueError(f"host_local_params: process {p} has {len(devs)} devices, this one {len(local)}")
        grid[p] = np.vectorize(lambda i: devs[i], otypes=[object])(layout)
    names = ("hosts", "replicas") + tuple(local_mesh.axis_names)
    twin = Mesh(grid, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))
    _TWINS[key] = twin
    return twin


_COPIERS: dict = {}


def host_local_params(tree, shardings) -> Any:
    """A copy of ``tree`` (global arrays over every device, e.g. fsdp-sharded across processes) on
    THIS process's devices, laid out by ``shardings`` (one NamedSharding over a local mesh, or a
    matching tree).

    Why not ``process_allgather``: it returns numpy, so on GPU/TPU every host pulls the whole model
    into host memory and then copies it back to its devices. Here one jitted reshard targets a
    global twin of the local sharding (replicated across hosts, laid out like the local mesh within
    each), and each host keeps the shards on its local mesh as a local array: device-to-device
    collectives, no host copy. A collective: every process must call it. The result owns fresh
    buffers (the next train step may donate ``tree``)."""
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree
    if isinstance(shardings, NamedSharding):
        local = [shardings] * len(leaves)
    else:
        local = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
        if len(local) != len(leaves):
            raise ValueError(f"host_local_params: {len(local)} shardings for {len(leaves)} arrays")
    every = set(jax.devices())
    for x in leaves:
        if set(x.sharding.device_set) != every:
            raise ValueError("host_local_params: the arrays must span every device of every process "
                             f"(got {len(x.sharding.device_set)} of {len(every)})")
    twins = tuple(NamedSharding(_twin_mesh(sh.mesh), sh.spec) for sh in local)
    key = (treedef, twins)
    if key not in _COPIERS:
        _COPIERS[key] = jax.jit(lambda xs: [jnp.copy(x) for x in xs], out_shardings=list(twins))
    out = _COPIERS[key](leaves)
    mine = []
    for x, sh in zip(out, local):
        keep = set(sh.mesh.devices.flat)
        mine.append(jax.make_array_from_single_device_arrays(
            x.shape, sh, [s.data for s in x.addressable_shards if s.device in keep]))
    return jax.tree.unflatten(treedef, mine)


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
        return broadcast_object(fn() if self.is_writer else None)

    def on_writer_shared(self, fn: Callable[[], Any], adopt: Callable[[Any], None]) -> Any:
        out = self.on_writer(fn)
        if not self.is_writer:
            adopt(out)
        return out

    def engine_params(self, model, shardings=None):
        from flax import nnx

        from genevolve_jax.models.qwen3_vl.layer_layout import with_layout_of
        state = nnx.state(with_layout_of(model, shardings), nnx.Param)
        return host_local_params(state, shardings if shardings is not None else _replicated(local_mesh()))

    def mesh_devices(self, sharding_cfg):
        return None   # a multi-process mesh spans every process's devices

    def local_model(self, setup, params):
        mesh = local_mesh()
        local = dataclasses.replace(setup, mesh=mesh, rest=host_local_params(setup.rest, _replicated(mesh)))
        return local.merge(host_local_params(params, _replicated(mesh)))

    # Decisions that change what a process does next must come out the same on every process:
    # one boolean all-gather each (a collective: every process calls it, in the same order).
    def _flags(self, flag: bool) -> np.ndarray:
        return np.asarray(multihost_utils.process_allgather(np.asarray([1 if flag else 0], np.int32))).reshape(-1)

    def any_process(self, flag):
        return bool(self._flags(flag).max() > 0)

    def all_processes(self, flag):
        return bool(self._flags(flag).min() > 0)

    def barrier(self, name):
        multihost_utils.sync_global_devices(name)
