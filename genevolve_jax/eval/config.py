"""Evaluation settings (the ``eval`` config section), with the paper's values as defaults.

METHOD.md §9: WISE is scored with WiScore = (0.7C + 0.2R + 0.1A)/2 on scores in 0–2 and a
category-weighted overall; these weights live here so that a report always states the numbers it
was computed with. GenEvolve-Bench is scored with KScore = 0.1f + 0.4v + 0.4t + 0.1a on dimensions
in {0, 0.5, 1}: the reward's KScore, so its weights are read from ``reward.kscore`` (one definition
for training and evaluation), not repeated here.
"""
from __future__ import annotations

import ml_collections

from genevolve_jax.config_checks import Checker

PROGRAM_SOURCES = ("agent", "raw_request", "programs")
JUDGES = ("rule", "vlm")


def get_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()

    # Where programs come from: the agent policy (``checkpoint``), the raw request rendered as it is
    # (the "no agent" baseline), or the programs recorded by an earlier run (``programs_path``), so
    # that one policy's programs can be re-rendered by another renderer.
    cfg.program_source = "agent"
    cfg.checkpoint = ""           # policy checkpoint directory; empty = the embedded tiny policy
    cfg.programs_path = ""        # cases.jsonl of an earlier run, for program_source = "programs"
    cfg.judge = "rule"            # rule: offline proxy judge; vlm: OpenAI-compatible VLM judge
    cfg.seed = 0                  # render seed of every case (one image per case, as in the paper)

    cfg.runner = ml_collections.ConfigDict()
    cfg.runner.max_concurrency = 4        # cases in flight at once (agent + render + judge)
    cfg.runner.requests_per_minute = 0.0  # case starts per minute; 0 = unlimited
    cfg.runner.retry_missing = True       # on restart, re-run cases whose last record is missing
    cfg.runner.limit = 0                  # evaluate only the first N cases; 0 = all

    cfg.wise = ml_collections.ConfigDict()
    cfg.wise.w_consistency = 0.7
    cfg.wise.w_realism = 0.2
    cfg.wise.w_aesthetics = 0.1
    cfg.wise.w_cultural = 0.4
    cfg.wise.w_time = 0.167
    cfg.wise.w_space = 0.133
    cfg.wise.w_biology = 0.1
    cfg.wise.w_physics = 0.1
    cfg.wise.w_chemistry = 0.1

    cfg.report = ml_collections.ConfigDict()
    cfg.report.n_best = 4                 # cases shown in the best and in the worst grid
    cfg.report.n_worst = 4
    cfg.report.thumb_px = 256             # long side of images embedded in the HTML grid
    return cfg


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Reject invalid values with an error naming the field."""
    check = Checker("eval")
    check.one_of(cfg.program_source, "program_source", PROGRAM_SOURCES)
    if cfg.program_source == "programs":
        check(bool(cfg.programs_path), "programs_path", "a cases.jsonl path when program_source is 'programs'",
              cfg.programs_path)
    check.one_of(cfg.judge, "judge", JUDGES)
    check.integer(cfg.seed, "seed", 0, "an integer >= 0")
    r = cfg.runner
    check.integer(r.max_concurrency, "runner.max_concurrency", 1, ">= 1")
    check.number(r.requests_per_minute, "runner.requests_per_minute", low=0)
    check.boolean(r.retry_missing, "runner.retry_missing")
    check.integer(r.limit, "runner.limit", 0, ">= 0")
    names = ("w_consistency", "w_realism", "w_aesthetics")
    for n in names:
        check.number(cfg.wise[n], f"wise.{n}", low=0)
    total = sum(float(cfg.wise[n]) for n in names)
    check(abs(total - 1.0) < 1e-6, f"wise.{names[0]}", f"part of weights {names} summing to 1", total)
    cats = ("w_cultural", "w_time", "w_space", "w_biology", "w_physics", "w_chemistry")
    for n in cats:
        check.number(cfg.wise[n], f"wise.{n}", low=0)
    total = sum(float(cfg.wise[n]) for n in cats)
    check(abs(total - 1.0) < 1e-6, "wise.w_cultural", f"part of category weights {cats} summing to 1", total)
    check.integer(cfg.report.n_best, "report.n_best", 0, ">= 0")
    check.integer(cfg.report.n_worst, "report.n_worst", 0, ">= 0")
    check.integer(cfg.report.thumb_px, "report.thumb_px", 16, ">= 16")
