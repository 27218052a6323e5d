"""Qwen3-VL-8B with LoRA rank 64 on one node of 8 H100s, the SGLang policy server beside it (issue 26).

``configs/qwen3vl_8b_gpu.py`` (the paper's run: its servers, data, sampling, rewards and schedule)
with low-rank adapters on the text decoder's q/k/v/o and gate/up/down projections; only the
adapters train, the base is frozen. Launched as that config is (``GENEVOLVE_POLICY_MODEL=<HF dir>
launch/single_host.sh genevolve train --config qwen3vl_8b_lora_gpu ...``), with the server started
with ``LORA_RANK=64`` (launch/sglang_server.sh: --enable-lora, --max-lora-rank 64, the same target
modules): after the base is pushed once, each step syncs a PEFT adapter folder (333 MiB of bf16
tensors at rank 64 on the 8B's 36 layers, against about 16 GiB for a full export) loaded as
``policy_v<step>``.

Sized by ``genevolve plan`` (BENCHMARKS.md, "LoRA"; planned, not measured): the trainer's resident
state per device on 8 GPUs is 2.52 GiB (bf16 base 2.20 + adapters and their AdamW state 0.32)
against full fine-tuning's 15.79 GiB (fp32 parameters 4.08, AdamW 7.63, KL reference copy 4.08):
the frozen base is held in bf16 (the compute dtype, so the step casts nothing), the adapters stay
float32, and the KL reference is the same base with the adapters off (no copy). Step activations
are not smaller with LoRA (the backward still runs through every frozen layer), so what the freed
bytes buy is rows per micro-batch: see the grad_accum_steps lines below.
"""
import ml_collections

from configs import qwen3vl_8b_gpu


def get_config() -> ml_collections.ConfigDict:
    cfg = qwen3vl_8b_gpu.get_config()
    cfg.workdir = "runs/qwen3vl_8b_lora"
    cfg.model.lora.rank = 64
    cfg.model.lora.alpha = 128.0            # scale alpha / rank = 2, the usual alpha = 2 × rank
    # targets: the default, the text decoder's seven projections (the ones SGLang's Qwen3-VL adapts;
    # vision adapters would go to the server merged, as full exports). dropout: PEFT's default of 0,
    # so the on-policy ratio stays exactly 1 and the step spends no extra π_old forward.
    cfg.model.lora.dropout = 0.0
    cfg.model.param_dtype = "bfloat16"      # the frozen base in the compute dtype; adapters float32
    # LoRA's learning rate is about 10× full fine-tuning's at the same batch (the usual starting
    # point, not tuned here): 1e-5 for GRPO (paper 1e-6), 1e-4 for the SFT cold start (paper 1e-5).
    cfg.train.optimizer.learning_rate = 1e-5
    cfg.sft.optimizer.learning_rate = 1e-4
    # Micro-batches. qwen3vl_8b_gpu plans 1 row per device per micro-batch on 8 GPUs: RL peak 38.84
    # of 43.81 GiB (the trainer's 0.55 share) = resident 15.79 + step temporaries 23.03, which hold
    # fp32 gradients as large as the parameter shards (4.08) and one row's activations; SFT peak
    # 34.21 of 59.74 = resident 11.71 + 22.49. With LoRA the resident state is 2.52 and the gradients
    # are the adapters' (0.16, half their AdamW state), so even if every other temporary doubled with
    # a second row per device (2 × (23.03 − 4.08) = 37.90) the RL step would peak at 2.52 + 0.16 +
    # 37.90 = 40.58 GiB of 43.81 (48 rollouts in 3 micro-batches of 16 rows), and SFT at 2.52 + 0.16 +
    # 2 × (22.49 − 4.08) = 39.50 of 59.74 (32 rows in 2 micro-batches).
    # Compiled for the target (`genevolve plan --config qwen3vl_8b_lora_gpu --target gpu:h100x8`, with
    # jax's CUDA plugin and cuDNN, no GPU; BENCHMARKS.md "LoRA"): RL peak 39.15 of 43.81 GiB, SFT
    # 38.75 of 59.74. `--config.train.grad_accum_steps=-1` goes back to one row per device (on one
    # H100 beside its server: peak 36.89 of 43.81 GiB).
    cfg.train.grad_accum_steps = 3
    cfg.sft.grad_accum_steps = 2
    return cfg
