"""Agent hyperparameters: limits of the multi-turn protocol, sampling, tools and the program.

Defaults are the paper's and the released runtime's values (METHOD.md §1–3). ``validate`` rejects a
bad value with an error that names the dotted field.
"""
from __future__ import annotations

import ml_collections

from genevolve_jax.config_checks import Checker, is_env_name, is_int, is_url

SKILL_NAMES = ("spatial_layout", "aesthetic_drawing", "text_rendering", "creative_drawing",
               "anatomy_body_coherence", "attribute_binding", "physical_material_consistency",
               "quantity_counting")
BACKENDS = ("offline", "serper")


def default_agent_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    # Protocol limits (repo: 11 rounds, 4096 per round; paper: prompt 6144, response 30000).
    cfg.max_rounds = 11
    cfg.round_max_tokens = 4096
    cfg.prompt_max_tokens = 6144
    # Everything after the initial prompt: policy turns and observations together.
    cfg.response_max_tokens = 30000
    # Consecutive format errors after which the trajectory ends with termination "format_error".
    cfg.max_consecutive_format_errors = 3
    # Tool budget stated in the system prompt and enforced by the loop.
    cfg.max_tool_calls = 10
    # Observations carry the reference images as pixels (True) or as text metadata only (False,
    # the released runtime's behaviour).
    cfg.observation_pixels = False
    cfg.max_images_per_observation = 5
    # "full": the tool JSON schemas and all rules (Qwen3-VL); "compact": a ~100-token variant for
    # tiny models (agent/system_prompt.py).
    cfg.system_prompt = "full"

    cfg.sampling = ml_collections.ConfigDict()
    cfg.sampling.temperature = 0.7
    cfg.sampling.top_p = 0.95
    cfg.sampling.top_k = -1  # -1: no top-k cut

    cfg.program = ml_collections.ConfigDict()
    cfg.program.max_references = 2  # repo runtime 2; training trajectories carry up to 5
    cfg.program.min_references = 1  # Qwen-Image-Edit needs at least one reference

    cfg.tools = ml_collections.ConfigDict()
    cfg.tools.backend = "offline"
    cfg.tools.corpus_dir = ""  # empty: the demo corpus shipped in genevolve_jax/data/demo_corpus
    cfg.tools.search_top_k = 5
    cfg.tools.image_search_top_k = 5
    cfg.tools.max_queries_per_search = 5
    cfg.tools.snippet_chars = 400
    cfg.tools.timeout_s = 20.0
    cfg.tools.retries = 3
    cfg.tools.backoff_s = 1.0
    cfg.tools.max_concurrency = 16
    cfg.tools.image_cache_dir = ""  # empty: a per-process temporary directory
    cfg.tools.serper_url = "https://google.serper.dev"
    cfg.tools.serper_key_env = "SERPER_API_KEY"

    cfg.loop = ml_collections.ConfigDict()
    cfg.loop.max_concurrent_trajectories = 64
    cfg.loop.engine_batch_size = 32
    # How long the batcher waits for more trajectories to reach their sampling point.
    cfg.loop.batch_wait_ms = 2.0
    return cfg


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Reject invalid values before anything runs; returns ``cfg`` for chaining."""
    from genevolve_jax.agent.system_prompt import STYLES

    check = Checker("agent")
    for path in ("max_rounds", "round_max_tokens", "prompt_max_tokens", "response_max_tokens",
                 "max_consecutive_format_errors", "max_tool_calls", "max_images_per_observation",
                 "program.max_references", "tools.search_top_k", "tools.image_search_top_k",
                 "tools.max_queries_per_search", "tools.snippet_chars", "tools.retries",
                 "tools.max_concurrency", "loop.max_concurrent_trajectories",
                 "loop.engine_batch_size"):
        value = cfg
        for part in path.split("."):
            value = value[part]
        check(is_int(value) and value > 0, path, "a positive integer", value)
    check(cfg.max_rounds >= 2, "max_rounds", ">= 2 (one tool round and the answer)", cfg.max_rounds)
    check(cfg.round_max_tokens <= cfg.response_max_tokens, "round_max_tokens",
          f"<= agent.response_max_tokens ({cfg.response_max_tokens})", cfg.round_max_tokens)
    s = cfg.sampling
    check.number(s.temperature, "sampling.temperature", low=0)
    check.number(s.top_p, "sampling.top_p", low=0, high=1, low_open=True)
    check(s.top_k == -1 or (is_int(s.top_k) and s.top_k > 0), "sampling.top_k", "-1 or a positive integer",
          s.top_k)
    p = cfg.program
    check.integer(p.min_references, "program.min_references", 0, ">= 0")
    check(p.min_references <= p.max_references, "program.min_references",
          f"<= agent.program.max_references ({p.max_references})", p.min_references)
    t = cfg.tools
    check.one_of(t.backend, "tools.backend", BACKENDS)
    check(isinstance(t.corpus_dir, str), "tools.corpus_dir", "a folder path (empty: the demo corpus)",
          t.corpus_dir)
    check(isinstance(t.image_cache_dir, str), "tools.image_cache_dir", "a folder path (empty: a temporary one)",
          t.image_cache_dir)
    check(is_url(t.serper_url), "tools.serper_url", "an http(s) URL", t.serper_url)
    check.secret(is_env_name(t.serper_key_env), "tools.serper_key_env",
                 "the name of an environment variable holding the key (letters, digits, _), or empty")
    check.number(t.timeout_s, "tools.timeout_s", low=0, low_open=True)
    check.number(t.backoff_s, "tools.backoff_s", low=0)
    check.number(cfg.loop.batch_wait_ms, "loop.batch_wait_ms", low=0)
    check.one_of(cfg.system_prompt, "system_prompt", STYLES)
    check.boolean(cfg.observation_pixels, "observation_pixels")
    return cfg
