"""`genevolve render-server`: the render service (FastAPI) with one worker per GPU.

    genevolve render-server --model /models/Qwen-Image-Edit-2511 --devices auto --port 8100
    genevolve render-server --tiny            # random tiny pipeline on CPU, for demos and tests

Binds 127.0.0.1 unless --host says otherwise; ``--api-key-env NAME`` requires ``Authorization: Bearer
$NAME`` on every route but /health; request bounds have flags (``--max-side``, ``--max-steps``, ...).
See genevolve_jax/serving/render_service.py for the contract.
"""
from __future__ import annotations

import argparse
import threading
import time

from genevolve_jax.serving.render_service import RenderLimits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="", help="local Qwen-Image-Edit-2511 pipeline directory")
    parser.add_argument("--text-model", default="",
                        help="optional local text-to-image pipeline directory for reference-free prompts")
    parser.add_argument("--tiny", action="store_true", help="serve the tiny random pipeline instead of a model")
    parser.add_argument("--devices", default="auto",
                        help="'auto' (every CUDA device, else cpu) or a comma list such as cuda:0,cuda:1")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--queue-size", type=int, default=256,
                        help="images waiting for a worker; more get 503 with Retry-After")
    parser.add_argument("--api-key-env", default="", metavar="NAME",
                        help="environment variable holding a bearer token required on every route but /health")
    limits = parser.add_argument_group("request limits (out of bounds: a 4xx naming the field)")
    d = RenderLimits()
    limits.add_argument("--max-side", type=int, default=d.max_side, help="largest width or height")
    limits.add_argument("--max-pixels", type=int, default=d.max_pixels, help="largest width x height")
    limits.add_argument("--max-steps", type=int, default=d.max_steps, help="largest num_inference_steps")
    limits.add_argument("--max-images", type=int, default=d.max_images, help="largest num_images_per_prompt")
    limits.add_argument("--max-refs", type=int, default=d.max_refs, help="reference images per request")
    limits.add_argument("--max-ref-pixels", type=int, default=d.max_ref_pixels,
                        help="width x height of one reference, checked before it is decoded")
    limits.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="request body size")
    parser.add_argument("--latency", type=float, default=0.0,
                        help="seconds each image takes on top of its render (with --slots: a stand-in for a "
                             "remote diffusion service, e.g. 8.0 for Qwen-Image-Edit-2511 on a GPU)")
    parser.add_argument("--slots", type=int, default=0,
                        help="images in flight at once, each waiting --latency (0: one per device); the "
                             "devices' renderers are shared by the slots")
    parser.add_argument("--steps", type=int, default=40, help="default num_inference_steps")
    parser.add_argument("--true-cfg-scale", type=float, default=4.0)
    parser.add_argument("--long-side", type=int, default=1024)


def resolve_devices(spec: str) -> list[str]:
    if spec != "auto":
        devices = [d.strip() for d in spec.split(",") if d.strip()]
        if not devices:
            raise ValueError(f"--devices must name at least one device, got {spec!r}")
        return devices
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(n)] or ["cpu"]


def build_workers(args: argparse.Namespace) -> list:
    from rich.progress import Progress

    from genevolve_jax.render.base import SamplingParams
    from genevolve_jax.render.diffusers_renderer import DiffusersRenderer
    from genevolve_jax.render.tiny import tiny_renderer

    if not args.tiny and not args.model and not args.text_model:
        raise SystemExit("render-server: give --model DIR (and/or --text-model DIR), or --tiny")
    devices = resolve_devices(args.devices)
    params = SamplingParams(num_inference_steps=args.steps, true_cfg_scale=args.true_cfg_scale,
                            long_side=args.long_side)
    workers = []
    with Progress(transient=True) as progress:
        task = progress.add_task(f"loading {len(devices)} render worker(s)", total=len(devices))
        for dev in devices:
            if args.tiny:
                workers.append(tiny_renderer(0, device=dev))
            else:
                workers.append(DiffusersRenderer.from_pretrained(args.model, args.text_model, dev, args.dtype,
                                                                 params))
            progress.advance(task)
    if args.latency < 0 or args.slots < 0:
        raise SystemExit("render-server: --latency and --slots must be >= 0")
    if args.latency > 0 or args.slots:
        locks = [threading.Lock() for _ in workers]     # one render at a time per renderer
        workers = [SimulatedLatencyWorker(workers[i % len(workers)], args.latency, locks[i % len(workers)])
                   for i in range(args.slots or len(workers))]
    return workers


class SimulatedLatencyWorker:
    """A render worker that takes ``latency_s`` longer than ``inner``: the stand-in for a remote
    diffusion service in benchmarks (bench/async_step.py). The wait holds no lock, so N such
    workers over one renderer have N images in flight; the render itself takes the renderer's lock."""

    def __init__(self, inner, latency_s: float, lock: threading.Lock):
        self.inner, self.latency_s, self.lock = inner, float(latency_s), lock

    def render_images(self, request, refs):
        time.sleep(self.latency_s)
        with self.lock:
            return self.inner.render_images(request, refs)


def limits_from_args(args: argparse.Namespace) -> RenderLimits:
    return RenderLimits(max_side=args.max_side, max_pixels=args.max_pixels, max_steps=args.max_steps,
                        max_images=args.max_images, max_refs=args.max_refs, max_ref_pixels=args.max_ref_pixels,
                        max_body_bytes=args.max_body_bytes)


def run(args: argparse.Namespace) -> int:
    import sys

    import uvicorn
    from rich.console import Console

    from genevolve_jax.serving.render_service import create_app
    from genevolve_jax.serving.guards import api_key_from_env

    try:
        limits, api_key = limits_from_args(args), api_key_from_env(args.api_key_env)
    except ValueError as exc:
        print(f"render-server: {exc}", file=sys.stderr)
        return 2
    workers = build_workers(args)
    Console(stderr=True).print(f"render-server: {len(workers)} worker(s) on http://{args.host}:{args.port}")
    uvicorn.run(create_app(workers, args.queue_size, limits=limits, api_key=api_key), host=args.host,
                port=args.port, log_level="info")
    return 0
