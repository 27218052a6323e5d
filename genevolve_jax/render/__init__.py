"""Rendering: (gen_prompt, reference image files, seed) -> image.

Backends: the in-process diffusers renderer (Qwen-Image-Edit-2511, with a text-to-image fallback),
the tiny random Qwen-Image pipelines (CPU tests, embedded demo), the HTTP client of the render
service (the service itself: serving/render_service.py), and the optional Gemini-image renderer.
Heavy imports (torch, diffusers) happen only in the modules that need them.
"""
from genevolve_jax.render.base import (RenderError, Renderer, RenderRequest, SamplingParams, load_reference_images,
                                       output_size)
from genevolve_jax.render.factory import CachedRenderer, RenderOutcome, build_renderer

__all__ = ["CachedRenderer", "RenderError", "RenderOutcome", "RenderRequest", "Renderer", "SamplingParams",
           "build_renderer", "load_reference_images", "output_size"]
