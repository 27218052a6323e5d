"""`genevolve plan`: compile a config's steps for a target and say whether they fit, before the
hardware is allocated.

    genevolve plan --config qwen3vl_8b_gpu --target gpu:h100x8 --phase all --output plan.json
    genevolve plan --config tpu_pod --target v5p-64
    genevolve plan --config tiny_cpu --target cpu:8

Targets (genevolve_jax/plan/targets.py): ``cpu:N`` simulated devices (XLA_FLAGS is set here,
before jax starts its CPU client; a process whose jax already runs with fewer devices is told so),
``tpu:GEN:TOPOLOGY`` / ``GEN-N`` through libtpu (``pip install 'jax[tpu]==<jax version>'``),
``gpu:h100xN`` / ``gpu:h200xN`` / ``gpu:a100xN`` through JAX's CUDA plugin (``pip install
jax-cuda12-plugin==<jax version> jax-cuda12-pjrt==<jax version>``, and for the run's cuDNN attention
``nvidia-cudnn-cu12>=9.8,<10``; ``--attention xla`` plans the XLA path without it). Nothing is
allocated: the state is abstract, the compile deviceless.

Exit codes: 0 every phase fits, 3 a phase does not fit (the largest buffers are named), 2 bad
arguments or a target this machine cannot compile for.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from genevolve_jax.jobs.sft import accept_dotted_overrides

EXIT_DOES_NOT_FIT = 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny_cpu", help="run config: a name under configs/ or a .py path")
    p.add_argument("--target", default="", help="cpu:N | tpu:v5p:4x4x4 | v5p-64 | gpu:h100x8 | gpu:h200x8 "
                                                "(default: cpu with the config's mesh size, "
                                                "a -1 axis filling 8 devices)")
    p.add_argument("--phase", choices=("sft", "rl", "engine", "sync", "export", "engine_build", "all"),
                   default="all",
                   help="engine: the JaxEngine's prefill and decode chunk (with the trainer's state beside "
                        "it when rl.engine is jax); sync: the weights into the engine after a step (with "
                        "SGLang: the HF export it reloads); export: the final HF export; engine_build: the "
                        "JaxEngine's construction (rl.engine=jax)")
    p.add_argument("--model-config", default="", help="an HF config.json (or its folder) instead of the preset")
    p.add_argument("--sft-rows", type=int, default=0, help="SFT rows per step (0: data.sft.rows_per_batch)")
    p.add_argument("--sft-row-len", type=int, default=0, help="SFT tokens per row (0: data.sft.row_len/cutoff_len)")
    p.add_argument("--rl-rows", type=int, default=0, help="rollouts per step (0: prompts_per_step × group_size)")
    p.add_argument("--rl-seq-len", type=int, default=0,
                   help="tokens per rollout row (0: rl.max_tokens_per_row)")
    p.add_argument("--images-per-row", type=int, default=0, help="images per row (square, --image-side pixels)")
    p.add_argument("--image-side", type=int, default=448)
    p.add_argument("--mem-fraction", type=float, default=None,
                   help="share of each device the trainer may use (default: from the launch/config, see the docs)")
    p.add_argument("--attention", choices=("auto", "xla"), default="auto",
                   help="auto: the kernel the run picks on the target (cuDNN on GPU, splash on TPU); xla: the "
                        "XLA path (a GPU plan without the cuDNN libraries)")
    p.add_argument("--device-memory", default="", help="override the target's memory per device, e.g. 16GiB, 80GB")
    p.add_argument("--output", default="", help="write the plan as JSON here")
    accept_dotted_overrides(p)
    p.add_argument("overrides", nargs="*", help="dotted overrides: --config.a.b=value")


def prepare_jax(target_spec: str) -> None:
    """Before jax creates its CPU client: the simulated device count, and CPU as the only runtime
    platform (TPU/GPU targets are compiled for, never run on)."""
    from genevolve_jax.plan.targets import cpu_xla_flags, parse_target
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if target_spec.strip().lower().startswith("cpu:"):
        t = parse_target(target_spec, host_memory_bytes=0)
        os.environ["XLA_FLAGS"] = cpu_xla_flags(t.num_devices)


# Devices a -1 mesh axis ("every device the other axes leave") stands for when no --target is
# given: one node of 8 GPUs, the hardware the GPU configs are written for.
DEFAULT_NODE_DEVICES = 8


def default_target(cfg) -> str:
    """Simulated CPU devices for the config's mesh: its axes' product, where a -1 axis takes what
    the others leave of one node."""
    fixed = 1
    for v in cfg.sharding.mesh.values():
        fixed *= max(1, int(v))
    flexible = any(int(v) == -1 for v in cfg.sharding.mesh.values())
    n = fixed * max(1, DEFAULT_NODE_DEVICES // fixed) if flexible else fixed
    return f"cpu:{n}"


def parse_bytes(text: str) -> int:
    import re
    m = re.fullmatch(r"\s*([0-9.]+)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*", text)
    if not m:
        raise ValueError(f"--device-memory {text!r}: expected a size such as 16GiB or 80GB")
    unit = m.group(2) or "B"
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
             "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30, "TiB": 2 ** 40}[unit]
    return int(float(m.group(1)) * scale)


def run(args) -> int:
    import dataclasses

    from genevolve_jax.config_loader import load_config
    from genevolve_jax.plan.targets import TargetError, parse_target

    try:
        # Before the config loads: its checks may start jax, which must already see the simulated
        # device count and CPU as its only runtime platform (else the CUDA plugin refuses to load).
        if args.target:
            prepare_jax(args.target)
        cfg = load_config(args.config, list(args.overrides or []))
        spec = args.target or default_target(cfg)
        prepare_jax(spec)
        target = parse_target(spec)
        if args.device_memory:
            device = dataclasses.replace(target.device, memory_bytes=parse_bytes(args.device_memory),
                                         kind=f"{target.device.kind}, {args.device_memory}")
            target = dataclasses.replace(target, device=device)
        if args.attention != "auto":
            target = dataclasses.replace(target, attention=args.attention)
    except (TargetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from genevolve_jax.plan import build_plan
    from genevolve_jax.plan.abstract import ImageShape
    from genevolve_jax.plan.phases import Shapes
    from genevolve_jax.plan.report import print_plan
    from genevolve_jax.sharding.mesh import MeshError

    shapes = Shapes(sft_rows=args.sft_rows, sft_row_len=args.sft_row_len, rl_rows=args.rl_rows,
                    rl_seq_len=args.rl_seq_len, images=ImageShape(args.images_per_row, args.image_side))
    from genevolve_jax.plan import PHASES
    phases = PHASES if args.phase == "all" else (args.phase,)
    try:
        plan = build_plan(cfg, target, phases, shapes=shapes, model_config_path=args.model_config,
                          config_name=args.config, mem_fraction_override=args.mem_fraction,
                          progress=lambda m: print(f"plan: {m}", file=sys.stderr, flush=True))
    except (TargetError, MeshError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_plan(plan)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(plan.to_json(), f, indent=2)
        print(f"wrote {args.output}")
    return 0 if plan.all_fit else EXIT_DOES_NOT_FIT
