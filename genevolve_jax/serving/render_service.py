"""The render service: a FastAPI app with one worker per device and a shared queue.

It speaks the JSON contract of the original Qwen-Image-Edit service (METHOD.md §8), so existing
clients work unchanged:

    POST /generate {image_urls: [data-URI JPEGs], prompt, seed, true_cfg_scale, negative_prompt,
                    num_inference_steps, guidance_scale, num_images_per_prompt, width, height}
      -> 200 {success: true, image: <base64 PNG>, images: [...], width, height, seed, worker}
      -> 4xx/5xx {success: false, error: "...", param, code}
    GET /health -> {status, workers, queue_depth, busy, served, failed, refused_busy, cancelled, ...}

A worker is anything with ``render_images(request, refs) -> PIL.Image`` (a DiffusersRenderer on its
own device). Workers pull from one queue, so a slow worker never holds up a free one. A full queue
answers 503 with Retry-After, which clients retry elsewhere. Every numeric field is bounded
(:class:`RenderLimits`; reference images are size-checked from their header before decoding), the
body is capped (413), a client that disconnects has its queued images dropped, and an optional
bearer token guards every route but /health (genevolve_jax/serving/guards.py).
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import dataclasses
import contextlib
import logging
import math
import time
from typing import Any, Sequence

from fastapi import Request, Response  # module level: FastAPI resolves the handler's annotation by name here

from genevolve_jax.render.base import RenderError, RenderRequest
from genevolve_jax.render.remote import image_to_bytes
from genevolve_jax.serving.guards import (ClientDisconnected, GuardMiddleware, RequestError, await_or_disconnect,
                                          decode_base64_image, error_response, open_image, parse_json_body)

log = logging.getLogger(__name__)

MAX_IMAGES_PER_PROMPT = 4


@dataclasses.dataclass(frozen=True)
class RenderLimits:
    """Bounds on one /generate request; each has a `genevolve render-server` flag. Out of bounds: a 400
    naming the field (413 for the body)."""
    max_side: int = 2048                 # width, height
    max_pixels: int = 2048 * 2048        # width x height of the output
    max_steps: int = 200                 # num_inference_steps
    max_images: int = MAX_IMAGES_PER_PROMPT  # num_images_per_prompt
    max_refs: int = 4                    # image_urls
    max_ref_pixels: int = 4096 * 4096    # one reference, checked from its header before decoding
    max_prompt_chars: int = 8192         # prompt, negative_prompt
    max_cfg: float = 100.0               # true_cfg_scale, guidance_scale
    max_body_bytes: int = 64 * 2 ** 20
    retry_after_s: int = 1

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"RenderLimits.{f.name} must be a positive number, got {v!r}")


def _render_error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The original service's error shape, plus the field and a code."""
    return {"success": False, "error": message, "param": param, "code": code}


def _error(status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
    return error_response(status, message, param, code, body=_render_error_body, headers=headers)


def _parse_generate(body: Any, limits: RenderLimits | None = None) -> tuple[RenderRequest, list, int]:
    """Validate a /generate body. Raises RequestError (a ValueError) naming the bad field."""
    limits = limits or RenderLimits()
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError("prompt must be a non-empty string", "prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError(f"prompt must have at most {limits.max_prompt_chars} characters, got {len(prompt)}",
                           "prompt")
    urls = body.get("image_urls") or []
    if not isinstance(urls, list):
        raise RequestError("image_urls must be a list of data URIs", "image_urls")
    if len(urls) > limits.max_refs:
        raise RequestError(f"image_urls holds {len(urls)} images; at most {limits.max_refs}", "image_urls")
    refs = []
    for i, u in enumerate(urls):
        if not isinstance(u, str) or not u:
            raise RequestError(f"image_urls[{i}]: image payload must be a non-empty string", f"image_urls[{i}]")
        refs.append(open_image(decode_base64_image(u, f"image_urls[{i}]"), max_pixels=limits.max_ref_pixels,
                               param=f"image_urls[{i}]"))

    def opt(name: str, typ, lo=None, hi=None):
        v = body.get(name)
        if v is None:
            return None
        if typ is str:
            if not isinstance(v, str):
                raise RequestError(f"{name} must be a string, got {str(v)[:40]!r}", name)
            if len(v) > limits.max_prompt_chars:
                raise RequestError(f"{name} must have at most {limits.max_prompt_chars} characters", name)
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RequestError(f"{name} must be a number, got {str(v)[:40]!r}", name)
        if isinstance(v, float) and not math.isfinite(v):
            raise RequestError(f"{name} must be finite, got {v}", name)
        if typ is int and v != int(v):
            raise RequestError(f"{name} must be an integer, got {v!r}", name)
        v = typ(v)
        if lo is not None and v < lo:
            raise RequestError(f"{name} must be >= {lo}, got {v}", name)
        if hi is not None and v > hi:
            raise RequestError(f"{name} must be <= {hi}, got {v}", name)
        return v

    n = opt("num_images_per_prompt", int, 1, limits.max_images) or 1
    width, height = opt("width", int, 16, limits.max_side), opt("height", int, 16, limits.max_side)
    if (width is None) != (height is None):
        raise RequestError("width and height must be given together", "width" if width is None else "height")
    if width is not None and width * height > limits.max_pixels:
        raise RequestError(f"width x height = {width * height} pixels exceeds the limit of {limits.max_pixels}",
                           "width")
    req = RenderRequest(prompt=prompt, seed=opt("seed", int, 0, 2 ** 63 - 1 - limits.max_images) or 0,
                        num_inference_steps=opt("num_inference_steps", int, 1, limits.max_steps),
                        true_cfg_scale=opt("true_cfg_scale", float, 0, limits.max_cfg),
                        guidance_scale=opt("guidance_scale", float, 0, limits.max_cfg),
                        negative_prompt=opt("negative_prompt", str), width=width, height=height)
    return req, refs, n


class _Job:
    __slots__ = ("request", "refs", "future")

    def __init__(self, request: RenderRequest, refs: list, future: asyncio.Future):
        self.request, self.refs, self.future = request, refs, future


async def _on_http_error(request, exc):  # starlette's HTTPException: unknown route, wrong method
    return _error(exc.status_code, str(exc.detail))


async def _on_unexpected(request, exc: Exception):  # a bug: still JSON, and the server lives on
    return _error(500, f"internal error: {type(exc).__name__}: {str(exc)[:200]}", code="internal_error")


class RenderService:
    """What one app holds: the workers, their shared queue (made when the app starts, on its event
    loop) and the counters /health reports. :meth:`health` and :meth:`generate` are its routes."""

    def __init__(self, workers: Sequence[Any], queue_size: int, limits: RenderLimits):
        if not workers:
            raise ValueError("the render service needs at least one worker")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.workers, self.queue_size, self.limits = list(workers), queue_size, limits
        self.stats = {"served": 0, "failed": 0, "busy": 0, "refused_busy": 0, "cancelled": 0, "bad_requests": 0}
        self.queue: asyncio.Queue | None = None

    async def _worker_loop(self, index: int, worker: Any) -> None:
        queue = self.queue
        while True:
            job: _Job = await queue.get()
            if job.future.done():  # the client went away while the job waited
                queue.task_done()
                continue
            self.stats["busy"] += 1
            try:
                image = await asyncio.to_thread(worker.render_images, job.request, job.refs)
                if not job.future.done():
                    job.future.set_result((index, image))
            except Exception as e:  # reported to the client, which retries; the worker lives on
                log.warning("render worker %d failed: %s", index, e)
                if not job.future.done():
                    job.future.set_exception(e)
            finally:
                self.stats["busy"] -= 1
                queue.task_done()

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.queue = asyncio.Queue(maxsize=self.queue_size)
        # A thread for every worker at once (asyncio's default pool has min(32, CPUs + 4)): with
        # more workers than that, the pool, not the workers, would bound the images in flight.
        asyncio.get_running_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(len(self.workers) + 4, thread_name_prefix="render-worker"))
        tasks = [asyncio.create_task(self._worker_loop(i, w)) for i, w in enumerate(self.workers)]
        yield
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def health(self):
        return {"status": "ok", "workers": len(self.workers), "queue_depth": self.queue.qsize(),
                "queue_size": self.queue_size, **self.stats}

    async def generate(self, request: Request):
        try:
            body = parse_json_body(await request.body())
            req, refs, n = await asyncio.to_thread(_parse_generate, body, self.limits)
        except RequestError as e:
            self.stats["bad_requests"] += 1
            return _error(e.status, e.message, e.param, e.code)
        t0 = time.perf_counter()
        refused = self._refusal(n)
        if refused is not None:
            return refused
        futures = self._enqueue(req, refs, n)  # no await since the check: it still holds
        try:
            results = await await_or_disconnect(request.receive, asyncio.gather(*futures))
        except ClientDisconnected:  # queued images are skipped by the workers; one being drawn finishes
            self.stats["cancelled"] += 1
            for f in futures:
                f.cancel()
            return Response(status_code=499)
        except RenderError as e:
            self.stats["failed"] += 1
            return _error(500, str(e), code="render_failed")
        except Exception as e:
            self.stats["failed"] += 1
            return _error(500, f"{type(e).__name__}: {e}", code="render_failed")
        self.stats["served"] += 1
        images = [base64.b64encode(image_to_bytes(img, "PNG")).decode("ascii") for _, img in results]
        first = results[0][1]
        return {"success": True, "image": images[0], "images": images, "width": first.width,
                "height": first.height, "seed": req.seed, "worker": results[0][0],
                "elapsed_s": round(time.perf_counter() - t0, 3)}

    def _refusal(self, n: int):
        """The error response for ``n`` images that would never fit the queue (400) or do not fit
        now (503 + Retry-After); None when they fit."""
        if n > self.queue_size:  # would never fit: not a reason to retry
            self.stats["bad_requests"] += 1
            return _error(400, f"num_images_per_prompt={n} exceeds the queue of {self.queue_size}",
                          "num_images_per_prompt")
        if self.queue.qsize() + n > self.queue_size:
            self.stats["refused_busy"] += 1
            return _error(503, f"queue full ({self.queue_size} images waiting); retry later", code="overloaded",
                          headers={"Retry-After": str(self.limits.retry_after_s)})
        return None

    def _enqueue(self, req: RenderRequest, refs: list, n: int) -> list[asyncio.Future]:
        """Queue the ``n`` images of one request, seeds ``req.seed + k``; their futures."""
        loop = asyncio.get_running_loop()
        futures = []
        for k in range(n):
            fut = loop.create_future()
            self.queue.put_nowait(_Job(dataclasses.replace(req, seed=req.seed + k), refs, fut))
            futures.append(fut)
        return futures


def create_app(workers: Sequence[Any], queue_size: int = 256, *, limits: RenderLimits | None = None,
               api_key: str | None = None):
    """The FastAPI app over ``workers`` (one per device). ``queue_size`` bounds the images waiting for
    a worker (more: 503 with Retry-After); ``api_key`` guards every route but /health."""
    from fastapi import FastAPI
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = limits or RenderLimits()
    service = RenderService(workers, queue_size, limits)
    app = FastAPI(title="genevolve render service", lifespan=service.lifespan)
    app.add_middleware(GuardMiddleware, max_body_bytes=limits.max_body_bytes, api_key=api_key,
                       error_body=_render_error_body)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
    app.get("/health")(service.health)
    app.post("/generate")(service.generate)
    return app


__all__ = ["create_app", "RenderLimits", "RenderService", "MAX_IMAGES_PER_PROMPT"]
