#!/usr/bin/env bash
# Start an SGLang server for a Hugging Face Qwen3-VL directory (needs a CUDA machine with sglang).
#
#   launch/sglang_server.sh MODEL_DIR [TP] [DP] [PORT] [extra sglang args...]
#   ROLE=judge launch/sglang_server.sh /models/Qwen3-VL-30B-A3B-Instruct 8 1 30000
#   DETERMINISTIC=1 launch/sglang_server.sh /models/Qwen3-VL-8B-Instruct 2 4   # seeds honoured
#
# Targets sglang==0.5.23 (pip install "sglang==0.5.23" on the CUDA machine).
#
# Two roles, on the ports configs/qwen3vl_{8b,2b}_gpu.py point at:
#   policy (default; PORT 30010 = rl.sglang.urls): the rollout engine of `genevolve train`. Token ids
#     in and out (--skip-tokenizer-init: the agent stops on token ids only; images still go through
#     SGLang's Qwen3-VL processor). MODEL_DIR only fixes the architecture and processor: the trainer
#     pushes its own weights at start and after every step (bf16 HF export under
#     rl.sglang.weights_dir, then /update_weights_from_disk), so that directory must be readable by
#     this server at the same path. Leave SGLANG_RETURN_ORIGINAL_LOGPROB unset: it makes the returned
#     log-probs temperature-1 ones. π_old is the trainer's own, but the returned log-probs are the
#     π_sampler of the truncated importance weights (rl.sampler_correction=tis: min(π_old/π_sampler, 2)),
#     so T = 1 ones would skew them; rollout/logprob_mismatch and tis/truncated_frac show it.
#   judge (PORT 30000 = reward.endpoint.base_url): the VLM judge behind /v1/chat/completions; keeps
#     its tokenizer for the chat template.
#
# GPU memory: MEM_FRACTION is --mem-fraction-static, the share of each visible GPU for weights + KV
# cache. Colocated with the trainer on the same GPUs (launch/single_host.sh does this), start the
# server FIRST (it sizes its pool from free memory) with MEM_FRACTION 0.30, then the trainer with
# XLA_PYTHON_CLIENT_MEM_FRACTION 0.55 (8 × 80 GB: 24 GB per GPU for the 8B policy at TP 2 × DP 4,
# 44 GB for the fsdp-sharded trainer). CUDA_VISIBLE_DEVICES picks the GPUs; TP × DP must equal
# their number. HOST defaults to 127.0.0.1 (set another only behind a firewall).
#
# Seeds: SGLang 0.5.23 ignores each request's sampling_seed (the agent sends one per trajectory and
# round when a seed is set) unless the server runs with --enable-deterministic-inference; DETERMINISTIC=1
# adds that flag (batch-invariant kernels: replayable rollouts, slower decoding). The trainer reads
# /server_info at start and logs every server that runs without it.
#
# LoRA: LORA_RANK=R (the run's model.lora.rank, or its model.lora.head_rank when that is larger:
# each synced adapter is padded to one rank, the largest) starts the policy server with adapters enabled:
# --enable-lora --max-lora-rank R --lora-target-modules (the text decoder's seven projections; SGLang
# fuses q/k/v and gate/up itself; LORA_HEAD=1 adds lm_head, for a run whose model.lora.targets has
# it) --max-loras-per-batch MAX_LORAS (default 2: the current policy
# version and the one before it while its last requests finish; at least rl.max_staleness + 1, the
# versions the trainer keeps loaded). Adapters then arrive as PEFT folders
# (`genevolve export-hf` of a LoRA checkpoint) through /load_lora_adapter.
#
# Images: the server's Qwen3-VL processor must give every image as many tokens as the trainer's
# (genevolve_jax/processing/image.py: min_pixels 65536, max_pixels 16777216, the values Qwen3-VL
# checkpoints ship in preprocessor_config.json). Keep MODEL_DIR's preprocessor_config.json as shipped;
# a sample whose image the server expands differently is masked (image_token_mismatch_server).
set -euo pipefail
MODEL_DIR=${1:?usage: $0 MODEL_DIR [TP] [DP] [PORT] [extra sglang args]}
TP=${2:-1}
DP=${3:-1}
ROLE=${ROLE:-policy}
case "$ROLE" in
  policy) DEFAULT_PORT=30010; ROLE_ARGS=(--skip-tokenizer-init) ;;
  judge) DEFAULT_PORT=30000; ROLE_ARGS=() ;;
  *) echo "sglang_server.sh: ROLE must be policy or judge, got '$ROLE'" >&2; exit 2 ;;
esac
PORT=${4:-$DEFAULT_PORT}
shift $(( $# < 4 ? $# : 4 ))
LORA_TARGETS=(q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)
case "${LORA_HEAD:-0}" in
  1) LORA_TARGETS+=(lm_head) ;;
  0) ;;
  *) echo "sglang_server.sh: LORA_HEAD must be 0 or 1, got '$LORA_HEAD'" >&2; exit 2 ;;
esac
case "${LORA_RANK:-0}" in
  0) ;;
  *[!0-9]*) echo "sglang_server.sh: LORA_RANK must be a positive integer, got '$LORA_RANK'" >&2; exit 2 ;;
  *) ROLE_ARGS+=(--enable-lora --max-lora-rank "$LORA_RANK" --lora-target-modules "${LORA_TARGETS[@]}"
                 --max-loras-per-batch "${MAX_LORAS:-2}") ;;
esac
case "${DETERMINISTIC:-0}" in
  1) ROLE_ARGS+=(--enable-deterministic-inference) ;;
  0) ;;
  *) echo "sglang_server.sh: DETERMINISTIC must be 0 or 1, got '$DETERMINISTIC'" >&2; exit 2 ;;
esac
exec python -m sglang.launch_server --model-path "$MODEL_DIR" --tp-size "$TP" --dp-size "$DP" \
  --host "${HOST:-127.0.0.1}" --port "$PORT" ${ROLE_ARGS[@]+"${ROLE_ARGS[@]}"} \
  --mem-fraction-static "${MEM_FRACTION:-0.8}" "$@"
