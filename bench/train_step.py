"""Train-step benchmark: our sharded JAX step vs. transformers' PyTorch Qwen3-VL step (not a test).

    python bench/train_step.py                                   # CPU: tiny config, fp32, smoke only
    python bench/train_step.py --shape 2b --batch 4 --seq 2048   # a GPU: bf16, text only
    python bench/train_step.py --shape 2b --batch 4 --seq 2048 --image 448   # one 448x448 image per row

Both sides: the same random weights, the same tokens, SFT on the LM with the vision tower frozen
(METHOD.md §5), loss on a random 60% of the text tokens, AdamW, bf16 compute. Ours keeps fp32
master weights unless --bf16-params; transformers trains a bf16 model with torch's fused AdamW and
SDPA attention. tokens/s counts every token of the batch; MFU uses 6·N_text·tokens + the attention
term 12·L·H·hd·T·tokens over the device's dense bf16 peak. Peak memory is the device allocator's.
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

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=("tiny", "2b", "8b"), default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--image", type=int, default=0, help="side of one square image per row (0 = text only)")
    p.add_argument("--remat", choices=("none", "full", "save_dots"), default="none")
    p.add_argument("--no-scan", action="store_true", help="unscanned decoder layers")
    p.add_argument("--bf16-params", action="store_true", help="bf16 params (no fp32 master weights)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def make_inputs(cfg, batch, seq, image, seed):
    from genevolve_jax.models.qwen3_vl import rope
    from tests.fixtures import hf_qwen3_vl as R
    rng = np.random.default_rng(seed)
    grid = None if not image else (1, image // cfg.vision.patch_size, image // cfg.vision.patch_size)
    rows = []
    for _ in range(batch):
        head = R.placeholder_segment(cfg, grid, "image", rng) if grid else []
        rows.append(R.text_tokens(cfg, seq - len(head), rng)[:2] + head + R.text_tokens(cfg, seq - len(head) - 2, rng))
    ids = np.asarray(rows, np.int64)
    grids = np.asarray([grid] * batch, np.int64) if grid else None
    pos, _ = rope.get_rope_index(ids, None, grids, None, None, spatial_merge_size=cfg.vision.spatial_merge_size,
                                 image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id)
    text = ids != cfg.image_token_id
    mask = ((rng.random(ids.shape) < 0.6) & text).astype(np.float32)
    out = {"input_ids": ids.astype(np.int32), "segment_ids": np.ones(ids.shape, np.int32),
           "position_ids": np.swapaxes(pos, 0, 1).astype(np.int32),
           "targets": np.concatenate([ids[:, 1:], np.zeros((batch, 1), np.int64)], 1).astype(np.int32),
           "loss_mask": np.concatenate([mask[:, 1:], np.zeros((batch, 1), np.float32)], 1)}
    if grid:
        out["pixel_values"] = R.random_pixels(cfg, grids, rng)
        out["image_grid_thw"] = grids
    return out


def flops_per_token(cfg, seq) -> float:
    t = cfg.text
    per_layer = (t.hidden_size * t.head_dim * (t.num_attention_heads * 2 + t.num_key_value_heads * 2)
                 + 3 * t.hidden_size * t.intermediate_size)
    n = t.num_hidden_layers * per_layer + t.vocab_size * t.hidden_size
    return 6.0 * n + 12.0 * t.num_hidden_layers * t.num_attention_heads * t.head_dim * seq


def bench_ours(cfg, state_dict, inputs, args, dtype):
    import jax
    import jax.numpy as jnp

    from genevolve_jax.models import hf_io
    from genevolve_jax.sharding.mesh import make_mesh
    from genevolve_jax.train.losses.step_losses import SFTLoss
    from genevolve_jax.train.runtime import step_config
    from genevolve_jax.train.runtime.state import create_train_state, is_vision_path
    from genevolve_jax.train.runtime.step import TrainStep

    model = hf_io.model_from_state_dict(cfg, state_dict)
    tcfg = step_config.default_config()
    tcfg.schedule.warmup_ratio = 0.0
    setup, params, opt = create_train_state(model, tcfg, make_mesh({"fsdp": -1}), "fsdp", total_steps=1000,
                                        freeze=is_vision_path)
    del model
    step = TrainStep(setup, SFTLoss(chunk_size=8192), compute_dtype=jnp.dtype(dtype))
    compiled, compile_s, _ = step.compile_and_time(params, opt, inputs, jax.random.key(0))
    rng = jax.random.key(1)
    params, opt, m = step(params, opt, inputs, rng)
    jax.block_until_ready(m["loss"])
    t0 = time.perf_counter()
    for _ in range(args.steps):
        params, opt, m = step(params, opt, inputs, rng)
    jax.block_until_ready(m["loss"])
    per = (time.perf_counter() - t0) / args.steps
    stats = jax.devices()[0].memory_stats() or {}
    return dict(impl="ours (jax, fsdp over local devices)", compile_s=compile_s, step_s=per,
                loss=float(np.asarray(m["loss"])), peak_bytes=stats.get("peak_bytes_in_use"))


def bench_transformers(cfg, state_dict, inputs, args):
    import os
    import tempfile

    import torch
    import transformers

    from genevolve_jax.models import hf_io
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if cfg.param_dtype == "bfloat16" or device == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        hf_io.save_state_dict(state_dict, tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg.to_hf_dict(), f)
        model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
            tmp, dtype=dtype, attn_implementation="sdpa").to(device).train()
    for p in model.model.visual.parameters():
        p.requires_grad_(False)
    if args.remat != "none":
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=1e-6,
                            fused=device == "cuda")
    ids = torch.as_tensor(inputs["input_ids"], device=device, dtype=torch.long)
    labels = torch.as_tensor(np.where(inputs["loss_mask"] > 0, inputs["targets"], -100).astype(np.int64),
                             device=device)
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
          "mm_token_type_ids": (ids == cfg.image_token_id).int()}
    if "pixel_values" in inputs:
        kw["pixel_values"] = torch.as_tensor(inputs["pixel_values"], device=device, dtype=dtype)
        kw["image_grid_thw"] = torch.as_tensor(inputs["image_grid_thw"], device=device)

    def one():
        model.model.rope_deltas = None
        hidden = model.model(**kw).last_hidden_state
        logits = model.lm_head(hidden).float()  # labels are pre-shifted: position t scores targets[t]
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1),
                                                 ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loss = one()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = one()
    sync()
    per = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return dict(impl=f"transformers {transformers.__version__} (torch, sdpa, {device})", compile_s=None,
                step_s=per, loss=float(loss), peak_bytes=peak)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import ml_dtypes
    from rich.console import Console
    from rich.table import Table

    from genevolve_jax.models import hf_io
    from genevolve_jax.models.qwen3_vl import config as qwen_config

    accel = jax.devices()[0].platform != "cpu"
    shape = args.shape or ("2b" if accel else "tiny")
    batch, seq = args.batch or (4 if accel else 2), args.seq or (2048 if accel else 64)
    dtype = "bfloat16" if accel else "float32"
    param_dtype = "bfloat16" if args.bf16_params else "float32"
    make = {"tiny": qwen_config.tiny, "2b": qwen_config.qwen3vl_2b, "8b": qwen_config.qwen3vl_8b}[shape]
    cfg = make(param_dtype=param_dtype, dtype=dtype, scan_layers=not args.no_scan, remat=args.remat)
    image = args.image if shape != "tiny" else (args.image and 64)
    state_dict = hf_io.random_state_dict(cfg, args.seed, ml_dtypes.bfloat16 if param_dtype == "bfloat16"
                                         else np.float32)
    inputs = make_inputs(cfg, batch, seq, image, args.seed)
    results = [bench_ours(cfg, state_dict, inputs, args, dtype)]
    if not args.no_transformers:
        results.append(bench_transformers(cfg, state_dict, inputs, args))
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None) if accel else None
    tokens = batch * seq
    table = Table(title=f"train step: {shape}, batch {batch} x seq {seq}{f', image {image}px' if image else ''}, "
                        f"{dtype} compute, {param_dtype} params, remat {args.remat} on {kind}")
    for col in ("implementation", "compile s", "ms / step", "tokens / s", "MFU", "peak mem", "loss"):
        table.add_column(col, justify="left" if col == "implementation" else "right")
    for r in results:
        r["tokens_per_s"] = tokens / r["step_s"]
        r["mfu"] = (flops_per_token(cfg, seq) * r["tokens_per_s"] / (peak * 1e12)) if peak else None
        table.add_row(r["impl"], "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}",
                      f"{r['step_s'] * 1e3:.1f}", f"{r['tokens_per_s']:,.0f}",
                      "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                      "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.1f} GiB", f"{r['loss']:.4f}")
    Console().print(table)
    if len(results) == 2:
        Console().print(f"speed-up ours / transformers: {results[0]['tokens_per_s'] / results[1]['tokens_per_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=shape, batch=batch, seq=seq, image=image, device=kind, results=results), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
