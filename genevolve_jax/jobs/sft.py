"""`genevolve sft`: the SFT cold start on a config (default: the embedded tiny_cpu defaults).

    genevolve sft --config tiny_cpu [--workdir DIR] [--config.sft.optimizer.learning_rate=1e-5 ...]

With ``synthetic.enabled`` and no ``data.sft.paths`` the synthetic teacher trajectories are written
into ``<workdir>/data`` first. A run whose work directory already holds checkpoints resumes.
"""
from __future__ import annotations

import argparse
import json
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny_cpu", help="config name under configs/ or a .py path")
    parser.add_argument("--workdir", default="", help="run directory (default: the config's workdir)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides: --config.a.b=value")
    accept_dotted_overrides(parser)


def accept_dotted_overrides(parser: argparse.ArgumentParser) -> None:
    """Let ``--config.a.b=value`` through argparse (it would reject them as unknown options): they
    are taken out before parsing and appended to ``args.overrides``."""
    inner = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        args = list(args or [])
        dotted = [a for a in args if a.startswith("--config.")]
        ns, unknown = inner([a for a in args if not a.startswith("--config.")], namespace)
        ns.overrides = list(getattr(ns, "overrides", None) or []) + dotted
        return ns, unknown

    parser.parse_known_args = parse_known_args


def load_run_config(args, extra: list[str] | None = None):
    from genevolve_jax.config_loader import load_config

    overrides = list(getattr(args, "overrides", []) or []) + list(extra or [])
    cfg = load_config(args.config, overrides)
    if args.workdir:
        cfg.workdir = args.workdir
    # Join a multi-host job (SLURM, TPU pod, explicit coordinator) before anything touches a
    # device; a one-process run (mode "auto" outside SLURM and pods, or "none") does nothing here.
    from genevolve_jax.sharding import distributed
    distributed.initialize(cfg.sharding.distributed)
    return cfg


def prepare_data(cfg, sft: bool = True, rl: bool = True) -> None:
    """Fill empty data paths with the synthetic set when the config asks for it."""
    need = (sft and not cfg.data.sft.paths) or (rl and not cfg.data.rl.paths)
    if not (need and cfg.synthetic.enabled):
        return
    from genevolve_jax.data.synthetic import write_synthetic_data

    out = write_synthetic_data(os.path.join(cfg.workdir, "data"), num_prompts=cfg.synthetic.num_prompts,
                               num_sft=cfg.synthetic.num_sft, agent_cfg=cfg.agent,
                               plans=list(cfg.synthetic.get("plans", ["query_knowledge,search,image_search"])))
    if not cfg.data.sft.paths:
        cfg.data.sft.paths = [out["sft"]]
    if not cfg.data.rl.paths:
        cfg.data.rl.paths = [out["rl"]]


def run_sft_config(cfg, progress: bool | None = None) -> dict:
    from genevolve_jax.train.sft.trainer import SFTTrainer

    prepare_data(cfg, sft=True, rl=False)
    trainer = SFTTrainer(cfg, progress=progress)
    try:
        return trainer.run()
    finally:
        trainer.close()


def run(args) -> int:
    cfg = load_run_config(args)
    out = run_sft_config(cfg, progress=False if args.no_progress else None)   # None: logging.progress decides
    losses = out["losses"]
    print(json.dumps({"steps": out["steps"], "first_loss": losses[0] if losses else None,
                      "last_loss": losses[-1] if losses else None, "model": out["model"],
                      "hf_export": out.get("hf_export")}, indent=2))
    return 0
