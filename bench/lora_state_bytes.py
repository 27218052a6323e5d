"""Planned resident bytes per device of the 8B RL trainer's state (parameters, optimiser state, the KL
reference copy): full fine-tuning against LoRA rank 64 with a float32 and a bf16 base, on 1 and on 8
devices (fsdp). Abstract states (``genevolve plan``'s), nothing allocated, no step compiled:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/lora_state_bytes.py
"""
import jax
from genevolve_jax.config_loader import load_config
from genevolve_jax.plan import abstract, phases
from genevolve_jax.sharding.mesh import make_mesh

G = 2**30
for n in (1, 8):
    mesh = make_mesh({"fsdp": n}, jax.devices()[:n])
    for rank, dtype in ((0, "float32"), (64, "float32"), (64, "bfloat16")):
        cfg = load_config("qwen3vl_8b_gpu")
        cfg.model.lora.rank = rank
        cfg.model.param_dtype = dtype
        cfg.sharding.strategy = "fsdp"
        config = abstract.model_config(cfg, cfg.train)
        state = phases.rl_state(cfg, config, mesh)
        res = phases.rl_resident(cfg, state)
        b = {k: abstract.bytes_per_device(v) / G for k, v in res.items()}
        print(f"{n} device(s) rank {rank:2d}: " + ", ".join(f"{k} {v:.2f} GiB" for k, v in b.items())
              + f", total {sum(b.values()):.2f} GiB; param_dtype {cfg.model.param_dtype}, "
              f"mu {cfg.train.optimizer.mu_dtype}, kl {cfg.loss.grpo.kl_coef}")
