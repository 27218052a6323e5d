"""The JaxEngine's phase of a plan: its prefill and decode chunk, the very functions the engine
jits (genevolve_jax/rollout/engine_functions.py), traced on abstract arguments and compiled for the
target.

The engine is host-local: its mesh is ``engine.mesh`` over the first devices of the target (one
host of a TPU slice, the GPUs of a node). Resident per device: the engine's copy of the weights in
the sampling layout and the trainer's compute dtype, and its KV cache (``engine.max_slots`` rows ×
``engine.max_seq_len`` plus a chunk). When the RL run samples with it (``rl.engine = "jax"``), the
trainer's state stays on the same devices while it samples, so the phase adds it (and the RL phase
adds the engine's).

Planned calls, the largest the engine makes:
- ``engine_prefill``: the largest call: a chunk of ``engine.prefill_tokens`` (longer text goes in
  chunks) with the rows the engine gives that length, attending over the whole cache (the last
  chunk of a prompt at the cap); with the plan's images, one request of that length carrying them;
- ``engine_decode_chunk``: ``engine.steps_per_sync`` steps over every slot, attending over the
  whole cache.
The sampler variant is the run's (``agent.sampling``: top-p/top-k filtering or not).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from genevolve_jax.plan import abstract


@dataclasses.dataclass
class AbstractEngine:
    fns: Any        # rollout.engine_functions.EngineFunctions
    params: Any     # abstract nnx.State in the sampling layout
    rest: Any
    head: Any       # the decode head's abstract copy (tied head on CPU) or None
    build: Any      # () -> a new EngineFunctions (fresh jitted functions)
    asynchronous: bool = False   # rl.max_staleness ≥ 1: a second copy of the weights (resident())

    def resident(self) -> dict[str, Any]:
        """The engine's weights and KV cache. With ``rl.max_staleness`` ≥ 1 also a second copy of
        its weights: the trainer publishes each version as a copy in the engine's layout, which the
        producer thread hands to the engine between two jobs (train/rl/trainer.py:publish_weights),
        so from one publish until that hand-over, a train step included, both versions are held."""
        out = {"engine params": self.params, "engine KV cache": self.fns.abstract_cache()}
        if self.asynchronous:
            out["engine params, the published next version"] = self.params
        return out


def abstract_engine(run_cfg, config, devices) -> AbstractEngine:
    """The engine a run of ``run_cfg`` builds on ``devices``, on abstract weights (nothing allocated).
    Its weights are in the trainer's compute dtype (``train.compute_dtype``), as the trainer builds it."""
    from flax import nnx

    from genevolve_jax.models.qwen3_vl.model import Qwen3VLForConditionalGeneration
    from genevolve_jax.rollout import config as engine_config
    from genevolve_jax.rollout.engine_functions import EngineFunctions, engine_mesh

    ecfg = engine_config.validate(run_cfg.engine)
    # An engine is host-local: its mesh is over one process's devices (a target's first host).
    first = min(d.process_index for d in devices)
    devices = sorted((d for d in devices if d.process_index == first), key=lambda d: d.id)
    dtype = str(run_cfg.train.compute_dtype)
    # The engine runs the layers one by one over its cache, whatever the trainer's layout.
    config = config.replace(scan_layers=False, lora=None)   # the plain model: LoRA adapters arrive merged
    model = nnx.eval_shape(lambda: Qwen3VLForConditionalGeneration(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    mesh = engine_mesh(ecfg, devices)
    fns = EngineFunctions(graphdef, config, params, ecfg, mesh, dtype)
    params = fns.held(abstract.with_shardings(params, fns.param_shardings))
    return AbstractEngine(fns, params, rest, fns.abstract_decode_head(params, rest),
                          lambda: EngineFunctions(graphdef, config, params, ecfg, mesh, dtype),
                          asynchronous=int(run_cfg.rl.max_staleness) >= 1)


def sampling_mode_of(run_cfg) -> str:
    from genevolve_jax.rollout.engine_functions import sampling_mode
    return sampling_mode([run_cfg.agent.sampling])


def engine_phase(run_cfg, target, mesh, shapes, *, model_config_path: str = ""):
    """The ``engine`` phase: the engine's layers as a list, whatever ``model.scan_layers`` (the
    trainer's layout, which its state beside the engine keeps)."""
    from genevolve_jax.plan import phases
    from genevolve_jax.train.runtime.step_config import validate

    tc = validate(run_cfg.train)
    config = abstract.model_config(run_cfg, tc, model_config_path)
    eng = abstract_engine(run_cfg, config, list(mesh.devices.flat))
    fns, mode = eng.fns, sampling_mode_of(run_cfg)
    grids = tuple(shapes.images.grid(config.vision) for _ in range(shapes.images.per_row))
    length = fns.prefill_chunk
    rows = 1 if grids else fns.prefill_rows(length)
    prefill_args = fns.abstract_prefill_args(eng.params, eng.rest, rows, length, mode=mode, image_grids=grids,
                                             window=fns.capacity)
    decode_args = fns.abstract_decode_args(eng.params, eng.rest, eng.head, mode=mode)

    def trace(fns, impl=None):
        with fns.rules(), phases.attention_context(target, impl):
            return (fns.prefill.trace(*prefill_args), fns.decode_chunk.trace(*decode_args))

    # Attention as the engine picks it on the target ("auto": its cache-reading calls take the XLA
    # path on every backend). FLOPs are counted on dot_generals: where the target has a fused
    # kernel, count on the same functions built afresh (jit caches traces), traced with XLA's.
    traced = trace(fns, "auto")
    counted = traced if phases.attention_implementation(target) == "xla" else trace(eng.build(), "xla")
    fn_list = []
    for name, t, c, args, cache_at in (("engine_prefill", traced[0], counted[0], prefill_args, 3),
                                       ("engine_decode_chunk", traced[1], counted[1], decode_args, 4)):
        # Inputs that are not resident: everything but the weights, `rest` and the (donated) cache.
        inputs = [a for i, a in enumerate(args[:-2]) if i not in (0, 1, cache_at)]
        fn_list.append(phases.TracedFn(name, t, abstract.bytes_per_device(inputs), {}, c.jaxpr, fns.mesh.devices.size))
    resident = eng.resident()
    if run_cfg.rl.engine == "jax":
        state = phases.rl_state(run_cfg, config, mesh)
        resident.update({f"trainer {k}": v for k, v in phases.rl_resident(run_cfg, state).items()})
    img = f", {shapes.images.per_row} image(s) of {shapes.images.side}²" if shapes.images.per_row else ""
    desc = (f"prefill {rows} × {length} tokens{img} over {fns.capacity} cached positions; "
            f"decode {fns.chunk} steps × {fns.slots} slots over "
            f"{fns.capacity} cached positions; engine mesh {dict(fns.mesh.shape)} on the first "
            f"{fns.mesh.devices.size} device(s), sampler '{mode}'")
    return phases.Phase("engine", None, resident, 0, fn_list, desc)
