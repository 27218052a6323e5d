"""`genevolve serve`: the JaxEngine behind SGLang's native API subset + OpenAI chat completions.

    genevolve serve --hf-dir DIR | --checkpoint CKPT [--host 127.0.0.1] [--port 30000]
                    [--api-key-env NAME] [--max-in-flight 64] [--max-body-bytes ...] ...

Binds 127.0.0.1 by default. With ``--api-key-env NAME`` every route but /health wants
``Authorization: Bearer $NAME`` (the key is read from the environment, never from the command line).
Refuses to start (exit 2, naming both sizes) when the tokenizer has more ids than the model's
vocabulary. SGLangEngine and the `openai` client both talk to it.
"""
from __future__ import annotations

import argparse
import sys

from genevolve_jax.serving.policy_schema import ServeLimits

_DEFAULTS = ServeLimits()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", default="", help="orbax model checkpoint directory (model_config.json)")
    src.add_argument("--hf-dir", default="", help="Hugging Face Qwen3-VL directory (config.json + safetensors)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--model-name", default="genevolve", help="the only model name requests may ask for")
    parser.add_argument("--api-key-env", default="", metavar="NAME",
                        help="environment variable holding a bearer token required on every route but /health")
    parser.add_argument("--max-slots", type=int, default=32, help="concurrent sequences in the decode batch")
    parser.add_argument("--max-seq-len", type=int, default=8192, help="prompt + generated tokens per request")
    parser.add_argument("--steps-per-sync", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=512, help="default max_new_tokens")
    parser.add_argument("--raw-logprobs", action="store_true", help="record T=1 log-probs instead of at the temperature")
    limits = parser.add_argument_group("request limits (out of bounds: a 4xx naming the field)")
    limits.add_argument("--max-in-flight", type=int, default=_DEFAULTS.max_in_flight,
                        help="requests held at once (queued + decoding); more get 503 with Retry-After")
    limits.add_argument("--max-new-tokens-limit", type=int, default=_DEFAULTS.max_new_tokens,
                        help="largest max_new_tokens / max_tokens a request may ask for")
    limits.add_argument("--max-images", type=int, default=_DEFAULTS.max_images, help="images per request")
    limits.add_argument("--max-image-pixels", type=int, default=_DEFAULTS.max_image_pixels,
                        help="width x height of one image, checked before it is decoded")
    limits.add_argument("--max-body-bytes", type=int, default=_DEFAULTS.max_body_bytes, help="request body size")
    limits.add_argument("--max-n", type=int, default=_DEFAULTS.max_n, help="OpenAI `n` (choices per request)")


def limits_from_args(args: argparse.Namespace) -> ServeLimits:
    return ServeLimits(max_new_tokens=args.max_new_tokens_limit, max_images=args.max_images,
                       max_image_pixels=args.max_image_pixels, max_body_bytes=args.max_body_bytes,
                       max_in_flight=args.max_in_flight, max_n=args.max_n)


def run(args) -> int:
    import uvicorn

    from genevolve_jax.rollout.config import default_engine_config, validate
    from genevolve_jax.rollout.jax_engine import from_checkpoint
    from genevolve_jax.serving.policy_server import create_app
    from genevolve_jax.serving.guards import api_key_from_env

    cfg = default_engine_config()
    cfg.max_slots, cfg.max_seq_len, cfg.steps_per_sync = args.max_slots, args.max_seq_len, args.steps_per_sync
    cfg.min_prefill_bucket = min(cfg.min_prefill_bucket, args.max_seq_len)
    cfg.raw_logprobs = bool(args.raw_logprobs)
    path = args.checkpoint or args.hf_dir
    engine = None
    try:
        limits = limits_from_args(args)
        api_key = api_key_from_env(args.api_key_env)
        validate(cfg)
        engine, tokenizer = from_checkpoint(path, cfg)
        app = create_app(engine, tokenizer, model_name=args.model_name, model_path=path,
                         default_max_tokens=args.max_tokens, limits=limits, api_key=api_key)
    except (ValueError, FileNotFoundError) as exc:
        print(f"genevolve serve: {exc}", file=sys.stderr)
        if engine is not None:
            engine.close()
        return 2
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        engine.close()
    return 0
