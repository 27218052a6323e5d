#!/usr/bin/env bash
# Single host: one process driving every local accelerator (or CPU, optionally simulating devices),
# optionally after starting the SGLang servers the GPU configs point at.
#
#   launch/single_host.sh genevolve compare-sharding --config tiny
#   GENEVOLVE_SIM_DEVICES=8 launch/single_host.sh genevolve compare-sharding --config tiny
#   GENEVOLVE_POLICY_MODEL=/models/Qwen3-VL-8B-Instruct \
#       launch/single_host.sh genevolve train --config qwen3vl_8b_gpu --config.model.path=runs/sft/model
set -euo pipefail

usage() {
  cat <<USAGE
usage: launch/single_host.sh COMMAND [ARGS...]

Runs COMMAND as one process with all local devices. No jax.distributed (mode "none" is implied
by the absence of SLURM/TPU-pod variables). Environment knobs:
  GENEVOLVE_SIM_DEVICES  on CPU, simulate this many devices (sets XLA_FLAGS)
  CUDA_VISIBLE_DEVICES   restrict the GPUs used

SGLang servers started first (each waited for on /health, stopped when COMMAND ends):
  GENEVOLVE_POLICY_MODEL  HF Qwen3-VL dir: the policy server of rl.engine=sglang (ROLE=policy)
    GENEVOLVE_POLICY_PORT 30010 (= rl.sglang.urls of configs/qwen3vl_*_gpu.py)
    GENEVOLVE_POLICY_TP 2, GENEVOLVE_POLICY_DP 4 (TP × DP = the GPUs it sees; 2B: 1 and 8)
    GENEVOLVE_POLICY_MEM 0.30 (--mem-fraction-static), GENEVOLVE_POLICY_GPUS (default: all)
  GENEVOLVE_JUDGE_MODEL   HF dir of the VLM judge (ROLE=judge)
    GENEVOLVE_JUDGE_PORT 30000 (= reward.endpoint.base_url), GENEVOLVE_JUDGE_TP 1,
    GENEVOLVE_JUDGE_MEM 0.80, GENEVOLVE_JUDGE_GPUS (set it: GPUs the trainer does not use)
  GENEVOLVE_SERVER_WAIT_S 1200 (how long to wait for a server's /health)

GPU split, one node of 8 × 80 GB (the default of qwen3vl_8b_gpu): the policy server and the
trainer are colocated on all 8 GPUs. The server starts first and keeps 0.30 of each GPU (8B bf16
weights at TP 2 + KV cache); the trainer then preallocates XLA_PYTHON_CLIENT_MEM_FRACTION=0.55
(set here when a policy server is started; fsdp over 8 holds 16 GB of params + AdamW per GPU plus
activations). The judge and the render service (launch/render_service.sh, :8100) need GPUs of
their own: another node, or GENEVOLVE_JUDGE_GPUS on a larger host.
USAGE
}

if [[ $# -eq 0 || "$1" == "-h" || "$1" == "--help" ]]; then usage; exit 0; fi
# A stray SLURM/JAX coordinator variable would make the job wait for peers that never come.
unset SLURM_JOB_ID SLURM_PROCID JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID
if [[ -n "${GENEVOLVE_SIM_DEVICES:-}" ]]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${GENEVOLVE_SIM_DEVICES}"
fi
if [[ -z "${GENEVOLVE_POLICY_MODEL:-}" && -z "${GENEVOLVE_JUDGE_MODEL:-}" ]]; then
  exec "$@"
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SERVER_PIDS=()
cleanup() {
  for pid in ${SERVER_PIDS[@]+"${SERVER_PIDS[@]}"}; do
    kill "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

# start_server NAME ROLE MODEL TP DP PORT MEM GPUS
start_server() {
  local name=$1 role=$2 model=$3 tp=$4 dp=$5 port=$6 mem=$7 gpus=$8
  echo "single_host.sh: starting the ${name} SGLang server on 127.0.0.1:${port} (TP ${tp} × DP ${dp}, mem ${mem}${gpus:+, GPUs ${gpus}})"
  if [[ -n "$gpus" ]]; then
    CUDA_VISIBLE_DEVICES="$gpus" ROLE="$role" MEM_FRACTION="$mem" \
      "$HERE/sglang_server.sh" "$model" "$tp" "$dp" "$port" > "sglang_${name}_${port}.log" 2>&1 &
  else
    ROLE="$role" MEM_FRACTION="$mem" \
      "$HERE/sglang_server.sh" "$model" "$tp" "$dp" "$port" > "sglang_${name}_${port}.log" 2>&1 &
  fi
  local pid=$!
  SERVER_PIDS+=("$pid")
  local deadline=$(( SECONDS + ${GENEVOLVE_SERVER_WAIT_S:-1200} ))
  until python3 -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:${port}/health', timeout=5).status != 200)" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "single_host.sh: the ${name} server exited; see sglang_${name}_${port}.log" >&2
      exit 1
    fi
    if (( SECONDS > deadline )); then
      echo "single_host.sh: the ${name} server is not healthy after ${GENEVOLVE_SERVER_WAIT_S:-1200} s; see sglang_${name}_${port}.log" >&2
      exit 1
    fi
    sleep 5
  done
  echo "single_host.sh: ${name} server healthy"
}

# Order matters for colocation: SGLang sizes its pool from the memory free when it starts.
if [[ -n "${GENEVOLVE_JUDGE_MODEL:-}" ]]; then
  start_server judge judge "$GENEVOLVE_JUDGE_MODEL" "${GENEVOLVE_JUDGE_TP:-1}" 1 "${GENEVOLVE_JUDGE_PORT:-30000}" \
    "${GENEVOLVE_JUDGE_MEM:-0.80}" "${GENEVOLVE_JUDGE_GPUS:-}"
fi
if [[ -n "${GENEVOLVE_POLICY_MODEL:-}" ]]; then
  start_server policy policy "$GENEVOLVE_POLICY_MODEL" "${GENEVOLVE_POLICY_TP:-2}" "${GENEVOLVE_POLICY_DP:-4}" \
    "${GENEVOLVE_POLICY_PORT:-30010}" "${GENEVOLVE_POLICY_MEM:-0.30}" "${GENEVOLVE_POLICY_GPUS:-}"
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.55}"
fi
"$@"
