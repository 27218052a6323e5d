"""`genevolve demo`: the tiny-model round trip on the embedded defaults, offline, on CPU.

1. build a tiny random Qwen3-VL (config.tiny(); every weight seeded-random, norms included);
2. preprocess one synthetic image with the numpy processor, expand its placeholder in a short
   prompt and run a jitted forward, timing compile and tokens/s;
3. export to a Hugging Face directory, reload it through our loader and compare logits;
4. when torch + transformers are importable, load the export with
   ``transformers.Qwen3VLForConditionalGeneration.from_pretrained`` and compare logits with theirs.

The prompt's text is byte-level ids (the tiny vocabulary holds all 256 bytes); a real run uses the
checkpoint's tokenizer. Exit status 0 when every comparison is within tolerance.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from rich.console import Console
from rich.table import Table

console = Console()

PROMPT = ("Describe the picture: ", " then plan a poster for it.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=os.path.join("runs", "demo"), help="output directory (HF export)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and image")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="parameter and compute dtype of the model (and of the export)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards after the compile")
    parser.add_argument("--no-transformers", action="store_true",
                        help="skip the comparison with transformers' PyTorch model")


def synthetic_image(seed: int, height: int = 96, width: int = 128) -> np.ndarray:
    """A uint8 RGB picture with structure (gradient sky, a disc, noise), not a constant."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.zeros((height, width, 3), np.float64)
    img[..., 0] = 255 * x / width
    img[..., 1] = 255 * y / height
    img[..., 2] = 128 + 100 * np.sin(x / 7.0)
    cy, cx, r = rng.integers(20, height - 20), rng.integers(20, width - 20), rng.integers(8, 20)
    img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = (250, 220, 40)
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def demo_inputs(config, seed: int):
    """(input_ids [1, L], attention_mask, pixel_values, image_grid_thw) for one image and a prompt."""
    from genevolve_jax.processing import chat, image
    # Small pixel bounds keep the demo's image at a few dozen patches.
    proc = image.ImageProcessorConfig(min_pixels=64 * 64, max_pixels=128 * 128)
    pixels, grid = image.preprocess_images([synthetic_image(seed)], proc)
    ids_of = chat.VisionTokenIds.from_config(config)
    text = [list(PROMPT[0].encode()), list(PROMPT[1].encode())]
    ids = text[0] + [ids_of.vision_start, ids_of.image_pad, ids_of.vision_end] + text[1]
    ids = chat.expand_ids(ids, ids_of, image_grid_thw=grid, merge_size=config.vision.spatial_merge_size)
    ids = ids[None].astype(np.int64)
    return ids, np.ones_like(ids), pixels, grid


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    import jax
    from flax import nnx

    from genevolve_jax.models import hf_io
    from genevolve_jax.models.qwen3_vl import config as qwen_config
    from genevolve_jax.models.qwen3_vl.model import forward, prepare_inputs

    if args.repeats < 1:
        console.print("[red]--repeats must be >= 1[/]")
        return 2
    rows: list[tuple[str, str]] = []
    summary: dict = {"dtype": args.dtype, "seed": args.seed}
    ok = True
    cfg = qwen_config.tiny(param_dtype=args.dtype, dtype=args.dtype)
    with console.status("building the tiny model"):
        model = hf_io.model_from_state_dict(cfg, hf_io.random_state_dict(cfg, args.seed))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    rows.append(("model", f"tiny Qwen3-VL, {n_params:,} params, {args.dtype}, "
                          f"{jax.devices()[0].platform} ({len(jax.devices())} device(s))"))

    ids, mask, pixels, grid = demo_inputs(cfg, args.seed)
    batch = prepare_inputs(cfg, ids, mask, pixel_values=pixels, image_grid_thw=grid)
    rows.append(("input", f"{ids.shape[1]} tokens incl. {int((ids == cfg.image_token_id).sum())} image tokens; "
                          f"image grid {grid.tolist()[0]} → {pixels.shape[0]} patches"))
    step = jax.jit(forward, static_argnums=0)
    graphdef, state = nnx.split(model)
    t = time.perf_counter()
    logits = np.asarray(jax.block_until_ready(step(graphdef, state, batch)), np.float32)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(args.repeats):
        jax.block_until_ready(step(graphdef, state, batch))
    per_call = (time.perf_counter() - t) / args.repeats
    rows.append(("forward", f"compile+first call {compile_s:.2f}s; {per_call * 1e3:.1f} ms/forward = "
                            f"{ids.size / per_call:,.0f} tokens/s"))
    summary.update(tokens=int(ids.size), compile_s=compile_s, forward_s=per_call, tokens_per_s=ids.size / per_call)
    if not np.isfinite(logits).all():
        ok = False
        rows.append(("logits", "[red]non-finite values[/]"))

    out = os.path.abspath(args.out)
    hf_dir = os.path.join(out, "hf")
    t = time.perf_counter()
    written = hf_io.save_pretrained(model, hf_dir, dtype=args.dtype)
    rows.append(("export", f"{hf_dir} ({len([w for w in written if w.endswith('.safetensors')])} shard(s), "
                           f"{time.perf_counter() - t:.2f}s)"))
    reloaded = hf_io.load_pretrained(hf_dir)
    g2, s2 = nnx.split(reloaded)
    again = np.asarray(step(g2, s2, batch), np.float32)
    diff = float(np.abs(again - logits).max())
    ok &= diff == 0.0
    summary["reload_max_abs_diff"] = diff
    rows.append(("reload (ours)", f"max |Δ logits| = {diff:.3g} {'[green]ok' if diff == 0 else '[red]MISMATCH'}[/]"))

    if not args.no_transformers:
        line, hf_diff = _compare_with_transformers(cfg, hf_dir, ids, mask, pixels, grid, logits, args.dtype)
        rows.append(("transformers", line))
        ok &= "MISMATCH" not in line
        summary["transformers_max_abs_diff"] = hf_diff
    table = Table(title="genevolve demo", show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    summary.update(ok=bool(ok), total_s=time.perf_counter() - start)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    console.print(f"{'[green]done' if ok else '[red]FAILED'}[/] in {summary['total_s']:.1f}s "
                  f"(summary: {os.path.join(out, 'summary.json')})", soft_wrap=True)
    return 0 if ok else 1


def _compare_with_transformers(cfg, hf_dir, ids, mask, pixels, grid, logits, dtype) -> tuple[str, float | None]:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        return f"skipped ({e.name} is not installed)", None
    from genevolve_jax.models.qwen3_vl import hf_reference
    t = time.perf_counter()
    hf = transformers.Qwen3VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    theirs = hf_reference.hf_logits(hf, cfg, ids, mask, pixel_values=pixels, image_grid_thw=grid)
    diff = float(np.abs(theirs - logits).max())
    # fp32 must agree to 1e-4; bf16 compute differs from torch's fp32 by bf16 rounding, so only report.
    tol = 1e-4 if dtype == "float32" else float("inf")
    verdict = "[green]ok[/]" if diff <= tol else "[red]MISMATCH[/]"
    return (f"from_pretrained + forward {time.perf_counter() - t:.2f}s; max |Δ logits| vs ours = {diff:.3g} "
            f"(max |logit| {np.abs(theirs).max():.2f}) {verdict}"), diff
