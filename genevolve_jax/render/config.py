"""Rendering hyperparameters (the ``render`` config section), with the paper's values as defaults.

METHOD.md §8: Qwen-Image-Edit-2511 through diffusers, 40 steps, true_cfg_scale 4.0, guidance 1.0,
negative prompt " ", bf16, long side 1024 following the first reference's aspect in multiples of 16.
"""
from __future__ import annotations

import ml_collections

from genevolve_jax.config_checks import Checker, is_env_name, is_int, is_url

BACKENDS = ("tiny", "diffusers", "http", "gemini")
DTYPES = ("bfloat16", "float16", "float32")


def get_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    # tiny: random pipeline built from configs (CPU tests, embedded demo); diffusers: in-process
    # pipeline from a local directory; http: render service(s); gemini: Nano Banana Pro API.
    cfg.backend = "tiny"
    # Render seeds come from the run: rl.render_seed (+ the sample's index in its group) in
    # training, eval.seed in evaluation. The render service (`genevolve render-server`) takes its
    # host, port, devices and queue size as command-line flags.

    cfg.sampling = ml_collections.ConfigDict()
    cfg.sampling.num_inference_steps = 40
    cfg.sampling.true_cfg_scale = 4.0
    cfg.sampling.guidance_scale = 1.0
    cfg.sampling.negative_prompt = " "
    cfg.sampling.long_side = 1024     # output long side; aspect follows the first reference
    cfg.sampling.multiple_of = 16
    cfg.sampling.max_sequence_length = 512

    cfg.diffusers = ml_collections.ConfigDict()
    cfg.diffusers.edit_model_path = ""   # local Qwen-Image-Edit-2511 directory
    cfg.diffusers.text_model_path = ""   # optional text-to-image pipeline for reference-free programs
    cfg.diffusers.device = "cuda:0"
    cfg.diffusers.dtype = "bfloat16"

    cfg.tiny = ml_collections.ConfigDict()
    cfg.tiny.long_side = 32
    cfg.tiny.num_inference_steps = 2
    cfg.tiny.init_seed = 0            # seed of the random weights

    cfg.http = ml_collections.ConfigDict()
    cfg.http.urls = ["http://127.0.0.1:8100"]
    cfg.http.timeout_s = 600.0        # one 40-step 1024² edit takes tens of seconds on a busy GPU
    cfg.http.max_retries = 3
    cfg.http.backoff_s = 2.0
    cfg.http.api_key_env = ""         # NAME of an env var holding the render-server's bearer key; "" = none

    cfg.gemini = ml_collections.ConfigDict()
    cfg.gemini.model = "gemini-3-pro-image-preview"
    cfg.gemini.api_key_env = "GEMINI_API_KEY"
    cfg.gemini.base_url = "https://generativelanguage.googleapis.com"
    cfg.gemini.timeout_s = 300.0
    cfg.gemini.max_retries = 3
    cfg.gemini.backoff_s = 4.0

    cfg.throughput = ml_collections.ConfigDict()
    cfg.throughput.max_concurrency = 8
    cfg.throughput.requests_per_minute = 0.0   # 0 = unlimited
    return cfg


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Reject invalid values with an error naming the field."""
    check = Checker("render")
    check.one_of(cfg.backend, "backend", BACKENDS)
    s = cfg.sampling
    check.integer(s.num_inference_steps, "sampling.num_inference_steps", 1, ">= 1")
    check.number(s.true_cfg_scale, "sampling.true_cfg_scale", low=0)
    check.number(s.guidance_scale, "sampling.guidance_scale", low=0)
    check(isinstance(s.negative_prompt, str), "sampling.negative_prompt", "a string", s.negative_prompt)
    check.integer(s.multiple_of, "sampling.multiple_of", 1, ">= 1")
    check(is_int(s.long_side) and s.long_side >= s.multiple_of and s.long_side % s.multiple_of == 0,
          "sampling.long_side", f"a positive multiple of sampling.multiple_of ({s.multiple_of})", s.long_side)
    check(is_int(s.max_sequence_length) and 1 <= s.max_sequence_length <= 1024, "sampling.max_sequence_length",
          "in [1, 1024]", s.max_sequence_length)
    check.one_of(cfg.diffusers.dtype, "diffusers.dtype", DTYPES)
    if cfg.backend == "diffusers":
        check(bool(cfg.diffusers.edit_model_path), "diffusers.edit_model_path",
              "a local model directory when backend is 'diffusers'", cfg.diffusers.edit_model_path)
    check(is_int(cfg.tiny.long_side) and cfg.tiny.long_side >= 16 and cfg.tiny.long_side % 16 == 0,
          "tiny.long_side", "a positive multiple of 16", cfg.tiny.long_side)
    check.integer(cfg.tiny.num_inference_steps, "tiny.num_inference_steps", 1, ">= 1")
    urls = list(cfg.http.urls)
    for u in urls:
        check(is_url(u), "http.urls", "a list of http(s) URLs", u)
    if not is_env_name(cfg.http.api_key_env):   # never echo it: it may be the key itself, pasted by mistake
        check.fail("http.api_key_env", "must be the name of an environment variable holding the key, or empty; "
                                       "got a value that is not one (not shown)")
    for sec in ("http", "gemini"):
        check.number(cfg[sec].timeout_s, f"{sec}.timeout_s", low=0, low_open=True)
        check.integer(cfg[sec].max_retries, f"{sec}.max_retries", 1, ">= 1")
        check.number(cfg[sec].backoff_s, f"{sec}.backoff_s", low=0)
    check(bool(cfg.gemini.api_key_env) and is_env_name(cfg.gemini.api_key_env), "gemini.api_key_env",
          "the name of an environment variable", cfg.gemini.api_key_env)
    check.integer(cfg.throughput.max_concurrency, "throughput.max_concurrency", 1, ">= 1")
    check.number(cfg.throughput.requests_per_minute, "throughput.requests_per_minute", low=0)


def require_service(cfg: ml_collections.ConfigDict) -> None:
    """At the start of a run: backend "http" needs its service URLs.

    A config may leave ``render.http.urls`` empty until it is run (``configs/tpu_pod.py`` reads
    them from ``GENEVOLVE_RENDER_URLS``), so this is not part of :func:`validate`."""
    check = Checker("render")
    if cfg.backend == "http":
        check(len(cfg.http.urls) >= 1, "http.urls",
              "a non-empty list when backend is 'http': start the render service (launch/render_service.sh) "
              "and pass its http(s)://host:port as --config.render.http.urls (tpu_pod: GENEVOLVE_RENDER_URLS)",
              list(cfg.http.urls))
