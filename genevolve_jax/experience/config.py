"""Visual Experience Distillation hyperparameters (the ``experience`` config section).

Paper values (METHOD.md §7): pairs need a reward gap ≥ 0.20; memory capacity 500 with at most 8
insertions per step; a bundle is used only when the nearest stored request has cosine > 0.84.
The loss side (λ, top-10% token mask, c_tok) lives in ``train.losses.config`` (``sdl``).
"""
from __future__ import annotations

import ml_collections

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


def _check(cond: bool, field: str, rule: str, value) -> None:
    if not cond:
        raise ValueError(f"experience.{field} must be {rule}, got {value!r}")


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Reject invalid values with an error naming the field."""
    _check(isinstance(cfg.enabled, bool), "enabled", "a bool", cfg.enabled)
    _check(0.0 <= float(cfg.pairs.min_gap) <= 1.0, "pairs.min_gap", "in [0, 1]", cfg.pairs.min_gap)
    s = cfg.summariser
    _check(s.backend in SUMMARISER_BACKENDS, "summariser.backend", f"one of {SUMMARISER_BACKENDS}", s.backend)
    if s.backend == "openai":
        _check(str(s.base_url).startswith(("http://", "https://")), "summariser.base_url", "an http(s) URL",
               s.base_url)
        _check(bool(s.model), "summariser.model", "a model name", s.model)
    _check(float(s.timeout_s) > 0, "summariser.timeout_s", "> 0", s.timeout_s)
    _check(float(s.temperature) >= 0, "summariser.temperature", ">= 0", s.temperature)
    _check(_int(s.max_tokens) and s.max_tokens >= 64, "summariser.max_tokens", "an int >= 64", s.max_tokens)
    _check(_int(s.attempts) and s.attempts >= 1, "summariser.attempts", "an int >= 1", s.attempts)
    _check(float(s.backoff_s) >= 0, "summariser.backoff_s", ">= 0", s.backoff_s)
    _check(_int(s.max_concurrency) and s.max_concurrency >= 1, "summariser.max_concurrency", "an int >= 1",
           s.max_concurrency)
    _check(_int(s.max_observation_chars) and s.max_observation_chars >= 0, "summariser.max_observation_chars",
           "an int >= 0", s.max_observation_chars)
    _check(_int(s.max_bullets) and s.max_bullets >= 1, "summariser.max_bullets", "an int >= 1", s.max_bullets)
    _check(_int(s.max_bullet_words) and s.max_bullet_words >= 3, "summariser.max_bullet_words", "an int >= 3",
           s.max_bullet_words)
    m = cfg.memory
    _check(_int(m.capacity) and m.capacity >= 1, "memory.capacity", "an int >= 1", m.capacity)
    _check(_int(m.max_inserts_per_step) and m.max_inserts_per_step >= 0, "memory.max_inserts_per_step",
           "an int >= 0", m.max_inserts_per_step)
    _check(_int(m.eviction_window) and 1 <= m.eviction_window <= m.capacity, "memory.eviction_window",
           f"an int in [1, memory.capacity={m.capacity}]", m.eviction_window)
    e = cfg.embedder
    _check(e.kind in EMBEDDERS, "embedder.kind", f"one of {EMBEDDERS}", e.kind)
    _check(_int(e.dim) and e.dim >= 16, "embedder.dim", "an int >= 16", e.dim)
    if e.kind == "hf":
        _check(bool(e.model_dir), "embedder.model_dir", "a local model folder when embedder.kind is 'hf'",
               e.model_dir)
    _check(_int(e.max_length) and e.max_length >= 8, "embedder.max_length", "an int >= 8", e.max_length)
    _check(_int(e.batch_size) and e.batch_size >= 1, "embedder.batch_size", "an int >= 1", e.batch_size)
    _check(-1.0 <= float(cfg.retrieval.min_similarity) <= 1.0, "retrieval.min_similarity", "in [-1, 1]",
           cfg.retrieval.min_similarity)
