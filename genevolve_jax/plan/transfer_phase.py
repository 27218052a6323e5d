"""The plan's phases that move the trainer's weights out of its layout (sharding/weight_stream.py),
one ``rl.sync_bucket_bytes`` bucket per program, beside the RL trainer's resident state:

- ``sync``, after every step. With the JaxEngine (``rl.engine = "jax"``): the stream into the
  engine's sampling layout (``Collective.engine_params``): one jitted program per bucket that
  takes the bucket's pieces (rows of stacked leaves, cast to the engine's dtype) and writes them
  in the engine's shardings (several hosts: in the global twin of the host-local engine mesh that
  ``MultiProcess`` targets). The engine released its weights first and its KV cache stays, so the
  resident state is the trainer's plus the engine's; the bucket's output is counted twice (in the
  engine's weights and as the program's output), a bound one bucket's share above the truth.
  With SGLang: the HF export the servers reload (below), in ``rl.sglang.export_dtype``.
- ``export``: the final HF export (``rl.export_dtype``), and the SGLang sync's. On one host
  (``SingleProcess``) no device program runs: ``save_pretrained`` reads each tensor's shards into
  host memory, one tensor at a time. On several hosts each round of ``gather_to_owners`` is one
  ``shard_map`` all-to-all (``owner_rounds(...).program()``), compiled here.
- ``engine_build``: the JaxEngine's construction (``Collective.local_model``), the sync's programs
  with the trainer's state alone resident (no engine, no KV cache yet).

Programs that differ only in which row of a stacked leaf they take, or which same-shaped leaves
they read, compile to the same memory: one of each kind is compiled, and counted for as many
buckets or rounds as it stands for (``runs_per_step``).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from genevolve_jax.plan import abstract, phases
from genevolve_jax.sharding import weight_stream

TRANSFER_PHASES = ("sync", "export", "engine_build")


@dataclasses.dataclass
class _Trainer:
    config: object
    state: abstract.AbstractState
    params: nnx.State          # the trainer's nnx.Param state (abstract, in its layout and shardings)
    sources: list


def _trainer(run_cfg, mesh, model_config_path: str) -> _Trainer:
    from genevolve_jax.train.runtime.step_config import validate
    config = abstract.model_config(run_cfg, validate(run_cfg.train), model_config_path)
    state = phases.rl_state(run_cfg, config, mesh)
    params = nnx.state(state.setup.merge(state.params), nnx.Param)
    return _Trainer(config, state, params, jax.tree.leaves(params))


def _alike(pieces) -> tuple:
    """What a bucket's program depends on for its memory: the pieces with the row they take
    forgotten (every row of a stacked leaf has the same shape)."""
    return tuple(dataclasses.replace(p, row=None if p.row is None else 0) for p in pieces)


def _signature(x) -> tuple:
    return tuple(x.shape), str(x.dtype), x.sharding


def _hosts(devices) -> int:
    return len({d.process_index for d in devices})


def _engine_targets(run_cfg, trainer: _Trainer, devices):
    """The engine's shardings, and per leaf what the bucket's program writes: on one host nothing
    fixed (``SingleProcess`` takes the pieces where the trainer holds them, then ``device_put``s
    them into the engine, whose copy the phase counts as resident); on several hosts the twins of
    the engine's shardings over every host (``MultiProcess``'s ``_place_on_host``)."""
    from genevolve_jax.plan.engine_phase import abstract_engine
    from genevolve_jax.sharding.multihost import twin_layout, twin_mesh
    engine = abstract_engine(run_cfg, trainer.config, devices)
    shardings = engine.fns.param_shardings
    leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    if _hosts(devices) > 1:
        local_mesh = engine.fns.mesh
        host = [d for d in devices if d.process_index == 0]
        twin = twin_mesh(twin_layout(local_mesh, sorted(host, key=lambda d: d.id)), devices, local_mesh.axis_names)
        return engine, shardings, [NamedSharding(twin, sh.spec) for sh in leaves]
    return engine, shardings, [None] * len(leaves)


def layout_fns(run_cfg, trainer: _Trainer, devices) -> tuple[list[phases.TracedFn], dict[str, int], str]:
    """The stream into the engine's layout: one traced program per kind of bucket, how many
    buckets each stands for, and a description."""
    from genevolve_jax.models.qwen3_vl.layer_layout import leaf_rows
    engine, shardings, targets = _engine_targets(run_cfg, trainer, devices)
    dtype = jnp.dtype(str(run_cfg.train.compute_dtype))
    pieces = weight_stream.float_pieces(trainer.sources, leaf_rows(trainer.params, shardings), dtype)
    bucket = int(run_cfg.rl.sync_bucket_bytes)
    buckets = weight_stream.plan_buckets([p.nbytes for p in pieces], bucket)
    kinds: dict[tuple, list[int]] = {}
    for k, b in enumerate(buckets):
        used = sorted({pieces[i].source for i in b})
        where = {s: n for n, s in enumerate(used)}
        local = [dataclasses.replace(pieces[i], source=where[pieces[i].source]) for i in b]
        key = (_alike(local), tuple(_signature(trainer.sources[s]) for s in used), tuple(targets[i] for i in b))
        kinds.setdefault(key, []).append(k)
    fns, runs = [], {}
    for n, ((alike, _, outs), members) in enumerate(kinds.items()):
        first = buckets[members[0]]
        used = sorted({pieces[i].source for i in first})
        program = jax.jit(weight_stream.selector(alike), **({} if outs[0] is None else {"out_shardings": list(outs)}))
        traced = program.trace([trainer.sources[s] for s in used])
        name = f"sync_bucket_kind{n}"
        fns.append(phases.TracedFn(name, traced, 0, {}, traced.jaxpr, len(devices)))
        runs[name] = len(members)
    total = sum(p.nbytes for p in pieces)
    desc = (f"{len(buckets)} bucket(s) of at most {bucket / 2 ** 30:g} GiB ({total / 2 ** 30:.2f} GiB in {dtype}) "
            f"into the engine's layout "
            f"{dict(engine.fns.mesh.shape)}, {len(kinds)} kind(s) of program")
    return fns, runs, desc


def export_fns(trainer: _Trainer, devices, dtype: str,
               bucket: int) -> tuple[list[phases.TracedFn], dict[str, int], str]:
    """The HF export's device programs: none on one host; on several, one traced round program
    of ``gather_to_owners`` per kind of round."""
    from genevolve_jax.models import hf_io, hf_sharded_export
    from genevolve_jax.models.qwen3_vl.layer_layout import path_names
    hosts = _hosts(devices)
    plan = hf_sharded_export.plan_export(trainer.config, hosts, dtype=dtype)
    total = sum(plan.nbytes(i) for i in range(len(plan.entries)))
    if hosts == 1:
        return [], {}, (f"HF export in {dtype} ({total / 2 ** 30:.2f} GiB) from one process: each tensor's shards "
                        "are read into host memory one at a time (save_pretrained), no device program")
    flat = jax.tree_util.tree_flatten_with_path(trainer.params)[0]
    where = {path_names(p): i for i, (p, _) in enumerate(flat)}
    np_dtype = hf_io.EXPORT_DTYPES[dtype]
    pieces = [weight_stream.piece(trainer.sources, where[e.nnx], e.stack_index, np_dtype) for e in plan.entries]
    rounds = weight_stream.owner_rounds(trainer.sources, pieces, plan.owners, bucket)
    kinds: dict = {}
    for rnd in rounds:
        # As gather_to_owners keys its programs (by the pieces each moves and their layouts), with
        # the sources renumbered and rows forgotten: rounds over alike layers share one.
        where = {s: n for n, s in enumerate(rnd.sources)}
        moved = [dataclasses.replace(pieces[i], source=where[pieces[i].source]) for b in rnd.buckets for i in b]
        starts = [0]
        for b in rnd.buckets:
            starts.append(starts[-1] + len(b))
        key = dataclasses.replace(rnd, pieces=_alike(moved), layouts=tuple((where[s], lay) for s, lay in rnd.layouts),
                                  buckets=tuple(tuple(range(a, a + len(b))) for a, b in zip(starts, rnd.buckets)))
        kinds.setdefault(key, []).append(rnd)
    fns, runs = [], {}
    for n, (key, members) in enumerate(kinds.items()):
        traced = key.program().trace(*[trainer.sources[s] for s in members[0].sources])
        name = f"export_round_kind{n}"
        fns.append(phases.TracedFn(name, traced, 0, {}, traced.jaxpr, len(devices)))
        runs[name] = len(members)
    desc = (f"HF export in {dtype} ({total / 2 ** 30:.2f} GiB) written by {hosts} processes, {len(rounds)} "
            f"all-to-all round(s) of at most {bucket / 2 ** 30:g} GiB per process, {len(kinds)} kind(s) of program")
    return fns, runs, desc


def transfer_phase(name: str, run_cfg, target, mesh, shapes, *, model_config_path: str = ""):
    """``sync``, ``export`` or ``engine_build`` (None where the run has no such phase: an engine
    built in-process only with ``rl.engine = "jax"``)."""
    del shapes
    devices = list(mesh.devices.flat)
    trainer = _trainer(run_cfg, mesh, model_config_path)
    resident = phases.rl_resident(run_cfg, trainer.state)
    bucket = int(run_cfg.rl.sync_bucket_bytes)
    jax_engine = run_cfg.rl.engine == "jax"
    if name == "engine_build" and not jax_engine:
        return None
    if name == "export" or (name == "sync" and not jax_engine):
        dtype = str(run_cfg.rl.export_dtype if name == "export" else run_cfg.rl.sglang.export_dtype)
        fns, runs, desc = export_fns(trainer, devices, dtype, bucket)
        if jax_engine:    # the final export runs while the engine (weights, KV cache) is still alive
            from genevolve_jax.plan.engine_phase import abstract_engine
            resident.update(abstract_engine(run_cfg, trainer.config, devices).resident())
    else:
        fns, runs, desc = layout_fns(run_cfg, trainer, devices)
        if name == "sync":
            from genevolve_jax.plan.engine_phase import abstract_engine
            resident.update(abstract_engine(run_cfg, trainer.config, devices).resident())
        else:
            desc += "; the engine's construction: the trainer's state alone resident"
    phase = phases.Phase(name, trainer.state, resident, 0, fns, desc)
    return phase, runs
