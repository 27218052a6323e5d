"""The jitted functions a run executes, traced on abstract state for a target mesh.

- ``sft``: the SFT train step (``TrainStep`` + the SFT loss) on ``data.sft`` packed rows.
- ``rl``: the evolve train step (``TrainStep`` + the evolve loss: policy forward, stop-gradient
  teacher forward and the fused log-prob op) and the reference forward of the KL term (and of the
  recomputed π_old), whose frozen copy of the policy stays resident through the run.

Each phase returns the abstract state it keeps resident and its traced functions; nothing is
allocated. Attention is traced for the target's backend (``ops.attention.compile_for``), so a TPU
plan compiles splash attention and a GPU plan cuDNN's (the cuDNN libraries must be importable:
:func:`check_attention`; ``Target.attention = "xla"`` plans the XLA path instead).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from flax import nnx

from genevolve_jax.models.layers import LoRAParam
from genevolve_jax.models.lora import freeze_filter
from genevolve_jax.plan import abstract
from genevolve_jax.plan.report import fmt_bytes
from genevolve_jax.sharding import logical

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Shapes:
    """The batch a phase is planned at. Zeros mean: from the run config."""
    sft_rows: int = 0
    sft_row_len: int = 0
    rl_rows: int = 0
    rl_seq_len: int = 0
    images: abstract.ImageShape = dataclasses.field(default_factory=abstract.ImageShape)

    def sft(self, cfg) -> tuple[int, int]:
        s = cfg.data.sft
        return self.sft_rows or int(s.rows_per_batch), self.sft_row_len or int(s.row_len or s.cutoff_len)

    def rl(self, cfg) -> tuple[int, int]:
        """Rows: prompts × rollouts (at worst one packed row each). Tokens: ``rl.max_tokens_per_row``
        (rollouts are packed into rows of that budget; longer ones are masked)."""
        rows = self.rl_rows or int(cfg.data.rl.prompts_per_step) * int(cfg.rl.group_size)
        if self.rl_seq_len:
            return rows, self.rl_seq_len
        # Packed rows of rl.max_tokens_per_row; at worst one rollout per row.
        return rows, int(cfg.rl.max_tokens_per_row)


@dataclasses.dataclass
class TracedFn:
    name: str
    traced: Any                 # jax.stages.Traced
    extra_input_bytes: int      # per device, inputs that are not resident state (the batch)
    compiler_options: dict
    count_jaxpr: Any = None     # the same function traced with XLA attention, for counting FLOPs
    num_devices: int = 0        # devices it runs on (0: the plan's; the engine runs on its own mesh)


@dataclasses.dataclass
class Phase:
    name: str
    state: abstract.AbstractState | None  # None: no train state (the engine's phase)
    resident: dict[str, Any]    # name -> abstract tree held through the phase (params, opt, ref…)
    gradients_bytes: int        # per device: one gradient per trainable parameter
    fns: list[TracedFn]
    batch_desc: str


def _attention_impl(target) -> str:
    if target.attention:
        return target.attention
    if target.platform == "tpu":
        return "splash"
    if target.platform == "gpu":
        return "cudnn"
    return "xla"


def cudnn_available() -> bool:
    """cuDNN fused attention compiles only with the cuDNN libraries present (nvidia-cudnn-cu12)."""
    import importlib.util
    return importlib.util.find_spec("nvidia.cudnn") is not None if importlib.util.find_spec("nvidia") else False


CUDNN_INSTALL = "pip install 'nvidia-cudnn-cu12>=9.8,<10'"


def check_attention(target) -> None:
    """A GPU plan compiles the run's cuDNN attention, or says what it needs. Without the cuDNN
    libraries it used to fall back to the XLA path silently: a program the run never executes,
    whose [T, T] probabilities at 32,768-token rows made the 8B step compile for more than 16
    CPU-minutes and planned 85 GiB of temporaries for two layers (9.7 GiB with cuDNN)."""
    from genevolve_jax.plan.targets import TargetError
    if _attention_impl(target) == "cudnn" and not cudnn_available():
        raise TargetError(f"target {target.spec}: the run attends with cuDNN's fused kernel, and a deviceless "
                          f"compile builds it only with the cuDNN libraries installed (no GPU needed): "
                          f"{CUDNN_INSTALL} (about 700 MB). --attention xla plans the XLA path instead, "
                          f"which is not the run's program (its [T, T] scores make long rows slow to compile "
                          f"and far larger than the run's)")


def attention_implementation(target) -> str:
    return _attention_impl(target)


@contextlib.contextmanager
def attention_context(target, impl: str | None = None):
    """Trace attention as the target compiles it (``impl``: force one implementation)."""
    from genevolve_jax.ops import attention
    with attention.compile_for(target.attention_backend), \
            attention.use_implementation(impl or _attention_impl(target)):
        yield


def _trace(step, state: abstract.AbstractState, batch: dict, target, mesh, impl: str | None = None):
    arrays, static = step.split_static(batch)
    with attention_context(target, impl), logical.use_rules(mesh, state.setup.rules):
        return step.jitted(arrays, static).trace(state.params, state.opt_state, arrays, abstract.abstract_rng(mesh))


def _count_jaxpr(traced, make_fn, args, mesh, rules, target):
    """FLOPs are counted on dot_generals; fused attention kernels (splash, cuDNN) hide theirs, so
    the count comes from the same function traced afresh (a new function object: jit's trace cache
    would hand back the kernel trace) with the XLA attention path (full T × T)."""
    if _attention_impl(target) == "xla":
        return traced.jaxpr
    with attention_context(target, "xla"), logical.use_rules(mesh, rules):
        return jax.make_jaxpr(make_fn())(*args)


def _step_fn_factory(step, batch):
    from genevolve_jax.train.runtime.step import build_step_fn
    _, static = step.split_static(batch)
    return lambda: build_step_fn(step.setup, step.loss_fn, compute_dtype=step.compute_dtype,
                                 grad_accum_steps=step.grad_accum_steps, static=static)


def _step_args(state, batch, mesh):
    arrays, _ = _split_static(batch)
    return (state.params, state.opt_state, arrays, abstract.abstract_rng(mesh))


def _split_static(batch):
    from genevolve_jax.train.runtime.step import TrainStep
    return TrainStep.split_static(batch)


def step_phase(name: str, config, tc, loss, mesh, strategy: str, batch: dict, target, *, freeze=None,
               compiler_options: dict | None = None, desc: str = "") -> Phase:
    """One train step (``TrainStep`` with ``loss``) of ``config`` on ``batch``, traced abstractly."""
    from genevolve_jax.train.runtime.step import TrainStep

    state = abstract.abstract_train_state(config, tc, mesh, strategy, freeze=freeze)
    opts = dict(compiler_options or {})
    step = TrainStep(state.setup, loss, compute_dtype=_DTYPES[tc.compute_dtype],
                     grad_accum_steps=tc.grad_accum_steps, compiler_options=opts)
    traced = _trace(step, state, batch, target, mesh)
    count = _count_jaxpr(traced, _step_fn_factory(step, batch), _step_args(state, batch, mesh), mesh,
                         state.setup.rules, target)
    batch_bytes = abstract.bytes_per_device({k: v for k, v in batch.items() if hasattr(v, "sharding")})
    return Phase(name, state, {"params": state.params, "optimizer": state.opt_state},
                 abstract.bytes_per_device(state.params["train"]),
                 [TracedFn(f"{name}_step", traced, batch_bytes, opts, count)], desc)


def sft_phase(run_cfg, target, mesh, shapes: Shapes, *, model_config_path: str = "") -> Phase:
    from genevolve_jax.train.runtime.model_setup import compiler_options
    from genevolve_jax.train.runtime.state import is_vision_path
    from genevolve_jax.train.runtime.step_config import validate

    tc = validate(run_cfg.sft, prefix="sft")
    config = abstract.model_config(run_cfg, tc, model_config_path)
    rows, row_len = shapes.sft(run_cfg)
    rules = logical.rules_for(run_cfg.sharding.strategy)
    batch = abstract.sft_batch(config, rows, row_len, mesh, rules, shapes.images)
    desc = f"{rows} × {row_len} packed" + (f", {shapes.images.per_row} image(s) of {shapes.images.side}² per row"
                                          if shapes.images.per_row else "") + f", {tc.grad_accum_steps} micro-batch(es)"
    return step_phase("sft", config, tc, sft_loss(run_cfg, tc), mesh, run_cfg.sharding.strategy, batch, target,
                      freeze=freeze_filter(config.lora is not None, is_vision_path if tc.freeze_vision else None),
                      compiler_options=compiler_options(run_cfg.model), desc=desc)


def sft_loss(run_cfg, tc):
    """The SFT driver's loss function."""
    from genevolve_jax.train.losses.step_losses import SFTLoss
    return SFTLoss(run_cfg.loss)


def old_logprob_route(run_cfg) -> str:
    """"on_policy", "sampler" or "recompute" (train/rl/logprob_forward.py)."""
    from genevolve_jax.train.rl.logprob_forward import old_logprobs_route_of
    return old_logprobs_route_of(run_cfg.rl)


def logprob_forwards_per_step(run_cfg) -> int:
    """Whole-batch log-prob forwards outside the step: the KL reference's, and π_old's when the
    run recomputes it."""
    return int(float(run_cfg.loss.grpo.kl_coef) > 0) + int(old_logprob_route(run_cfg) == "recompute")


def rl_resident(run_cfg, state: abstract.AbstractState) -> dict[str, Any]:
    """What the trainer holds through an RL run: parameters, optimiser state and, with the KL term
    on, the frozen reference copy of the policy (none with LoRA: the reference is the base with
    the adapters off, :func:`reference_bytes_saved`)."""
    resident = {"params": state.params, "optimizer": state.opt_state}
    if float(run_cfg.loss.grpo.kl_coef) > 0 and not lora_on(state):
        resident["reference params"] = abstract.abstract_copy(state.params, state.setup.param_shardings)
    return resident


def lora_on(state: abstract.AbstractState) -> bool:
    """Whether the state trains LoRA adapters (its trained parameters are adapters)."""
    return any(isinstance(v, LoRAParam) for v in
               jax.tree.leaves(state.params["train"], is_leaf=lambda x: isinstance(x, nnx.Variable)))


def reference_bytes_saved(run_cfg, state: abstract.AbstractState) -> int:
    """Bytes a device does not hold for the KL reference because LoRA's reference is the base
    itself: the copy of the base parameters a full fine-tuning run keeps (0 without LoRA or KL)."""
    if float(run_cfg.loss.grpo.kl_coef) <= 0 or not lora_on(state):
        return 0
    variables = jax.tree.leaves(state.params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return abstract.bytes_per_device([v.get_value() for v in variables if not isinstance(v, LoRAParam)])


def rl_state(run_cfg, config, mesh) -> abstract.AbstractState:
    """The RL trainer's abstract state (``train`` section: freezing, optimiser)."""
    from genevolve_jax.train.runtime.state import is_vision_path
    from genevolve_jax.train.runtime.step_config import validate
    tc = validate(run_cfg.train)
    return abstract.abstract_train_state(config, tc, mesh, run_cfg.sharding.strategy,
                                         freeze=freeze_filter(config.lora is not None,
                                                              is_vision_path if tc.freeze_vision else None))


def rl_phase(run_cfg, target, mesh, shapes: Shapes, *, model_config_path: str = "") -> Phase:
    from genevolve_jax.train.runtime.model_setup import compiler_options
    from genevolve_jax.train.runtime.step import TrainStep
    from genevolve_jax.train.runtime.step_config import validate

    tc = validate(run_cfg.train)
    config = abstract.model_config(run_cfg, tc, model_config_path)
    state = rl_state(run_cfg, config, mesh)
    rows, seq_len = shapes.rl(run_cfg)
    kl = float(run_cfg.loss.grpo.kl_coef) > 0
    batch = abstract.evolve_batch(config, rows, seq_len, mesh, state.setup.rules, kl=kl,
                           old_logprobs=old_logprob_route(run_cfg) != "on_policy", images=shapes.images,
                           patch_multiple=int(run_cfg.rl.patch_multiple))
    opts = compiler_options(run_cfg.model)
    dtype = _DTYPES[tc.compute_dtype]
    from genevolve_jax.train.losses.step_losses import EvolveLoss
    from genevolve_jax.train.rl.config import tis_cap_of
    step = TrainStep(state.setup, EvolveLoss(run_cfg.loss, tis_cap=tis_cap_of(run_cfg.rl)), compute_dtype=dtype,
                     grad_accum_steps=tc.grad_accum_steps, compiler_options=opts)
    traced = _trace(step, state, batch, target, mesh)
    count = _count_jaxpr(traced, _step_fn_factory(step, batch), _step_args(state, batch, mesh), mesh,
                         state.setup.rules, target)
    fns = [TracedFn("evolve_step", traced, abstract.bytes_per_device(batch), opts, count)]
    resident = rl_resident(run_cfg, state)
    if run_cfg.rl.engine == "jax":
        # The in-process JaxEngine samples from its own copy (the step donates the trainer's), in
        # its own layout on its own (host-local) mesh, next to its KV cache.
        from genevolve_jax.plan.engine_phase import abstract_engine
        engine = abstract_engine(run_cfg, config, list(mesh.devices.flat)).resident()
        resident.update(engine)
    if logprob_forwards_per_step(run_cfg):
        # The trainer's own LogprobForward (micro-batched like the step) over the whole batch.
        from genevolve_jax.train.rl.logprob_forward import LogprobForward

        def make():
            return LogprobForward(state.setup, run_cfg.loss, dtype, micro_batches=tc.grad_accum_steps,
                                  compiler_options=opts)

        forward = make()
        view = forward.view(batch)
        with attention_context(target), logical.use_rules(mesh, state.setup.rules):
            traced = forward.jitted(view).trace(state.params, view)
        fresh = make()   # a new function object: jit would hand back the kernel trace
        count = _count_jaxpr(traced, lambda: (lambda p, b: fresh.forward(p, b)), (state.params, view), mesh,
                             state.setup.rules, target)
        fns.append(TracedFn("reference_forward", traced, abstract.bytes_per_device(view), opts, count))
    img = f", {shapes.images.per_row} image(s) of {shapes.images.side}² per row" if shapes.images.per_row else ""
    desc = f"{rows} rollouts × {seq_len} tokens{img}, {tc.grad_accum_steps} micro-batch(es)"
    saved = reference_bytes_saved(run_cfg, state)
    if saved:
        desc += (f", LoRA {config.lora.ranks}: KL reference = the base with adapters off "
                 f"({fmt_bytes(saved)} a device not copied)")
    return Phase("rl", state, resident, abstract.bytes_per_device(state.params["train"]), fns, desc)
