"""Forward-pass benchmark of the NNX Qwen3-VL: compile time and tokens/s (not a test).

    python bench/forward.py                         # CPU: tiny config, fp32, ours + transformers
    python bench/forward.py --shape 2b --batch 4 --seq 2048 --dtype bfloat16   # a GPU

Both implementations get the same random weights (every tensor random, norms included). Ours is
timed as one jitted function (``jax.jit(forward)`` on the split graph) with and without the
[B, L, V] logits; transformers' ``Qwen3VLForConditionalGeneration`` runs on the same device type
(CUDA when available) under ``torch.no_grad``. "first call" is compile + first run for ours and
the first (warm-up) call for transformers. Results print as a table and, with --json, to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

# The random models and inputs come from tests/fixtures (test and benchmark code, not the package's),
# importable from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=("tiny", "2b", "8b"), default=None,
                   help="model shape (default: tiny on CPU, 2b on an accelerator)")
    p.add_argument("--batch", type=int, default=None, help="rows per forward (default 2 CPU / 4 GPU)")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default 128 CPU / 2048 GPU)")
    p.add_argument("--image-grid", type=int, nargs=3, metavar=("T", "H", "W"), default=None,
                   help="also put one image of this patch grid in every row (e.g. 1 32 32)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="param + compute dtype (default float32 CPU / bfloat16 GPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per implementation")
    p.add_argument("--no-transformers", action="store_true", help="time only our model")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice; 1 avoids thrashing on a busy CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args(argv)


def _inputs(cfg, batch: int, seq: int, image_grid, seed: int):
    from tests.fixtures import hf_qwen3_vl as R
    rng = np.random.default_rng(seed)
    rows, grids = [], []
    for _ in range(batch):
        row = []
        if image_grid is not None:
            row = R.placeholder_segment(cfg, image_grid, "image", rng)
            grids.append(image_grid)
        if len(row) > seq:
            raise SystemExit(f"--seq {seq} is shorter than the image's {len(row)} placeholder tokens")
        rows.append(R.text_tokens(cfg, seq - len(row), rng) + row)
    ids, mask = R.pad_rows(rows, "right")
    if not grids:
        return dict(input_ids=ids, attention_mask=mask)
    grid = np.asarray(grids, np.int64)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=R.random_pixels(cfg, grid, rng), image_grid_thw=grid)


_PROBE = 8  # last positions of row 0 whose logits are compared between implementations


def _time(fn, repeats: int) -> tuple[float, float]:
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return first, (time.perf_counter() - t) / repeats


def bench_ours(cfg, state_dict, inputs, repeats: int) -> list[dict]:
    import jax
    from flax import nnx

    from genevolve_jax.models import hf_io
    from genevolve_jax.models.qwen3_vl.model import forward, forward_hidden, prepare_inputs

    model = hf_io.model_from_state_dict(cfg, state_dict)
    batch = prepare_inputs(cfg, **inputs)
    graphdef, state = nnx.split(model)
    out = []
    for name, fn in (("ours (logits)", forward), ("ours (hidden, no logits)", forward_hidden)):
        jitted = jax.jit(fn, static_argnums=0)
        t = time.perf_counter()
        compiled = jitted.lower(graphdef, state, batch).compile()
        compile_s = time.perf_counter() - t
        first, per = _time(lambda: jax.block_until_ready(compiled(state, batch)), repeats)
        out.append(dict(impl=name, compile_s=compile_s, first_call_s=compile_s + first, forward_s=per))
        if fn is forward:
            out[-1]["probe"] = np.asarray(compiled(state, batch)[0, -_PROBE:], np.float32)
    return out


def bench_transformers(cfg, state_dict, inputs, repeats: int, threads: int | None = None) -> list[dict]:
    import torch
    if threads:
        torch.set_num_threads(threads)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if cfg.param_dtype == "bfloat16" else torch.float32
    import tempfile

    import transformers

    from genevolve_jax.models import hf_io
    # Through a safetensors directory, as a real checkpoint arrives: from_pretrained skips the
    # random init and sets up its buffers (rotary tables) itself.
    with tempfile.TemporaryDirectory() as tmp:
        hf_io.save_state_dict(state_dict, tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg.to_hf_dict(), f)
        model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
            tmp, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    kw = {"input_ids": torch.as_tensor(inputs["input_ids"], device=device),
          "attention_mask": torch.as_tensor(inputs["attention_mask"], device=device),
          "mm_token_type_ids": torch.as_tensor((inputs["input_ids"] == cfg.image_token_id).astype(np.int32),
                                               device=device)}
    if "pixel_values" in inputs:
        kw["pixel_values"] = torch.as_tensor(inputs["pixel_values"], device=device, dtype=dtype)
        kw["image_grid_thw"] = torch.as_tensor(inputs["image_grid_thw"], device=device)

    def call():
        model.model.rope_deltas = None
        with torch.no_grad():
            logits = model(**kw).logits
        if device == "cuda":
            torch.cuda.synchronize()
        return logits
    first, per = _time(call, repeats)
    probe = call()[0, -_PROBE:].float().cpu().numpy()
    return [dict(impl=f"transformers {transformers.__version__} (sdpa, {device})", compile_s=None,
                 first_call_s=first, forward_s=per, probe=probe)]


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    from rich.console import Console
    from rich.table import Table

    from genevolve_jax.models import hf_io
    from genevolve_jax.models.qwen3_vl import config as qwen_config

    accel = jax.devices()[0].platform != "cpu"
    shape = args.shape or ("2b" if accel else "tiny")
    dtype = args.dtype or ("bfloat16" if accel else "float32")
    batch = args.batch or (4 if accel else 2)
    seq = args.seq or (2048 if accel else 128)
    if min(batch, seq, args.repeats) < 1:
        raise SystemExit("--batch, --seq and --repeats must be >= 1")
    make = {"tiny": qwen_config.tiny, "2b": qwen_config.qwen3vl_2b, "8b": qwen_config.qwen3vl_8b}[shape]
    cfg = make(param_dtype=dtype, dtype=dtype)
    console = Console()
    with console.status(f"random {shape} weights"):
        import ml_dtypes
        state_dict = hf_io.random_state_dict(cfg, args.seed, ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    inputs = _inputs(cfg, batch, seq, tuple(args.image_grid) if args.image_grid else None, args.seed)
    results = bench_ours(cfg, state_dict, inputs, args.repeats)
    if not args.no_transformers:
        try:
            results += bench_transformers(cfg, state_dict, inputs, args.repeats, args.torch_threads)
        except ImportError as e:
            console.print(f"transformers comparison skipped: {e}")
    tokens = int(inputs["input_ids"].size)
    device = f"{jax.devices()[0].device_kind} ×{len(jax.devices())}" if accel else f"CPU ({os.cpu_count()} cores)"
    table = Table(title=f"forward: {shape}, {dtype}, batch {batch} × seq {seq}"
                        f"{', image grid ' + str(tuple(args.image_grid)) if args.image_grid else ''} on {device}")
    for col in ("implementation", "compile s", "first call s", "ms / forward", "tokens / s"):
        table.add_column(col, justify="left" if col == "implementation" else "right")
    for r in results:
        r.update(tokens=tokens, tokens_per_s=tokens / r["forward_s"])
        table.add_row(r["impl"], "-" if r["compile_s"] is None else f"{r['compile_s']:.2f}",
                      f"{r['first_call_s']:.2f}", f"{r['forward_s'] * 1e3:.1f}", f"{r['tokens_per_s']:,.0f}")
    console.print(table)
    probes = [r.pop("probe") for r in results if "probe" in r]
    if len(probes) == 2:  # same weights, same inputs: the implementations must agree
        diff = float(np.abs(probes[0] - probes[1]).max())
        results[0]["max_abs_logit_diff_vs_transformers"] = diff
        console.print(f"max |Δ logits| ours vs transformers (row 0, last {_PROBE} positions): {diff:.3g} "
                      f"(max |logit| {np.abs(probes[1]).max():.2f})")
    for r in results:
        r.pop("probe", None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=shape, dtype=dtype, batch=batch, seq=seq, image_grid=args.image_grid,
                           device=device, jax=jax.__version__, results=results), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
