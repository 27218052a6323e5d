"""Sharding settings: which strategy, which mesh, and how a multi-host job joins its peers.

Defaults describe a single-host run that spreads data over every device present (``fsdp = -1``);
a pod job overrides the mesh axes and the distributed block on the command line.
"""
from __future__ import annotations

import ml_collections

from genevolve_jax.config_checks import Checker, is_int

from genevolve_jax.sharding.logical import MESH_AXES, STRATEGY_RULES

DISTRIBUTED_MODES = ("none", "auto", "slurm", "tpu", "explicit")


def default_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.strategy = "fsdp"
    # Mesh axis sizes; exactly one may be -1 ("all remaining devices"), the product must equal
    # the device count. Axes a strategy does not map anything to are best left at 1.
    cfg.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "sequence": 1})
    # How this process finds its peers. "none": single process; "auto": detect SLURM / TPU pod
    # from the environment and fall back to single-process; "explicit": coordinator_address,
    # num_processes and process_id below (or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    # JAX_PROCESS_ID environment variables).
    cfg.distributed = ml_collections.ConfigDict({
        "mode": "auto",
        "coordinator_address": "",
        "num_processes": 0,
        "process_id": -1,
        "local_device_ids": "",     # comma-separated, empty = all local devices
        "initialization_timeout_s": 300,
    })
    return cfg


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Reject settings that can never work, naming the field. Device-count checks are in mesh.py."""
    check = Checker("sharding")
    check.one_of(cfg.strategy, "strategy", sorted(STRATEGY_RULES))
    unknown = set(cfg.mesh.keys()) - set(MESH_AXES)
    if unknown:
        check.fail("mesh", f"has unknown axes {sorted(unknown)}; the axes are {list(MESH_AXES)}")
    rest = 0
    for axis in MESH_AXES:
        size = cfg.mesh.get(axis, 1)
        check(is_int(size) and (size >= 1 or size == -1), f"mesh.{axis}", "a positive int or -1", size)
        rest += size == -1
    if rest > 1:
        check.fail("mesh", "is invalid: at most one axis may be -1 (the rest of the devices)")
    d = cfg.distributed
    check.one_of(d.mode, "distributed.mode", DISTRIBUTED_MODES)
    check(isinstance(d.coordinator_address, str), "distributed.coordinator_address", "a host:port string",
          d.coordinator_address)
    check.integer(d.num_processes, "distributed.num_processes", 0, "an int >= 0 (0 = from the environment)")
    check.integer(d.process_id, "distributed.process_id", -1, "an int >= -1 (-1 = from the environment)")
    if d.num_processes:
        check(d.process_id < d.num_processes, "distributed.process_id", f"< num_processes ({d.num_processes})",
              d.process_id)
    check(isinstance(d.local_device_ids, str), "distributed.local_device_ids",
          "a comma-separated string (empty = all local devices)", d.local_device_ids)
    check.number(d.initialization_timeout_s, "distributed.initialization_timeout_s", low=0, low_open=True)
    return cfg
