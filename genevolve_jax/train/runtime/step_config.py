"""Train-step hyperparameters: optimiser, schedule, precision, remat, accumulation, freezing.

One factory serves two sections: ``sft`` (the SFT cold start) and ``train`` (GRPO). Defaults are the
paper's SFT cold start (METHOD.md §5): AdamW at lr 1e-5 with a cosine schedule and 2% warmup,
weight decay 1e-6, bf16 compute, activation checkpointing, LM only (vision tower and projector
frozen). Values the paper does not report are marked (ours).

What is not here, and why:
- batch sizes: the rows of one optimiser step are set by the data. SFT takes
  ``data.sft.rows_per_batch`` packed rows per step (the paper's 32 sequences); GRPO takes
  ``data.rl.prompts_per_step × rl.group_size`` rollouts per step (8 × 6 = 48 in the paper). A
  separate "global batch size" could only repeat those numbers, so there is none;
- the fused log-prob op's vocabulary chunk and temperatures: ``loss.logprob.*``;
- parameter storage and compute dtypes of the model itself: ``model.param_dtype`` / ``model.dtype``.
"""
from __future__ import annotations

import ml_collections

from genevolve_jax.config_checks import Checker, is_int

REMAT_POLICIES = ("none", "full", "save_dots")
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16")
PER_SHARD = -1      # grad_accum_steps: as many micro-batches as one packed row per batch shard takes


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
        # (ours) The peak lr when the model trains LoRA adapters (model.lora.rank > 0); 0 = the
        # learning_rate above. Adapters want their own step: Adam moves A and B by about the lr,
        # which moves the product s·A·B by far more or less than full tuning moves W, depending on
        # alpha / rank; and SFT's adapters are merged before RL's fresh ones, so each phase has its own.
        "lora_learning_rate": 0.0,
    })
    cfg.schedule = ml_collections.ConfigDict({
        "kind": "cosine",
        "warmup_ratio": 0.02,   # of the run's steps (SFT: epochs × batches; RL: rl.num_steps)
        "final_lr_ratio": 0.0,  # cosine/linear decay to this fraction of the peak
    })
    # Micro-batches per step (scanned); the step's rows split evenly. -1 (PER_SHARD): one packed
    # row per batch shard per micro-batch, derived from the mesh (micro_batches below).
    cfg.grad_accum_steps = 1
    cfg.compute_dtype = "bfloat16"  # params are cast to this for the step's forward and backward
    cfg.remat = "full"              # activation checkpointing per decoder layer
    cfg.freeze_vision = True        # SFT trains the LM only
    cfg.max_consecutive_nonfinite = 5  # (ours) stop after this many skipped non-finite steps in a row
    return cfg


def validate(cfg: ml_collections.ConfigDict, prefix: str = "train") -> ml_collections.ConfigDict:
    """Reject invalid values naming ``<prefix>.<field>`` (the section is "train" or "sft")."""
    check = Checker(prefix)
    o, s = cfg.optimizer, cfg.schedule
    check.number(o.learning_rate, "optimizer.learning_rate", low=0, low_open=True)
    check.number(o.lora_learning_rate, "optimizer.lora_learning_rate", low=0, rule=">= 0 (0: learning_rate)")
    check.number(o.weight_decay, "optimizer.weight_decay", low=0)
    for name in ("b1", "b2"):
        check.number(o[name], f"optimizer.{name}", low=0, high=1, high_open=True)
    check.number(o.eps, "optimizer.eps", low=0, low_open=True)
    check.number(o.max_grad_norm, "optimizer.max_grad_norm", low=0, rule=">= 0 (0 disables)")
    check.one_of(o.mu_dtype, "optimizer.mu_dtype", DTYPES)
    check.one_of(s.kind, "schedule.kind", SCHEDULES)
    check.number(s.warmup_ratio, "schedule.warmup_ratio", low=0, high=1, high_open=True)
    check.number(s.final_lr_ratio, "schedule.final_lr_ratio", low=0, high=1)
    check(is_int(cfg.grad_accum_steps) and (cfg.grad_accum_steps >= 1 or cfg.grad_accum_steps == PER_SHARD),
          "grad_accum_steps", ">= 1, or -1 (one packed row per batch shard per micro-batch)", cfg.grad_accum_steps)
    check.one_of(cfg.compute_dtype, "compute_dtype", DTYPES)
    check.one_of(cfg.remat, "remat", REMAT_POLICIES)
    check.boolean(cfg.freeze_vision, "freeze_vision")
    check.integer(cfg.max_consecutive_nonfinite, "max_consecutive_nonfinite", 1, ">= 1")
    return cfg


def validate_sft(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The ``sft`` section: the same fields as ``train``, errors naming ``sft.<field>``."""
    return validate(cfg, prefix="sft")


def micro_batches(grad_accum_steps: int, rows: int, shards: int) -> int:
    """The micro-batches of a step of ``rows`` rows split over ``shards`` batch shards: the count
    as set, or at -1 (PER_SHARD) ceil(rows / shards), one packed row per shard per micro-batch.

    The shipped GPU and pod configs use -1: a device then holds one row's activations whatever the
    device count (what their plans measure), and one config serves 8, 16 or 32 GPUs: 48 rollouts
    are 6 micro-batches on 8, 3 on 16 and 2 on 32; the RL batch's rows are a multiple of
    micro-batches × shards (train/rl/batch_assembly.py), so on 32 the second micro-batch's last 16
    rows are padding at worst."""
    if int(grad_accum_steps) != PER_SHARD:
        return int(grad_accum_steps)
    return -(-int(rows) // int(shards))


def resolve_micro_batches(cfg: ml_collections.ConfigDict, rows: int, shards: int) -> ml_collections.ConfigDict:
    """The section (``sft`` or ``train``) with ``grad_accum_steps`` as :func:`micro_batches` gives
    it: ``cfg`` itself when it is set, a copy when it is derived (-1)."""
    if int(cfg.grad_accum_steps) != PER_SHARD:
        return cfg
    out = cfg.copy_and_resolve_references()
    out.grad_accum_steps = micro_batches(PER_SHARD, rows, shards)
    return out
