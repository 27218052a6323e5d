"""An HTTP server on the JaxEngine: the subset of SGLang's native API that SGLangEngine uses, plus
OpenAI-compatible chat completions.

Native: ``POST /generate`` (input_ids or text, image_data, sampling_params, return_logprob),
``GET /health``, ``GET /get_model_info``, ``POST /flush_cache``, ``POST /update_weights_from_disk``
{model_path, flush_cache}. OpenAI: ``POST /v1/chat/completions`` (messages with string content,
temperature, top_p, max_tokens, stop, seed; no streaming) and ``GET /v1/models``.

Requests run on the engine's worker through futures, so concurrent HTTP requests share the decode
batch (continuous batching). Binds 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

from genevolve_jax.rollout.engine import GenerationRequest, SamplingParams


def _sampling(p: dict, default_max: int) -> SamplingParams:
    stop = p.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    top_k = p.get("top_k", -1)
    return SamplingParams(max_new_tokens=int(p.get("max_new_tokens") or p.get("max_tokens") or default_max),
                          temperature=float(p.get("temperature", 1.0)), top_p=float(p.get("top_p", 1.0)),
                          top_k=-1 if top_k in (None, 0, -1) else int(top_k), stop=stop,
                          stop_token_ids=tuple(int(t) for t in p.get("stop_token_ids") or ()),
                          seed=p.get("sampling_seed", p.get("seed")))


def create_app(engine, tokenizer, *, model_name: str = "genevolve", model_path: str = "",
               default_max_tokens: int = 512):
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse

    app = FastAPI(title="genevolve serve")
    reload_lock = threading.Lock()
    state = {"model_path": model_path, "weight_version": "0"}

    async def run(req: GenerationRequest):
        return await asyncio.wrap_future(engine.submit(req))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/get_model_info")
    async def model_info():
        return {"model_path": state["model_path"], "tokenizer_path": state["model_path"], "is_generation": True,
                "weight_version": state["weight_version"], "served_model_name": model_name}

    @app.post("/flush_cache")
    async def flush_cache():
        engine.flush_cache()
        return {"success": True, "message": "cache flushed"}

    @app.post("/update_weights_from_disk")
    async def update_weights(body: dict):
        path = body.get("model_path")
        if not path:
            return JSONResponse({"success": False, "message": "model_path is required"}, status_code=400)

        def load():
            from flax import nnx
            from genevolve_jax.models.loading import load_model
            with reload_lock:
                model = load_model(path, param_dtype=engine.config.param_dtype, dtype=engine.config.dtype)
                engine.update_weights(nnx.state(model, nnx.Param))
        try:
            await asyncio.to_thread(load)
        except Exception as exc:  # the old weights stay in place (SGLang rolls back too)
            return JSONResponse({"success": False, "message": f"{type(exc).__name__}: {exc}"}, status_code=400)
        state["model_path"] = path
        state["weight_version"] = str(body.get("weight_version") or int(state["weight_version"]) + 1)
        return {"success": True, "message": f"loaded {path}", "num_paused_requests": 0}

    @app.post("/generate")
    async def generate(body: dict):
        ids = body.get("input_ids")
        if ids is None:
            if not isinstance(body.get("text"), str):
                raise HTTPException(400, "give input_ids or text")
            ids = tokenizer.encode(body["text"], add_special_tokens=False)
        try:
            sampling = _sampling(body.get("sampling_params") or {}, default_max_tokens)
        except (ValueError, TypeError) as exc:
            raise HTTPException(400, f"sampling_params: {exc}")
        images = body.get("image_data") or []
        images = [images] if isinstance(images, str) else list(images)
        if any(isinstance(x, str) and x.startswith(("http://", "https://")) for x in images):
            raise HTTPException(400, "image_data URLs are not fetched by this server; give local paths")
        images = [_decode_image(x) for x in images]
        res = await run(GenerationRequest([int(t) for t in ids], sampling, images, str(body.get("rid") or "")))
        finish: dict[str, Any] = {"type": res.finish_reason}
        if res.finish_reason == "abort":
            finish["message"] = res.error
        meta = {"id": body.get("rid") or uuid.uuid4().hex, "finish_reason": finish, "prompt_tokens": len(ids),
                "completion_tokens": len(res.token_ids), "weight_version": state["weight_version"]}
        if body.get("return_logprob"):
            meta["output_token_logprobs"] = [[lp, t, None] for t, lp in zip(res.token_ids, res.logprobs)]
        text = tokenizer.decode(res.token_ids, skip_special_tokens=True) if tokenizer is not None else ""
        return {"text": text, "output_ids": res.token_ids, "meta_info": meta}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "genevolve"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        if body.get("stream"):
            raise HTTPException(400, "stream=true is not supported")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise HTTPException(400, "messages must be a non-empty list")
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            sampling = _sampling({**body, "max_tokens": body.get("max_tokens") or body.get("max_completion_tokens")},
                                 default_max_tokens)
        except Exception as exc:
            raise HTTPException(400, f"bad request: {exc}")
        ids = tokenizer.encode(text, add_special_tokens=False)
        stops = tuple(t for t in (tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                  tokenizer.convert_tokens_to_ids("<|endoftext|>")) if isinstance(t, int) and t >= 0)
        sampling = SamplingParams(**{**sampling.__dict__, "stop_token_ids": sampling.stop_token_ids + stops})
        res = await run(GenerationRequest(ids, sampling))
        if res.finish_reason == "abort":
            raise HTTPException(500, f"generation aborted: {res.error}")
        return {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": 0, "finish_reason": res.finish_reason,
                             "message": {"role": "assistant",
                                         "content": tokenizer.decode(res.token_ids, skip_special_tokens=True)}}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(res.token_ids),
                          "total_tokens": len(ids) + len(res.token_ids)}}

    return app


def _decode_image(entry):
    if isinstance(entry, str) and entry.startswith("data:"):
        import base64
        import io
        from PIL import Image
        return Image.open(io.BytesIO(base64.b64decode(entry.split(",", 1)[1]))).convert("RGB")
    return entry
