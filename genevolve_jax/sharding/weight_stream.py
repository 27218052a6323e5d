"""The trainer's weights moved into another layout bucket by bucket: the weight sync, the HF export
and the engine's construction hold the run's resident state plus one bucket, never a second model.

Why: one jitted reshard of the whole parameter tree holds its whole output at once. Before issue 24
a multi-host sync put the full fp32 model on every device of every host (32.7 GiB per GPU for the 8B
config) although the trainer holds 1/N of it.

A transfer is a list of :class:`Piece` (a source array, or one row of a stacked ``[L, ...]`` one, in
the dtype it travels in), planned identically on every process before a byte moves, then run in
buckets of at most ``bucket_bytes`` (``rl.sync_bucket_bytes``; a piece larger than the bucket
travels alone, as the 8B model's embedding and head, 1.16 GiB each in bf16, do at the default
1 GiB). Two kinds:

- :func:`stream_to_layout`, when every host needs every weight (its own engine): each bucket is
  one jitted program that reads the trainer's shards and writes the bucket in the target layout;
  the Collective supplies the placement (several processes: a global twin of the host's layout).
- :func:`gather_to_owners`, when each weight is needed by ONE host (a host writes its share of the
  sharded HF export): every host owns a list of pieces, and in each round one ``shard_map``
  program sends, with one ``all_to_all``, every device's shards of host p's next bucket to host
  p's devices. Why an ``all_to_all`` and not a reshard: a jax collective gives every device a piece
  of the same shape, so a reshard that gathers a bucket to one host gives the other hosts a piece
  of the same size as well (data they do not need); an all-to-all in which each host receives its
  own bucket wastes nothing. A device holds at most about two buckets / (its host's device count)
  per round (the send and receive buffers), and a host receives exactly the bytes it writes.

Both report every bucket to the observers of :func:`observe_buckets` while its buffers are alive
(progress, memory probes). For a plan: :func:`bucket_bytes_of` gives each bucket's size, and
:func:`owner_rounds` an export's round programs from abstract shapes, to compile and measure.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


@dataclasses.dataclass(frozen=True)
class Piece:
    """One array a transfer delivers: ``source`` (an index into the transfer's source arrays), or
    its row ``row`` when the source is stacked ([L, ...]: a scanned decoder's parameter), in
    ``dtype``."""
    source: int
    row: int | None
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def piece(sources: Sequence[jax.Array], source: int, row: int | None = None, dtype=None) -> Piece:
    """The :class:`Piece` for ``sources[source]`` (row ``row``), travelling in ``dtype`` (default:
    the source's)."""
    x = sources[source]
    shape = tuple(x.shape[1:]) if row is not None else tuple(x.shape)
    return Piece(int(source), None if row is None else int(row), shape, np.dtype(dtype or x.dtype))


def float_pieces(sources: Sequence[jax.Array], rows: Sequence[tuple[int, int | None]], dtype=None) -> list[Piece]:
    """:func:`piece` of each (source, row) of ``rows``, floating-point ones travelling in ``dtype``
    (None: as they are): an engine that holds bf16 weights gets bf16 buckets, cast on the sender's
    devices before they move, never a float32 copy cast after."""
    def travels_in(x):
        return dtype if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else None
    return [piece(sources, i, row, travels_in(sources[i])) for i, row in rows]


def plan_buckets(sizes: Sequence[int], bucket_bytes: int | None) -> list[list[int]]:
    """Consecutive indices grouped into buckets of at most ``bucket_bytes``; a larger item alone
    (None: all in one bucket)."""
    if bucket_bytes is None:
        return [list(range(len(sizes)))] if len(sizes) else []
    if int(bucket_bytes) < 1:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[list[int]] = []
    used = 0
    for i, n in enumerate(sizes):
        if not buckets or (buckets[-1] and used + int(n) > bucket_bytes):
            buckets.append([])
            used = 0
        buckets[-1].append(i)
        used += int(n)
    return buckets


def bucket_bytes_of(pieces: Sequence[Piece], bucket_bytes: int) -> list[int]:
    """The bytes of each bucket a transfer of ``pieces`` moves (what a plan bounds)."""
    return [sum(pieces[i].nbytes for i in b) for b in plan_buckets([p.nbytes for p in pieces], bucket_bytes)]


# --- observers ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BucketMoved:
    """What :func:`observe_buckets` callbacks get: a transfer (``kind``: "layout" or "owners") moved
    bucket ``index`` of ``count``; ``nbytes``: the bytes of that bucket ("owners": of the largest
    bucket one process received in that round)."""
    kind: str
    index: int
    count: int
    nbytes: int


_OBSERVERS: list[Callable[[BucketMoved], None]] = []


@contextlib.contextmanager
def observe_buckets(callback: Callable[[BucketMoved], None]) -> Iterator[None]:
    """Call ``callback`` after each bucket of every transfer in the block has moved, while that
    bucket's buffers are still alive (so a memory probe sees the transient at its largest)."""
    _OBSERVERS.append(callback)
    try:
        yield
    finally:
        _OBSERVERS.remove(callback)


def _moved(kind: str, index: int, count: int, nbytes: int) -> None:
    event = BucketMoved(kind, index, count, nbytes)
    for callback in list(_OBSERVERS):
        callback(event)


# --- to every host, in a layout of its devices ---------------------------------------------------------
def _take(x: jax.Array, p: Piece) -> jax.Array:
    x = x if p.row is None else x[p.row]
    return x.astype(p.dtype)


def selector(pieces: Sequence[Piece]) -> Callable:
    """A function of the source arrays that returns ``pieces`` (rows taken, cast) as fresh arrays
    (a copy even when nothing changes: the caller's buffers may be donated by the next step)."""
    return lambda xs: [jnp.copy(_take(xs[p.source], p)) for p in pieces]


# (pieces, their sources, target shardings, moved) -> the pieces in those shardings, on this host;
# ``moved()`` is called once the bucket is on the devices, while everything the move made is alive.
Placer = Callable[[Sequence[Piece], list, list, Callable[[], None]], list]


def stream_to_layout(sources: Sequence[jax.Array], pieces: Sequence[Piece], shardings: Sequence[NamedSharding],
                     bucket_bytes: int | None, place: Placer) -> list[jax.Array]:
    """Each of ``pieces`` on this host's devices in its target sharding, moved bucket by bucket (at
    most ``bucket_bytes`` each; None: one bucket): ``place`` runs one bucket, given the bucket's
    pieces renumbered over the sources it reads (a Collective's jitted reshard). The result owns
    fresh buffers."""
    if len(shardings) != len(pieces):
        raise ValueError(f"{len(shardings)} shardings for {len(pieces)} pieces")
    out: list = [None] * len(pieces)
    buckets = plan_buckets([p.nbytes for p in pieces], bucket_bytes)
    for k, bucket in enumerate(buckets):
        used = sorted({pieces[i].source for i in bucket})
        where = {s: n for n, s in enumerate(used)}
        local = [dataclasses.replace(pieces[i], source=where[pieces[i].source]) for i in bucket]
        nbytes = sum(pieces[i].nbytes for i in bucket)
        got = place(local, [sources[s] for s in used], [shardings[i] for i in bucket],
                    functools.partial(_moved, "layout", k, len(buckets), nbytes))
        for i, a in zip(bucket, got):
            out[i] = a
    return out


# --- to one host each ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where one source's shards sit: its block shape, the global slice of each distinct block
    with the devices (mesh positions) that hold a copy of it, and per device which copy it is."""
    spec: PartitionSpec
    block: tuple[int, ...]
    groups: tuple[tuple[tuple[tuple[int, int], ...], tuple[int, ...]], ...]
    replica: tuple[int, ...]

    @property
    def replicas(self) -> int:
        return len(self.groups[0][1])


def _layout(x: jax.Array, mesh: Mesh) -> _Layout:
    sharding = x.sharding
    if not isinstance(sharding, NamedSharding) or sharding.mesh != mesh:
        raise ValueError(f"gather_to_owners: every source must be a NamedSharding over one mesh; got {sharding}")
    by_device = sharding.devices_indices_map(tuple(x.shape))
    groups: dict[tuple, list[int]] = {}
    replica = []
    for pos, d in enumerate(mesh.devices.flat):
        key = tuple(s.indices(n)[:2] for s, n in zip(by_device[d], x.shape))
        replica.append(len(groups.setdefault(key, [])))
        groups[key].append(pos)
    if len({len(v) for v in groups.values()}) != 1:
        raise ValueError(f"gather_to_owners: the blocks of {sharding} are not held equally often")
    shapes = {tuple(b - a for a, b in key) for key in groups}
    if len(shapes) != 1:
        raise ValueError(f"gather_to_owners: {sharding} splits an array of shape {x.shape} unevenly")
    return _Layout(sharding.spec, shapes.pop(), tuple((k, tuple(v)) for k, v in groups.items()), tuple(replica))


def _block(p: Piece, lay: _Layout) -> tuple[int, ...]:
    return lay.block[1:] if p.row is not None else lay.block


def _part_len(p: Piece, lay: _Layout) -> int:
    """Elements each device sends of piece ``p``: its block's (row's) share, split over the copies."""
    return -(-math.prod(_block(p, lay)) // lay.replicas)


@dataclasses.dataclass(frozen=True)
class _Round:
    """One round of :func:`gather_to_owners`: process p receives the pieces ``buckets[p]``.
    ``hosts[j]`` / ``ranks[j]``: the process of the mesh's device j and its rank among that
    process's devices (``local`` each)."""
    mesh: Mesh
    pieces: tuple[Piece, ...]
    layouts: tuple[tuple[int, _Layout], ...]     # (source, its layout) for the sources used
    buckets: tuple[tuple[int, ...], ...]
    hosts: tuple[int, ...]
    ranks: tuple[int, ...]
    local: int

    @property
    def sources(self) -> list[int]:
        return [s for s, _ in self.layouts]

    def payload(self, host: int) -> int:
        lay = dict(self.layouts)
        return sum(_part_len(self.pieces[i], lay[self.pieces[i].source]) for i in self.buckets[host])

    @property
    def dtype(self) -> np.dtype:
        """The dtype the round's pieces travel in (one per round)."""
        dtypes = {np.dtype(self.pieces[i].dtype) for b in self.buckets for i in b}
        if len(dtypes) != 1:
            raise ValueError(f"gather_to_owners: a round's pieces travel in one dtype, got {sorted(map(str, dtypes))}")
        return dtypes.pop()

    @property
    def width(self) -> int:
        """Elements each device sends to each device."""
        return max(1, max(-(-self.payload(h) // self.local) for h in range(len(self.buckets))))

    def program(self) -> Callable:
        """The jitted shard_map over the sources used (in ``sources`` order) → the receive buffers
        as one [D·D, width] array, device j's [D, width] block being what every device sent it."""
        axes, local, width = self.mesh.axis_names, self.local, self.width
        lay = dict(self.layouts)
        where = {s: k for k, s in enumerate(self.sources)}
        dtype = self.dtype

        # Row j of the send buffer goes to device j: the slice of j's host's payload that j (rank r
        # there) receives. Payloads are stacked host-major, so the rows need reordering only when
        # the mesh does not list each host's devices together.
        order = [h * local + r for h, r in zip(self.hosts, self.ranks)]

        def per_device(*blocks):
            me = jax.lax.axis_index(axes)
            parts = []   # every host's payload, each padded to local · width: one concatenation
            for bucket in self.buckets:
                used = 0
                for i in bucket:
                    p, lp = self.pieces[i], lay[self.pieces[i].source]
                    b = blocks[where[p.source]]
                    flat = (b if p.row is None else b[p.row]).reshape(-1)
                    n = _part_len(p, lp)
                    if lp.replicas > 1:    # each copy of a block sends its own share of it: no byte twice
                        if n * lp.replicas != flat.size:
                            flat = jnp.pad(flat, (0, n * lp.replicas - flat.size))
                        flat = jax.lax.dynamic_slice(flat, (jnp.asarray(lp.replica, jnp.int32)[me] * n,), (n,))
                    parts.append(flat.astype(dtype))
                    used += n
                if local * width > used:
                    parts.append(jnp.zeros((local * width - used,), dtype))
            send = jnp.concatenate(parts).reshape(len(self.buckets) * local, width)
            if order != list(range(len(order))):
                send = jnp.take(send, jnp.asarray(order, jnp.int32), axis=0)
            # As unsigned integers of the same width: XLA:CPU would carry a bf16 all-to-all in f32
            # (twice the bytes on the way), and the host reads the bits back as they were.
            send = jax.lax.bitcast_convert_type(send, _carrier(dtype))
            return jax.lax.all_to_all(send, axes, 0, 0, tiled=True)

        in_specs = tuple(lay[s].spec for s in self.sources)
        return jax.jit(jax.shard_map(per_device, mesh=self.mesh, in_specs=in_specs,
                                     out_specs=PartitionSpec(axes), check_vma=False))

    def assemble(self, received: dict[int, np.ndarray], host: int) -> Iterator[tuple[int, np.ndarray]]:
        """The pieces of ``host``'s bucket from its devices' receive buffers ({rank: [D, width]})."""
        n = self.payload(host)
        payload = [np.concatenate([received[r][s] for r in range(self.local)])[:n].view(self.dtype)
                   for s in range(len(self.hosts))]
        lay = dict(self.layouts)
        offset = 0
        for i in self.buckets[host]:
            p, lp = self.pieces[i], lay[self.pieces[i].source]
            m, block = _part_len(p, lp), _block(p, lp)
            out = np.empty(p.shape, p.dtype)
            for index, holders in lp.groups:
                flat = np.concatenate([payload[d][offset:offset + m] for d in holders])[:math.prod(block)]
                index = index[1:] if p.row is not None else index
                out[tuple(slice(a, b) for a, b in index)] = flat.reshape(block)
            offset += m
            yield i, out


def _carrier(dtype: np.dtype):
    return {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[np.dtype(dtype).itemsize]


_PROGRAMS: dict = {}


def owner_rounds(sources: Sequence[jax.Array], pieces: Sequence[Piece], owners: Sequence[int],
                 bucket_bytes: int) -> list[_Round]:
    """The rounds of :func:`gather_to_owners` (the same on every process): round r gives each
    process its r-th bucket of the pieces it owns. Needs only the sources' shapes and shardings
    (ShapeDtypeStructs will do, on a target's devices): ``round.program().lower(*abstract)`` then
    compiles a round for a plan, whose memory analysis bounds the transfer's transient."""
    if not pieces:
        return []
    mesh = sources[pieces[0].source].sharding.mesh
    hosts = tuple(d.process_index for d in mesh.devices.flat)
    ranks, seen = [], {}
    for h in hosts:
        ranks.append(seen.get(h, 0))
        seen[h] = ranks[-1] + 1
    count = len(seen)
    if sorted(seen) != list(range(count)) or len(set(seen.values())) != 1:
        raise ValueError(f"gather_to_owners: every process must hold as many of the mesh's devices, got {seen}")
    if not set(owners) <= set(range(count)) or len(owners) != len(pieces):
        raise ValueError(f"gather_to_owners: an owner per piece, each one of processes 0..{count - 1}")
    layouts = {s: _layout(sources[s], mesh) for s in sorted({p.source for p in pieces})}
    for p in pieces:
        if p.row is not None and layouts[p.source].block[0] != sources[p.source].shape[0]:
            raise ValueError("gather_to_owners: a stacked source split along its rows cannot be sent a row at a time")
    per_host = [[i for i in range(len(pieces)) if owners[i] == h] for h in range(count)]
    planned = [[[mine[k] for k in b] for b in plan_buckets([pieces[i].nbytes for i in mine], bucket_bytes)]
               for mine in per_host]
    out = []
    for r in range(max(len(b) for b in planned)):
        buckets = tuple(tuple(b[r]) if r < len(b) else () for b in planned)
        used = sorted({pieces[i].source for b in buckets for i in b})
        out.append(_Round(mesh, tuple(pieces), tuple((s, layouts[s]) for s in used), buckets, hosts,
                          tuple(ranks), seen[0]))
    return out


def gather_to_owners(sources: Sequence[jax.Array], pieces: Sequence[Piece], owners: Sequence[int],
                     bucket_bytes: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(i, numpy array)`` for every piece ``i`` this process owns (``owners[i]``, a process
    index), in index order, moved in rounds: per round each process receives its next bucket of
    at most ``bucket_bytes`` (a bigger piece alone) and nothing else. A collective: every process
    iterates to the end. The sources share one mesh over every device, each process holding as
    many of its devices; a stacked source must not be split along its rows."""
    sources = list(sources)
    if pieces and set(sources[pieces[0].source].sharding.mesh.devices.flat) != set(jax.devices()):
        raise ValueError("gather_to_owners: the sources' mesh must span every device")
    rounds = owner_rounds(sources, pieces, owners, bucket_bytes)
    me = jax.process_index()
    for r, rnd in enumerate(rounds):
        starts = [int(x) for x in np.cumsum([0] + [len(b) for b in rnd.buckets])]
        key = dataclasses.replace(rnd, pieces=tuple(pieces[i] for b in rnd.buckets for i in b),
                                  buckets=tuple(tuple(range(a, a + len(b))) for a, b in zip(starts, rnd.buckets)))
        # Keyed by what the program depends on: the pieces it moves (not their index), their layouts.
        if key not in _PROGRAMS:
            _PROGRAMS[key] = key.program()
        out = _PROGRAMS[key](*[sources[s] for s in rnd.sources])
        position = {d: j for j, d in enumerate(rnd.mesh.devices.flat)}
        received = {rnd.ranks[position[sh.device]]: np.asarray(sh.data) for sh in out.addressable_shards}
        _moved("owners", r, len(rounds), max(sum(pieces[i].nbytes for i in b) for b in rnd.buckets))
        del out
        yield from rnd.assemble(received, me)
