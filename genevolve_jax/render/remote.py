"""Plumbing shared by every remote call (render and judge): content hashes, an on-disk cache,
bounded concurrency with a requests-per-minute limit, retries with backoff, and image data URIs.

Kept free of torch and diffusers so that judges and HTTP clients import it cheaply.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import random
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, TypeVar

from PIL import Image

T = TypeVar("T")


# --- content hashing ------------------------------------------------------------------------------

def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal inputs always give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def content_hash(obj: Any, blobs: Iterable[bytes] = ()) -> str:
    """sha256 over the canonical JSON of ``obj`` followed by each blob (length-prefixed, so that
    moving bytes from one blob to the next changes the hash)."""
    h = hashlib.sha256(canonical_json(obj).encode("utf-8"))
    for blob in blobs:
        h.update(len(blob).to_bytes(8, "little"))
        h.update(blob)
    return h.hexdigest()


def file_bytes(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# --- images <-> bytes / data URIs ------------------------------------------------------------------

def image_to_bytes(image: Image.Image, fmt: str = "PNG", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img = image.convert("RGB") if fmt.upper() in ("JPEG", "JPG") else image
    img.save(buf, format="JPEG" if fmt.upper() == "JPG" else fmt.upper(), quality=quality)
    return buf.getvalue()


def bytes_to_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def image_to_data_uri(image: Image.Image | bytes, fmt: str = "JPEG") -> str:
    """A ``data:image/...;base64,`` URI. Bytes are sent as they are, with their sniffed type."""
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
        mime = "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
    else:
        data = image_to_bytes(image, fmt)
        mime = "image/png" if fmt.upper() == "PNG" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def decode_image_payload(payload: str) -> Image.Image:
    """A data URI or bare base64 string -> RGB image. Raises ValueError naming what was wrong."""
    if not isinstance(payload, str) or not payload:
        raise ValueError("image payload must be a non-empty string")
    if payload.startswith("data:"):
        head, sep, body = payload.partition(",")
        if not sep or ";base64" not in head:
            raise ValueError(f"image data URI must be base64-encoded, got header {head[:40]!r}")
    else:
        body = payload
    try:
        raw = base64.b64decode(body, validate=False)
        return bytes_to_image(raw).convert("RGB")
    except Exception as e:  # PIL raises several types for bad bytes
        raise ValueError(f"image payload is not a decodable image: {e}") from e


# --- on-disk cache -------------------------------------------------------------------------------

class ContentCache:
    """Blobs keyed by content hash, one file each under ``root/namespace/ab/<hash><suffix>``.

    Writes go to a temporary file and are renamed into place, so a crash never leaves a torn entry
    and concurrent writers of the same key are harmless (same content). ``root=None`` disables it.
    """

    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root) if root else None
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def path(self, namespace: str, key: str, suffix: str = "") -> Path:
        assert self.root is not None
        return self.root / namespace / key[:2] / f"{key}{suffix}"

    def get_bytes(self, namespace: str, key: str, suffix: str = "") -> bytes | None:
        if self.root is None:
            return None
        p = self.path(namespace, key, suffix)
        if p.is_file():
            self.hits += 1
            return p.read_bytes()
        self.misses += 1
        return None

    def put_bytes(self, namespace: str, key: str, data: bytes, suffix: str = "") -> Path | None:
        if self.root is None:
            return None
        p = self.path(namespace, key, suffix)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.{random.getrandbits(32):08x}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, p)
        return p

    def get_json(self, namespace: str, key: str) -> Any | None:
        data = self.get_bytes(namespace, key, ".json")
        if data is None:
            return None
        try:
            return json.loads(data)
        except json.JSONDecodeError:  # a foreign or damaged file: treat as a miss, it gets rewritten
            self.hits -= 1
            self.misses += 1
            return None

    def put_json(self, namespace: str, key: str, value: Any) -> Path | None:
        return self.put_bytes(namespace, key, canonical_json(value).encode("utf-8"), ".json")


# --- concurrency and rate limits -------------------------------------------------------------------

class Throttle:
    """At most ``max_concurrency`` calls in flight and at most ``requests_per_minute`` starts per
    minute (0 = no rate limit). Starts are spaced evenly (60/rpm seconds apart) rather than in
    bursts, which is what hosted endpoints' limiters tolerate best."""

    def __init__(self, max_concurrency: int, requests_per_minute: float = 0.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if requests_per_minute < 0:
            raise ValueError(f"requests_per_minute must be >= 0, got {requests_per_minute}")
        self.max_concurrency = max_concurrency
        self.interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self._clock = clock
        self._sleep = sleep
        self._per_loop: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._next_start = 0.0
        self.in_flight = 0
        self.peak_in_flight = 0

    def _primitives(self) -> tuple[asyncio.Semaphore, asyncio.Lock]:
        # Made lazily, one pair per event loop: a Throttle is built outside the loop that uses it,
        # and a trainer runs each step's rollout phase in an event loop of its own (asyncio.run);
        # a semaphore bound to an earlier loop fails ("bound to a different event loop") as soon as
        # a call has to wait for a slot. The limit holds within each loop.
        loop = asyncio.get_running_loop()
        if loop not in self._per_loop:
            self._per_loop[loop] = (asyncio.Semaphore(self.max_concurrency), asyncio.Lock())
        return self._per_loop[loop]

    async def __aenter__(self) -> "Throttle":
        sem, lock = self._primitives()
        await sem.acquire()
        try:
            if self.interval:
                async with lock:
                    now = self._clock()
                    wait = self._next_start - now
                    self._next_start = max(now, self._next_start) + self.interval
                if wait > 0:
                    await self._sleep(wait)
        except BaseException:  # cancelled while waiting for its slot: give the slot back
            sem.release()
            raise
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.in_flight -= 1
        sem, _ = self._primitives()
        sem.release()


# --- retries -------------------------------------------------------------------------------------

class RetryableError(Exception):
    """A failure worth another try (timeout, connection error, 5xx, 429, unparsable output)."""


class PermanentError(Exception):
    """A failure that another try cannot fix (bad request, missing key, bad input)."""


@dataclass
class RetriesExhausted(Exception):
    reason: str
    tries: int

    def __str__(self) -> str:
        return f"{self.reason} after {self.tries} tries"


async def retry_async(fn: Callable[[], Awaitable[T]], tries: int, backoff_s: float,
                      max_backoff_s: float = 60.0) -> T:
    """Call ``fn`` until it succeeds, up to ``tries`` times, sleeping backoff·2^k (with jitter)
    between tries. RetryableError and timeouts are retried; PermanentError stops at once. Raises
    RetriesExhausted with the last reason either way, so callers can record why."""
    last = "unknown error"
    for attempt in range(1, tries + 1):
        try:
            return await fn()
        except PermanentError as e:
            raise RetriesExhausted(f"{e}", attempt) from e
        except (RetryableError, asyncio.TimeoutError, TimeoutError, ConnectionError) as e:
            last = str(e) or type(e).__name__
        if attempt < tries and backoff_s > 0:
            delay = min(max_backoff_s, backoff_s * 2 ** (attempt - 1))
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
    raise RetriesExhausted(last, tries)
