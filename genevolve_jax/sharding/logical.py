"""Logical axis names and their resolution to a device mesh.

Every parameter carries a tuple of logical axis names in its ``logical_axes`` metadata, and every
main activation passes through :func:`constrain`. A *strategy* is one rules table that maps logical
names to mesh axes (``data``, ``fsdp``, ``tensor``, ``sequence``). Nothing in the model knows which
strategy is active: it is chosen once, by :func:`use_rules`, around tracing.

We keep the metadata under our own key instead of flax's ``out_sharding`` so that creating a
parameter never triggers flax's eager sharding, and so that the name survives flax's metadata
renames (``sharding`` → ``sharding_names`` → ``out_sharding`` in one year).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# --- logical axis names ---------------------------------------------------------------------------
BATCH = "batch"          # sequences in a batch
SEQ = "seq"              # token positions
EMBED = "embed"          # text hidden size
HEADS = "heads"          # query heads
KV_HEADS = "kv_heads"    # key/value heads
HEAD_DIM = "head_dim"
MLP = "mlp"              # SwiGLU intermediate size
VOCAB = "vocab"
LAYERS = "layers"        # stacked (scanned) decoder layers
CACHE_SEQ = "cache_seq"  # KV-cache positions
VIS_TOKENS = "vis_tokens"  # vision patches, all images of a batch concatenated
VIS_EMBED = "vis_embed"    # vision hidden size
VIS_HEADS = "vis_heads"
VIS_MLP = "vis_mlp"
VIS_IN = "vis_in"          # flattened patch (C·T·P·P) and merged-patch input features
LORA_RANK = "lora_rank"    # an adapter's rank dim: replicated under every strategy (r is small)
NONE = None                # replicated dimension

ALL_LOGICAL_AXES = (BATCH, SEQ, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, LAYERS, CACHE_SEQ,
                    VIS_TOKENS, VIS_EMBED, VIS_HEADS, VIS_MLP, VIS_IN, LORA_RANK)

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

Rules = Mapping[str, Any]  # logical name -> mesh axis name, tuple of mesh axis names, or None

# One table per strategy. Batch is split over every axis that holds data replicas; fsdp also
# shards every parameter along one "model" dimension (embed first; the merger's vis_in and the
# mlp dims for tensors without an embed dim: a mesh axis is used once per array, first dim wins),
# tp splits heads/mlp/vocab (column/row parallel attention and MLP, vocab-parallel embedding and
# head). Activations keep batch first, so under fsdp they are split by batch, never by embed.
_FSDP = {BATCH: ("data", "fsdp"), EMBED: "fsdp", VIS_EMBED: "fsdp", VIS_IN: "fsdp", MLP: "fsdp",
         VIS_MLP: "fsdp"}
_TP = {HEADS: "tensor", KV_HEADS: "tensor", MLP: "tensor", VOCAB: "tensor", VIS_HEADS: "tensor",
       VIS_MLP: "tensor"}
STRATEGY_RULES: dict[str, Rules] = {
    "dp": {BATCH: ("data", "fsdp")},
    "fsdp": dict(_FSDP),
    "tp": {BATCH: "data", **_TP},
    "fsdp_tp": {**_FSDP, **_TP},
    # Sequence/context parallel for long trajectories: activations split along seq as well.
    "fsdp_sp": {**_FSDP, SEQ: "sequence"},
    # Sampling layout: weights replicated across data replicas, tensor-parallel only, so that a
    # decode step never all-gathers fsdp shards.
    "sample": {BATCH: "data", HEADS: "tensor", KV_HEADS: "tensor", MLP: "tensor", VOCAB: "tensor",
               VIS_HEADS: "tensor", VIS_MLP: "tensor"},
}


@dataclasses.dataclass(frozen=True)
class ShardingContext:
    mesh: Mesh
    rules: Rules


_ACTIVE: contextvars.ContextVar[ShardingContext | None] = contextvars.ContextVar(
    "genevolve_sharding", default=None)


def rules_for(strategy: str) -> Rules:
    if strategy not in STRATEGY_RULES:
        raise ValueError(f"unknown sharding strategy {strategy!r}; "
                         f"choose one of {sorted(STRATEGY_RULES)}")
    return STRATEGY_RULES[strategy]


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules | str) -> Iterator[ShardingContext]:
    """Activate a mesh + rules table for :func:`constrain` and ``jax.set_mesh`` while tracing."""
    if isinstance(rules, str):
        rules = rules_for(rules)
    ctx = ShardingContext(mesh, dict(rules))
    token = _ACTIVE.set(ctx)
    try:
        with jax.set_mesh(mesh):
            yield ctx
    finally:
        _ACTIVE.reset(token)


def active() -> ShardingContext | None:
    return _ACTIVE.get()


def partition_spec(axes: Sequence[str | None], rules: Rules, mesh: Mesh | None = None,
                   shape: Sequence[int] | None = None) -> PartitionSpec:
    """Resolve logical axes to a PartitionSpec.

    A mesh axis is used at most once per array (first logical dim wins). With ``mesh`` and
    ``shape`` given, a mesh axis that does not divide its dimension is dropped (replicated), so a
    tiny head count never makes a layout impossible; size-1 mesh axes are dropped too.
    """
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        target = rules.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        targets = (target,) if isinstance(target, str) else tuple(target)
        kept = []
        for t in targets:
            if t in used:
                continue
            if mesh is not None:
                size = mesh.shape.get(t, 1)
                if size == 1:
                    continue
                if shape is not None:
                    prod = size * int(np.prod([mesh.shape[k] for k in kept])) if kept else size
                    if shape[i] % prod:
                        continue
            kept.append(t)
        used.update(kept)
        out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    return PartitionSpec(*out)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op outside :func:`use_rules`."""
    ctx = _ACTIVE.get()
    if ctx is None:
        return x
    if len(axes) != x.ndim:
        raise ValueError(f"logical axes {tuple(axes)} do not match an array of rank {x.ndim}")
    spec = partition_spec(axes, ctx.rules, ctx.mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec))


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], axes: Sequence[str | None],
          dtype=jnp.float32) -> nnx.Param:
    """A parameter created by ``init(key, shape, dtype)`` and tagged with its logical axes."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {tuple(axes)} do not match shape {tuple(shape)}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), logical_axes=tuple(axes))


def logical_axes_of(variable: Any) -> tuple | None:
    """The logical axes recorded on an nnx Variable (None when it has none)."""
    getter = getattr(variable, "get_metadata", None)
    meta = getter() if callable(getter) else {}
    return meta.get("logical_axes") if isinstance(meta, dict) else None


def state_partition_specs(state: nnx.State, rules: Rules | str, mesh: Mesh | None = None):
    """A tree like ``state`` with a PartitionSpec per leaf (replicated where no axes are known)."""
    if isinstance(rules, str):
        rules = rules_for(rules)

    def spec(v):
        axes = logical_axes_of(v)
        value = v.get_value() if hasattr(v, "get_value") else v
        shape = getattr(value, "shape", None)
        if axes is None or shape is None:
            return PartitionSpec()
        # A stacked (scanned) layer adds a leading dim that the module did not declare.
        if len(axes) == len(shape) - 1:
            axes = (LAYERS, *axes)
        return partition_spec(axes, rules, mesh, shape)

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules | str):
    specs = state_partition_specs(state, rules, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))
