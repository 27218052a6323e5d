"""Renderer over one or more render services (``genevolve render-server`` or the original
Qwen-Image-Edit service): round-robin over URLs, retries with backoff, long timeouts."""
from __future__ import annotations

import itertools
from typing import Sequence

import httpx
from PIL import Image

from genevolve_jax.render.base import RenderError, RenderRequest, SamplingParams, load_reference_images, output_size
from genevolve_jax.render.remote import (PermanentError, RetriesExhausted, RetryableError, decode_image_payload,
                                         image_to_data_uri, retry_async)


def generate_payload(request: RenderRequest, refs: list[Image.Image], params: SamplingParams) -> dict:
    """The /generate JSON body of the original service contract for one request."""
    s = request.resolved(params)
    if request.width and request.height:
        width, height = int(request.width), int(request.height)
    elif refs:
        width, height = output_size(refs[0].width, refs[0].height, params.long_side, params.multiple_of)
    else:
        width = height = params.long_side
    return {"image_urls": [image_to_data_uri(r, "JPEG") for r in refs], "prompt": request.prompt,
            "seed": int(request.seed), "true_cfg_scale": s["true_cfg_scale"],
            "negative_prompt": s["negative_prompt"], "num_inference_steps": s["num_inference_steps"],
            "guidance_scale": s["guidance_scale"], "num_images_per_prompt": 1, "width": width, "height": height}


class HTTPRenderer:
    """Async client renderer. Each try goes to the next URL in turn, so a dead or overloaded
    service costs one try, not the sample."""

    def __init__(self, urls: Sequence[str], params: SamplingParams = SamplingParams(), timeout_s: float = 600.0,
                 max_retries: int = 3, backoff_s: float = 2.0, transport: httpx.AsyncBaseTransport | None = None,
                 api_key: str | None = None):
        if not urls:
            raise ValueError("HTTPRenderer needs at least one service URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.params = params
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._transport = transport
        # `genevolve render-server --api-key-env NAME` wants this bearer token (read from the environment)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._next = itertools.cycle(range(len(self.urls)))
        self.renderer_id = f"http:{params}"  # services behind the URLs are assumed interchangeable
        self.attempts_per_url = {u: 0 for u in self.urls}

    async def _post_once(self, client: httpx.AsyncClient, payload: dict) -> Image.Image:
        url = self.urls[next(self._next)]
        self.attempts_per_url[url] += 1
        try:
            resp = await client.post(f"{url}/generate", json=payload)
        except (httpx.TimeoutException, httpx.TransportError) as e:
            raise RetryableError(f"{url}: {type(e).__name__}: {e}") from e
        try:
            body = resp.json()
        except ValueError:
            body = {}
        err = body.get("error") if isinstance(body, dict) else None
        if resp.status_code == 429 or resp.status_code >= 500:
            raise RetryableError(f"{url}: HTTP {resp.status_code}: {err or resp.text[:200]}")
        if resp.status_code >= 400:
            raise PermanentError(f"{url}: HTTP {resp.status_code}: {err or resp.text[:200]}")
        if not isinstance(body, dict) or not body.get("success") or not body.get("image"):
            raise RetryableError(f"{url}: unsuccessful response: {err or str(body)[:200]}")
        try:
            return decode_image_payload(body["image"])
        except ValueError as e:
            raise RetryableError(f"{url}: {e}") from e

    async def render(self, request: RenderRequest) -> Image.Image:
        payload = generate_payload(request, load_reference_images(request.reference_paths), self.params)
        async with httpx.AsyncClient(timeout=self.timeout_s, transport=self._transport,
                                     headers=self._headers) as client:
            try:
                return await retry_async(lambda: self._post_once(client, payload), self.max_retries, self.backoff_s)
            except RetriesExhausted as e:
                raise RenderError(f"render service failed: {e}") from e
