"""Qwen3-VL-2B on 8 GPUs with fsdp × tensor parallelism: the 8B recipe at the smaller shape.

Same services and ports as qwen3vl_8b_gpu: the SGLang policy server on 127.0.0.1:30010 colocated
on the 8 GPUs (for 2B: TP 1 × DP 8, ``--mem-fraction-static 0.30``, started by
``GENEVOLVE_POLICY_MODEL=<HF dir> GENEVOLVE_POLICY_TP=1 GENEVOLVE_POLICY_DP=8 launch/single_host.sh``),
π_old recomputed, the judge on :30000 and the render service on :8100 elsewhere.
"""
import ml_collections

from configs import qwen3vl_8b_gpu


def get_config() -> ml_collections.ConfigDict:
    cfg = qwen3vl_8b_gpu.get_config()
    cfg.workdir = "runs/qwen3vl_2b"
    cfg.model.preset = "qwen3vl_2b"
    cfg.sharding.strategy = "fsdp_tp"
    cfg.sharding.mesh.fsdp = 4
    cfg.sharding.mesh.tensor = 2
    cfg.engine.mesh.tensor = 2
    cfg.engine.mesh.data = 4
    # One row per data shard (fsdp 4) per micro-batch. Estimated from the 8B plan's per-row
    # activations, not planned: the 2B config as shipped before planned 71.5 GiB (SFT) and
    # 114.7 GiB (RL) per device on 8 × H100 in one micro-batch.
    cfg.sft.grad_accum_steps = 8
    cfg.train.grad_accum_steps = 12
    return cfg
