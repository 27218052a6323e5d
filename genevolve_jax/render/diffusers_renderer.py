"""In-process rendering through diffusers.

The edit pipeline is ``QwenImageEditPlusPipeline`` (Qwen-Image-Edit-2511): multi-reference, true
CFG, seeded. Programs without references go to an optional text-to-image pipeline (any diffusers
pipeline taking prompt/height/width/steps/generator; other keyword arguments are passed only when
its ``__call__`` accepts them).
"""
from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Any, Callable

from PIL import Image

from genevolve_jax.render.base import (RenderError, RenderRequest, SamplingParams, load_reference_images,
                                       output_size)

_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
           "float32": "float32", "fp32": "float32"}


def torch_dtype(name: str):
    import torch

    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return getattr(torch, _DTYPES[name])


def _call_parameters(pipe) -> set[str]:
    """Named parameters of the pipeline's ``__call__``, looking through wrappers that take only
    ``*args, **kwargs`` (such as the tiny pipeline's) to the class that defines them."""
    for cls in type(pipe).__mro__:
        fn = cls.__dict__.get("__call__")
        if fn is None:
            continue
        params = inspect.signature(fn).parameters.values()
        named = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - {"self"}
        if named:
            return named
    return set()


class DiffusersRenderer:
    """Renders with an edit pipeline (references) and an optional text-to-image pipeline (none).

    Calls are serialised per renderer: a diffusers pipeline is not re-entrant, and one GPU gains
    nothing from two concurrent denoising loops. Run one renderer per device for parallelism
    (the render service does).
    """

    def __init__(self, edit_pipeline=None, text_pipeline=None, params: SamplingParams = SamplingParams(),
                 device: str = "cpu", renderer_id: str = "diffusers", num_threads: int | None = None,
                 load_pipelines: Callable[[], tuple[Any, Any]] | None = None):
        """``load_pipelines`` (instead of the two pipelines): builds (edit, text) at the first render.
        Why: importing torch and diffusers and building even the tiny pipelines is about 3 s of a
        2-core CPU, which a run whose policy never answers with a program (a random model, a run
        stopped before its first render) need not spend before its first step."""
        if edit_pipeline is None and text_pipeline is None and load_pipelines is None:
            raise ValueError("DiffusersRenderer needs an edit pipeline, a text-to-image pipeline, or both")
        self.edit_pipeline = edit_pipeline
        self.text_pipeline = text_pipeline
        self._load_pipelines = load_pipelines
        self._load_lock = threading.Lock()
        self.params = params
        self.device = device
        self.renderer_id = f"{renderer_id}|{params}"
        # CPU intra-op threads during a render (None = torch's default). Tiny pipelines run fastest
        # on one thread: their ops are too small to split, and on a shared machine extra threads
        # mostly wait for cores (10x slower measured under load).
        self.num_threads = num_threads
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, edit_model_path: str = "", text_model_path: str = "", device: str = "cuda:0",
                        dtype: str = "bfloat16", params: SamplingParams = SamplingParams()) -> "DiffusersRenderer":
        """Load local pipeline directories (no hub access) and place them on ``device``/``dtype``."""
        import diffusers

        pipes = []
        for path, kind in ((edit_model_path, "edit"), (text_model_path, "text")):
            if not path:
                pipes.append(None)
                continue
            if kind == "edit":
                pipe = diffusers.QwenImageEditPlusPipeline.from_pretrained(
                    path, torch_dtype=torch_dtype(dtype), local_files_only=True)
            else:
                pipe = diffusers.DiffusionPipeline.from_pretrained(
                    path, torch_dtype=torch_dtype(dtype), local_files_only=True)
            pipe.to(device)
            pipe.set_progress_bar_config(disable=True)
            pipes.append(pipe)
        rid = f"diffusers:{edit_model_path or '-'}:{text_model_path or '-'}:{dtype}"
        return cls(pipes[0], pipes[1], params=params, device=device, renderer_id=rid)

    # --- rendering ---------------------------------------------------------------------------

    def _size(self, request: RenderRequest, refs: list[Image.Image]) -> tuple[int, int]:
        if request.width and request.height:
            return int(request.width), int(request.height)
        p = self.params
        if refs:
            return output_size(refs[0].width, refs[0].height, p.long_side, p.multiple_of)
        return p.long_side, p.long_side

    def render_images(self, request: RenderRequest, refs: list[Image.Image]) -> Image.Image:
        """Render from already-decoded reference images (the service passes decoded uploads)."""
        import torch

        if not request.prompt or not request.prompt.strip():
            raise RenderError("empty prompt")
        self._ensure_pipelines()
        width, height = self._size(request, refs)
        s = request.resolved(self.params)
        # A CPU generator makes the noise identical on every device for a given seed.
        generator = torch.Generator("cpu").manual_seed(int(request.seed))
        if refs:
            if self.edit_pipeline is None:
                raise RenderError("references given but no edit pipeline is loaded")
            pipe, kwargs = self.edit_pipeline, {"image": refs}
        else:
            if self.text_pipeline is None:
                raise RenderError("Qwen-Image-Edit needs at least one reference image and no "
                                  "text-to-image fallback pipeline is loaded")
            pipe, kwargs = self.text_pipeline, {}
        kwargs.update(prompt=request.prompt, height=height, width=width, generator=generator,
                      num_inference_steps=s["num_inference_steps"], output_type="pil")
        kwargs.update(self._optional_kwargs(pipe, s))
        with self._lock, torch.inference_mode():
            saved_threads = torch.get_num_threads()
            if self.num_threads:
                torch.set_num_threads(self.num_threads)
            try:
                out = pipe(**kwargs)
            except RenderError:
                raise
            except Exception as e:  # a pipeline failure is a failed render, not a crashed run
                raise RenderError(f"pipeline failed: {type(e).__name__}: {e}") from e
            finally:
                if self.num_threads:
                    torch.set_num_threads(saved_threads)
        return out.images[0].convert("RGB")

    def _ensure_pipelines(self) -> None:
        with self._load_lock:     # concurrent first renders build once
            if self._load_pipelines is not None:
                self.edit_pipeline, self.text_pipeline = self._load_pipelines()
                self._load_pipelines = None

    def _optional_kwargs(self, pipe, s: dict) -> dict[str, Any]:
        accepted = _call_parameters(pipe)
        out: dict[str, Any] = {}
        if "true_cfg_scale" in accepted:
            out["true_cfg_scale"] = s["true_cfg_scale"]
        if "negative_prompt" in accepted:
            out["negative_prompt"] = s["negative_prompt"]
        if "max_sequence_length" in accepted:
            out["max_sequence_length"] = self.params.max_sequence_length
        if "guidance_scale" in accepted:
            transformer = getattr(pipe, "transformer", None)
            distilled = getattr(getattr(transformer, "config", None), "guidance_embeds", None)
            # Qwen-Image-Edit ignores guidance_scale unless guidance-distilled (and warns); SD-style
            # pipelines use it as their CFG scale.
            if distilled is None or distilled:
                out["guidance_scale"] = s["guidance_scale"]
        return out

    def render_sync(self, request: RenderRequest) -> Image.Image:
        return self.render_images(request, load_reference_images(request.reference_paths))

    async def render(self, request: RenderRequest) -> Image.Image:
        return await asyncio.to_thread(self.render_sync, request)
