"""Train-step hyperparameters: optimiser, schedule, precision, remat, accumulation, freezing.

Defaults are the paper's SFT cold start (METHOD.md §5): AdamW at lr 1e-5 with a cosine schedule
and 2% warmup, weight decay 1e-6, 32 sequences per step, bf16 compute, activation checkpointing,
LM only (vision tower and projector frozen). Values the paper does not report are marked (ours).
"""
from __future__ import annotations

import ml_collections

REMAT_POLICIES = ("none", "full", "save_dots")
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16")


def default_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.optimizer = ml_collections.ConfigDict({
        "learning_rate": 1e-5,
        "weight_decay": 1e-6,
        "b1": 0.9,              # (ours: AdamW defaults)
        "b2": 0.999,
        "eps": 1e-8,
        "max_grad_norm": 1.0,   # (ours) global-norm clipping; 0 disables it
        "mu_dtype": "float32",  # first-moment dtype; bf16 halves its memory
    })
    cfg.schedule = ml_collections.ConfigDict({
        "kind": "cosine",
        "warmup_ratio": 0.02,
        "total_steps": 1000,    # set by the driver: SFT from epochs × batches, RL from rl.num_steps
        "final_lr_ratio": 0.0,  # cosine/linear decay to this fraction of the peak
    })
    cfg.global_batch_size = 32      # sequences (packed rows) per optimiser step
    cfg.grad_accum_steps = 1        # micro-batches per step (scanned)
    cfg.max_tokens = 32768          # SFT cutoff (packing budget per row)
    cfg.compute_dtype = "bfloat16"
    cfg.param_dtype = "float32"     # fp32 master weights; "bfloat16" keeps params in bf16 only
    cfg.remat = "full"              # activation checkpointing per decoder layer
    cfg.freeze_vision = True        # SFT trains the LM only
    cfg.logprob_chunk_size = 8192   # vocab chunk of the fused logprob op
    return cfg


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    o, s = cfg.optimizer, cfg.schedule
    if not o.learning_rate > 0:
        raise ValueError(f"train.optimizer.learning_rate must be > 0, got {o.learning_rate}")
    if o.weight_decay < 0:
        raise ValueError(f"train.optimizer.weight_decay must be >= 0, got {o.weight_decay}")
    for name in ("b1", "b2"):
        if not 0 <= o[name] < 1:
            raise ValueError(f"train.optimizer.{name} must be in [0, 1), got {o[name]}")
    if not o.eps > 0:
        raise ValueError(f"train.optimizer.eps must be > 0, got {o.eps}")
    if o.max_grad_norm < 0:
        raise ValueError(f"train.optimizer.max_grad_norm must be >= 0 (0 disables), got {o.max_grad_norm}")
    if o.mu_dtype not in DTYPES:
        raise ValueError(f"train.optimizer.mu_dtype must be one of {DTYPES}, got {o.mu_dtype!r}")
    if s.kind not in SCHEDULES:
        raise ValueError(f"train.schedule.kind must be one of {SCHEDULES}, got {s.kind!r}")
    if not 0 <= s.warmup_ratio < 1:
        raise ValueError(f"train.schedule.warmup_ratio must be in [0, 1), got {s.warmup_ratio}")
    if s.total_steps < 1:
        raise ValueError(f"train.schedule.total_steps must be >= 1, got {s.total_steps}")
    if not 0 <= s.final_lr_ratio <= 1:
        raise ValueError(f"train.schedule.final_lr_ratio must be in [0, 1], got {s.final_lr_ratio}")
    if cfg.global_batch_size < 1:
        raise ValueError(f"train.global_batch_size must be >= 1, got {cfg.global_batch_size}")
    if cfg.grad_accum_steps < 1:
        raise ValueError(f"train.grad_accum_steps must be >= 1, got {cfg.grad_accum_steps}")
    if cfg.global_batch_size % cfg.grad_accum_steps:
        raise ValueError(f"train.global_batch_size {cfg.global_batch_size} must be divisible by "
                         f"train.grad_accum_steps {cfg.grad_accum_steps}")
    if cfg.max_tokens < 2:
        raise ValueError(f"train.max_tokens must be >= 2, got {cfg.max_tokens}")
    for name in ("compute_dtype", "param_dtype"):
        if cfg[name] not in DTYPES:
            raise ValueError(f"train.{name} must be one of {DTYPES}, got {cfg[name]!r}")
    if cfg.remat not in REMAT_POLICIES:
        raise ValueError(f"train.remat must be one of {REMAT_POLICIES}, got {cfg.remat!r}")
    if cfg.logprob_chunk_size < 1:
        raise ValueError(f"train.logprob_chunk_size must be >= 1, got {cfg.logprob_chunk_size}")
    return cfg


def model_overrides(cfg: ml_collections.ConfigDict, scan_layers: bool = True) -> dict:
    """The Qwen3VLConfig fields the train config decides: ``model_cfg.replace(**model_overrides(t))``.

    Parameters are held in ``param_dtype`` (fp32 master weights by default) and every matmul runs
    in ``compute_dtype``; the step also casts parameters to the compute dtype before use, so fsdp
    gathers move bf16.
    """
    return {"param_dtype": cfg.param_dtype, "dtype": cfg.compute_dtype, "remat": cfg.remat,
            "scan_layers": scan_layers}
