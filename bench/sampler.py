"""Decode tokens/s of the JaxEngine against transformers' generate, on the same random weights.

    python bench/sampler.py                       # GPU: 2B shape, B=1 and 32, 512-token prompts, 256 new
    python bench/sampler.py --shape tiny --prompt-len 64 --new-tokens 32 --batches 1 8   # CPU scale-down
    python bench/sampler.py --shape mid --dtype float32 --prompt-len 256 --new-tokens 64 --batches 1 8  # CPU

``mid`` is the CPU shape of issue 16: hidden 512, 8 layers, 8 heads (4 KV), head_dim 64, MLP 1536,
vocab 32,000, tied embeddings (tiny's vision tower, unused by text prompts).

Decode tok/s = batch × (new tokens − 1) / (time of the whole generate − time of a prefill-only
call), for both engines, each time the median of --repeats calls (one call on a 2-core box varied
by ±20 %); greedy, no stop tokens, so every row generates exactly --new-tokens.

``--matmul-floor`` also times, per batch, a decode step made of the model's matmuls alone (the 7
projections of every layer and the output head, fp32, the same weights) in XLA and in torch. That
is each library's floor for this decode on the machine at hand, and it says how much of a ratio
between the engines is the BLAS underneath. At B8 on the mid shape, on two 2-core AMD EPYC boxes:
XLA 13.8–14.9 ms and torch 12.4–15.2 ms on the 2026-12-02 one (B8 ratio 1.33–1.41×), XLA 11.0 ms
and torch 20.9 ms on the 2026-12-06 one (B8 ratio 2.6–2.7×).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

# The random models and inputs come from tests/fixtures (test and benchmark code, not the package's),
# importable from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def mid_config(dtype: str):
    import dataclasses
    from genevolve_jax.models.qwen3_vl import config as qwen_config
    cfg = qwen_config.tiny(vocab_size=32000, param_dtype=dtype, dtype=dtype)
    text = dataclasses.replace(cfg.text, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                               num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                               mrope_section=(12, 10, 10))
    return cfg.replace(text=text, vision=dataclasses.replace(cfg.vision, out_hidden_size=512))


def matmul_floor_ms(sd: dict, cfg, batch: int, repeats: int, steps: int = 16) -> tuple[float, float]:
    """(XLA, torch) milliseconds of one decode step of the model's matmuls alone at ``batch`` rows:
    per layer x·Wq, x·Wk, x·Wv, x·Wo, x·Wgate, x·Wup, x·Wdown, then x·head, on ``sd``'s weights.
    Residual adds and the SwiGLU product keep every product live; the norms, rope, attention and
    sampling do not run."""
    import jax
    import jax.numpy as jnp
    import torch
    n = cfg.text.num_hidden_layers
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    prefix = "model.language_model.layers"
    layers = [[np.asarray(sd[f"{prefix}.{i}.{m}.weight"], np.float32) for m in names] for i in range(n)]
    head = np.asarray(sd.get("lm_head.weight", sd["model.language_model.embed_tokens.weight"]), np.float32)
    d = head.shape[1]

    def step(mm, act, x, ws, head_w):
        for q, k, vv, o, g, u, down in ws:
            x = x + mm(mm(x, q), o) + 0 * mm(x, k).sum() + 0 * mm(x, vv).sum()
            x = x + mm(act(mm(x, g)) * mm(x, u), down)
        return mm(x, head_w)

    # XLA: weights as [in, out] (the layout the engine's kernels and its decode head use), scanned.
    ws = [[jnp.asarray(w.T) for w in layer] for layer in layers]
    head_w = jnp.asarray(head.T)

    def chunk(ws, head_w, x):
        def body(x, _):
            logits = step(jnp.matmul, jax.nn.silu, x, ws, head_w)
            return x + 1e-3 * logits[:, :d], None
        return jax.lax.scan(body, x, None, length=steps)[0]
    run = jax.jit(chunk)
    x0 = jnp.full((batch, d), 0.1, jnp.float32)
    run(ws, head_w, x0).block_until_ready()
    xla_ms = 1e3 * median_time(lambda: run(ws, head_w, x0).block_until_ready(), repeats) / steps
    # torch: nn.Linear's [out, in] weights, as transformers holds them.
    tws = [[torch.from_numpy(w) for w in layer] for layer in layers]
    t_head = torch.from_numpy(head)
    linear = torch.nn.functional.linear
    tx = torch.full((batch, d), 0.1)

    def torch_steps():
        x = tx
        with torch.no_grad():
            for _ in range(steps):
                x = x + 1e-3 * step(linear, torch.nn.functional.silu, x, tws, t_head)[:, :d]
    torch_steps()
    torch_ms = 1e3 * median_time(torch_steps, repeats) / steps
    return xla_ms, torch_ms


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=["tiny", "mid", "2b"], default="2b")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps-per-sync", type=int, default=16)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (their median)")
    ap.add_argument("--matmul-floor", action="store_true",
                    help="also time a decode step of the matmuls alone, in XLA and in torch (fp32 only)")
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default); 1 avoids thread-sync stalls on a loaded CPU")
    args = ap.parse_args(argv)

    import jax
    if args.matmul_floor and (args.dtype != "float32" or jax.default_backend() != "cpu"):
        ap.error("--matmul-floor is a CPU measurement in float32 (torch runs it on the CPU)")
    from genevolve_jax.models.hf_io import model_from_state_dict, random_state_dict
    from genevolve_jax.models.qwen3_vl import config as qwen_config
    from genevolve_jax.rollout.config import default_engine_config
    from genevolve_jax.rollout.engine import GenerationRequest, SamplingParams
    from genevolve_jax.rollout.jax_engine import JaxEngine

    cfg = mid_config(args.dtype) if args.shape == "mid" else \
        (qwen_config.qwen3vl_2b if args.shape == "2b" else qwen_config.tiny)(param_dtype=args.dtype, dtype=args.dtype)
    sd = random_state_dict(cfg, seed=0)
    model = model_from_state_dict(cfg, sd)
    rng = np.random.default_rng(0)
    rows = {}
    for b in args.batches:
        ecfg = default_engine_config()
        ecfg.max_slots, ecfg.steps_per_sync = b, args.steps_per_sync
        ecfg.max_seq_len = args.prompt_len + args.new_tokens + 1
        ecfg.min_prefill_bucket = min(64, args.prompt_len)
        engine = JaxEngine(model, None, ecfg)
        top = min(cfg.image_token_id, cfg.vision_start_token_id, cfg.text.vocab_size) - 10
        prompts = [rng.integers(0, top, args.prompt_len).tolist() for _ in range(b)]

        def run(n):
            return engine.generate([GenerationRequest(p, SamplingParams(max_new_tokens=n, temperature=0.0))
                                    for p in prompts])
        run(args.new_tokens)  # compile
        run(1)
        prefill = median_time(lambda: run(1), args.repeats)
        total = median_time(lambda: run(args.new_tokens), args.repeats)
        assert all(len(o.token_ids) == args.new_tokens for o in run(args.new_tokens))
        jax_tps = b * (args.new_tokens - 1) / max(total - prefill, 1e-9)
        engine.close()
        hf_tps = None
        if not args.skip_hf:
            import torch
            import transformers

            from tests.fixtures.hf_qwen3_vl import hf_config
            if args.torch_threads:
                torch.set_num_threads(args.torch_threads)
            hf = transformers.Qwen3VLForConditionalGeneration(hf_config(cfg))   # weights: ours, below
            hf.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, strict=False)
            hf = hf.to(torch.bfloat16 if args.dtype == "bfloat16" else torch.float32)
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            hf = hf.to(dev).eval()
            ids = torch.tensor(prompts, device=dev)
            with torch.no_grad():
                def gen(n):
                    return hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                       min_new_tokens=n, do_sample=False, pad_token_id=0)
                gen(2)
                hp = median_time(lambda: gen(1), args.repeats)
                ht = median_time(lambda: gen(args.new_tokens), args.repeats)
            hf_tps = b * (args.new_tokens - 1) / max(ht - hp, 1e-9)
        rows[b] = (jax_tps, hf_tps)
        print(f"batch {b:3d}: JaxEngine {jax_tps:9.1f} tok/s   transformers "
              f"{'-' if hf_tps is None else f'{hf_tps:9.1f}'} tok/s", flush=True)
        if args.matmul_floor:
            xla_ms, torch_ms = matmul_floor_ms(sd, cfg, b, args.repeats)
            print(f"batch {b:3d}: matmuls alone, one decode step: XLA {xla_ms:6.2f} ms   torch {torch_ms:6.2f} ms   "
                  f"(JaxEngine's decode step {1e3 * b / jax_tps:6.2f} ms)", flush=True)
    print(f"device: {jax.devices()[0].device_kind}; shape {args.shape}; prompt {args.prompt_len}; "
          f"new {args.new_tokens}; dtype {args.dtype}")


if __name__ == "__main__":
    main()
