"""Join a multi-host job: ``jax.distributed.initialize`` from SLURM, a TPU pod, or explicit settings.

The resolution (which coordinator, how many processes, which one we are) is a pure function of
the config and the environment, so it is tested without starting anything; :func:`initialize`
then calls jax once. It must run before anything touches a device.

SLURM: one process per host (``srun --ntasks-per-node=1``); the coordinator is the first host
of the step's node list, on ``GENEVOLVE_COORDINATOR_PORT`` (default 12355).
TPU pod: every worker runs the same command (``gcloud ... ssh --worker=all``); jax finds the
coordinator through the TPU metadata itself.
Explicit: ``coordinator_address`` / ``num_processes`` / ``process_id`` from config or from
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping

import jax

DEFAULT_PORT = 12355


@dataclasses.dataclass(frozen=True)
class DistributedPlan:
    mode: str                            # "none" | "slurm" | "tpu" | "explicit"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    timeout_s: int = 300                 # sharding.distributed.initialization_timeout_s


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """``"gpu[001-003,007],login1"`` -> ``["gpu001", "gpu002", "gpu003", "gpu007", "login1"]``."""
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?", nodelist):
        prefix, ranges = m.group(1), m.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(prefix + part)
    return hosts


def _int_env(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError as e:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from e


def _device_ids(spec: str) -> tuple[int, ...] | None:
    spec = (spec or "").strip()
    if not spec:
        return None
    try:
        return tuple(int(x) for x in spec.split(","))
    except ValueError as e:
        raise ValueError(f"sharding.distributed.local_device_ids must be comma-separated ints, got {spec!r}") from e


def plan_from_env(cfg, env: Mapping[str, str] | None = None) -> DistributedPlan:
    """Decide how to initialise. ``cfg`` is the ``sharding.distributed`` ConfigDict."""
    env = os.environ if env is None else env
    mode = cfg.mode
    local_ids = _device_ids(cfg.get("local_device_ids", ""))
    if mode == "none":
        return DistributedPlan("none")
    timeout = int(cfg.initialization_timeout_s)
    explicit_addr = cfg.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS", "")
    if mode == "explicit" or (mode == "auto" and explicit_addr):
        n = cfg.num_processes or (_int_env(env, "JAX_NUM_PROCESSES") if "JAX_NUM_PROCESSES" in env else 0)
        pid = cfg.process_id if cfg.process_id >= 0 else (
            _int_env(env, "JAX_PROCESS_ID") if "JAX_PROCESS_ID" in env else -1)
        if not explicit_addr:
            raise ValueError("sharding.distributed.coordinator_address (or JAX_COORDINATOR_ADDRESS) is "
                             "required in explicit mode")
        if n < 1:
            raise ValueError("sharding.distributed.num_processes (or JAX_NUM_PROCESSES) must be >= 1 in "
                             "explicit mode")
        if not 0 <= pid < n:
            raise ValueError(f"sharding.distributed.process_id (or JAX_PROCESS_ID) must be in [0, {n}), got {pid}")
        return DistributedPlan("explicit", explicit_addr, n, pid, local_ids, timeout)
    in_slurm = "SLURM_JOB_ID" in env and "SLURM_PROCID" in env
    if mode == "slurm" or (mode == "auto" and in_slurm):
        for key in ("SLURM_NTASKS", "SLURM_PROCID"):
            if key not in env:
                raise ValueError(f"sharding.distributed.mode=slurm but {key} is not set (run under srun)")
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise ValueError("sharding.distributed.mode=slurm but neither SLURM_STEP_NODELIST nor "
                             "SLURM_JOB_NODELIST is set")
        port = _int_env(env, "GENEVOLVE_COORDINATOR_PORT") if "GENEVOLVE_COORDINATOR_PORT" in env else DEFAULT_PORT
        host = expand_slurm_nodelist(nodelist)[0]
        return DistributedPlan("slurm", f"{host}:{port}", _int_env(env, "SLURM_NTASKS"),
                               _int_env(env, "SLURM_PROCID"), local_ids, timeout)
    in_tpu_pod = bool(env.get("TPU_WORKER_HOSTNAMES") or env.get("CLOUD_TPU_TASK_ID") or env.get("TPU_NAME"))
    if mode == "tpu" or (mode == "auto" and in_tpu_pod):
        return DistributedPlan("tpu", timeout_s=timeout)
    return DistributedPlan("none")


_INITIALISED = False


def initialize(cfg, env: Mapping[str, str] | None = None) -> DistributedPlan:
    """Initialise ``jax.distributed`` once per process as planned; returns the plan used."""
    global _INITIALISED
    plan = plan_from_env(cfg, env)
    if plan.mode == "none" or _INITIALISED:
        return plan
    if plan.mode == "tpu":
        jax.distributed.initialize(initialization_timeout=plan.timeout_s)
    else:
        # CPU-only processes need a cross-process collectives backend (harmless on GPU hosts,
        # it only affects the CPU client). Touching devices here would be too early.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=plan.coordinator_address,
                                   num_processes=plan.num_processes, process_id=plan.process_id,
                                   local_device_ids=plan.local_device_ids,
                                   initialization_timeout=plan.timeout_s)
    _INITIALISED = True
    return plan
