"""Agent hyperparameters: limits of the multi-turn protocol, sampling, tools and the program.

Defaults are the paper's and the released runtime's values (METHOD.md §1–3). ``validate`` rejects a
bad value with an error that names the dotted field.
"""
from __future__ import annotations

import ml_collections

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


def _positive_int(cfg, path: str) -> None:
    value = cfg
    for part in path.split("."):
        value = value[part]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"agent.{path} must be a positive integer, got {value!r}")


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Reject invalid values before anything runs; returns ``cfg`` for chaining."""
    for path in ("max_rounds", "round_max_tokens", "prompt_max_tokens", "response_max_tokens",
                 "max_consecutive_format_errors", "max_tool_calls", "max_images_per_observation",
                 "program.max_references", "tools.search_top_k", "tools.image_search_top_k",
                 "tools.max_queries_per_search", "tools.snippet_chars", "tools.retries",
                 "tools.max_concurrency", "loop.max_concurrent_trajectories",
                 "loop.engine_batch_size"):
        _positive_int(cfg, path)
    if cfg.max_rounds < 2:
        raise ValueError(f"agent.max_rounds must be >= 2 (one tool round and the answer), got {cfg.max_rounds}")
    if cfg.round_max_tokens > cfg.response_max_tokens:
        raise ValueError(f"agent.round_max_tokens must be <= agent.response_max_tokens "
                         f"({cfg.response_max_tokens}), got {cfg.round_max_tokens}")
    s = cfg.sampling
    if not s.temperature >= 0:
        raise ValueError(f"agent.sampling.temperature must be >= 0, got {s.temperature}")
    if not 0 < s.top_p <= 1:
        raise ValueError(f"agent.sampling.top_p must be in (0, 1], got {s.top_p}")
    if not (s.top_k == -1 or (isinstance(s.top_k, int) and s.top_k > 0)):
        raise ValueError(f"agent.sampling.top_k must be -1 or a positive integer, got {s.top_k}")
    p = cfg.program
    if not isinstance(p.min_references, int) or p.min_references < 0:
        raise ValueError(f"agent.program.min_references must be >= 0, got {p.min_references}")
    if p.min_references > p.max_references:
        raise ValueError(f"agent.program.min_references must be <= agent.program.max_references "
                         f"({p.max_references}), got {p.min_references}")
    t = cfg.tools
    if t.backend not in BACKENDS:
        raise ValueError(f"agent.tools.backend must be one of {BACKENDS}, got {t.backend!r}")
    if not t.timeout_s > 0:
        raise ValueError(f"agent.tools.timeout_s must be > 0, got {t.timeout_s}")
    if not t.backoff_s >= 0:
        raise ValueError(f"agent.tools.backoff_s must be >= 0, got {t.backoff_s}")
    if not cfg.loop.batch_wait_ms >= 0:
        raise ValueError(f"agent.loop.batch_wait_ms must be >= 0, got {cfg.loop.batch_wait_ms}")
    from genevolve_jax.agent.system_prompt import STYLES
    if cfg.get("system_prompt", "full") not in STYLES:
        raise ValueError(f"agent.system_prompt must be one of {STYLES}, got {cfg.system_prompt!r}")
    if not isinstance(cfg.observation_pixels, bool):
        raise ValueError(f"agent.observation_pixels must be a bool, got {cfg.observation_pixels!r}")
    return cfg
