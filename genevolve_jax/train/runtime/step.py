"""The sharded train step: a pure ``(params, opt_state, batch, rng) -> (params, opt_state, metrics)``.

Compiled with ``jax.jit`` and explicit in/out shardings under the mesh, with the NNX graph merged
from its static ``graphdef`` inside (split/merge at the boundary, no ``nnx.jit`` traversal).

The loss is a :class:`LossFunction`: ``loss(model, microbatch, rng) -> (loss_sum, weight, metrics)``,
and the step minimises ``Σ loss_sum / Σ weight`` over the micro-batches of a step. Returning sums
rather than means makes accumulation exact: m micro-batches give the same loss and gradient as
one batch m times larger, whatever the mask counts per micro-batch. SFT's weight is the number of
trained tokens.

Micro-batch i takes rows i, i+m, i+2m, … of the batch, so on a batch-sharded mesh every device
keeps its own rows and no data moves between micro-batches.
"""
from __future__ import annotations

import abc
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from genevolve_jax.sharding import logical
from genevolve_jax.sharding.mesh import check_divisible
from genevolve_jax.train.runtime import nonfinite
from genevolve_jax.train.runtime.batch_layout import NOT_BATCH_MAJOR, STATIC_FIELDS, batch_axes, batch_shardings
from genevolve_jax.train.runtime.state import TrainSetup

class LossFunction(abc.ABC):
    """What the train step minimises: ``loss(model, microbatch, rng) -> (loss_sum, weight, metrics)``.

    The step minimises ``Σ loss_sum / Σ weight`` over a step's micro-batches. A loss that returns
    sums (SFT: weight = trained tokens; the evolve loss: host-computed per-token weights) makes
    accumulation exact. Metrics are summed over micro-batches, except those named in
    :attr:`max_metrics`, whose maximum is kept."""

    max_metrics: tuple[str, ...] = ()

    @abc.abstractmethod
    def __call__(self, model: nnx.Module, batch: Mapping[str, jax.Array],
                 rng: jax.Array) -> tuple[jax.Array, jax.Array, dict]:
        """(loss numerator, its weight, metrics) of one (micro-)batch."""


def _mesh_axes_for(rules, name) -> tuple:
    t = rules.get(name)
    return () if t is None else ((t,) if isinstance(t, str) else tuple(t))


def check_batch(batch: Mapping[str, Any], mesh, rules, grad_accum_steps: int) -> None:
    """Refuse batches whose rows or tokens cannot be split as the strategy asks."""
    dims = {}
    for k, v in batch.items():
        if k in NOT_BATCH_MAJOR:
            if grad_accum_steps > 1:
                raise ValueError(f"batch field {k!r} is not batch-major; image batches cannot be split "
                                 "into micro-batches inside the step (use grad_accum_steps=1)")
            continue
        b = v.shape[0]
        if b % grad_accum_steps:
            raise ValueError(f"batch field {k!r} has {b} rows, not divisible by grad_accum_steps "
                             f"{grad_accum_steps}")
        dims[f"micro-batch rows of {k!r}"] = (b // grad_accum_steps, _mesh_axes_for(rules, logical.BATCH))
        seq_dim = batch_axes(k, v.ndim).index(logical.SEQ) if logical.SEQ in batch_axes(k, v.ndim) else None
        if seq_dim is not None:
            dims[f"tokens of {k!r}"] = (v.shape[seq_dim], _mesh_axes_for(rules, logical.SEQ))
    check_divisible(mesh, dims)


def cast_floating(tree, dtype):
    """Cast floating leaves to the compute dtype (before use, so fsdp gathers move bf16)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def split_micro_batches(x: jax.Array, m: int) -> jax.Array:
    """[B, ...] -> [m, B/m, ...] with micro-batch i = rows i, i+m, … (see module docstring)."""
    b = x.shape[0]
    return jnp.swapaxes(x.reshape(b // m, m, *x.shape[1:]), 0, 1)


def join_micro_batches(x: jax.Array) -> jax.Array:
    """The inverse of :func:`split_micro_batches`: [m, B/m, ...] -> [B, ...]."""
    m, per = x.shape[:2]
    return jnp.swapaxes(x, 0, 1).reshape(per * m, *x.shape[2:])


def build_step_fn(setup: TrainSetup, loss_fn: LossFunction, *, compute_dtype=jnp.float32,
                  grad_accum_steps: int = 1, static: Mapping[str, Any] | None = None) -> Callable:
    """The pure (not yet jitted) step function. ``static`` entries (host-side values that fix
    shapes, such as ``image_grid_thw``) are added to every micro-batch the loss function sees."""
    static = dict(static or {})
    tx = setup.tx

    def grads_of(train, frozen, mb, key):
        def f(train_p):
            model = setup.merge({"train": cast_floating(train_p, compute_dtype),
                                 "frozen": cast_floating(frozen, compute_dtype)})
            num, den, mets = loss_fn(model, {**mb, **static}, key)
            return num.astype(jnp.float32), (den.astype(jnp.float32), mets)
        (num, (den, mets)), g = jax.value_and_grad(f, has_aux=True)(train)
        g = jax.lax.with_sharding_constraint(g, setup.param_shardings["train"])
        return num, den, mets, g

    def step(params, opt_state, batch, rng):
        train, frozen = params["train"], params["frozen"]
        if grad_accum_steps == 1:
            num, den, mets, grads = grads_of(train, frozen, batch, rng)
        else:
            micro = {k: split_micro_batches(v, grad_accum_steps) for k, v in batch.items()}
            keys = jax.random.split(rng, grad_accum_steps)
            first = {k: v[0] for k, v in micro.items()}
            shapes = jax.eval_shape(lambda: grads_of(train, frozen, first, keys[0]))
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            zeros = zeros[:3] + (jax.lax.with_sharding_constraint(zeros[3], setup.param_shardings["train"]),)
            maxed = set(loss_fn.max_metrics)
            zeros[2].update({k: jnp.full_like(v, -jnp.inf) for k, v in zeros[2].items() if k in maxed})

            def body(acc, xs):
                mb, key = xs
                out = grads_of(train, frozen, mb, key)
                summed = jax.tree.map(jnp.add, acc, out)
                summed[2].update({k: jnp.maximum(acc[2][k], out[2][k]) for k in maxed if k in out[2]})
                return summed, None

            (num, den, mets, grads), _ = jax.lax.scan(body, zeros, (micro, keys))
        safe = jnp.where(den > 0, den, 1.0)
        grads = jax.tree.map(lambda g: (g / safe).astype(g.dtype), grads)
        grad_norm = optax.global_norm(grads)
        loss = num / safe
        updates, new_opt_state = tx.update(grads, opt_state, train)
        new_train = optax.apply_updates(train, updates)
        # A non-finite loss or gradient changes nothing: params and optimiser state stay as given,
        # bit for bit (train/runtime/nonfinite.py); the host counts the skip and may stop the run.
        stage = nonfinite.nonfinite_stage(loss, grad_norm)
        train = nonfinite.keep_if_finite(stage, new_train, train)
        opt_state = nonfinite.keep_if_finite(stage, new_opt_state, opt_state)
        # Every count in the chain advances together; the first one is the step number.
        count = optax.tree_utils.tree_get_all_with_path(opt_state, "count")[0][1]
        # The step's own numbers win over same-named loss-function metrics.
        metrics = {**mets, "loss": loss, "weight": den, "grad_norm": grad_norm,
                   "learning_rate": setup.schedule(jnp.maximum(count - 1, 0)),
                   nonfinite.SKIPPED: (stage != nonfinite.STAGE_NONE).astype(jnp.float32), nonfinite.STAGE: stage}
        return {"train": train, "frozen": frozen}, opt_state, metrics

    return step


class TrainStep:
    """The jitted step with shardings; compiled once per batch layout (shapes, field names and
    static fields such as image grids)."""

    def __init__(self, setup: TrainSetup, loss_fn: LossFunction, *, compute_dtype=jnp.float32,
                 grad_accum_steps: int = 1, donate: bool = True, compiler_options: Mapping[str, Any] | None = None):
        self.setup = setup
        # Passed to XLA as is, e.g. {"xla_backend_optimization_level": 0} for quick CPU compiles.
        self.compiler_options = dict(compiler_options or {})
        self.loss_fn = loss_fn
        self.compute_dtype = compute_dtype
        self.grad_accum_steps = grad_accum_steps
        self._donate = (0, 1) if donate else ()
        self._jitted: dict = {}

    @staticmethod
    def split_static(batch: Mapping[str, Any]) -> tuple[dict, dict]:
        arrays = {k: v for k, v in batch.items() if k not in STATIC_FIELDS}
        static = {k: tuple(tuple(int(x) for x in row) for row in np.asarray(v).reshape(-1, 3))
                  for k, v in batch.items() if k in STATIC_FIELDS}
        return arrays, static

    def jitted(self, arrays: Mapping[str, Any], static: Mapping[str, Any]):
        key = (tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in arrays.items())),
               tuple(sorted(static.items())))
        if key not in self._jitted:
            s = self.setup
            check_batch(arrays, s.mesh, s.rules, self.grad_accum_steps)
            fn = build_step_fn(s, self.loss_fn, compute_dtype=self.compute_dtype,
                               grad_accum_steps=self.grad_accum_steps, static=static)
            replicated = NamedSharding(s.mesh, PartitionSpec())
            in_sh = (s.param_shardings, s.opt_shardings, batch_shardings(arrays, s.mesh, s.rules), replicated)
            out_sh = (s.param_shardings, s.opt_shardings, replicated)
            self._jitted[key] = jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh,
                                        donate_argnums=self._donate,
                                        compiler_options=self.compiler_options or None)
        return self._jitted[key]

    @property
    def compiled_layouts(self) -> int:
        """How many batch layouts (shapes, fields, static fields) this step has compiled for."""
        return len(self._jitted)

    def lower(self, params, opt_state, batch, rng):
        arrays, static = self.split_static(batch)
        with logical.use_rules(self.setup.mesh, self.setup.rules):
            return self.jitted(arrays, static).lower(params, opt_state, arrays, rng)

    def place_batch(self, arrays: Mapping[str, Any]) -> dict:
        """Host arrays -> global arrays in the batch shardings. Every process passes the same full
        batch and keeps only its own shards, which also works when the mesh spans processes."""
        shardings = batch_shardings(arrays, self.setup.mesh, self.setup.rules)
        out = {}
        for k, v in arrays.items():
            if isinstance(v, jax.Array):
                out[k] = v
            else:
                host = np.asarray(v)
                out[k] = jax.make_array_from_callback(host.shape, shardings[k], lambda idx, h=host: h[idx])
        return out

    def __call__(self, params, opt_state, batch, rng):
        arrays, static = self.split_static(batch)
        arrays = self.place_batch(arrays)
        with logical.use_rules(self.setup.mesh, self.setup.rules):
            return self.jitted(arrays, static)(params, opt_state, arrays, rng)

    def compile_and_time(self, params, opt_state, batch, rng):
        """(compiled, compile seconds, arrays to call it with): for compare-sharding and benchmarks."""
        arrays, _ = self.split_static(batch)
        t0 = time.perf_counter()
        compiled = self.lower(params, opt_state, batch, rng).compile()
        return compiled, time.perf_counter() - t0, arrays
