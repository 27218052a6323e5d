"""Bytes (and the adapter folder's write seconds) of one SGLang weight sync of the 2B policy: the full
bf16 HF export every sync sends today against the LoRA adapter folder that ``rl.engine=sglang`` with
``model.lora`` sends (issue 26). The full export's bytes are its tensors' (keymap); its seconds are
not measured here (it needs the whole model in memory). The adapters are real arrays on an abstract
base, so nothing of the 2B model is allocated:

    python bench/lora_sync_bytes.py [--rank 64] [--preset qwen3vl_2b]
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

from genevolve_jax.models import hf_io, peft_io
from genevolve_jax.models.layers import LoRAParam
from genevolve_jax.models.qwen3_vl import config as qwen_config
from genevolve_jax.models.qwen3_vl import keymap


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--preset", default="qwen3vl_2b")
    args = p.parse_args()
    cfg = getattr(qwen_config, args.preset)(param_dtype="bfloat16", dtype="bfloat16")
    full = sum(math.prod(e.hf_shape) * 2 for e in keymap.key_entries(cfg))    # bf16 export
    lora = qwen_config.LoRAConfig(args.rank, 2.0 * args.rank)
    model = hf_io.abstract_model(cfg.replace(lora=lora))
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    rng = np.random.default_rng(0)
    for key, var in flat.items():
        if isinstance(var, LoRAParam):
            flat[key] = var.replace(jnp.asarray(rng.normal(0, 0.01, var.get_value().shape), jnp.float32))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    with tempfile.TemporaryDirectory() as d:
        for dtype, name in ((np.float32, "float32"), (jnp.bfloat16, "bfloat16")):
            t0 = time.perf_counter()
            peft_io.save_adapter(model, os.path.join(d, name), dtype=dtype)
            seconds = time.perf_counter() - t0
            size = sum(os.path.getsize(os.path.join(d, name, f)) for f in os.listdir(os.path.join(d, name)))
            print(f"{args.preset} LoRA rank {args.rank} adapter folder ({name}): {size / 2**20:.1f} MiB, "
                  f"written in {seconds:.2f} s")
    print(f"{args.preset} full bf16 HF export: {full / 2**30:.2f} GiB of tensors per sync "
          f"({full / size:.0f}× the bf16 adapter folder)")


if __name__ == "__main__":
    main()
