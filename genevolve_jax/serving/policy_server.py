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

Robustness (genevolve_jax/serving/guards.py): every numeric field is bounded (:class:`ServeLimits`);
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
from genevolve_jax.serving.guards import (Admission, ClientDisconnected, GuardMiddleware, Overloaded, RequestError,
                                          await_or_disconnect, error_response, parse_json_body)
from genevolve_jax.serving.policy_schema import (ChatRequest, NativeRequest, ServeLimits, VisionTokens,
                                                 expand_image_pads, parse_chat, parse_generate, read_str,
                                                 sampling_params)

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


def _update_failure_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """SGLang's answer to a weight update it could not make (not OpenAI's error shape)."""
    return {"success": False, "message": message}


async def _on_disconnected(request, exc: ClientDisconnected):  # nobody reads this; nginx's 499
    from fastapi.responses import Response
    return Response(status_code=499)


async def _on_http_error(request, exc):  # starlette's HTTPException: unknown route, wrong method
    return error_response(exc.status_code, str(exc.detail), None, None)


async def _on_validation_error(request, exc):  # FastAPI's RequestValidationError (path parameters)
    return error_response(400, f"invalid request: {str(exc.errors())[:300]}", None, None)


async def _on_unexpected(request, exc: Exception):  # a bug: still JSON, and the server lives on
    return error_response(500, f"internal error: {type(exc).__name__}: {str(exc)[:200]}", None, "internal_error")


class PolicyServer:
    """What one app holds: the engine and its bounds, the requests in flight, the weights' version
    and the counters /health reports. Its public coroutines are the app's routes (:meth:`add_routes`)."""

    def __init__(self, engine: ServedEngine, tokenizer, *, model_name: str, model_path: str,
                 default_max_tokens: int, limits: ServeLimits, context_len: int | None):
        check_tokenizer_fits(tokenizer, engine.config)
        self.engine, self.tokenizer, self.model_name, self.limits = engine, tokenizer, model_name, limits
        self.vocab = engine.config.text.vocab_size
        self.context_len = int(context_len or engine.cfg.max_seq_len)
        self.default_max_tokens = min(default_max_tokens, limits.max_new_tokens)
        self.vision = VisionTokens(engine.config.image_token_id, engine.config.video_token_id,
                                   engine.config.vision_start_token_id, engine.config.vision_end_token_id)
        self.chat_stops = () if tokenizer is None else tuple(
            t for t in (tokenizer.convert_tokens_to_ids("<|im_end|>"),
                        tokenizer.convert_tokens_to_ids("<|endoftext|>")) if isinstance(t, int) and t >= 0)
        self.admission = Admission(limits.max_in_flight, limits.retry_after_s)
        self.live_rids: set[str] = set()
        self.reload_lock = threading.Lock()
        self.model_path, self.weight_version = model_path, "0"
        self.counts = {"served": 0, "refused_busy": 0, "cancelled": 0, "bad_requests": 0}

    # -- wiring --------------------------------------------------------------------------------------
    def add_error_handlers(self, app) -> None:
        """Every failure in OpenAI's error shape: a refused request names its field, a full server
        says when to retry, and an unexpected exception is a 500 the server survives."""
        from fastapi.exceptions import RequestValidationError
        from starlette.exceptions import HTTPException as StarletteHTTPException

        app.add_exception_handler(RequestError, self.on_request_error)
        app.add_exception_handler(Overloaded, self.on_overloaded)
        app.add_exception_handler(ClientDisconnected, _on_disconnected)
        app.add_exception_handler(StarletteHTTPException, _on_http_error)
        app.add_exception_handler(RequestValidationError, _on_validation_error)
        app.add_exception_handler(Exception, _on_unexpected)

    def add_routes(self, app) -> None:
        app.get("/health")(self.health)
        for path in ("/model_info", "/get_model_info"):
            app.get(path)(self.model_info)
        for path in ("/server_info", "/get_server_info"):
            app.get(path)(self.server_info)
        app.post("/flush_cache")(self.flush_cache)
        app.post("/abort_request")(self.abort_request)
        app.post("/update_weights_from_disk")(self.update_weights)
        app.post("/generate")(self.generate)
        app.get("/v1/models")(self.models)
        app.get("/v1/models/{name:path}")(self.model)
        app.post("/v1/chat/completions")(self.chat)

    async def on_request_error(self, request, exc: RequestError):
        self.counts["bad_requests"] += 1
        return error_response(exc.status, exc.message, exc.param, exc.code)

    async def on_overloaded(self, request, exc: Overloaded):
        self.counts["refused_busy"] += 1
        return error_response(503, str(exc), None, "overloaded",
                              headers={"Retry-After": str(self.limits.retry_after_s)})

    # -- helpers -------------------------------------------------------------------------------------
    def _need_tokenizer(self, param: str) -> None:
        if self.tokenizer is None:
            raise RequestError(f"{param}: this server runs without a tokenizer; send input_ids", param)

    def _decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _expand(self, ids: list[int], images: list, param: str) -> list[int]:
        expanded = expand_image_pads(ids, [self.engine.num_image_tokens(im) for im in images], self.vision, param)
        if len(expanded) >= self.context_len:
            raise RequestError(f"{param}: the prompt holds {len(expanded)} tokens (images expanded), which leaves "
                               f"no room under the server's context length of {self.context_len}", param)
        return expanded

    def _top_k_within_vocab(self, kw: dict) -> dict:
        return {**kw, "top_k": -1 if kw["top_k"] >= self.vocab else kw["top_k"]}

    async def _run(self, request: Request, reqs: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Submit ``reqs``; wait for all unless the client hangs up (then cancel them in the engine)."""
        admission = self.admission
        if len(reqs) > admission.limit:  # would never be admitted: not a reason to retry
            raise RequestError(f"n={len(reqs)} exceeds the {admission.limit} requests this server holds at once", "n")
        admission.acquire(len(reqs))
        loop = asyncio.get_running_loop()
        try:
            for r in reqs:
                if r.request_id in self.live_rids:
                    raise RequestError(f"Duplicate request ID detected: {r.request_id}", "rid")
            self.live_rids.update(r.request_id for r in reqs)
            try:
                waits = [_watch(self.engine.submit(r), loop) for r in reqs]
                return await await_or_disconnect(request.receive, asyncio.gather(*waits))
            except (ClientDisconnected, asyncio.CancelledError):
                self.counts["cancelled"] += len(reqs)
                for r in reqs:
                    self.engine.cancel(r.request_id)
                raise
            finally:
                self.live_rids.difference_update(r.request_id for r in reqs)
        finally:
            admission.release(len(reqs))

    # -- SGLang's native routes ----------------------------------------------------------------------
    async def health(self):
        return {"status": "ok", "in_flight": self.admission.in_flight, "max_in_flight": self.admission.limit,
                **self.counts}

    def model_info(self):
        return {"model_path": self.model_path, "tokenizer_path": self.model_path, "is_generation": True,
                "weight_version": self.weight_version, "served_model_name": self.model_name,
                "has_image_understanding": True, "model_type": "qwen3_vl"}

    def server_info(self):
        # Seeds are honoured: a request's sampling_seed fixes its samples whatever else is batched.
        return {"version": SERVER_VERSION, "enable_deterministic_inference": True, "context_length": self.context_len,
                "max_in_flight": self.limits.max_in_flight, "served_model_name": self.model_name}

    async def flush_cache(self):
        return {"success": True, "message": "Cache flushed."}  # the engine keeps no prefix cache

    async def abort_request(self, request: Request):
        body = await _json_object(request)
        rid = read_str(body.get("rid"), "rid")
        return {"success": bool(self.engine.cancel(rid))}

    async def update_weights(self, request: Request):
        body = await _json_object(request)
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            return error_response(400, "model_path is required", "model_path", None, body=_update_failure_body)
        version = body.get("weight_version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, (str, int))):
            raise RequestError("weight_version must be a string", "weight_version")
        try:
            await asyncio.to_thread(self._load_weights, path)
        except Exception as exc:  # the old weights stay in place (SGLang rolls back too)
            return error_response(400, f"{type(exc).__name__}: {exc}", "model_path", None, body=_update_failure_body)
        self.model_path = path
        self.weight_version = str(version) if version not in (None, "") else str(int(self.weight_version) + 1)
        return {"success": True, "message": f"Succeeded to update model weights from {path}.",
                "num_paused_requests": 0}

    def _load_weights(self, path: str) -> None:
        from flax import nnx

        from genevolve_jax.models.loading import load_model
        with self.reload_lock:
            config = self.engine.config
            model = load_model(path, param_dtype=config.param_dtype, dtype=config.dtype)
            check_tokenizer_fits(self.tokenizer, model.config)
            self.engine.update_weights(nnx.state(model, nnx.Param))

    async def generate(self, request: Request):
        t0 = time.perf_counter()
        body = parse_json_body(await request.body())
        req: NativeRequest = await asyncio.to_thread(parse_generate, body, self.limits, self.default_max_tokens,
                                                     self.vocab, self.context_len - 1)
        param = "input_ids" if req.input_ids is not None else "text"
        if req.input_ids is None:
            self._need_tokenizer("text")
        ids = req.input_ids if req.input_ids is not None else self.tokenizer.encode(req.text, add_special_tokens=False)
        prompt = await asyncio.to_thread(self._expand, list(ids), req.images, param)
        rid = req.rid or uuid.uuid4().hex
        if req.max_new_tokens == 0:
            res = GenerationResult([], [], "length")
        else:
            sampling = sampling_params(self._top_k_within_vocab(req.sampling_kw), req.max_new_tokens)
            res = (await self._run(request, [GenerationRequest(prompt, sampling, req.images, rid)]))[0]
        self.counts["served"] += 1
        return self._native_response(req, rid, prompt, res, time.perf_counter() - t0)

    def _native_response(self, req: NativeRequest, rid: str, prompt: list[int], res: GenerationResult,
                         elapsed: float) -> dict:
        finish: dict[str, Any] = {"type": res.finish_reason}
        if res.finish_reason == "abort":
            finish["message"] = res.error
        elif res.finish_reason == "length":
            finish["length"] = len(res.token_ids)
        else:
            last = res.token_ids[-1] if res.token_ids else None
            finish["matched"] = last if last in req.sampling_kw["stop_token_ids"] or self.tokenizer is None else next(
                (s for s in req.sampling_kw["stop"] if s in self._decode(res.token_ids[-32:], False)), None)
        meta: dict[str, Any] = {"id": rid, "finish_reason": finish, "prompt_tokens": len(prompt),
                                "completion_tokens": len(res.token_ids), "cached_tokens": 0, "reasoning_tokens": 0,
                                "weight_version": self.weight_version, "e2e_latency": round(elapsed, 6)}
        if req.images:
            meta["image_tokens"] = sum(t == self.vision.image_pad for t in prompt)
        if req.return_logprob:
            with_text = req.return_text_in_logprobs and self.tokenizer
            text = (lambda t: self._decode([t], False)) if with_text else (lambda t: None)
            meta["input_token_logprobs"] = []
            meta["output_token_logprobs"] = [[lp, t, text(t)] for t, lp in zip(res.token_ids, res.logprobs)]
            meta["output_token_logprobs_length"] = len(res.token_ids)
        out: dict[str, Any] = {"output_ids": res.token_ids, "meta_info": meta}
        if self.tokenizer is not None:  # SGLang leaves "text" out under --skip-tokenizer-init
            out["text"] = self._decode(res.token_ids, req.skip_special_tokens)
        if req.return_prompt_token_ids:
            out["prompt_token_ids"] = prompt
        return out

    # -- OpenAI's routes -----------------------------------------------------------------------------
    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "genevolve"}

    def _unknown_model(self, name: str):
        return error_response(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                              "model", "model_not_found")

    async def models(self):
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, name: str):
        return self._model_card() if name == self.model_name else self._unknown_model(name)

    async def chat(self, request: Request):
        body = parse_json_body(await request.body())
        req: ChatRequest = await asyncio.to_thread(parse_chat, body, self.limits)
        if req.model is not None and req.model != self.model_name:
            return self._unknown_model(req.model)
        self._need_tokenizer("messages")
        try:
            text = self.tokenizer.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template's own checks (jinja raise_exception)
            raise RequestError(f"messages: {exc}", "messages") from None
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        prompt = await asyncio.to_thread(self._expand, ids, req.images, "messages")
        max_new = req.max_tokens or min(self.default_max_tokens, self.context_len - len(prompt))
        kw = req.sampling_kw
        seeds = [None if kw["seed"] is None else kw["seed"] + k for k in range(req.n)]  # n distinct samples
        reqs = [GenerationRequest(prompt, sampling_params({**kw, "seed": seed}, max_new, self.chat_stops), req.images,
                                  uuid.uuid4().hex) for seed in seeds]
        results = await self._run(request, reqs)
        for res in results:
            if res.finish_reason == "abort":
                status = 503 if "closed" in res.error else 500
                return error_response(status, f"generation aborted: {res.error}", None, "aborted")
        self.counts["served"] += 1
        completion = sum(len(r.token_ids) for r in results)
        return {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name,
                "choices": [{"index": i, "finish_reason": r.finish_reason, "logprobs": None,
                             "message": {"role": "assistant", "content": self._decode(r.token_ids)}}
                            for i, r in enumerate(results)],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion,
                          "total_tokens": len(prompt) + completion}}


async def _json_object(request: Request) -> dict:
    body = parse_json_body(await request.body())
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def create_app(engine: ServedEngine, tokenizer, *, model_name: str = "genevolve", model_path: str = "",
               default_max_tokens: int = 512, limits: ServeLimits | None = None, api_key: str | None = None,
               context_len: int | None = None):
    """The FastAPI app. ``context_len`` is the engine's prompt + output limit (``engine.cfg.max_seq_len``
    by default); ``api_key`` (from the environment, see jobs/serve.py) guards every route but /health."""
    from fastapi import FastAPI

    limits = limits or ServeLimits()
    server = PolicyServer(engine, tokenizer, model_name=model_name, model_path=model_path,
                          default_max_tokens=default_max_tokens, limits=limits, context_len=context_len)
    app = FastAPI(title="genevolve serve")
    app.add_middleware(GuardMiddleware, max_body_bytes=limits.max_body_bytes, api_key=api_key)
    server.add_error_handlers(app)
    server.add_routes(app)
    return app


__all__ = ["create_app", "check_tokenizer_fits", "PolicyServer", "ServeLimits", "ServedEngine"]
