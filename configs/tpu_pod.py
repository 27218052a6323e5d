"""Qwen3-VL-8B on a TPU pod slice (e.g. v5p-64: 32 chips on 8 hosts of 4): fsdp × tensor 8 over
every chip (fsdp -1 takes what tensor leaves: 4 on v5p-64), multi-host init from the TPU
environment. A delta on configs/qwen3vl_8b_gpu.py (the paper's values). Its micro-batches hold one
packed row per data shard (grad_accum_steps -1, from the GPU config: 32 / fsdp for SFT, rollouts
per step / fsdp for RL), so another slice size needs no edit; plan it (`genevolve plan --target v5p-N`).

Rollouts: the in-process JaxEngine on every host (``rl.engine = "jax"``; SGLang, the GPU configs'
policy server, is a CUDA server). Each host samples its own share of the step's prompts
(``data.sharding = "jax_process"``) on an engine that holds the policy tensor-parallel over that
host's 4 chips (``engine.mesh``: the mesh of one host, not of the slice); after every step the
trainer moves the new parameters into the engines in memory. π_old: ``rl.old_logprobs = "auto"``:
with one update per rollout batch the step's own pre-update log-probs are π_old and no forward is
spent; the JaxEngine records the trainer's quantity (log_softmax(logits / T) over the vocabulary
in float32, its weights in the trainer's bf16 and its head accumulated in float32, 4.09 GiB a chip),
so ``rollout/logprob_mismatch`` reads the bf16 arithmetic of two programs (a mean of 8.3e-4 on a
random tiny model on the CPU, tests/rollout/test_engine_bf16_logprobs.py; the TPU's trainer attends
with splash, its engine with XLA) and is the health check.

Services outside the pod: the render service (Qwen-Image-Edit-2511 through diffusers,
launch/render_service.sh, on GPU machines) and the VLM judge (any OpenAI-compatible server, e.g.
an SGLang-served Qwen3-VL-30B-A3B, launch/sglang_server.sh). There is no address a pod could
assume for them, so they are read from the environment of every host when the config loads:

    export GENEVOLVE_RENDER_URLS=http://10.128.0.5:8100,http://10.128.0.6:8100   # comma-separated
    export GENEVOLVE_JUDGE_URL=http://10.128.0.7:30000

or given on the command line (``--config.render.http.urls='["http://…:8100"]'``,
``--config.reward.endpoint.base_url=http://…:30000``). With launch/tpu_pod.sh, variables of the
local shell do not reach the workers: put the two exports in the file named by GENEVOLVE_ENV (it
is sourced on every worker), or use the command-line form. Left unset they are empty, and
``genevolve train`` stops before building anything with an error that names the field to set
(render.http.urls, reward.endpoint.base_url). A judge that needs a key reads it from the variable
named by ``reward.endpoint.api_key_env``.
"""
import os

import ml_collections

from configs import qwen3vl_8b_gpu

RENDER_URLS_ENV = "GENEVOLVE_RENDER_URLS"
JUDGE_URL_ENV = "GENEVOLVE_JUDGE_URL"


def get_config() -> ml_collections.ConfigDict:
    cfg = qwen3vl_8b_gpu.get_config()
    cfg.workdir = "gs://your-bucket/genevolve/qwen3vl_8b_tpu"   # set: a bucket every host can write
    cfg.sharding.distributed.mode = "tpu"
    # The decoder layers train as one lax.scan (MaxText's TPU default): each host compiles one
    # layer body instead of 36. `genevolve plan --config tpu_pod` on 2 CPU cores: all three phases
    # in 2:48 and 3.7 GB of RSS, against 8–10 min and 12.4 GB for the unrolled steps (BENCHMARKS.md).
    cfg.model.scan_layers = True
    # fsdp × tensor 8 (fsdp takes the rest of the slice: 4 on v5p-64). Planned on v5p-64
    # (BENCHMARKS.md): with fsdp over all 32 chips the unrolled steps kept 91–95 GiB of temporaries
    # for one 32,768-token row per chip (SFT 97.6, RL 143.8 of 95 GiB); with tensor 8 the scanned
    # RL step keeps 18.4 GiB (peak 67.1 GiB with the bf16 engine resident), SFT 18.3 (peak 21.2).
    cfg.sharding.strategy = "fsdp_tp"
    cfg.sharding.mesh.fsdp = -1
    cfg.sharding.mesh.tensor = 8
    cfg.data.sharding = "jax_process"       # each host reads its share of the prompt pool
    cfg.data.rl.prompts_per_step = 32       # × rl.group_size 6 = 192 rollouts per optimiser step
    # One packed row per data shard (fsdp 4 on v5p-64) per micro-batch (grad_accum_steps -1, from
    # the GPU config): SFT 32 × 32768 in 8 micro-batches, RL 192 rollouts in 48.

    cfg.rl.engine = "jax"
    cfg.rl.old_logprobs = "auto"
    cfg.rl.sglang.urls = []                 # no SGLang server on a pod
    # Per host: 192 rollouts over 8 hosts are 24 each, plus 8 rows for parked prefixes. Planned
    # (BENCHMARKS.md): the KV cache of 64 slots × 36,872 positions took 81 GiB of each chip and the
    # RL phase did not fit (121 of 95 GiB); with 32 slots it is 40.5 GiB.
    cfg.engine.max_slots = 32
    cfg.engine.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 4, "sequence": 1})

    cfg.render.http.urls = [u.strip() for u in os.environ.get(RENDER_URLS_ENV, "").split(",") if u.strip()]
    cfg.reward.endpoint.base_url = os.environ.get(JUDGE_URL_ENV, "").strip()
    return cfg
