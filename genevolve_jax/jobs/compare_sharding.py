"""`genevolve compare-sharding`: the same train step on the same batch under several strategies.

For each strategy: build the mesh, place one model (same weights) in that strategy's shardings,
compile the step, run it, and report loss (they must agree), compile time, step time, per-device
parameter + optimiser bytes, peak temporary bytes (the compiled memory analysis) and bytes moved
per step by each kind of collective (read from the optimised HLO, loops weighted by their trip
counts). On CPU, ``--simulate-devices N`` fakes N devices; it must be applied before jax starts,
which is why jax is imported only inside :func:`run`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
PRESETS = ("tiny", "qwen3vl_2b", "qwen3vl_8b")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


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
    p.add_argument("--output", default="compare_sharding.json", help="JSON results file")


# --- HLO collectives ------------------------------------------------------------------------------
_COMP_RE = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?\s*->.*\{\s*$")
_SHAPE_RE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE_RE.findall(text):
        total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes per collective kind for one execution of the HLO module (per device).

    A collective's bytes are its result's bytes (an all-gather counts the gathered array). Ops in
    a while body count once per trip when XLA knows the trip count (scans do); async pairs count
    once (``-start``, not ``-done``).
    """
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        m = _COMP_RE.match(line.strip())
        if m and not line.startswith(" "):
            current = m.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is not None:
            comps[current].append(line)
    if entry is None:
        return {k: 0 for k in COLLECTIVES}
    edges: dict[str, list[tuple[str, int]]] = {c: [] for c in comps}
    for c, lines in comps.items():
        for line in lines:
            if " while(" in line:
                body = re.search(r"body=%?([\w.\-]+)", line)
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                if body:
                    edges[c].append((body.group(1), int(trips.group(1)) if trips else 1))
            for key in ("calls", "true_computation", "false_computation"):
                for callee in re.findall(key + r"=%?([\w.\-]+)", line):
                    edges[c].append((callee, 1))
            for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
                edges[c].extend((x.strip().lstrip("%"), 1) for x in group.split(","))
    mult = {c: 0 for c in comps}

    def visit(c: str, factor: int, depth: int = 0):
        if c not in mult or depth > 64:
            return
        mult[c] += factor
        for callee, n in edges[c]:
            visit(callee, factor * n, depth + 1)

    visit(entry, 1)
    out = {k: 0 for k in COLLECTIVES}
    for c, lines in comps.items():
        if not mult[c]:
            continue
        for line in lines:
            if "=" not in line:
                continue
            lhs_rhs = line.split("=", 1)[1]
            for kind in COLLECTIVES:
                m = re.search(r"\s" + kind + r"(-start)?\(", lhs_rhs)
                if m:
                    out[kind] += mult[c] * _shape_bytes(lhs_rhs[:m.start()])
                    break
    return out


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
    from genevolve_jax.sharding import logical as L
    from genevolve_jax.sharding.mesh import MeshError
    t = cfg.text
    dims = {L.HEADS: ("text num_attention_heads", t.num_attention_heads),
            L.KV_HEADS: ("text num_key_value_heads", t.num_key_value_heads),
            L.MLP: ("text intermediate_size", t.intermediate_size),
            L.VOCAB: ("vocab_size", t.vocab_size), L.EMBED: ("text hidden_size", t.hidden_size)}
    for logical, (field, size) in dims.items():
        target = rules.get(logical)
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        n = math.prod(mesh.shape.get(a, 1) for a in axes)
        if n > 1 and size % n:
            raise MeshError(f"{field} = {size} is not divisible by mesh axes {list(axes)} (size {n}) "
                            f"that the rules map '{logical}' to")


def load_model_config(spec: str, layers: int, scan: bool, remat: str, dtype: str):
    from genevolve_jax.models.qwen3_vl import config as C
    if spec in PRESETS:
        cfg = getattr(C, spec)()
    elif os.path.exists(spec):
        cfg = C.Qwen3VLConfig.from_pretrained(spec)
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


def compare(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from genevolve_jax.models.qwen3_vl.model import Qwen3VLForConditionalGeneration
    from genevolve_jax.sharding import logical as L
    from genevolve_jax.sharding.mesh import make_mesh
    from genevolve_jax.train import config as train_config
    from genevolve_jax.train.state import bytes_per_device, create_train_state, is_vision_path
    from genevolve_jax.train.losses.step_losses import SFTLoss
    from genevolve_jax.train.step import TrainStep

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for s in strategies:
        L.rules_for(s)
    meshes = parse_mesh_args(args.mesh)
    cfg = load_model_config(args.config, args.layers, args.scan_layers, args.remat, args.dtype)
    tcfg = train_config.default_config()
    tcfg.grad_accum_steps = args.grad_accum
    train_config.validate(tcfg)
    n = len(jax.devices())
    # Check every mesh before building or compiling anything: an impossible one fails up front.
    plans = []
    for s in strategies:
        sizes = meshes.get(s) or _default_mesh(s, n, cfg)
        mesh = make_mesh(sizes)
        check_model_dims(cfg, mesh, L.rules_for(s))
        plans.append((s, mesh))
    # One compiled initialisation (eager init would dispatch hundreds of small ops); every
    # strategy then receives copies of these same weights.
    make = lambda: Qwen3VLForConditionalGeneration(cfg, rngs=nnx.Rngs(args.seed))  # noqa: E731
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    model = nnx.merge(graphdef, jax.jit(lambda: nnx.split(make())[1])())
    batch = random_batch(cfg, args.batch_size, args.seq_len, args.seed)
    rows = []
    for s, mesh in plans:
        setup, params, opt_state = create_train_state(model, tcfg, mesh, s, freeze=is_vision_path)
        state_bytes = bytes_per_device((params, opt_state))
        step = TrainStep(setup, SFTLoss(chunk_size=min(8192, cfg.text.vocab_size)),
                         compute_dtype=jnp.dtype(args.dtype), grad_accum_steps=args.grad_accum, donate=True)
        compiled, compile_s, _ = step.compile_and_time(params, opt_state, batch, jax.random.key(0))
        mem = compiled.memory_analysis()
        temp = int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else 0
        coll = collective_bytes(compiled.as_text())
        rng = jax.random.key(args.seed)
        params, opt_state, metrics = step(params, opt_state, batch, rng)
        loss = float(np.asarray(metrics["loss"]))
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            params, opt_state, m = step(params, opt_state, batch, rng)
            jax.block_until_ready(m["loss"])
            times.append(time.perf_counter() - t0)
        rows.append({"strategy": s, "mesh": {k: int(v) for k, v in mesh.shape.items()}, "loss": loss,
                     "compile_s": compile_s, "step_s": float(np.median(times)) if times else float("nan"),
                     "param_opt_bytes_per_device": int(state_bytes), "peak_temp_bytes": temp,
                     "collective_bytes": coll})
    return rows


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_table(rows: list[dict]) -> None:
    import jax
    if jax.process_index() != 0:
        return
    from rich.console import Console
    from rich.table import Table
    table = Table(title="compare-sharding: one train step per strategy")
    for col in ("strategy", "mesh", "loss", "compile s", "step ms", "params+opt/dev", "peak temp",
                *COLLECTIVES):
        table.add_column(col, justify="right" if col not in ("strategy", "mesh") else "left")
    for r in rows:
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1"
        table.add_row(r["strategy"], mesh, f"{r['loss']:.6f}", f"{r['compile_s']:.2f}", f"{1e3 * r['step_s']:.1f}",
                      _fmt_bytes(r["param_opt_bytes_per_device"]), _fmt_bytes(r["peak_temp_bytes"]),
                      *(_fmt_bytes(r["collective_bytes"][k]) for k in COLLECTIVES))
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def run(args) -> int:
    if args.simulate_devices:
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
    print_table(rows)
    losses = [r["loss"] for r in rows]
    spread = max(losses) - min(losses) if losses else 0.0
    result = {"config": args.config, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "grad_accum": args.grad_accum, "dtype": args.dtype, "remat": args.remat,
              "scan_layers": args.scan_layers, "loss_spread": spread, "rows": rows}
    import jax
    if jax.process_index() == 0:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.output}; loss spread across strategies {spread:.3g}")
    return 0
