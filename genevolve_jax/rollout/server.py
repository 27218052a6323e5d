"""An HTTP server on the JaxEngine: the subset of SGLang 0.5.23's native API that SGLangEngine uses,
plus OpenAI-compatible chat completions.

Native: ``POST /generate`` (SGLang's schema, one prompt per request: ``input_ids`` or ``text``,
``image_data``, ``sampling_params``, ``return_logprob``, ``return_prompt_token_ids``, ``rid``),
``POST /abort_request {rid}``, ``GET /health``, ``GET /model_info`` (and ``/get_model_info``),
``GET /server_info`` (and ``/get_server_info``), ``POST /flush_cache``,
``POST /update_weights_from_disk {model_path, weight_version}``. OpenAI: ``POST /v1/chat/completions``
(string or text/image_url content; no streaming), ``GET /v1/models``, ``GET /v1/models/{model}``.

Image prompts come in SGLang's form: ONE ``<|image_pad|>`` per image between ``<|vision_start|>`` and
``<|vision_end|>``, the images in ``image_data``; the server expands each pad to the image's token
count under the engine's image processor (as SGLang's Qwen-VL processor does) and returns the expanded
ids as ``prompt_token_ids`` when asked.

Robustness (genevolve_jax/server_guards.py): every numeric field is bounded (:class:`ServeLimits`);
bad requests get a 4xx in OpenAI's error shape naming the field, never a 500; at most
``limits.max_in_flight`` requests are held, past that 503 with Retry-After; a client that disconnects
has its request cancelled in the engine (``engine.cancel(request_id)``), which frees its slot; an
optional bearer token guards every route except /health; a tokenizer larger than the model's
vocabulary is refused when the app is built. Binds 127.0.0.1 unless told otherwise (jobs/serve.py).

Requests run on the engine's worker through futures, so concurrent HTTP requests share the decode
batch (continuous batching).
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import time
import uuid
from typing import Any, Protocol, Sequence

from fastapi import Request  # module level: FastAPI resolves the handlers' annotations by name here

from genevolve_jax.rollout.engine import GenerationRequest, GenerationResult
from genevolve_jax.rollout.server_schema import (ChatRequest, NativeRequest, ServeLimits, VisionTokens,
                                                 expand_image_pads, parse_chat, parse_generate, read_str,
                                                 sampling_params)
from genevolve_jax.server_guards import (Admission, ClientDisconnected, GuardMiddleware, Overloaded, RequestError,
                                         await_or_disconnect, error_response, parse_json_body)

SERVER_VERSION = "genevolve-serve-0.5.23-compatible"


class ServedEngine(Protocol):
    """What the server needs of an engine (JaxEngine's public API)."""
    config: Any  # the model's Qwen3VLConfig: vocabulary size and vision token ids

    def submit(self, request: GenerationRequest) -> cf.Future: ...

    def cancel(self, request_id: str) -> bool: ...

    def num_image_tokens(self, image) -> int: ...

    def update_weights(self, params, step: int = 0) -> dict: ...


def check_tokenizer_fits(tokenizer, config) -> None:
    """Refuse a tokenizer with more ids than the model's embedding has rows: every prompt with a
    high id would fail (the `genevolve demo` model has 512 rows; the default tokenizer 2048 ids)."""
    if tokenizer is None:      # a tokenizer-free server (clients send token ids)
        return
    if tokenizer is None:  # token ids in and out only (SGLang's --skip-tokenizer-init)
        return
    vocab = config.text.vocab_size
    size = len(tokenizer)
    if size > vocab:
        raise ValueError(f"the tokenizer has {size} tokens but the model's vocabulary has {vocab} "
                         f"(text.vocab_size); ids >= {vocab} would fail every request. Serve the model with the "
                         f"tokenizer it was trained with (put it in the model directory), or a model whose "
                         f"vocabulary covers the tokenizer")


def _watch(future: cf.Future, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
    """An asyncio future resolved with ``future``'s result. Unlike ``asyncio.wrap_future``, cancelling
    it leaves the engine's future alone (the engine resolves its own futures)."""
    out = loop.create_future()

    def resolve(f: cf.Future):
        def set_it():
            if not out.done():
                if f.cancelled():
                    out.cancel()
                elif f.exception() is not None:
                    out.set_exception(f.exception())
                else:
                    out.set_result(f.result())
        loop.call_soon_threadsafe(set_it)

    future.add_done_callback(resolve)
    return out


def create_app(engine: ServedEngine, tokenizer, *, model_name: str = "genevolve", model_path: str = "",
               default_max_tokens: int = 512, limits: ServeLimits | None = None, api_key: str | None = None,
               context_len: int | None = None):
    """The FastAPI app. ``context_len`` is the engine's prompt + output limit (``engine.cfg.max_seq_len``
    by default); ``api_key`` (from the environment, see jobs/serve.py) guards every route but /health."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = limits or ServeLimits()
    check_tokenizer_fits(tokenizer, engine.config)
    vocab = engine.config.text.vocab_size
    context_len = int(context_len or engine.cfg.max_seq_len)
    default_max_tokens = min(default_max_tokens, limits.max_new_tokens)
    vision = VisionTokens(engine.config.image_token_id, engine.config.video_token_id,
                          engine.config.vision_start_token_id, engine.config.vision_end_token_id)
    chat_stops = () if tokenizer is None else tuple(
        t for t in (tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>"))
        if isinstance(t, int) and t >= 0)

    def need_tokenizer(param: str):
        if tokenizer is None:
            raise RequestError(f"{param}: this server runs without a tokenizer; send input_ids", param)

    def decode(ids: list[int], skip_special_tokens: bool = True) -> str:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    admission = Admission(limits.max_in_flight, limits.retry_after_s)
    live_rids: set[str] = set()
    reload_lock = threading.Lock()
    state = {"model_path": model_path, "weight_version": "0"}
    counts = {"served": 0, "refused_busy": 0, "cancelled": 0, "bad_requests": 0}

    app = FastAPI(title="genevolve serve")
    app.add_middleware(GuardMiddleware, max_body_bytes=limits.max_body_bytes, api_key=api_key)

    @app.exception_handler(RequestError)
    async def on_request_error(request, exc: RequestError):
        counts["bad_requests"] += 1
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(Overloaded)
    async def on_overloaded(request, exc: Overloaded):
        counts["refused_busy"] += 1
        return error_response(503, str(exc), None, "overloaded", headers={"Retry-After": str(limits.retry_after_s)})

    @app.exception_handler(ClientDisconnected)
    async def on_disconnected(request, exc: ClientDisconnected):  # nobody reads this; nginx's 499
        from fastapi.responses import Response
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), None, None)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, exc: RequestValidationError):
        return error_response(400, f"invalid request: {str(exc.errors())[:300]}", None, None)

    @app.exception_handler(Exception)
    async def on_unexpected(request, exc: Exception):  # a bug: still JSON, and the server lives on
        return error_response(500, f"internal error: {type(exc).__name__}: {str(exc)[:200]}", None, "internal_error")

    async def body_of(request: Request) -> Any:
        return parse_json_body(await request.body())

    def expand(ids: list[int], images: list, param: str) -> list[int]:
        expanded = expand_image_pads(ids, [engine.num_image_tokens(im) for im in images], vision, param)
        if len(expanded) >= context_len:
            raise RequestError(f"{param}: the prompt holds {len(expanded)} tokens (images expanded), which leaves "
                               f"no room under the server's context length of {context_len}", param)
        return expanded

    def top_k_within_vocab(kw: dict) -> dict:
        return {**kw, "top_k": -1 if kw["top_k"] >= vocab else kw["top_k"]}

    async def run(request: Request, reqs: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Submit ``reqs``; wait for all unless the client hangs up (then cancel them in the engine)."""
        if len(reqs) > admission.limit:  # would never be admitted: not a reason to retry
            raise RequestError(f"n={len(reqs)} exceeds the {admission.limit} requests this server holds at once", "n")
        admission.acquire(len(reqs))
        loop = asyncio.get_running_loop()
        try:
            for r in reqs:
                if r.request_id in live_rids:
                    raise RequestError(f"Duplicate request ID detected: {r.request_id}", "rid")
            live_rids.update(r.request_id for r in reqs)
            try:
                waits = [_watch(engine.submit(r), loop) for r in reqs]
                return await await_or_disconnect(request.receive, asyncio.gather(*waits))
            except (ClientDisconnected, asyncio.CancelledError):
                counts["cancelled"] += len(reqs)
                for r in reqs:
                    engine.cancel(r.request_id)
                raise
            finally:
                live_rids.difference_update(r.request_id for r in reqs)
        finally:
            admission.release(len(reqs))

    @app.get("/health")
    async def health():
        return {"status": "ok", "in_flight": admission.in_flight, "max_in_flight": admission.limit, **counts}

    def model_info():
        return {"model_path": state["model_path"], "tokenizer_path": state["model_path"], "is_generation": True,
                "weight_version": state["weight_version"], "served_model_name": model_name,
                "has_image_understanding": True, "model_type": "qwen3_vl"}

    app.get("/model_info")(model_info)
    app.get("/get_model_info")(model_info)

    def server_info():
        # Seeds are honoured: a request's sampling_seed fixes its samples whatever else is batched.
        return {"version": SERVER_VERSION, "enable_deterministic_inference": True, "context_length": context_len,
                "max_in_flight": limits.max_in_flight, "served_model_name": model_name}

    app.get("/server_info")(server_info)
    app.get("/get_server_info")(server_info)

    @app.post("/flush_cache")
    async def flush_cache():
        return {"success": True, "message": "Cache flushed."}  # the engine keeps no prefix cache

    @app.post("/abort_request")
    async def abort_request(request: Request):
        body = await body_of(request)
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        rid = read_str(body.get("rid"), "rid")
        return {"success": bool(engine.cancel(rid))}

    @app.post("/update_weights_from_disk")
    async def update_weights(request: Request):
        body = await body_of(request)
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            return error_response(400, "model_path is required", "model_path", None,
                                  body=lambda s, m, p, c: {"success": False, "message": m})
        version = body.get("weight_version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, (str, int))):
            raise RequestError("weight_version must be a string", "weight_version")

        def load():
            from flax import nnx

            from genevolve_jax.models.loading import load_model
            with reload_lock:
                model = load_model(path, param_dtype=engine.config.param_dtype, dtype=engine.config.dtype)
                check_tokenizer_fits(tokenizer, model.config)
                engine.update_weights(nnx.state(model, nnx.Param))
        try:
            await asyncio.to_thread(load)
        except Exception as exc:  # the old weights stay in place (SGLang rolls back too)
            return error_response(400, f"{type(exc).__name__}: {exc}", "model_path", None,
                                  body=lambda s, m, p, c: {"success": False, "message": m})
        state["model_path"] = path
        state["weight_version"] = str(version) if version not in (None, "") else str(int(state["weight_version"]) + 1)
        return {"success": True, "message": f"Succeeded to update model weights from {path}.",
                "num_paused_requests": 0}

    @app.post("/generate")
    async def generate(request: Request):
        t0 = time.perf_counter()
        body = await body_of(request)
        req: NativeRequest = await asyncio.to_thread(parse_generate, body, limits, default_max_tokens, vocab,
                                                     context_len - 1)
        param = "input_ids" if req.input_ids is not None else "text"
        if req.input_ids is None:
            need_tokenizer("text")
        ids = req.input_ids if req.input_ids is not None else tokenizer.encode(req.text, add_special_tokens=False)
        prompt = await asyncio.to_thread(expand, list(ids), req.images, param)
        rid = req.rid or uuid.uuid4().hex
        if req.max_new_tokens == 0:
            res = GenerationResult([], [], "length")
        else:
            sampling = sampling_params(top_k_within_vocab(req.sampling_kw), req.max_new_tokens)
            res = (await run(request, [GenerationRequest(prompt, sampling, req.images, rid)]))[0]
        counts["served"] += 1
        return native_response(req, rid, prompt, res, time.perf_counter() - t0)

    def native_response(req: NativeRequest, rid: str, prompt: list[int], res: GenerationResult, elapsed: float):
        finish: dict[str, Any] = {"type": res.finish_reason}
        if res.finish_reason == "abort":
            finish["message"] = res.error
        elif res.finish_reason == "length":
            finish["length"] = len(res.token_ids)
        else:
            last = res.token_ids[-1] if res.token_ids else None
            finish["matched"] = last if last in req.sampling_kw["stop_token_ids"] or tokenizer is None else next(
                (s for s in req.sampling_kw["stop"] if s in decode(res.token_ids[-32:], False)), None)
        meta: dict[str, Any] = {"id": rid, "finish_reason": finish, "prompt_tokens": len(prompt),
                                "completion_tokens": len(res.token_ids), "cached_tokens": 0, "reasoning_tokens": 0,
                                "weight_version": state["weight_version"], "e2e_latency": round(elapsed, 6)}
        if req.images:
            meta["image_tokens"] = sum(t == vision.image_pad for t in prompt)
        if req.return_logprob:
            text = (lambda t: decode([t], False)) if req.return_text_in_logprobs and tokenizer else (lambda t: None)
            meta["input_token_logprobs"] = []
            meta["output_token_logprobs"] = [[lp, t, text(t)] for t, lp in zip(res.token_ids, res.logprobs)]
            meta["output_token_logprobs_length"] = len(res.token_ids)
        out: dict[str, Any] = {"output_ids": res.token_ids, "meta_info": meta}
        if tokenizer is not None:  # SGLang leaves "text" out under --skip-tokenizer-init
            out["text"] = decode(res.token_ids, req.skip_special_tokens)
        if req.return_prompt_token_ids:
            out["prompt_token_ids"] = prompt
        return out

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    def model_card():
        return {"id": model_name, "object": "model", "created": 0, "owned_by": "genevolve"}

    def unknown_model(name: str):
        return error_response(404, f"The model `{name}` does not exist; this server serves `{model_name}`",
                              "model", "model_not_found")

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        return model_card() if name == model_name else unknown_model(name)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await body_of(request)
        req: ChatRequest = await asyncio.to_thread(parse_chat, body, limits)
        if req.model is not None and req.model != model_name:
            return unknown_model(req.model)
        need_tokenizer("messages")
        try:
            text = tokenizer.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template's own checks (jinja raise_exception)
            raise RequestError(f"messages: {exc}", "messages") from None
        ids = tokenizer.encode(text, add_special_tokens=False)
        prompt = await asyncio.to_thread(expand, ids, req.images, "messages")
        max_new = req.max_tokens or min(default_max_tokens, context_len - len(prompt))
        kw = req.sampling_kw
        seeds = [None if kw["seed"] is None else kw["seed"] + k for k in range(req.n)]  # n distinct samples
        reqs = [GenerationRequest(prompt, sampling_params({**kw, "seed": seed}, max_new, chat_stops), req.images,
                                  uuid.uuid4().hex) for seed in seeds]
        results = await run(request, reqs)
        for res in results:
            if res.finish_reason == "abort":
                status = 503 if "closed" in res.error else 500
                return error_response(status, f"generation aborted: {res.error}", None, "aborted")
        counts["served"] += 1
        completion = sum(len(r.token_ids) for r in results)
        return {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": i, "finish_reason": r.finish_reason, "logprobs": None,
                             "message": {"role": "assistant",
                                         "content": decode(r.token_ids)}}
                            for i, r in enumerate(results)],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion,
                          "total_tokens": len(prompt) + completion}}

    return app


__all__ = ["create_app", "check_tokenizer_fits", "ServeLimits", "ServedEngine"]
