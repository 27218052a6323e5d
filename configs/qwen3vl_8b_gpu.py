"""Qwen3-VL-8B on one node of 8 GPUs: the paper's setup (METHOD.md §5–7).

Starts from the SFT cold-start checkpoint (``--config.model.path``). Rollouts go to an SGLang policy
server on 127.0.0.1:30010 (``rl.engine="sglang"``), colocated with the trainer on the same 8 GPUs
(TP 2 × DP 4, ``--mem-fraction-static 0.30``; the trainer keeps ``XLA_PYTHON_CLIENT_MEM_FRACTION``
0.55): ``GENEVOLVE_POLICY_MODEL=<HF dir> launch/single_host.sh genevolve train --config
qwen3vl_8b_gpu ...`` starts it first and waits for its /health. The trainer pushes its starting
weights at start and its policy after every step (bf16 HF export to <workdir>/sglang_weights,
/update_weights_from_disk). π_old is the trainer's own (``rl.old_logprobs="auto"``: the step's
forward, no extra one), and the server's bf16 kernels are corrected for by truncated importance
sampling (``rl.sampler_correction="tis"``, C = ``rl.tis_cap`` = 2; train/rl/config.py). The in-process
JaxEngine (``--config.rl.engine=jax``, the ``engine`` section) remains available. A delta on
configs/base.py.

Renders with the Qwen-Image-Edit-2511 render service on :8100 (launch/render_service.sh) and judges
with a VLM behind an OpenAI-compatible endpoint on :30000 (an SGLang-served Qwen3-VL-30B-A3B,
launch/sglang_server.sh, or GENEVOLVE_JUDGE_MODEL with single_host.sh); both are expected on other
GPUs (another node, or GENEVOLVE_JUDGE_GPUS), since the trainer and the policy server fill these 8.
fsdp over every GPU of the job (8 on one node; several nodes through launch/slurm_gpu.sh) with bf16
compute and activation checkpointing. Paper values throughout: 8 prompts
× 6 rollouts, temperature 0.7, top-p 0.95, lr 1e-6 cosine, ε 0.20/0.28, β 1e-3, λ 2.0, about 200
steps; SFT lr 1e-5, warmup 0.02, 2 epochs, 32 sequences, cutoff 32768.
"""
import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    cfg = base.get_config()
    cfg.workdir = "runs/qwen3vl_8b"
    cfg.model.preset = "qwen3vl_8b"
    cfg.model.path = ""                     # set: the SFT output (orbax) or an HF Qwen3-VL-8B folder
    cfg.model.param_dtype = "float32"
    cfg.model.dtype = "bfloat16"
    cfg.sharding.strategy = "fsdp"
    cfg.sharding.mesh.fsdp = -1             # every GPU of the job: 8 on one node, 16 on two (launch/slurm_gpu.sh)
    cfg.sharding.mesh.data = 1
    cfg.sharding.distributed.mode = "auto"
    for section in (cfg.sft, cfg.train):
        section.compute_dtype = "bfloat16"
        section.remat = "full"
    # One packed row per device per micro-batch (-1: the count follows the device count,
    # train/runtime/step_config.micro_batches), so that the paper's batches fit next to the colocated
    # SGLang server on 8, 16 or 32 GPUs. On 8 (`genevolve plan --target gpu:h100x8`, BENCHMARKS.md;
    # planned, not measured, layers unrolled as the trainer runs them): SFT 32 × 32768 in 4
    # micro-batches (34.2 of 59.7 GiB), RL 48 rollouts in 6 (38.8 of 43.8 GiB at the trainer's 0.55
    # share; the reference forward runs in the same micro-batches); in one micro-batch neither fits.
    # On 16: SFT 2, RL 3; on 32: SFT 1, RL 2 (64 rows, 16 of them padding at worst).
    cfg.sft.grad_accum_steps = -1
    cfg.train.grad_accum_steps = -1
    cfg.data.rl.prompts_per_step = 8        # × rl.group_size = 48 rollouts per optimiser step
    # rl.max_tokens_per_row stays at base's 32768, the planned row: a rollout that reaches the paper's
    # caps together (prompt 6144 + response 30000) is masked as too_long_for_batch.
    cfg.rl.group_size = 6
    cfg.rl.num_steps = 200
    cfg.rl.engine = "sglang"
    # π_old: one optimiser step per rollout batch, so π_old is the pre-update policy, which is what
    # the step's own forward computes: "auto" takes its stop-gradient (train/rl/logprob_forward.py),
    # equal to a separate recompute forward at 1e-6 (tests/train/rl/test_pipeline.py). "recompute"
    # spent one more forward over the 48 rollouts × 32,768 tokens per step for that same number
    # (the plan's reference_forward ran twice a step, now once: the KL reference's). The tokens
    # are SGLang's, sampled with bf16 kernels that are not the trainer's, so each policy-gradient
    # term is weighted by min(π_old / π_sampler, 2) (verl's token TIS); tis/* metrics show its size.
    cfg.rl.old_logprobs = "auto"
    cfg.rl.sampler_correction = "tis"
    cfg.rl.sglang.urls = ["http://127.0.0.1:30010"]   # the policy server (single_host.sh GENEVOLVE_POLICY_PORT)
    cfg.rl.sglang.export_dtype = "bfloat16"           # = the trainer's bf16 compute weights
    cfg.rl.sglang.health_wait_s = 300.0               # an 8B server takes minutes to come up
    cfg.engine.max_slots = 48               # the JaxEngine's, for --config.rl.engine=jax
    cfg.engine.max_seq_len = 36864          # prompt cap 6144 + response cap 30000 (+ slack)
    cfg.engine.mesh.tensor = 8
    cfg.loss.logprob.rl_temperature = 0.7   # and agent.sampling.temperature: one field (configs/base.py)
    cfg.agent.sampling.top_p = 0.95
    cfg.render.backend = "http"
    cfg.render.http.urls = ["http://127.0.0.1:8100"]
    cfg.reward.judge_kind = "vlm"
    cfg.reward.endpoint.base_url = "http://127.0.0.1:30000"   # the judge's SGLang; not the policy's :30010
    cfg.experience.summariser.backend = "policy"
    cfg.checkpoint.save_every = 20
    cfg.checkpoint.keep = 3
    cfg.logging.sample_every = 10
    return cfg
