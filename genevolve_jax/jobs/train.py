"""`genevolve train`: the self-evolution loop (GRPO + Visual Experience Distillation).

    genevolve train --config tiny_cpu --sft          # the README's main command: SFT, then evolve
    genevolve train --config qwen3vl_8b_gpu --config.model.path=runs/sft/model

``--sft`` runs the SFT cold start first (when ``model.path`` is empty) and starts the evolve loop
from its model. At the end: a checkpoint, an HF export, ``reward_curve.png`` and a reward table.
"""
from __future__ import annotations

import argparse
import json
import os

from genevolve_jax.jobs.sft import accept_dotted_overrides, load_run_config, prepare_data, run_sft_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny_cpu", help="config name under configs/ or a .py path")
    parser.add_argument("--workdir", default="", help="run directory (default: the config's workdir)")
    parser.add_argument("--sft", action="store_true", help="run the SFT cold start first (model.path empty)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides: --config.a.b=value")
    accept_dotted_overrides(parser)


def run_train_config(cfg, progress: bool | None = None) -> dict:
    from genevolve_jax.train.rl.trainer import EvolveTrainer

    prepare_data(cfg, sft=False, rl=True)
    trainer = EvolveTrainer(cfg, progress=progress)
    try:
        return trainer.run()
    finally:
        trainer.close()


def _report(out: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="reward per step (offline rule judge: a proxy, not KScore)")
    table.add_column("step")
    table.add_column("mean reward")
    table.add_column("loss")
    for i, (r, loss) in enumerate(zip(out["rewards"], out["losses"]), 1):
        table.add_row(str(i), "-" if r is None else f"{r:.4f}", f"{loss:.4f}")
    Console().print(table)


def run(args) -> int:
    cfg = load_run_config(args)
    progress = False if args.no_progress else None    # None: logging.progress decides
    sft_out = None
    if args.sft and not cfg.model.path:
        sft_out = run_sft_config(cfg, progress=progress)
        cfg.model.path = sft_out["model"]
        cfg.model.tokenizer = os.path.join(sft_out["model"], "hf_assets")
    out = run_train_config(cfg, progress=progress)
    _report(out)
    summary = {k: out.get(k) for k in ("steps", "checkpoints", "reward_curve", "hf_export")}
    if sft_out:
        summary["sft"] = {"steps": sft_out["steps"], "first_loss": sft_out["losses"][0],
                          "last_loss": sft_out["losses"][-1], "model": sft_out["model"]}
    print(json.dumps(summary, indent=2))
    return 0
