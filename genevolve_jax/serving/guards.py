"""Guards shared by genevolve's HTTP servers (`genevolve serve` and `genevolve render-server`).

- :class:`RequestError`: a bad request, with the status and the field (``param``) to report;
- :func:`openai_error_body` / :func:`error_response`: OpenAI's error shape
  ``{"error": {"message", "type", "param", "code"}}``;
- :class:`GuardMiddleware` (plain ASGI, so it runs before any route parses anything): the optional
  bearer token on every path but the open ones (401), and the body-size cap (413, checked on the
  declared Content-Length and again on the bytes that actually arrive, for chunked bodies);
- :class:`Admission`: a bounded count of requests in flight; past it a server answers 503 with
  ``Retry-After`` instead of queueing without end;
- :func:`await_or_disconnect`: waits for a result unless the client hangs up first, so a server can
  cancel work nobody will read;
- :func:`parse_json_body`: strict JSON (no NaN/Infinity, no absurd nesting) -> 400 on anything else;
- :func:`open_image`: image bytes to RGB with the pixel count checked from the header *before* any
  pixel is decoded (decompression bombs), in a short list of formats.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import json
import os
import warnings
from typing import Any, Awaitable, Callable

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
               404: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 503: "server_error"}
# Formats PIL may decode here: what clients send (PNG/JPEG data URIs) and a few common others.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_JSON_DEPTH = 64


class RequestError(ValueError):
    """A request the server refuses: ``status`` (4xx), ``param`` (the offending field, dotted)."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


class ClientDisconnected(Exception):
    """The client closed the connection before its result was ready."""


def openai_error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error" if status >= 500
                                                                   else "invalid_request_error"),
                      "param": param, "code": code}}


ErrorBody = Callable[[int, str, "str | None", "str | None"], dict]


def error_response(status: int, message: str, param: str | None = None, code: str | None = None, *,
                   body: ErrorBody = openai_error_body, headers: dict[str, str] | None = None):
    from fastapi.responses import JSONResponse
    return JSONResponse(body(status, message, param, code), status_code=status, headers=headers)


def api_key_from_env(name: str) -> str | None:
    """The bearer token held in environment variable ``name`` ("" -> no token). The key itself is never
    a command-line argument (it would show in ``ps``)."""
    if not name:
        return None
    value = os.environ.get(name, "")
    if not value.strip():
        raise ValueError(f"--api-key-env {name}: the environment variable {name} is unset or empty")
    return value.strip()


class GuardMiddleware:
    """Bearer-token check and body-size cap for every HTTP request, before routing.

    ``api_key=None`` turns the token check off. ``open_paths`` (exact paths) skip the token check
    (health probes). The body is read here (at most ``max_body_bytes``) and replayed to the app, so
    a route never sees an oversized body whatever its framing."""

    def __init__(self, app, *, max_body_bytes: int, api_key: str | None = None,
                 open_paths: tuple[str, ...] = ("/health",), error_body: ErrorBody = openai_error_body):
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
        self.app, self.max_body_bytes, self.open_paths, self.error_body = app, max_body_bytes, open_paths, error_body
        self._key = api_key.encode() if api_key else None

    async def _reply(self, send, status: int, message: str, code: str | None, headers=()) -> None:
        payload = json.dumps(self.error_body(status, message, None, code)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode()), *headers]})
        await send({"type": "http.response.body", "body": payload})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or []
        if self._key is not None and scope.get("path") not in self.open_paths:
            given = [v for k, v in headers if k.lower() == b"authorization"]
            token = given[0][7:].strip() if len(given) == 1 and given[0][:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self._key):
                why = "missing bearer token" if not given else "incorrect API key provided"
                return await self._reply(send, 401, f"{why} (send 'Authorization: Bearer <key>')",
                                         "invalid_api_key", [(b"www-authenticate", b"Bearer")])
        lengths = [v for k, v in headers if k.lower() == b"content-length"]
        if lengths:
            try:
                declared = int(lengths[0])
            except ValueError:
                return await self._reply(send, 400, "Content-Length is not an integer", "bad_content_length")
            if declared > self.max_body_bytes:
                return await self._reply(send, 413, f"request body of {declared} bytes exceeds the limit of "
                                                    f"{self.max_body_bytes} bytes", "body_too_large")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await self._reply(send, 413, f"request body exceeds the limit of {self.max_body_bytes} bytes",
                                         "body_too_large")
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        return await self.app(scope, replay, send)


class Overloaded(Exception):
    """The server holds as many requests as it admits."""


class Admission:
    """At most ``limit`` requests in flight (queued in the engine or running). Used from one event
    loop, so a plain counter suffices."""

    def __init__(self, limit: int, retry_after_s: int = 1):
        if limit < 1:
            raise ValueError(f"admission limit must be >= 1, got {limit}")
        self.limit, self.retry_after_s = limit, retry_after_s
        self.in_flight = 0
        self.refused = 0

    def acquire(self, n: int = 1) -> None:
        if self.in_flight + n > self.limit:
            self.refused += 1
            raise Overloaded(f"server busy: {self.in_flight} requests in flight (limit {self.limit}); retry later")
        self.in_flight += n

    def release(self, n: int = 1) -> None:
        self.in_flight -= n


async def await_or_disconnect(receive: Callable[[], Awaitable[dict]], work: Awaitable[Any]) -> Any:
    """``await work``, unless the client disconnects first: then raise :class:`ClientDisconnected`
    (``work`` is cancelled; the caller cancels whatever the work stands for). ``receive`` is the ASGI
    receive of a request whose body was already read, so its next message is the disconnect."""
    work = asyncio.ensure_future(work)

    async def watch():
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if work.done():
        return work.result()
    work.cancel()
    with contextlib.suppress(BaseException):  # retrieve the cancellation (no "never retrieved" log)
        await work
    raise ClientDisconnected()


def _reject_constant(name: str):
    raise RequestError(f"body is not valid JSON: {name} is not a JSON number")


def _depth(value: Any, limit: int) -> int:
    stack, deepest = [(value, 1)], 0
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            break
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


def parse_json_body(raw: bytes) -> Any:
    """Strict JSON: RequestError (400) on bad UTF-8, syntax, NaN/Infinity, or nesting deeper than
    :data:`MAX_JSON_DEPTH`."""
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except RequestError:
        raise
    except (ValueError, RecursionError) as e:
        raise RequestError(f"body is not valid JSON: {str(e)[:200]}") from None
    if _depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise RequestError(f"body nests deeper than {MAX_JSON_DEPTH} levels")
    return value


def decode_base64_image(payload: str, param: str) -> bytes:
    """The bytes of a ``data:image/...;base64,`` URI or of bare base64 text."""
    head, sep, data = payload.partition(",")
    if payload.startswith("data:"):
        if not sep or ";base64" not in head:
            raise RequestError(f"{param}: an image data URI must be base64-encoded", param)
    else:
        data = payload
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{param}: not valid base64", param) from None


def open_image(data: bytes, *, max_pixels: int, param: str):
    """RGB PIL image from encoded bytes. The header's width × height is checked against
    ``max_pixels`` before decoding; PIL's own bomb check and truncated files become a 400 too."""
    from PIL import Image

    from genevolve_jax.processing.image import to_rgb
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = img.size
            if width < 1 or height < 1:
                raise RequestError(f"{param}: image has no pixels ({width}x{height})", param)
            if width * height > max_pixels:
                raise RequestError(f"{param}: image of {width}x{height} = {width * height} pixels exceeds the "
                                   f"limit of {max_pixels} pixels", param, code="image_too_large")
            img.load()
            return to_rgb(img)   # as every stage decodes: transparency onto white (processing/image.py)
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RequestError(f"{param}: image exceeds the limit of {max_pixels} pixels (PIL: {e})", param,
                           code="image_too_large") from None
    except Exception as e:  # PIL raises many types for bad or truncated bytes
        raise RequestError(f"{param}: not a decodable image ({type(e).__name__}: {str(e)[:120]})", param) from None


__all__ = ["RequestError", "ClientDisconnected", "Overloaded", "Admission", "GuardMiddleware", "openai_error_body",
           "error_response", "api_key_from_env", "await_or_disconnect", "parse_json_body", "decode_base64_image",
           "open_image", "IMAGE_FORMATS"]
