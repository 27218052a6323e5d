"""Train state: the model split into trainable / frozen parameters, the optimiser, and shardings.

The model graph is split once (``nnx.split``) into a static ``graphdef`` and pytrees of arrays that
cross the jit boundary. Parameters are ``{"train": State, "frozen": State}``: the optimiser sees
only ``train``, so frozen parameters (the vision tower in SFT) get no gradient computation, no
optimiser state and no update. Every array has a ``NamedSharding`` resolved from its logical axes
under the active strategy; optimiser moments inherit the sharding of the parameter they track.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from genevolve_jax.models.lora import has_adapters
from genevolve_jax.sharding import logical

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def is_vision_path(path: tuple, _value: Any = None) -> bool:
    """The vision tower, its merger and deepstack mergers all live under ``visual``."""
    return len(path) > 0 and path[0] == "visual"


def peak_learning_rate(cfg, adapters: bool = False) -> float:
    """``optimizer.learning_rate``, or ``optimizer.lora_learning_rate`` when it is set and the
    trained parameters are LoRA adapters."""
    o = cfg.optimizer
    lora_lr = float(o.lora_learning_rate)
    return lora_lr if adapters and lora_lr > 0 else float(o.learning_rate)


def make_schedule(cfg, total_steps: int, *, adapters: bool = False) -> optax.Schedule:
    """Warmup (linear from 0) then cosine / linear decay / constant, from ``cfg.schedule``, over the
    run's ``total_steps`` (the driver's: SFT from its epochs × batches, RL from ``rl.num_steps``), to
    the peak of :func:`peak_learning_rate` (``adapters``: the model trains LoRA adapters)."""
    s, peak = cfg.schedule, peak_learning_rate(cfg, adapters)
    warmup = int(round(s.warmup_ratio * total_steps))
    decay_steps = max(1, total_steps - warmup)
    end = peak * s.final_lr_ratio
    if s.kind == "cosine":
        main = optax.cosine_decay_schedule(peak, decay_steps, alpha=s.final_lr_ratio)
    elif s.kind == "linear":
        main = optax.linear_schedule(peak, end, decay_steps)
    else:
        main = optax.constant_schedule(peak)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def make_optimizer(cfg, total_steps: int, *, adapters: bool = False) -> tuple[optax.GradientTransformation,
                                                                              optax.Schedule]:
    """Global-norm clipping, then AdamW on the schedule. ``cfg`` is the train ConfigDict;
    ``adapters``: the model trains LoRA adapters (:func:`peak_learning_rate`)."""
    o = cfg.optimizer
    schedule = make_schedule(cfg, total_steps, adapters=adapters)
    adamw = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                        mu_dtype=_DTYPES[o.mu_dtype])
    if o.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(o.max_grad_norm), adamw), schedule
    return adamw, schedule


def _path_keys(path) -> tuple:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
    return tuple(out)


def opt_state_shardings(opt_state_shape, params_train_shardings, params_train_shape, mesh: Mesh):
    """Shardings for an optimiser state: a leaf whose key path ends with a parameter's path (and
    has its shape) is sharded like that parameter; scalars such as step counts are replicated."""
    by_path = {}
    # Shardings sit where the Variables are; leaf paths of the params (and of the optimiser's
    # copies of them) continue into the Variable's value, so key by the array paths.
    for sh, (path, shp) in zip(jax.tree.leaves(params_train_shardings),
                               jax.tree_util.tree_flatten_with_path(params_train_shape)[0]):
        by_path[_path_keys(path)] = (sh, tuple(shp.shape))
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        keys = _path_keys(path)
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and hit[1] == tuple(leaf.shape):
                return hit[0]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, opt_state_shape)


@dataclasses.dataclass
class TrainSetup:
    """Everything static about a train state: how to rebuild the model and where arrays live."""
    graphdef: Any
    rest: nnx.State                 # non-parameter variables (usually empty), replicated
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: Mesh
    rules: logical.Rules
    param_shardings: dict           # {"train": ..., "frozen": ...}
    opt_shardings: Any

    def merge(self, params: dict) -> nnx.Module:
        return nnx.merge(self.graphdef, params["train"], params["frozen"], self.rest)


def _split(model: nnx.Module, freeze: Callable | None):
    frozen_filter = nnx.Nothing if freeze is None else nnx.All(nnx.Param, freeze)
    graphdef, frozen, train, rest = nnx.split(model, frozen_filter, nnx.Param, ...)
    return graphdef, train, frozen, rest


def create_train_state(model: nnx.Module | Callable[[], nnx.Module], cfg, mesh: Mesh, rules: logical.Rules | str,
                       *, total_steps: int, freeze: Callable | None = None):
    """Place a model on the mesh in its shardings and initialise the optimiser.

    ``model`` is either a built module (its arrays are copied into their shardings; use this for a
    loaded checkpoint or to put one model under several strategies) or a zero-argument factory,
    which is traced under ``jax.jit`` with sharded outputs so that a model larger than one device
    is never materialised whole. ``freeze`` is an nnx path filter (e.g. :func:`is_vision_path`) for
    parameters that are not trained; ``total_steps`` the length of the learning-rate schedule.
    Returns ``(setup, params, opt_state)``.
    """
    if isinstance(rules, str):
        rules = logical.rules_for(rules)
    built = isinstance(model, nnx.Module)
    shape = model if built else nnx.eval_shape(model)
    graphdef, train_abs, frozen_abs, rest_abs = _split(shape, freeze)
    train_sh = logical.state_shardings(train_abs, mesh, rules)
    frozen_sh = logical.state_shardings(frozen_abs, mesh, rules)
    rest_sh = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), rest_abs)
    param_shardings = {"train": train_sh, "frozen": frozen_sh}
    tx, schedule = make_optimizer(cfg, total_steps, adapters=has_adapters(shape))

    with logical.use_rules(mesh, rules):
        if built:
            params, rest = place_on_mesh(({"train": train_abs, "frozen": frozen_abs}, rest_abs),
                                         (param_shardings, rest_sh))
        else:
            def build():
                _, train, frozen, rest = _split(model(), freeze)
                return {"train": train, "frozen": frozen}, rest
            params, rest = jax.jit(build, out_shardings=(param_shardings, rest_sh))()
        opt_abs = jax.eval_shape(tx.init, params["train"])
        opt_sh = opt_state_shardings(opt_abs, train_sh, train_abs, mesh)
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params["train"])
    setup = TrainSetup(graphdef=graphdef, rest=rest, tx=tx, schedule=schedule, mesh=mesh, rules=rules,
                       param_shardings=param_shardings, opt_shardings=opt_sh)
    return setup, params, opt_state


def place_on_mesh(tree, shardings):
    """Copy arrays into (possibly multi-process) shardings through the host: each process holds
    the same full values (same seed or same checkpoint) and keeps its own shards."""
    def put(x, sh):
        if isinstance(x, nnx.Variable):
            return x.replace(put(x.get_value(), sh))
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sh, lambda idx: host[idx])
    return jax.tree.map(put, tree, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def bytes_per_device(tree) -> int:
    """Bytes of ``tree``'s arrays held by one device (the largest per-device total)."""
    per: dict[Any, int] = {}
    for x in jax.tree.leaves(tree):
        for shard in getattr(x, "addressable_shards", ()):
            per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
    return max(per.values(), default=0)
