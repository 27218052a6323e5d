"""Build the configured renderer, and wrap any renderer with a content-hash cache and a throttle."""
from __future__ import annotations

import os
from dataclasses import dataclass

from PIL import Image

from genevolve_jax.render.base import RenderError, Renderer, RenderRequest, SamplingParams
from genevolve_jax.render.remote import ContentCache, Throttle, bytes_to_image, image_to_bytes


def build_renderer(cfg) -> Renderer:
    """The renderer the ``render`` config section asks for (see render/config.py)."""
    from genevolve_jax.render.config import validate

    validate(cfg)
    params = SamplingParams.from_config(cfg.sampling)
    if cfg.backend == "tiny":
        from genevolve_jax.render.tiny import tiny_renderer

        return tiny_renderer(cfg.tiny.init_seed, cfg.tiny.long_side, cfg.tiny.num_inference_steps, deferred=True)
    if cfg.backend == "diffusers":
        from genevolve_jax.render.diffusers_renderer import DiffusersRenderer

        return DiffusersRenderer.from_pretrained(cfg.diffusers.edit_model_path, cfg.diffusers.text_model_path,
                                                 cfg.diffusers.device, cfg.diffusers.dtype, params)
    if cfg.backend == "http":
        from genevolve_jax.render.client import HTTPRenderer

        key_env = cfg.http.api_key_env
        if key_env and not os.environ.get(key_env):
            raise RenderError(f"render.http.api_key_env names {key_env}, which is not set in the environment")
        return HTTPRenderer(list(cfg.http.urls), params, cfg.http.timeout_s, cfg.http.max_retries,
                            cfg.http.backoff_s, api_key=os.environ.get(key_env) if key_env else None)
    from genevolve_jax.render.gemini import GeminiRenderer

    g = cfg.gemini
    return GeminiRenderer(g.model, g.api_key_env, g.base_url, g.timeout_s, g.max_retries, g.backoff_s)


@dataclass
class RenderOutcome:
    image: Image.Image
    key: str            # content hash of the request (renderer id, settings, reference bytes)
    cached: bool
    path: str | None    # where the PNG lies in the cache, if caching is on


class CachedRenderer:
    """Renders through ``renderer`` at most once per content hash, under a throttle."""

    def __init__(self, renderer: Renderer, cache: ContentCache | None = None, throttle: Throttle | None = None):
        self.renderer = renderer
        self.cache = cache or ContentCache(None)
        self.throttle = throttle or Throttle(8)
        self.calls = 0  # renders actually run (cache misses)

    async def render(self, request: RenderRequest) -> RenderOutcome:
        key = request.cache_key(self.renderer.renderer_id)
        hit = self.cache.get_bytes("render", key, ".png")
        if hit is not None:
            path = self.cache.path("render", key, ".png")
            return RenderOutcome(bytes_to_image(hit).convert("RGB"), key, True, str(path))
        async with self.throttle:
            self.calls += 1
            image = await self.renderer.render(request)
        path = self.cache.put_bytes("render", key, image_to_bytes(image, "PNG"), ".png")
        return RenderOutcome(image, key, False, str(path) if path else None)
