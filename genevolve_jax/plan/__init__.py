"""Ahead-of-time plans: compile a run's jitted steps for hardware that is not here, and report
per-device memory, FLOPs and collectives (``genevolve plan``, ``compare-sharding --plan-only``).

:func:`build_plan` is the entry point: run config + target + phases -> :class:`report.Plan`.
Phases: the train steps (``sft``, ``rl``: plan/phases.py), the JaxEngine's calls (``engine``:
plan/engine_phase.py) and the weight transfers around them (``sync``, ``export``,
``engine_build``: plan/transfer_phase.py). A GPU phase is compiled for the memory share the
trainer gets there (:func:`mem_fraction`), as the trainer's own compile is.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

PHASES = ("sft", "rl", "engine", "sync", "export", "engine_build")
LAUNCH_SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "single_host.sh"
SHIPPED_COLOCATED_FRACTION = 0.55


def colocated_fraction() -> tuple[float, str]:
    """The trainer's XLA_PYTHON_CLIENT_MEM_FRACTION when the policy's SGLang server shares its
    GPUs, as the shipped launch script sets it."""
    try:
        text = LAUNCH_SCRIPT.read_text()
    except OSError:
        return SHIPPED_COLOCATED_FRACTION, "shipped launch default (SGLang colocated)"
    block = text.split("GENEVOLVE_POLICY_MODEL", 1)[-1]
    m = re.search(r"XLA_PYTHON_CLIENT_MEM_FRACTION:-([0-9.]+)", block)
    if not m:
        return SHIPPED_COLOCATED_FRACTION, "shipped launch default (SGLang colocated)"
    return float(m.group(1)), "launch/single_host.sh with the SGLang policy colocated"


def _local(url: str) -> bool:
    from urllib.parse import urlsplit
    host = urlsplit(url).hostname or ""
    return host in ("127.0.0.1", "localhost", "::1")


def mem_fraction(run_cfg, target, phase: str, override: float | None = None) -> tuple[float, str]:
    """The share of each device the trainer's allocator may use in ``phase``."""
    if override is not None:
        return override, "--mem-fraction"
    if target.platform != "gpu":
        return 1.0, "whole device"
    env = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    if env:
        return float(env), "XLA_PYTHON_CLIENT_MEM_FRACTION"
    # The RL trainer's process holds one allocator through its step, sync and export.
    if phase in ("rl", "sync", "export", "engine_build") and run_cfg.rl.engine == "sglang" \
            and any(_local(u) for u in run_cfg.rl.sglang.urls):
        return colocated_fraction()
    from genevolve_jax.train.runtime.model_setup import JAX_GPU_DEFAULT_FRACTION
    return JAX_GPU_DEFAULT_FRACTION, "JAX's default preallocation"


def mesh_for(run_cfg, devices, strategy_mesh: dict | None = None):
    from genevolve_jax.sharding.mesh import make_mesh
    return make_mesh(dict(strategy_mesh or run_cfg.sharding.mesh), devices)


def resolve_micro_batches(run_cfg, shapes, mesh):
    """Set ``run_cfg``'s (a copy's) ``grad_accum_steps`` of -1 to their count on ``mesh``, as the
    trainers do (train/runtime/step_config.micro_batches); the shapes with the RL rows the trainer's
    largest batch has (its rows are a multiple of micro-batches × batch shards)."""
    import dataclasses
    import math

    from genevolve_jax.train.rl.batch_assembly import bucket_rows
    from genevolve_jax.train.runtime.model_setup import batch_axes
    from genevolve_jax.train.runtime.step_config import micro_batches
    shards = math.prod(int(mesh.shape[a]) for a in batch_axes(run_cfg.sharding.strategy) if a in mesh.shape)
    for section, (rows, _) in ((run_cfg.sft, shapes.sft(run_cfg)), (run_cfg.train, shapes.rl(run_cfg))):
        section.grad_accum_steps = micro_batches(section.grad_accum_steps, rows, shards)
    if shapes.rl_rows:
        return shapes
    rows = bucket_rows(shapes.rl(run_cfg)[0], int(run_cfg.train.grad_accum_steps) * shards)
    return dataclasses.replace(shapes, rl_rows=rows)


def report_phase(phase, target, num_devices: int, frac: float, source: str, runs: dict | None = None,
                 progress=None, memory_bytes: int | None = None):
    """Compile a traced phase and sum its per-device memory. A phase whose resident state alone
    exceeds the budget is not compiled (it cannot fit whatever the step needs)."""
    from genevolve_jax.plan import abstract
    from genevolve_jax.plan.compile import compile_traced
    from genevolve_jax.plan.report import PhaseReport

    say = progress or (lambda msg: None)
    resident = {k: abstract.bytes_per_device(v) for k, v in phase.resident.items()}
    bufs = [b for k, v in phase.resident.items() for b in abstract.buffers(v, k)]
    budget = int((memory_bytes or target.device.memory_bytes) * frac)
    # The compile gets the share too: XLA:GPU schedules for the memory it is told of, which the
    # trainer sets from its allocator's share (model_setup.device_compiler_options).
    from genevolve_jax.train.runtime.model_setup import gpu_memory_options
    share = gpu_memory_options(frac) if target.platform == "gpu" else {}
    compiled, extra, note = [], {}, ""
    if sum(resident.values()) > budget:
        note = "not compiled: the resident state alone exceeds the budget"
    else:
        for fn in phase.fns:
            say(f"compiling {fn.name} for {target.spec}")
            c = compile_traced(fn.name, fn.traced, fn.num_devices or num_devices, {**fn.compiler_options, **share},
                               fn.count_jaxpr)
            compiled.append(c)
            extra[fn.name] = fn.extra_input_bytes
            bufs.append(abstract.Buffer(f"{fn.name}: compiled temporaries", (), "", c.temp_bytes))
    bufs.sort(key=lambda b: -b.bytes_per_device)
    return PhaseReport(phase.name, phase.batch_desc, resident, phase.gradients_bytes, compiled, extra, bufs[:12],
                       dict(runs or {}), frac, source, note)


def build_plan(run_cfg, target, phases=PHASES, *, shapes=None, model_config_path: str = "",
               config_name: str = "", mem_fraction_override: float | None = None, devices=None,
               strategy: str | None = None, mesh_sizes: dict | None = None, progress=None):
    """Trace and compile every function of ``phases`` for ``target``; returns a :class:`Plan`.

    ``strategy`` / ``mesh_sizes`` override the config's sharding (compare-sharding). A phase whose
    resident state alone exceeds the budget is reported without compiling (it cannot fit)."""
    from genevolve_jax.plan import phases as phase_functions
    from genevolve_jax.plan.report import Plan
    from genevolve_jax.plan.targets import target_devices

    run_cfg = run_cfg.copy_and_resolve_references()
    if strategy:
        run_cfg.sharding.strategy = strategy
    if mesh_sizes:
        run_cfg.sharding.mesh = type(run_cfg.sharding.mesh)(dict(mesh_sizes))
    shapes = shapes or phase_functions.Shapes()
    phase_functions.check_attention(target)
    devices = devices if devices is not None else target_devices(target)
    mesh = mesh_for(run_cfg, devices)
    shapes = resolve_micro_batches(run_cfg, shapes, mesh)
    say = progress or (lambda msg: None)
    reports = []
    runs = {"evolve_step": 1, "sft_step": 1, "reference_forward": phase_functions.logprob_forwards_per_step(run_cfg),
            "engine_prefill": 1, "engine_decode_chunk": 1}
    for name in phases:
        say(f"tracing phase {name}")
        from genevolve_jax.plan.engine_phase import engine_phase
        from genevolve_jax.plan.transfer_phase import TRANSFER_PHASES, transfer_phase
        if name in TRANSFER_PHASES:
            built = transfer_phase(name, run_cfg, target, mesh, shapes, model_config_path=model_config_path)
            if built is None:   # no such phase in this run (an engine built in-process)
                continue
            phase, transfer_runs = built
            runs.update(transfer_runs)
        else:
            build = {"sft": phase_functions.sft_phase, "rl": phase_functions.rl_phase, "engine": engine_phase}[name]
            phase = build(run_cfg, target, mesh, shapes, model_config_path=model_config_path)
        frac, source = mem_fraction(run_cfg, target, name, mem_fraction_override)
        reports.append(report_phase(phase, target, len(devices), frac, source, runs, progress=say))
    return Plan(config=config_name, target=target.spec, device_kind=target.device.kind, num_devices=len(devices),
                mesh={k: int(v) for k, v in mesh.shape.items()}, strategy=run_cfg.sharding.strategy,
                attention=phase_functions.attention_implementation(target),
                device_memory_bytes=target.device.memory_bytes,
                peak_flops=target.device.peak_flops, phases=reports)
