"""Data-pipeline hyperparameters (the ``data`` config section), with the paper's values as defaults.

METHOD.md §5: SFT on assistant tokens only, cutoff 32768 tokens, 32 sequences per step, 2 epochs.
METHOD.md §6: 8 prompts per GRPO step. ``validate`` rejects a bad value with an error naming the
dotted field.
"""
from __future__ import annotations

import ml_collections

from genevolve_jax.config_checks import Checker, is_int

FORMATS = ("auto", "jsonl", "parquet")
OVERFLOW = ("truncate", "drop", "error")
SHARDING = ("jax_process", "explicit", "none")


def get_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    # A malformed row (bad JSON, missing field, missing image, no assistant turn, …) is reported with
    # its file and line; True skips it and counts it, False fails the run on the first one.
    cfg.skip_malformed = False
    # Threads that read and tokenise rows ahead of the trainer (grain ReadOptions).
    cfg.read_threads = 2
    cfg.prefetch_buffer_size = 64

    # Host sharding: "jax_process" = one shard per JAX process (multi-host), "explicit" = the
    # shard_index / shard_count below, "none" = every host reads everything.
    cfg.sharding = "jax_process"
    cfg.shard_index = 0
    cfg.shard_count = 1

    cfg.sft = ml_collections.ConfigDict()
    cfg.sft.paths = []            # JSONL / parquet files in the GenEvolve-Data `sft` layout
    cfg.sft.format = "auto"       # by file extension
    cfg.sft.image_root = ""       # relative image paths resolve here; empty: the data file's folder
    cfg.sft.image_placeholder = "<image>"  # in string content, one per entry of the `images` list
    cfg.sft.seed = 0
    cfg.sft.num_epochs = 2
    cfg.sft.cutoff_len = 32768
    # Longer sequences: truncate (text only; image sequences are dropped), drop, or error.
    cfg.sft.overflow = "truncate"
    cfg.sft.pack = True           # False: one trajectory per row, right-padded (no packing)
    cfg.sft.rows_per_batch = 32   # global rows per step; each host gets rows_per_batch / shard_count
    cfg.sft.row_len = 0           # tokens per packed row; 0 = cutoff_len
    cfg.sft.train_eos = True      # train the assistant's <|im_end|> (it learns to stop)
    cfg.sft.image_min_pixels = 65536
    cfg.sft.image_max_pixels = 589824   # (ours) 768·768, a common SFT budget for Qwen-VL
    cfg.sft.merge_size = 2
    cfg.sft.patch_size = 16
    cfg.sft.temporal_patch_size = 2

    cfg.rl = ml_collections.ConfigDict()
    cfg.rl.paths = []             # JSONL / parquet files in the GenEvolve-Data `rl` layout
    cfg.rl.format = "auto"
    cfg.rl.image_root = ""
    cfg.rl.seed = 0
    cfg.rl.prompts_per_step = 8   # P (paper); each host gets prompts_per_step / shard_count
    cfg.rl.num_epochs = 0         # 0 = repeat forever (the trainer counts steps)
    cfg.rl.require_gt_image = True
    # Parquet rows may carry the GT image as bytes ({bytes, path}, the HF Image feature); they are
    # written here once, named by content hash. Empty: a folder beside the first data file.
    cfg.rl.image_cache_dir = ""
    return cfg


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Reject invalid values with an error naming the field."""
    check = Checker("data")
    check.boolean(cfg.skip_malformed, "skip_malformed")
    check.integer(cfg.read_threads, "read_threads", 0)
    check.integer(cfg.prefetch_buffer_size, "prefetch_buffer_size", 1)
    check.one_of(cfg.sharding, "sharding", SHARDING)
    check.integer(cfg.shard_count, "shard_count", 1)
    check(is_int(cfg.shard_index) and 0 <= cfg.shard_index < cfg.shard_count, "shard_index",
          f"an int in [0, shard_count={cfg.shard_count})", cfg.shard_index)

    s = cfg.sft
    check.one_of(s.format, "sft.format", FORMATS)
    check(all(isinstance(p, str) and p for p in s.paths), "sft.paths", "a list of file paths", list(s.paths))
    check(isinstance(s.image_placeholder, str) and bool(s.image_placeholder), "sft.image_placeholder",
          "a non-empty string", s.image_placeholder)
    check.integer(s.seed, "sft.seed")
    check.integer(s.num_epochs, "sft.num_epochs", 1)
    check.integer(s.cutoff_len, "sft.cutoff_len", 2)
    check.one_of(s.overflow, "sft.overflow", OVERFLOW)
    check.boolean(s.pack, "sft.pack")
    check.integer(s.rows_per_batch, "sft.rows_per_batch", 1)
    check(is_int(s.row_len) and (s.row_len == 0 or s.row_len >= s.cutoff_len), "sft.row_len",
          f"0 or an int >= sft.cutoff_len ({s.cutoff_len})", s.row_len)
    check.boolean(s.train_eos, "sft.train_eos")
    for name in ("image_min_pixels", "image_max_pixels", "merge_size", "patch_size", "temporal_patch_size"):
        check.integer(s[name], f"sft.{name}", 1)
    check(s.image_min_pixels <= s.image_max_pixels, "sft.image_min_pixels",
          f"<= sft.image_max_pixels ({s.image_max_pixels})", s.image_min_pixels)

    r = cfg.rl
    check.one_of(r.format, "rl.format", FORMATS)
    check(all(isinstance(p, str) and p for p in r.paths), "rl.paths", "a list of file paths", list(r.paths))
    check.integer(r.seed, "rl.seed")
    check.integer(r.prompts_per_step, "rl.prompts_per_step", 1)
    check.integer(r.num_epochs, "rl.num_epochs", 0, "an int >= 0 (0 = forever)")
    check.boolean(r.require_gt_image, "rl.require_gt_image")

    if cfg.sharding == "explicit":
        # Per-host batch sizes must be whole numbers: every host steps in lockstep.
        check(s.rows_per_batch % cfg.shard_count == 0, "sft.rows_per_batch",
              f"divisible by shard_count ({cfg.shard_count})", s.rows_per_batch)
        check(r.prompts_per_step % cfg.shard_count == 0, "rl.prompts_per_step",
              f"divisible by shard_count ({cfg.shard_count})", r.prompts_per_step)
