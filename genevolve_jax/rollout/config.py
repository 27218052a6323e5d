"""The ``engine`` section: the in-process JaxEngine's slots, cache length and mesh (rl.engine = "jax")."""
from __future__ import annotations

import ml_collections

from genevolve_jax.config_checks import Checker, is_int
from genevolve_jax.sharding.logical import MESH_AXES


def default_engine_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.max_slots = 32          # concurrent sequences in the decode batch
    cfg.max_seq_len = 8192      # prompt + generated tokens per request (cache slots per row)
    cfg.steps_per_sync = 8      # decode steps per jitted chunk between host checks
    cfg.min_prefill_bucket = 64  # fresh prompts are padded to max(this, next power of two)
    cfg.kv_reuse = True         # keep finished conversations' KV; a request sharing their prefix prefills the rest
    cfg.min_append_bucket = 16  # the appended part of a reused prefix is padded to max(this, next power of two)
    # Padded tokens per prefill call: a call of length bucket L always has max(1, this // L) rows
    # (at most max_slots), so prefill compiles once per (length, window) bucket, not per row count;
    # longer text is prefilled in chunks of this size (rounded down to a power of two).
    cfg.prefill_tokens = 2048
    cfg.raw_logprobs = False    # True: record log_softmax(logits) instead of log_softmax(logits / T)
    cfg.seed = 0                # seeds requests that carry none
    cfg.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1})
    return cfg


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    check = Checker("engine")
    for name in ("max_slots", "max_seq_len", "steps_per_sync", "min_prefill_bucket", "min_append_bucket",
                 "prefill_tokens"):
        check(is_int(cfg[name]) and cfg[name] >= 1, name, "a positive integer", cfg[name])
    check(cfg.min_prefill_bucket <= cfg.max_seq_len, "min_prefill_bucket",
          f"<= engine.max_seq_len ({cfg.max_seq_len})", cfg.min_prefill_bucket)
    check(cfg.min_append_bucket <= cfg.max_seq_len, "min_append_bucket",
          f"<= engine.max_seq_len ({cfg.max_seq_len})", cfg.min_append_bucket)
    check.boolean(cfg.kv_reuse, "kv_reuse")
    check.boolean(cfg.raw_logprobs, "raw_logprobs")
    check.integer(cfg.seed, "seed")
    unknown = set(cfg.mesh.keys()) - set(MESH_AXES)
    if unknown:
        check.fail("mesh", f"has unknown axes {sorted(unknown)}; the axes are {list(MESH_AXES)}")
    for axis in MESH_AXES:
        size = cfg.mesh.get(axis, 1)
        check(is_int(size) and size >= 1, f"mesh.{axis}", "a positive integer", size)
    return cfg
