"""Qwen3-VL-2B on 8 GPUs with fsdp × tensor parallelism: the 8B recipe at the smaller shape.

Same services and ports as qwen3vl_8b_gpu: the SGLang policy server on 127.0.0.1:30010 colocated
on the 8 GPUs (for 2B: TP 1 × DP 8, ``--mem-fraction-static 0.30``, started by
``GENEVOLVE_POLICY_MODEL=<HF dir> GENEVOLVE_POLICY_TP=1 GENEVOLVE_POLICY_DP=8 launch/single_host.sh``),
π_old from the step's own forward with truncated importance sampling against the server's log-probs,
the judge on :30000 and the render service on :8100 elsewhere.
"""
import ml_collections

from configs import qwen3vl_8b_gpu


def get_config() -> ml_collections.ConfigDict:
    cfg = qwen3vl_8b_gpu.get_config()
    cfg.workdir = "runs/qwen3vl_2b"
    cfg.model.preset = "qwen3vl_2b"
    cfg.sharding.strategy = "fsdp_tp"
    cfg.sharding.mesh.fsdp = -1             # what tensor 2 leaves: 4 on one node of 8 GPUs, 8 on two
    cfg.sharding.mesh.tensor = 2
    # The JaxEngine (--config.rl.engine=jax, genevolve serve): tensor-parallel over the 8 GPUs. With
    # slots split over data (data 4 × tensor 2) its ragged cache writes resharded the whole cache:
    # planned decode temporaries 24.1 GiB and prefill 38.6 GiB a device (does not fit), against 1.3
    # and 2.1 GiB with tensor 8 (BENCHMARKS.md).
    cfg.engine.mesh.tensor = 8
    cfg.engine.mesh.data = 1
    # One row per data shard per micro-batch (grad_accum_steps -1, from qwen3vl_8b_gpu): on 8 GPUs
    # (fsdp 4) SFT in 8 micro-batches and RL in 12. Planned (unrolled layers, as the trainer runs
    # them, on 8 × H100): SFT 29.6 of 59.7 GiB, RL 30.6 of 43.8 GiB (BENCHMARKS.md); 2 SFT
    # micro-batches planned 93.5 GiB, 4 RL micro-batches 76.4 GiB.
    return cfg
