"""Request validation of `genevolve serve`: SGLang 0.5.23's native ``/generate`` schema and OpenAI's
chat completions, each field checked for type and bound before anything reaches the engine.

SGLang's contract (its generated ``sglang.api.v1`` decoder, which its server runs before a request
is admitted): unknown top-level keys are ignored; unknown ``sampling_params`` keys are refused
("unknown field ..."); integers must be JSON integers, floats any JSON number; its ``verify`` bounds
(temperature finite >= 0, top_p in (0, 1], top_k -1 or >= 1, min_p in [0, 1], penalties in their
ranges, max_new_tokens >= 0). Keys SGLang knows but this server does not implement (penalties,
grammars, n > 1, logit_bias, ...) are accepted at their default values and refused with a 400
naming them otherwise, so a request never silently samples differently from what it asked for.

Every failure is a :class:`RequestError` (a 4xx naming the dotted field). Limits on sizes are
:class:`ServeLimits`, set from `genevolve serve`'s flags.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from genevolve_jax.rollout.engine import SamplingParams
from genevolve_jax.serving.guards import RequestError, decode_base64_image, open_image

I64 = (-(2 ** 63), 2 ** 63 - 1)
TOP_K_OFF = 1 << 30  # SGLang's default top_k: the whole vocabulary


@dataclasses.dataclass(frozen=True)
class ServeLimits:
    """Bounds on what one request may ask for; each has a `genevolve serve` flag."""
    max_new_tokens: int = 4096          # --max-new-tokens-limit
    max_images: int = 8                 # --max-images
    max_image_pixels: int = 4096 * 4096  # --max-image-pixels: checked from the header, before decoding
    max_body_bytes: int = 32 * 2 ** 20  # --max-body-bytes
    max_in_flight: int = 64             # --max-in-flight: more gets 503 + Retry-After
    max_n: int = 8                      # --max-n: OpenAI `n`
    max_messages: int = 256
    max_stop: int = 32                  # SGLang's MAX_STOP_COUNT
    max_stop_chars: int = 256
    max_stop_token_ids: int = 1024
    retry_after_s: int = 1

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ServeLimits.{f.name} must be a positive integer, got {v!r}")


# --- typed field readers (SGLang's wording for type errors) ---------------------------------------
def _describe(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean `{str(v).lower()}`"
    if isinstance(v, int):
        return f"integer `{v}`"
    if isinstance(v, float):
        return f"floating point `{v}`"
    if isinstance(v, str):
        return f'string "{v[:40]}"'
    return "sequence" if isinstance(v, list) else "map" if isinstance(v, dict) else type(v).__name__


def _bad_type(param: str, v: Any, expected: str) -> RequestError:
    return RequestError(f"{param}: invalid type: {_describe(v)}, expected {expected}", param)


def read_int(v: Any, param: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad_type(param, v, "an integer")
    if lo is not None and v < lo:
        raise RequestError(f"{param} must be >= {lo}, got {v}", param)
    if hi is not None and v > hi:
        raise RequestError(f"{param} must be <= {hi}, got {v}", param)
    return v


def read_float(v: Any, param: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad_type(param, v, "a number")
    try:
        x = float(v)
    except OverflowError:
        x = math.inf
    if not math.isfinite(x):
        raise RequestError(f"{param} must be finite, got {v}", param)
    return x


def read_bool(v: Any, param: str) -> bool:
    if not isinstance(v, bool):
        raise _bad_type(param, v, "a boolean")
    return v


def read_str(v: Any, param: str) -> str:
    if not isinstance(v, str):
        raise _bad_type(param, v, "a string")
    return v


def read_stops(v: Any, param: str, limits: ServeLimits, max_count: int | None = None) -> tuple[str, ...]:
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list):
        raise _bad_type(param, v, "a string or a list of strings")
    cap = max_count or limits.max_stop
    if len(stops) > cap:
        raise RequestError(f"{param} holds {len(stops)} strings; at most {cap}", param)
    out = []
    for i, s in enumerate(stops):
        s = read_str(s, f"{param}[{i}]")
        if not s or len(s) > limits.max_stop_chars:
            raise RequestError(f"{param}[{i}] must have 1..{limits.max_stop_chars} characters", param)
        out.append(s)
    return tuple(out)


# --- SGLang sampling_params -------------------------------------------------------------------------
# Every key of SGLang 0.5.23's SamplingParams. Value: (reader, default this server implements or None
# when any valid value is implemented).
_UNSUPPORTED_DEFAULTS = {"stop_regex": None, "min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
                         "repetition_penalty": 1.0, "min_new_tokens": 0, "n": 1, "json_schema": None,
                         "regex": None, "ebnf": None, "structural_tag": None, "logit_bias": {},
                         "custom_params": None, "beam_width": None, "watermark": None, "choice": []}
SGLANG_SAMPLING_KEYS = ("max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k",
                        "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens",
                        "n", "json_schema", "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens",
                        "spaces_between_special_tokens", "no_stop_trim", "stream_interval", "logit_bias",
                        "sampling_seed", "custom_params", "beam_width", "watermark", "choice")


def _check_sglang_types(sp: dict, limits: ServeLimits) -> None:
    """Types and SGLang's own value ranges of the keys this server does not act on."""
    p = "sampling_params."
    for key in ("min_p", "frequency_penalty", "presence_penalty", "repetition_penalty"):
        if sp.get(key) is not None:
            read_float(sp[key], p + key)
    for key in ("min_new_tokens", "n", "stream_interval", "beam_width"):
        if sp.get(key) is not None:
            read_int(sp[key], p + key, *I64)
    for key in ("json_schema", "regex", "ebnf", "structural_tag"):
        if sp.get(key) is not None:
            read_str(sp[key], p + key)
    for key in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
        if sp.get(key) is not None:
            read_bool(sp[key], p + key)
    if sp.get("stop_regex") is not None:
        read_stops(sp["stop_regex"], p + "stop_regex", limits)
    if sp.get("logit_bias") is not None:
        if not isinstance(sp["logit_bias"], dict):
            raise _bad_type(p + "logit_bias", sp["logit_bias"], "a map")
        for k, v in sp["logit_bias"].items():
            read_float(v, f"{p}logit_bias.{k}")
    if sp.get("watermark") is not None and not isinstance(sp["watermark"], dict):
        raise _bad_type(p + "watermark", sp["watermark"], "struct WatermarkRequestConfig")
    if sp.get("choice") is not None:
        if not isinstance(sp["choice"], list):
            raise _bad_type(p + "choice", sp["choice"], "a sequence")
        for i, c in enumerate(sp["choice"]):
            read_str(c, f"{p}choice[{i}]")


def parse_sglang_sampling(sp: Any, limits: ServeLimits, default_max: int) -> tuple[dict, int]:
    """``sampling_params`` -> (SamplingParams keyword arguments without max_new_tokens, max_new_tokens)."""
    p = "sampling_params."
    if sp is None:
        sp = {}
    if isinstance(sp, list):
        raise RequestError("sampling_params: a list (batched request) is not supported by genevolve serve; "
                           "send one request per prompt", "sampling_params")
    if not isinstance(sp, dict):
        raise _bad_type("sampling_params", sp, "struct SamplingParams")
    for key in sp:
        if key not in SGLANG_SAMPLING_KEYS:
            listed = ", ".join(f"`{k}`" for k in SGLANG_SAMPLING_KEYS)
            raise RequestError(f"sampling_params: unknown field `{key}`, expected one of {listed}", p + str(key))
    _check_sglang_types(sp, limits)
    for key, default in _UNSUPPORTED_DEFAULTS.items():
        if sp.get(key) is not None and sp[key] != default:
            raise RequestError(f"{p}{key}={sp[key]!r} is not supported by genevolve serve (only {default!r})",
                               p + key)
    max_new = sp.get("max_new_tokens")
    max_new = default_max if max_new is None else read_int(max_new, p + "max_new_tokens", 0, limits.max_new_tokens)
    temperature = 1.0 if sp.get("temperature") is None else read_float(sp["temperature"], p + "temperature")
    if temperature < 0:
        raise RequestError(f"{p}temperature must be a non-negative finite number, got {temperature}", p + "temperature")
    top_p = 1.0 if sp.get("top_p") is None else read_float(sp["top_p"], p + "top_p")
    if not 0 < top_p <= 1:
        raise RequestError(f"{p}top_p must be in (0, 1], got {top_p}", p + "top_p")
    top_k = TOP_K_OFF if sp.get("top_k") is None else read_int(sp["top_k"], p + "top_k", *I64)
    if top_k != -1 and top_k < 1:
        raise RequestError(f"{p}top_k must be -1 (disable) or at least 1, got {top_k}", p + "top_k")
    ids = sp.get("stop_token_ids")
    ids = [] if ids is None else ids
    if not isinstance(ids, list):
        raise _bad_type(p + "stop_token_ids", ids, "a sequence")
    if len(ids) > limits.max_stop_token_ids:
        raise RequestError(f"{p}stop_token_ids holds {len(ids)} ids; at most {limits.max_stop_token_ids}",
                           p + "stop_token_ids")
    seed = sp.get("sampling_seed")
    kw = dict(temperature=temperature, top_p=top_p, top_k=-1 if top_k >= TOP_K_OFF else top_k,
              stop=read_stops(sp.get("stop"), p + "stop", limits),
              stop_token_ids=tuple(read_int(t, f"{p}stop_token_ids[{i}]", *I64) for i, t in enumerate(ids)),
              seed=None if seed is None else read_int(seed, p + "sampling_seed", *I64))
    return kw, max_new


# --- images -------------------------------------------------------------------------------------------
_MEDIA_REF_KEYS = ("url", "detail", "max_dynamic_patch", "content_hash", "min_pixels", "max_pixels",
                   "total_max_pixels", "fps", "num_frames", "min_frames", "max_frames", "max_tokens_per_frame",
                   "max_image_tokens", "use_audio", "image_grid_thw")
_MEDIA_REF_IGNORED = ("url", "detail", "content_hash")


def load_image_entry(entry: Any, param: str, limits: ServeLimits):
    """One ``image_data`` item: a data URI, bare base64, a local file path, or SGLang's MediaRef object
    ``{"url": ...}``. URLs are not fetched (the server would become a proxy)."""
    if isinstance(entry, dict):
        for key, v in entry.items():
            if key not in _MEDIA_REF_KEYS:
                raise RequestError(f"{param}: unknown field `{key}` of MediaRef", f"{param}.{key}")
            if key not in _MEDIA_REF_IGNORED and v is not None:
                raise RequestError(f"{param}.{key} is not supported by genevolve serve (the server's image "
                                   f"processor settings apply)", f"{param}.{key}")
        entry = entry.get("url")
    if not isinstance(entry, str) or not entry:
        raise _bad_type(param, entry, "an image: data URI, base64 text or a local path")
    if entry.startswith(("http://", "https://")):
        raise RequestError(f"{param}: image URLs are not fetched by this server; send a data URI or a local path",
                           param)
    if entry.startswith("data:"):
        data = decode_base64_image(entry, param)
    elif len(entry) < 4096 and os.path.isfile(entry):
        size = os.path.getsize(entry)
        if size > limits.max_body_bytes:
            raise RequestError(f"{param}: file of {size} bytes exceeds the limit of {limits.max_body_bytes}", param,
                               status=413)
        with open(entry, "rb") as f:
            data = f.read()
    else:
        data = decode_base64_image(entry, param)
    return open_image(data, max_pixels=limits.max_image_pixels, param=param)


def image_items(value: Any, param: str, limits: ServeLimits) -> list:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    if items and isinstance(items[0], list):
        raise RequestError(f"{param}: a list of lists (batched request) is not supported by genevolve serve", param)
    if len(items) > limits.max_images:
        raise RequestError(f"{param} holds {len(items)} images; at most {limits.max_images}", param)
    return items


# --- SGLang-form image prompts --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VisionTokens:
    image_pad: int
    video_pad: int
    vision_start: int
    vision_end: int


def expand_image_pads(ids: list[int], counts: list[int], tokens: VisionTokens, param: str) -> list[int]:
    """SGLang's form -> the engine's: each ``<|vision_start|><|image_pad|><|vision_end|>`` holds ONE pad
    per image (SGLang's processor expands it); here pad i becomes ``counts[i]`` pads."""
    pads = [i for i, t in enumerate(ids) if t == tokens.image_pad]
    if tokens.video_pad in ids:
        raise RequestError(f"{param}: video prompts are not supported by genevolve serve", param)
    if len(pads) != len(counts):
        raise RequestError(f"{param}: {len(pads)} <|image_pad|> tokens for {len(counts)} images in image_data; "
                           f"SGLang's form has exactly one pad per image (the server expands it)", param)
    for i in pads:
        if not (0 < i < len(ids) - 1 and ids[i - 1] == tokens.vision_start and ids[i + 1] == tokens.vision_end):
            raise RequestError(f"{param}: the <|image_pad|> at position {i} is not alone between <|vision_start|> "
                               f"and <|vision_end|>; send one pad per image, not the expanded run", param)
    out: list[int] = []
    image = 0
    for t in ids:
        if t == tokens.image_pad:
            out.extend([t] * counts[image])
            image += 1
        else:
            out.append(t)
    return out


# --- SGLang /generate ------------------------------------------------------------------------------------
@dataclasses.dataclass
class NativeRequest:
    rid: str
    input_ids: list[int] | None
    text: str | None
    images: list           # decoded RGB PIL images, in pad order
    sampling_kw: dict
    max_new_tokens: int
    return_logprob: bool
    return_text_in_logprobs: bool
    return_prompt_token_ids: bool
    skip_special_tokens: bool


_UNSUPPORTED_TOP = {"stream": False, "return_hidden_states": False, "top_logprobs_num": 0, "token_ids_logprob": None,
                    "video_data": None, "audio_data": None, "lora_path": None, "input_embeds": None,
                    "return_sampling_mask": False}


def parse_generate(body: Any, limits: ServeLimits, default_max: int, vocab_size: int,
                   max_prompt_tokens: int | None = None) -> NativeRequest:
    """A /generate body -> NativeRequest; ``max_prompt_tokens`` refuses an over-long ``input_ids``
    before its ids are checked one by one (the expanded prompt is checked again by the server)."""
    if not isinstance(body, dict):
        raise _bad_type("body", body, "struct GenerateRequest")
    for key, default in _UNSUPPORTED_TOP.items():
        v = body.get(key)
        if v is not None and v != default and not (isinstance(v, (list, dict)) and not v):
            raise RequestError(f"{key}={str(v)[:60]} is not supported by genevolve serve", key)
    rid = body.get("rid")
    if isinstance(rid, list):
        raise RequestError("rid: a list (batched request) is not supported by genevolve serve", "rid")
    rid = "" if rid is None else read_str(rid, "rid")
    if len(rid) > 256:
        raise RequestError("rid must have at most 256 characters", "rid")
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise RequestError("give exactly one of text and input_ids", "input_ids" if ids is not None else "text")
    if text is not None:
        if isinstance(text, list):
            raise RequestError("text: a list (batched request) is not supported by genevolve serve", "text")
        text = read_str(text, "text")
        if not text:
            raise RequestError("text must not be empty", "text")
    else:
        if not isinstance(ids, list):
            raise _bad_type("input_ids", ids, "a sequence of token ids")
        if ids and isinstance(ids[0], list):
            raise RequestError("input_ids: a list of lists (batched request) is not supported by genevolve serve",
                               "input_ids")
        if not ids:
            raise RequestError("input_ids must not be empty", "input_ids")
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            raise RequestError(f"input_ids holds {len(ids)} tokens; the server takes at most {max_prompt_tokens}",
                               "input_ids")
        ids = [read_int(t, f"input_ids[{i}]", 0, vocab_size - 1) for i, t in enumerate(ids)]
    sampling_kw, max_new = parse_sglang_sampling(body.get("sampling_params"), limits, default_max)
    sp = body.get("sampling_params") or {}
    flags = {}
    for key in ("return_logprob", "return_text_in_logprobs", "return_prompt_token_ids"):
        v = body.get(key)
        if isinstance(v, list):
            raise RequestError(f"{key}: a list (batched request) is not supported by genevolve serve", key)
        flags[key] = False if v is None else read_bool(v, key)
    if body.get("logprob_start_len") is not None and not isinstance(body["logprob_start_len"], list):
        read_int(body["logprob_start_len"], "logprob_start_len", *I64)
    items = image_items(body.get("image_data"), "image_data", limits)
    images = [load_image_entry(x, f"image_data[{i}]", limits) for i, x in enumerate(items) if x is not None]
    skip = sp.get("skip_special_tokens") if isinstance(sp, dict) else None
    return NativeRequest(rid=rid, input_ids=ids, text=text, images=images, sampling_kw=sampling_kw,
                         max_new_tokens=max_new, skip_special_tokens=True if skip is None else skip, **flags)


# --- OpenAI chat completions -------------------------------------------------------------------------------
OPENAI_CHAT_KEYS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop",
                    "seed", "stream", "user", "frequency_penalty", "presence_penalty", "logprobs", "top_logprobs",
                    "logit_bias", "response_format", "tools", "tool_choice", "parallel_tool_calls",
                    "stream_options", "metadata", "store", "service_tier")
_OPENAI_UNSUPPORTED = {"stream": False, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False,
                       "top_logprobs": None, "logit_bias": None, "response_format": None, "tools": None,
                       "tool_choice": None, "stream_options": None}


@dataclasses.dataclass
class ChatRequest:
    model: str | None
    messages: list[dict]     # for the chat template: content is a string or text/image parts
    images: list             # decoded RGB PIL images, in message order
    sampling_kw: dict
    max_tokens: int | None
    n: int


def parse_chat(body: Any, limits: ServeLimits) -> ChatRequest:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for key in body:
        if key not in OPENAI_CHAT_KEYS:
            raise RequestError(f"Unrecognized request argument supplied: {str(key)[:60]}", str(key)[:60])
    for key, default in _OPENAI_UNSUPPORTED.items():
        v = body.get(key)
        if v is not None and v != default and not (isinstance(v, (list, dict)) and not v):
            raise RequestError(f"{key}={str(v)[:60]} is not supported by genevolve serve", key)
    model = body.get("model")
    model = None if model is None else read_str(model, "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    if len(messages) > limits.max_messages:
        raise RequestError(f"messages holds {len(messages)} messages; at most {limits.max_messages}", "messages")
    rendered, images = [], []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad_type(param, m, "a message object")
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise RequestError(f"{param}.role must be system, user or assistant, got {str(role)[:40]!r}",
                               f"{param}.role")
        content = m.get("content")
        if isinstance(content, str):
            rendered.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise _bad_type(f"{param}.content", content, "a string or a list of content parts")
        parts = []
        for j, part in enumerate(content):
            pp = f"{param}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": read_str(part.get("text"), pp + ".text")})
            elif kind == "image_url":
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(url, str) or not url.startswith("data:"):
                    raise RequestError(f"{pp}.image_url.url must be a data: URI (URLs are not fetched)",
                                       pp + ".image_url.url")
                if len(images) >= limits.max_images:
                    raise RequestError(f"messages hold more than {limits.max_images} images", pp)
                images.append(open_image(decode_base64_image(url, pp + ".image_url.url"),
                                         max_pixels=limits.max_image_pixels, param=pp + ".image_url.url"))
                parts.append({"type": "image"})
            else:
                raise RequestError(f"{pp}.type must be 'text' or 'image_url'", pp + ".type")
        rendered.append({"role": role, "content": parts})
    max_tokens = None
    for key in ("max_tokens", "max_completion_tokens"):
        if body.get(key) is not None:
            max_tokens = read_int(body[key], key, 1, limits.max_new_tokens)
    n = 1 if body.get("n") is None else read_int(body["n"], "n", 1, limits.max_n)
    temperature = 1.0 if body.get("temperature") is None else read_float(body["temperature"], "temperature")
    if not 0 <= temperature <= 2:
        raise RequestError(f"temperature must be in [0, 2], got {temperature}", "temperature")
    top_p = 1.0 if body.get("top_p") is None else read_float(body["top_p"], "top_p")
    if not 0 < top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {top_p}", "top_p")
    seed = None if body.get("seed") is None else read_int(body["seed"], "seed", *I64)
    if body.get("user") is not None:
        read_str(body["user"], "user")
    kw = dict(temperature=temperature, top_p=top_p, top_k=-1, stop=read_stops(body.get("stop"), "stop", limits, 4),
              stop_token_ids=(), seed=seed)
    return ChatRequest(model, rendered, images, kw, max_tokens, n)


def sampling_params(kw: dict, max_new_tokens: int, extra_stop_ids: tuple[int, ...] = ()) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, **{**kw, "stop_token_ids": kw["stop_token_ids"]
                                                             + tuple(extra_stop_ids)})


__all__ = ["ServeLimits", "NativeRequest", "ChatRequest", "VisionTokens", "parse_generate", "parse_chat",
           "parse_sglang_sampling", "expand_image_pads", "sampling_params", "SGLANG_SAMPLING_KEYS"]
