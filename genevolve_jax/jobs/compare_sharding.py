"""`genevolve compare-sharding`: the same train step on the same batch under several strategies.

For each strategy: build the mesh, plan the step (abstract state, compiled step: per-device
parameter + optimiser bytes, temporaries, peak, FLOPs, bytes moved per collective kind), then,
unless ``--plan-only``, build the state sharded from that abstract state (a jitted init with
sharded outputs: no host copy of the model), run the compiled step on it and report loss (they
must agree across strategies), compile and step time. One strategy at a time: its state is
freed before the next is built, and a strategy whose plan does not fit this host's free memory
is skipped with a line saying so. ``--plan-only`` compiles for any target (``--target
tpu:v5p-64``, ``gpu:h100x8``; see `genevolve plan`) and never allocates the model.

On CPU, ``--simulate-devices N`` fakes N devices; it must be applied before jax starts, which is
why jax is imported only inside :func:`run`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from genevolve_jax.plan.compile import COLLECTIVES

PRESETS = ("tiny", "qwen3vl_2b", "qwen3vl_8b")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny",
                   help=f"model: a preset ({', '.join(PRESETS)}) or a Hugging Face config.json / its directory")
    p.add_argument("--strategies", default="dp,fsdp,tp,fsdp_tp", help="comma-separated strategies")
    p.add_argument("--mesh", action="append", default=[], metavar="STRATEGY:AXIS=N,...",
                   help="mesh for one strategy, e.g. tp:data=2,tensor=4 (default: all devices on the "
                        "strategy's main axis)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps after compilation")
    p.add_argument("--layers", type=int, default=0, help="override the number of decoder layers (0 = keep)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--remat", choices=("none", "full", "save_dots"), default="none")
    p.add_argument("--scan-layers", action="store_true", help="scan the decoder layers")
    p.add_argument("--simulate-devices", type=int, default=0,
                   help="on CPU, simulate this many devices (sets XLA_FLAGS before jax starts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plan-only", action="store_true",
                   help="compile and report per-device memory, FLOPs and collectives; allocate nothing")
    p.add_argument("--target", default="", help="with --plan-only: cpu:N | tpu:v5p-64 | gpu:h100x8 … "
                                                "(default: this process's devices)")
    p.add_argument("--host-memory-fraction", type=float, default=0.85,
                   help="a strategy runs only when its planned peak on all devices fits this share of the "
                        "host's available memory (simulated devices share it)")
    p.add_argument("--output", default="compare_sharding.json", help="JSON results file")


# --- the comparison -------------------------------------------------------------------------------
def _default_mesh(strategy: str, n: int, cfg) -> dict[str, int]:
    t = math.gcd(n, cfg.text.num_key_value_heads)
    s = 2 if n % 2 == 0 else 1
    return {"dp": {"data": -1}, "fsdp": {"fsdp": -1}, "tp": {"data": -1, "tensor": t},
            "fsdp_tp": {"fsdp": -1, "tensor": t}, "fsdp_sp": {"fsdp": -1, "sequence": s},
            "sample": {"data": -1, "tensor": t}}[strategy]


def parse_mesh_args(items: list[str]) -> dict[str, dict[str, int]]:
    out = {}
    for item in items:
        if ":" not in item:
            raise ValueError(f"--mesh {item!r}: expected STRATEGY:AXIS=N[,AXIS=N...]")
        strategy, spec = item.split(":", 1)
        sizes = {}
        for part in spec.split(","):
            axis, _, value = part.partition("=")
            try:
                sizes[axis.strip()] = int(value)
            except ValueError:
                raise ValueError(f"--mesh {item!r}: {part!r} is not AXIS=N") from None
        out[strategy.strip()] = sizes
    return out


def check_model_dims(cfg, mesh, rules) -> None:
    """Refuse a mesh whose model-parallel axes do not divide the dims the rules shard with them
    (instead of silently replicating them, which would compare the wrong layout)."""
    from genevolve_jax.sharding import logical as logical_rules
    from genevolve_jax.sharding.mesh import MeshError
    t = cfg.text
    dims = {logical_rules.HEADS: ("text num_attention_heads", t.num_attention_heads),
            logical_rules.KV_HEADS: ("text num_key_value_heads", t.num_key_value_heads),
            logical_rules.MLP: ("text intermediate_size", t.intermediate_size),
            logical_rules.VOCAB: ("vocab_size", t.vocab_size), logical_rules.EMBED: ("text hidden_size", t.hidden_size)}
    for logical, (field, size) in dims.items():
        target = rules.get(logical)
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        n = math.prod(mesh.shape.get(a, 1) for a in axes)
        if n > 1 and size % n:
            raise MeshError(f"{field} = {size} is not divisible by mesh axes {list(axes)} (size {n}) "
                            f"that the rules map '{logical}' to")


def load_model_config(spec: str, layers: int, scan: bool, remat: str, dtype: str):
    from genevolve_jax.models.qwen3_vl import config as qwen_config
    if spec in PRESETS:
        cfg = getattr(qwen_config, spec)()
    elif os.path.exists(spec):
        cfg = qwen_config.Qwen3VLConfig.from_pretrained(spec)
    else:
        raise ValueError(f"--config {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a path")
    if layers:
        import dataclasses
        # Fewer decoder layers than deepstack levels is not a Qwen3-VL: keep the first levels.
        deep = cfg.vision.deepstack_visual_indexes[:layers]
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=layers),
                          vision=dataclasses.replace(cfg.vision, deepstack_visual_indexes=deep))
    return cfg.replace(scan_layers=scan, remat=remat, dtype=dtype)


def random_batch(cfg, batch_size: int, seq_len: int, seed: int):
    """Packed random trajectories (variable lengths, a few per row) with assistant masks."""
    import numpy as np
    from genevolve_jax.data.packing import Trajectory, pack
    rng = np.random.default_rng(seed)
    trajs, total = [], 0
    while total < batch_size * seq_len * 0.8:
        n = int(rng.integers(max(2, seq_len // 4), seq_len + 1))
        ids = rng.integers(0, min(cfg.text.vocab_size, cfg.image_token_id), n)
        trajs.append(Trajectory(ids, (rng.random(n) < 0.6).astype(np.float32)))
        total += n
    batch, _ = pack(trajs, seq_len, sort=True, num_rows=None)
    rows = batch["input_ids"].shape[0]
    if rows < batch_size:
        batch, _ = pack(trajs, seq_len, sort=True, num_rows=batch_size)
    return {k: v[:batch_size] for k, v in batch.items()}


def _train_config(args):
    from genevolve_jax.train.runtime import step_config
    tcfg = step_config.default_config()
    tcfg.grad_accum_steps = args.grad_accum
    tcfg.compute_dtype = args.dtype
    tcfg.remat = args.remat
    return step_config.validate(tcfg)


def sft_loss_for(cfg):
    from genevolve_jax.train.losses.config import default_loss_config
    from genevolve_jax.train.losses.step_losses import SFTLoss
    loss_cfg = default_loss_config()
    loss_cfg.logprob.chunk_size = min(8192, cfg.text.vocab_size)
    return SFTLoss(loss_cfg)


def abstract_batch(batch: dict, mesh, rules) -> dict:
    """ShapeDtypeStructs of a host batch in the step's batch shardings."""
    import jax
    from jax.sharding import NamedSharding

    from genevolve_jax.sharding import logical as logical_rules
    from genevolve_jax.train.runtime.batch_layout import batch_axes
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(
        mesh, logical_rules.partition_spec(batch_axes(k, v.ndim), rules, mesh, v.shape))) for k, v in batch.items()}


def plan_strategy(cfg, tcfg, strategy: str, mesh, batch: dict, target):
    """The plan of one strategy's step: its traced phase and compiled report (nothing allocated)."""
    from genevolve_jax.plan import report_phase
    from genevolve_jax.plan.phases import step_phase
    from genevolve_jax.sharding import logical as logical_rules
    from genevolve_jax.train.runtime.state import is_vision_path

    abstract = abstract_batch(batch, mesh, logical_rules.rules_for(strategy))
    phase = step_phase("sft", cfg, tcfg, sft_loss_for(cfg), mesh, strategy, abstract, target,
                       freeze=is_vision_path, desc=f"{len(batch['input_ids'])} × {batch['input_ids'].shape[1]}")
    return phase, report_phase(phase, target, mesh.size, 1.0, "whole device")


def _row(strategy, mesh, report) -> dict:
    fn = report.fns[0] if report.fns else None
    return {"strategy": strategy, "mesh": {k: int(v) for k, v in mesh.shape.items()},
            "param_opt_bytes_per_device": int(report.resident_bytes["params"] + report.resident_bytes["optimizer"]),
            "peak_temp_bytes": fn.temp_bytes if fn else 0, "planned_peak_bytes": int(report.peak_bytes),
            "flops_per_device": fn.flops if fn else 0.0,
            "collective_bytes": fn.collective_bytes if fn else {k: 0 for k in COLLECTIVES},
            "compile_s": (fn.lower_s + fn.compile_s) if fn else 0.0,
            "loss": None, "step_s": None, "skipped": "", "measured": False}


def _run_strategy(cfg, tcfg, strategy, mesh, phase, report, batch, args) -> tuple[float, float]:
    """Build the state sharded (jitted init with out_shardings), run the compiled step; returns
    (loss of the first step, median step seconds). Everything it allocates dies with it."""
    import jax
    import numpy as np
    from flax import nnx

    from genevolve_jax.models.qwen3_vl.model import Qwen3VLForConditionalGeneration
    from genevolve_jax.train.runtime.state import create_train_state, is_vision_path
    from genevolve_jax.train.runtime.step import TrainStep

    make = lambda: Qwen3VLForConditionalGeneration(cfg, rngs=nnx.Rngs(args.seed))  # noqa: E731
    setup, params, opt_state = create_train_state(make, tcfg, mesh, strategy, total_steps=max(1, args.steps),
                                                  freeze=is_vision_path)
    step = TrainStep(setup, sft_loss_for(cfg), compute_dtype=jax.numpy.dtype(args.dtype),
                     grad_accum_steps=args.grad_accum)
    arrays = step.place_batch(step.split_static(batch)[0])
    compiled = report.fns[0].executable
    rng = jax.random.key(args.seed)
    params, opt_state, metrics = compiled(params, opt_state, arrays, rng)
    loss = float(np.asarray(metrics["loss"]))
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        params, opt_state, m = compiled(params, opt_state, arrays, rng)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
    return loss, float(np.median(times)) if times else float("nan")


def compare(args) -> list[dict]:
    import gc

    import jax
    import psutil

    from genevolve_jax.plan.targets import parse_target, target_devices
    from genevolve_jax.sharding import logical as logical_rules
    from genevolve_jax.sharding.mesh import make_mesh

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for s in strategies:
        logical_rules.rules_for(s)
    meshes = parse_mesh_args(args.mesh)
    cfg = load_model_config(args.config, args.layers, args.scan_layers, args.remat, args.dtype)
    tcfg = _train_config(args)
    if args.target:
        if not args.plan_only:
            raise ValueError("--target compiles for other hardware: use it with --plan-only")
        target = parse_target(args.target)
        devices = target_devices(target)
    else:
        devices = jax.devices()
        target = parse_target(f"cpu:{len(devices)}") if devices[0].platform == "cpu" else None
        if target is None:
            from genevolve_jax.plan.targets import DeviceSpec, Target
            stats = devices[0].memory_stats() or {}
            target = Target(f"{devices[0].platform}:{len(devices)}", devices[0].platform, len(devices),
                            DeviceSpec(devices[0].device_kind, int(stats.get("bytes_limit", 0)), 0.0, 0.0))
    n = len(devices)
    # Check every mesh before building or compiling anything: an impossible one fails up front.
    plans = []
    for s in strategies:
        sizes = meshes.get(s) or _default_mesh(s, n, cfg)
        mesh = make_mesh(sizes, devices)
        check_model_dims(cfg, mesh, logical_rules.rules_for(s))
        plans.append((s, mesh))
    batch = random_batch(cfg, args.batch_size, args.seq_len, args.seed)
    rows = []
    for s, mesh in plans:
        phase, report = plan_strategy(cfg, tcfg, s, mesh, batch, target)
        row = _row(s, mesh, report)
        if not args.plan_only:
            # Simulated CPU devices share this host's memory: all of them must fit in what is free.
            free = psutil.virtual_memory().available
            need = report.peak_bytes * (n if devices[0].platform == "cpu" else 1)
            if devices[0].platform == "cpu" and need > args.host_memory_fraction * free:
                row["skipped"] = (f"planned peak {_fmt_bytes(report.peak_bytes)} × {n} devices = {_fmt_bytes(need)} "
                                  f"> {args.host_memory_fraction:g} × {_fmt_bytes(free)} free on this host")
                print(f"compare-sharding: skipping {s}: {row['skipped']}", file=sys.stderr, flush=True)
            else:
                row["loss"], row["step_s"] = _run_strategy(cfg, tcfg, s, mesh, phase, report, batch, args)
                row["measured"] = True
        rows.append(row)
        del phase, report
        gc.collect()
    return rows


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_table(rows: list[dict], plan_only: bool = False) -> None:
    import jax
    if jax.process_index() != 0:
        return
    from rich.console import Console
    from rich.table import Table
    title = "compare-sharding: one train step per strategy" + (" (PLANNED, not run)" if plan_only else "")
    table = Table(title=title)
    cols = ["strategy", "mesh"] + ([] if plan_only else ["loss", "step ms"]) + [
        "compile s", "params+opt/dev", "temp/dev", "peak/dev", "GFLOP/dev", *COLLECTIVES]
    for col in cols:
        table.add_column(col, justify="right" if col not in ("strategy", "mesh") else "left")
    for r in rows:
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1"
        measured = [] if plan_only else (
            [f"{r['loss']:.6f}", f"{1e3 * r['step_s']:.1f}"] if r["measured"] else ["skipped", "-"])
        table.add_row(r["strategy"], mesh, *measured, f"{r['compile_s']:.1f}",
                      _fmt_bytes(r["param_opt_bytes_per_device"]), _fmt_bytes(r["peak_temp_bytes"]),
                      _fmt_bytes(r["planned_peak_bytes"]), f"{r['flops_per_device'] / 1e9:.1f}",
                      *(_fmt_bytes(r["collective_bytes"][k]) for k in COLLECTIVES))
    Console(width=None if sys.stdout.isatty() else 220).print(table)
    for r in rows:
        if r["skipped"]:
            print(f"{r['strategy']}: skipped: {r['skipped']}")


def run(args) -> int:
    if args.target:
        from genevolve_jax.jobs.plan import prepare_jax
        prepare_jax(args.target)
    elif args.simulate_devices:
        if "jax" in sys.modules:
            import jax
            if len(jax.devices()) != args.simulate_devices:
                print(f"error: --simulate-devices {args.simulate_devices} must be applied before jax starts, "
                      f"and jax is already running with {len(jax.devices())} devices", file=sys.stderr)
                return 2
        else:
            flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count")]
            os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count="
                                                        f"{args.simulate_devices}"])
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from genevolve_jax.sharding import config as sharding_config
    from genevolve_jax.sharding import distributed
    from genevolve_jax.sharding.mesh import MeshError
    try:
        # Multi-host (SLURM / TPU pod / JAX_COORDINATOR_ADDRESS): join the peers before any device
        # is touched; a no-op on a single host.
        distributed.initialize(sharding_config.default_config().distributed)
        rows = compare(args)
    except (MeshError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_table(rows, args.plan_only)
    losses = [r["loss"] for r in rows if r["measured"]]
    spread = max(losses) - min(losses) if losses else 0.0
    result = {"config": args.config, "plan_only": args.plan_only, "target": args.target or "this host",
              "batch_size": args.batch_size, "seq_len": args.seq_len,
              "grad_accum": args.grad_accum, "dtype": args.dtype, "remat": args.remat,
              "scan_layers": args.scan_layers, "loss_spread": spread, "rows": rows}
    import jax
    if jax.process_index() == 0:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.output}; loss spread across strategies {spread:.3g}")
    return 0
