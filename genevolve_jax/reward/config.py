"""Reward hyperparameters (the ``reward`` config section), with the paper's values as defaults.

METHOD.md §4: R = (1−α)·R_img + α·R_text with α = 0.5; R_img = KScore = 0.1f + 0.4v + 0.4t + 0.1a
over {0, 0.5, 1} with t = 0.5 when text is not applicable; R_text in {0, .25, .5, .75, 1}; zero
reward for an empty gen_prompt or a reference count outside the allowed range.
"""
from __future__ import annotations

import ml_collections

from genevolve_jax.config_checks import Checker, is_env_name, is_int, is_url

JUDGE_KINDS = ("rule", "vlm", "local")


def get_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.alpha = 0.5
    # rule: offline rule judge (embedded default, a proxy); vlm: KScore + program judges over an
    # OpenAI-compatible endpoint; local: the same judges on a Qwen3-VL checkpoint run in-process
    # through the JaxEngine (reward.local.checkpoint).
    cfg.judge_kind = "rule"

    cfg.local = ml_collections.ConfigDict()
    cfg.local.checkpoint = ""   # orbax checkpoint (import-hf / trainer) or HF Qwen3-VL folder

    cfg.kscore = ml_collections.ConfigDict()
    cfg.kscore.w_faithfulness = 0.1
    cfg.kscore.w_visual_correctness = 0.4
    cfg.kscore.w_text_accuracy = 0.4
    cfg.kscore.w_aesthetics = 0.1
    cfg.kscore.text_na_value = 0.5
    cfg.kscore.levels = [0.0, 0.5, 1.0]

    cfg.program = ml_collections.ConfigDict()
    cfg.program.levels = [0.0, 0.25, 0.5, 0.75, 1.0]
    # (ours) Qwen-Image-Edit needs >= 1 reference; training trajectories carry up to 5.
    cfg.program.min_references = 1
    cfg.program.max_references = 5

    cfg.endpoint = ml_collections.ConfigDict()
    cfg.endpoint.base_url = "http://127.0.0.1:30000"   # SGLang-served Qwen3-VL or a hosted API
    cfg.endpoint.model = "Qwen/Qwen3-VL-30B-A3B-Instruct"
    cfg.endpoint.api_key_env = ""                       # name of the env var holding the key, if any
    cfg.endpoint.timeout_s = 180.0
    cfg.endpoint.max_retries = 3
    cfg.endpoint.backoff_s = 2.0
    cfg.endpoint.temperature = 0.0
    cfg.endpoint.max_tokens = 2048
    cfg.endpoint.max_concurrency = 16
    cfg.endpoint.requests_per_minute = 0.0              # 0 = unlimited

    cfg.rule = ml_collections.ConfigDict()
    # Task-metadata keys the rule judge reads (looked up in row["meta"], then row["extra_info"], then row).
    cfg.rule.facts_key = "required_facts"
    cfg.rule.text_key = "required_text"
    cfg.rule.skills_keys = ["primary_skills"]
    cfg.rule.min_note_chars = 8

    cfg.cache_dir = ""   # empty = no judge cache
    return cfg


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Reject invalid values with an error naming the field."""
    check = Checker("reward")
    check.number(cfg.alpha, "alpha", low=0, high=1)
    check.one_of(cfg.judge_kind, "judge_kind", JUDGE_KINDS)
    k = cfg.kscore
    names = ("w_faithfulness", "w_visual_correctness", "w_text_accuracy", "w_aesthetics")
    for name in names:
        check.number(k[name], f"kscore.{name}", low=0)
    weights = [k[n] for n in names]
    check(abs(sum(float(w) for w in weights) - 1.0) < 1e-6, "kscore weights", "summing to 1", weights)
    check.number(k.text_na_value, "kscore.text_na_value", low=0, high=1)
    for sec in ("kscore", "program"):
        lv = [float(x) for x in cfg[sec].levels]
        check(len(lv) >= 2 and lv == sorted(set(lv)) and lv[0] >= 0 and lv[-1] <= 1, f"{sec}.levels",
              "a strictly increasing list of >= 2 values in [0, 1]", list(cfg[sec].levels))
    p = cfg.program
    check.integer(p.min_references, "program.min_references", 0, ">= 0")
    check(is_int(p.max_references) and p.max_references >= p.min_references, "program.max_references",
          f">= program.min_references ({p.min_references})", p.max_references)
    e = cfg.endpoint
    # Empty = not set yet (required when the run starts: require_service); anything else a URL.
    check(e.base_url == "" or is_url(e.base_url), "endpoint.base_url", "an http(s) URL", e.base_url)
    if cfg.judge_kind == "vlm":
        check(bool(e.model), "endpoint.model", "a model name", e.model)
    if cfg.judge_kind == "local":
        check(bool(cfg.local.checkpoint), "local.checkpoint", "a checkpoint directory", cfg.local.checkpoint)
    check.secret(is_env_name(e.api_key_env), "endpoint.api_key_env",
                 "the name of an environment variable holding the key (letters, digits, _), or empty")
    check.number(e.timeout_s, "endpoint.timeout_s", low=0, low_open=True)
    check.integer(e.max_retries, "endpoint.max_retries", 1, ">= 1")
    check.number(e.backoff_s, "endpoint.backoff_s", low=0)
    check.number(e.temperature, "endpoint.temperature", low=0)
    check.integer(e.max_tokens, "endpoint.max_tokens", 16, ">= 16")
    check.integer(e.max_concurrency, "endpoint.max_concurrency", 1, ">= 1")
    check.number(e.requests_per_minute, "endpoint.requests_per_minute", low=0)
    check(bool(cfg.rule.facts_key) and bool(cfg.rule.text_key), "rule.facts_key/text_key", "non-empty",
          (cfg.rule.facts_key, cfg.rule.text_key))
    check.integer(cfg.rule.min_note_chars, "rule.min_note_chars", 0, ">= 0")


def require_service(cfg: ml_collections.ConfigDict) -> None:
    """At the start of a run: judge_kind "vlm" needs its endpoint.

    A config may leave ``reward.endpoint.base_url`` empty until it is run (``configs/tpu_pod.py``
    reads it from ``GENEVOLVE_JUDGE_URL``), so this is not part of :func:`validate`."""
    if cfg.judge_kind == "vlm":
        Checker("reward")(bool(cfg.endpoint.base_url), "endpoint.base_url",
                          "set when judge_kind is 'vlm': the OpenAI-compatible judge server's http(s)://host:port "
                          "(launch/sglang_server.sh), as --config.reward.endpoint.base_url (tpu_pod: "
                          "GENEVOLVE_JUDGE_URL)", cfg.endpoint.base_url)
