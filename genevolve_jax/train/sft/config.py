"""The ``sft_run`` section of `genevolve sft`: how long the cold start runs and what it writes.
SFT runs ``data.sft.num_epochs`` (2, METHOD.md §5) epochs unless ``max_steps`` cuts it short."""
from __future__ import annotations

import ml_collections

from genevolve_jax.config_checks import Checker, is_int
from genevolve_jax.train.runtime.checkpoint import EXPORT_DTYPES

_require = Checker()


def default_sft_run_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "max_steps": 0,             # 0 = every batch of data.sft.num_epochs epochs
        "export_hf": True,
        "export_dtype": "bfloat16",
        "output": "",               # orbax model for `genevolve train`; empty = <workdir>/model
    })


def validate_sft_run(cfg) -> ml_collections.ConfigDict:
    _require(is_int(cfg.max_steps) and cfg.max_steps >= 0, "sft_run.max_steps", ">= 0", cfg.max_steps)
    _require(cfg.export_dtype in EXPORT_DTYPES, "sft_run.export_dtype", "float32 or bfloat16",
             cfg.export_dtype)
    return cfg
