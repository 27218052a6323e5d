"""The `genevolve` command: one subcommand per job.

Each subcommand lives in its own module, imported only when it runs, so `genevolve --help` stays
fast and a job's heavy dependencies (torch, diffusers) load only for the jobs that need them. A
module in the table defines ``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("genevolve_jax.jobs.demo",
             "tiny-model demo on the embedded defaults: forward, HF export, reload, compare"),
    "import-hf": ("genevolve_jax.jobs.convert", "convert a Hugging Face Qwen3-VL directory to an orbax checkpoint"),
    "export-hf": ("genevolve_jax.jobs.convert", "export an orbax checkpoint to a Hugging Face directory"),
    "plan": ("genevolve_jax.jobs.plan",
             "compile a config's steps for a target (cpu:N, tpu:…, gpu:h100x8) and report per-device "
             "memory, FLOPs, collectives; exit 3 when it does not fit"),
    "compare-sharding": ("genevolve_jax.jobs.compare_sharding",
                         "run one train step under several sharding strategies and compare loss, time, memory, collectives"),
    "render-server": ("genevolve_jax.jobs.render_server",
                      "render service (FastAPI, one worker per GPU, Qwen-Image-Edit JSON contract)"),
    "eval": ("genevolve_jax.jobs.eval", "run GenEvolve-Bench (KScore) or WISE (WiScore) end to end and write a report"),
    "serve": ("genevolve_jax.jobs.serve",
              "serve a policy on the JAX engine: SGLang-style /generate + OpenAI /v1/chat/completions"),
    "generate": ("genevolve_jax.jobs.generate",
                 "run one request through the agent loop on the embedded defaults; print trajectory and program"),
    "sft": ("genevolve_jax.jobs.sft", "SFT cold start (LM only, assistant tokens) on a config, default tiny_cpu"),
    "train": ("genevolve_jax.jobs.train", "self-evolution loop: GRPO + experience distillation, checkpoints, HF export"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genevolve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in sys.argv[1:2]:  # import only the module of the command that runs
            mod = importlib.import_module(module)
            adder = getattr(mod, f"add_{name.replace('-', '_')}_arguments", None) or mod.add_arguments
            adder(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sys.argv = [sys.argv[0], *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    mod = importlib.import_module(SUBCOMMANDS[args.command][0])
    runner = getattr(mod, f"run_{args.command.replace('-', '_')}", None) or mod.run
    from genevolve_jax.train.runtime.preemption import RunStopped
    try:
        return int(runner(args) or 0)
    except RunStopped as stop:   # preempted (0) or non-finite (3): the driver saved and said where
        return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
