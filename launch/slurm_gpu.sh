#!/usr/bin/env bash
# Multi-host GPU training under SLURM: one process per host, each driving all of its GPUs.
#
# Submit:   sbatch --nodes=4 --gpus-per-node=8 launch/slurm_gpu.sh genevolve compare-sharding --config qwen3vl_2b
# Or, inside an existing allocation (salloc), run it directly with the same arguments.
#
# srun starts one task per node; every task finds its peers through the SLURM environment
# (SLURM_NTASKS, SLURM_PROCID, SLURM_STEP_NODELIST: genevolve_jax/sharding/distributed.py), the
# coordinator being the first node of the step on GENEVOLVE_COORDINATOR_PORT. The command must
# initialise jax.distributed before touching a device (the genevolve jobs do, with the default
# sharding.distributed.mode=auto).
#
# SGLang rollouts (rl.engine=sglang, configs/qwen3vl_*_gpu.py): with GENEVOLVE_POLICY_MODEL set, one
# policy server per node is started first (launch/sglang_server.sh ROLE=policy), colocated with that
# node's trainer process on the same GPUs (the server takes GENEVOLVE_POLICY_MEM=0.30 of each GPU
# first, the trainer then XLA_PYTHON_CLIENT_MEM_FRACTION=0.55), bound to the node's hostname on
# GENEVOLVE_POLICY_PORT (30010): keep the cluster network closed to outsiders. COMMAND (then
# `genevolve train ...`) gets --config.rl.sglang.urls=[every node's server] and
# --config.rl.sglang.weights_dir=$GENEVOLVE_WEIGHTS_DIR, a shared filesystem path every node reads
# (process 0 exports the policy there; each server reloads it). The judge (:30000) and the render
# service (:8100) run on their own nodes: point reward.endpoint.base_url / render.http.urls at them.
#SBATCH --job-name=genevolve
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=genevolve-%j.out
set -euo pipefail

usage() {
  cat <<USAGE
usage: sbatch --nodes=N --gpus-per-node=G launch/slurm_gpu.sh COMMAND [ARGS...]
       (or inside salloc: launch/slurm_gpu.sh COMMAND [ARGS...])

Runs COMMAND once per node (srun --ntasks-per-node=1); jax.distributed is initialised from the
SLURM environment. Environment knobs:
  GENEVOLVE_COORDINATOR_PORT  coordinator port on the first node (default 12355)
  GENEVOLVE_ENV               a file to source on every node first (venv activation, modules)
  GENEVOLVE_POLICY_MODEL      HF Qwen3-VL dir: start an SGLang policy server on every node first
  GENEVOLVE_WEIGHTS_DIR       shared directory for the weight sync (required with the above)
  GENEVOLVE_POLICY_PORT/_TP/_DP/_MEM   30010 / 2 / 4 / 0.30 (TP × DP = GPUs per node)
example:
  sbatch --nodes=2 --gpus-per-node=8 launch/slurm_gpu.sh \\
      genevolve compare-sharding --config qwen3vl_2b --strategies fsdp,fsdp_tp --batch-size 16 --seq-len 4096
USAGE
}

if [[ $# -eq 0 || "$1" == "-h" || "$1" == "--help" ]]; then usage; exit 0; fi
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "error: not inside a SLURM allocation; submit with sbatch (see usage below)" >&2
  usage >&2
  exit 2
fi

export GENEVOLVE_COORDINATOR_PORT="${GENEVOLVE_COORDINATOR_PORT:-12355}"
NODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CMD=("$@")
if [[ -n "${GENEVOLVE_POLICY_MODEL:-}" ]]; then
  : "${GENEVOLVE_WEIGHTS_DIR:?set GENEVOLVE_WEIGHTS_DIR to a shared path every node can read (weight sync)}"
  PORT="${GENEVOLVE_POLICY_PORT:-30010}"
  echo "genevolve: starting an SGLang policy server on every node, port ${PORT}"
  srun --overlap --nodes="${NODES}" --ntasks-per-node=1 --output="sglang-policy-%j-%N.log" bash -c '
    if [[ -n "${GENEVOLVE_ENV:-}" ]]; then source "${GENEVOLVE_ENV}"; fi
    HOST="$(hostname)" ROLE=policy MEM_FRACTION="${GENEVOLVE_POLICY_MEM:-0.30}" exec "$0" "$@"
  ' "$HERE/sglang_server.sh" "$GENEVOLVE_POLICY_MODEL" "${GENEVOLVE_POLICY_TP:-2}" "${GENEVOLVE_POLICY_DP:-4}" "$PORT" &
  SERVERS_PID=$!
  trap 'kill "$SERVERS_PID" 2>/dev/null || true' EXIT
  URLS=()
  for node in $(scontrol show hostnames "${SLURM_JOB_NODELIST}"); do URLS+=("http://${node}:${PORT}"); done
  deadline=$(( SECONDS + ${GENEVOLVE_SERVER_WAIT_S:-1200} ))
  fast_until=$(( SECONDS + 30 ))   # a server already up, or quick to start, is seen at once
  for url in "${URLS[@]}"; do
    until python3 -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('${url}/health', timeout=5).status != 200)" 2>/dev/null; do
      if ! kill -0 "$SERVERS_PID" 2>/dev/null || (( SECONDS > deadline )); then
        echo "error: SGLang policy server ${url} is not healthy; see sglang-policy-${SLURM_JOB_ID}-*.log" >&2
        exit 1
      fi
      sleep $(( SECONDS < fast_until ? 1 : 10 ))
    done
  done
  QUOTED=$(printf '"%s",' "${URLS[@]}")
  CMD+=("--config.rl.sglang.urls=[${QUOTED%,}]" "--config.rl.sglang.weights_dir=${GENEVOLVE_WEIGHTS_DIR}")
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.55}"
fi
# One process sees all GPUs of its node; XLA should not grab 75% of memory before the model fits.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
echo "genevolve: ${NODES} node(s), coordinator port ${GENEVOLVE_COORDINATOR_PORT}: ${CMD[*]}"

srun --overlap --nodes="${NODES}" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
  if [[ -n "${GENEVOLVE_ENV:-}" ]]; then source "${GENEVOLVE_ENV}"; fi
  exec "$@"
' genevolve-task "${CMD[@]}"
