"""Visual Experience Distillation hyperparameters (the ``experience`` config section).

Paper values (METHOD.md §7): pairs need a reward gap ≥ 0.20; memory capacity 500 with at most 8
insertions per step; a bundle is used only when the nearest stored request has cosine > 0.84.
The loss side (λ, top-10% token mask, c_tok) lives in ``train.losses.config`` (``sdl``).
"""
from __future__ import annotations

import ml_collections

from genevolve_jax.config_checks import Checker, is_env_name, is_int, is_url

SUMMARISER_BACKENDS = ("policy", "openai", "rule")
EMBEDDERS = ("hashed", "hf")


def get_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.enabled = True

    cfg.pairs = ml_collections.ConfigDict()
    cfg.pairs.min_gap = 0.20                  # R(τ+) − R(τ−) ≥ 0.20 (paper)
    cfg.pairs.skip_protocol_failures = True   # a pair whose difference is a protocol failure teaches nothing

    cfg.summariser = ml_collections.ConfigDict()
    # policy: the trainer's own policy through the JaxEngine (default, as in the issue);
    # openai: any OpenAI-compatible /v1/chat/completions endpoint; rule: the scripted offline
    # proxy (experience/rule_summariser.py) for runs whose policy cannot write a summary yet.
    cfg.summariser.backend = "policy"
    cfg.summariser.base_url = "http://127.0.0.1:30000"
    cfg.summariser.model = "Qwen/Qwen3-VL-8B-Instruct"
    cfg.summariser.api_key_env = ""           # name of the env var holding the key, if any
    cfg.summariser.timeout_s = 120.0
    cfg.summariser.temperature = 0.3
    cfg.summariser.max_tokens = 1024
    cfg.summariser.attempts = 3               # calls per pair before the pair is dropped and counted
    cfg.summariser.backoff_s = 1.0
    cfg.summariser.max_concurrency = 4
    cfg.summariser.max_observation_chars = 400   # per tool response in the transcripts shown
    cfg.summariser.max_bullets = 4            # per guidance field
    cfg.summariser.max_bullet_words = 30

    cfg.memory = ml_collections.ConfigDict()
    cfg.memory.capacity = 500                 # paper
    cfg.memory.max_inserts_per_step = 8       # paper
    # FIFO with reward-gap eviction (ours, the paper gives no detail): when full, the entry evicted
    # is the smallest-gap one among the oldest `eviction_window` entries (1 = pure FIFO).
    cfg.memory.eviction_window = 50

    cfg.embedder = ml_collections.ConfigDict()
    cfg.embedder.kind = "hashed"              # offline default; "hf" = a local embedding model folder
    cfg.embedder.dim = 1024                   # hashed only
    cfg.embedder.model_dir = ""               # hf only, e.g. a local Qwen3-Embedding-0.6B copy
    cfg.embedder.max_length = 512
    cfg.embedder.batch_size = 16
    cfg.embedder.instruction = ""             # hf only: prefix for every text (empty: none)

    cfg.retrieval = ml_collections.ConfigDict()
    cfg.retrieval.min_similarity = 0.84       # a bundle is used only when cosine > this (paper)
    return cfg


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Reject invalid values with an error naming the field."""
    check = Checker("experience")
    check.boolean(cfg.enabled, "enabled")
    check.number(cfg.pairs.min_gap, "pairs.min_gap", low=0, high=1)
    check.boolean(cfg.pairs.skip_protocol_failures, "pairs.skip_protocol_failures")
    s = cfg.summariser
    check.one_of(s.backend, "summariser.backend", SUMMARISER_BACKENDS)
    if s.backend == "openai":
        check(is_url(s.base_url), "summariser.base_url", "an http(s) URL", s.base_url)
        check(bool(s.model), "summariser.model", "a model name", s.model)
    check.secret(is_env_name(s.api_key_env), "summariser.api_key_env",
                 "the name of an environment variable holding the key (letters, digits, _), or empty")
    check.number(s.timeout_s, "summariser.timeout_s", low=0, low_open=True)
    check.number(s.temperature, "summariser.temperature", low=0)
    check.integer(s.max_tokens, "summariser.max_tokens", 64)
    check.integer(s.attempts, "summariser.attempts", 1)
    check.number(s.backoff_s, "summariser.backoff_s", low=0)
    check.integer(s.max_concurrency, "summariser.max_concurrency", 1)
    check.integer(s.max_observation_chars, "summariser.max_observation_chars", 0)
    check.integer(s.max_bullets, "summariser.max_bullets", 1)
    check.integer(s.max_bullet_words, "summariser.max_bullet_words", 3)
    m = cfg.memory
    check.integer(m.capacity, "memory.capacity", 1)
    check.integer(m.max_inserts_per_step, "memory.max_inserts_per_step", 0)
    check(is_int(m.eviction_window) and 1 <= m.eviction_window <= m.capacity, "memory.eviction_window",
          f"an int in [1, memory.capacity={m.capacity}]", m.eviction_window)
    e = cfg.embedder
    check.one_of(e.kind, "embedder.kind", EMBEDDERS)
    check.integer(e.dim, "embedder.dim", 16)
    if e.kind == "hf":
        check(bool(e.model_dir), "embedder.model_dir", "a local model folder when embedder.kind is 'hf'",
              e.model_dir)
    check.integer(e.max_length, "embedder.max_length", 8)
    check.integer(e.batch_size, "embedder.batch_size", 1)
    check(isinstance(e.instruction, str), "embedder.instruction", "a string (empty: none)", e.instruction)
    check.number(cfg.retrieval.min_similarity, "retrieval.min_similarity", low=-1, high=1)
