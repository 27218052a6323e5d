"""Mesh construction, impossible meshes, sharding config validation and multi-host planning."""
import jax
import ml_collections
import pytest
from jax.sharding import AxisType, PartitionSpec

from genevolve_jax.sharding import config as sharding_config
from genevolve_jax.sharding import logical
from genevolve_jax.sharding.distributed import expand_slurm_nodelist, plan_from_env
from genevolve_jax.sharding.mesh import MeshError, check_divisible, make_mesh, mesh_from_config, resolve_axis_sizes


def test_rest_axis_and_axis_types():
    mesh = make_mesh({"data": 2, "fsdp": -1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1, "sequence": 1}
    assert mesh.axis_names == logical.MESH_AXES
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    cfg = sharding_config.default_config()
    assert dict(mesh_from_config(cfg).shape)["fsdp"] == len(jax.devices())
    sub = make_mesh({"tensor": 2}, jax.devices()[:2])
    assert dict(sub.shape)["tensor"] == 2


@pytest.mark.parametrize("sizes,n,match", [
    ({"data": 3}, 8, r"multiply to 3 devices, but 8 are present"),
    ({"data": 3, "fsdp": -1}, 8, r"need a multiple of 3 devices for the -1 axis 'fsdp'"),
    ({"data": -1, "fsdp": -1}, 8, r"only one mesh axis may be -1"),
    ({"data": 0}, 8, r"mesh axis 'data' has size 0"),
    ({"pipeline": 2}, 8, r"unknown mesh axes \['pipeline'\]"),
])
def test_impossible_meshes_are_refused(sizes, n, match):
    with pytest.raises(MeshError, match=match):
        resolve_axis_sizes(sizes, n)


def test_divisibility_of_data_dims():
    mesh = make_mesh({"data": 2, "fsdp": 4})
    check_divisible(mesh, {"batch": (16, ("data", "fsdp"))})
    with pytest.raises(MeshError, match=r"batch = 12 is not divisible by the mesh axes \['data', 'fsdp'\]"):
        check_divisible(mesh, {"batch": (12, ("data", "fsdp"))})


def test_rules_resolve_and_drop_what_cannot_divide():
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    rules = logical.rules_for("fsdp_tp")
    assert logical.partition_spec((logical.EMBED, logical.HEADS, logical.HEAD_DIM), rules, mesh, (64, 4, 16)) == \
        PartitionSpec("fsdp", "tensor", None)
    # 3 heads cannot split over tensor=2: replicated on that dim, never an error for params
    assert logical.partition_spec((logical.EMBED, logical.HEADS, logical.HEAD_DIM), rules, mesh, (64, 3, 16)) == \
        PartitionSpec("fsdp", None, None)
    # activations: batch takes fsdp first, so embed is not split under fsdp
    assert logical.partition_spec((logical.BATCH, logical.SEQ, logical.EMBED), rules, mesh, (8, 16, 64)) == \
        PartitionSpec("fsdp", None, None)
    sp = logical.partition_spec((logical.BATCH, logical.SEQ, logical.EMBED), logical.rules_for("fsdp_sp"),
                                make_mesh({"fsdp": 2, "sequence": 4}), (4, 32, 64))
    assert sp == PartitionSpec("fsdp", "sequence", None)
    with pytest.raises(ValueError, match="unknown sharding strategy 'zero3'"):
        logical.rules_for("zero3")


def test_sharding_config_validation():
    cfg = sharding_config.default_config()
    sharding_config.validate(cfg)
    bad = sharding_config.default_config()
    bad.strategy = "zero"
    with pytest.raises(ValueError, match="sharding.strategy must be one of"):
        sharding_config.validate(bad)
    bad = sharding_config.default_config()
    bad.mesh.data = -1
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding_config.validate(bad)
    bad = sharding_config.default_config()
    bad.distributed.mode = "mpi"
    with pytest.raises(ValueError, match="sharding.distributed.mode"):
        sharding_config.validate(bad)


def _dist(**kw):
    d = sharding_config.default_config().distributed
    for k, v in kw.items():
        d[k] = v
    return d


def test_slurm_nodelist_expansion():
    assert expand_slurm_nodelist("gpu[001-003,007],login1") == ["gpu001", "gpu002", "gpu003", "gpu007", "login1"]
    assert expand_slurm_nodelist("node7") == ["node7"]
    assert expand_slurm_nodelist("a[9-11]") == ["a9", "a10", "a11"]


def test_distributed_plans_from_environment():
    slurm = {"SLURM_JOB_ID": "42", "SLURM_PROCID": "3", "SLURM_NTASKS": "4",
             "SLURM_STEP_NODELIST": "gpu[010-013]", "GENEVOLVE_COORDINATOR_PORT": "2222"}
    p = plan_from_env(_dist(), slurm)
    assert (p.mode, p.coordinator_address, p.num_processes, p.process_id) == ("slurm", "gpu010:2222", 4, 3)
    assert plan_from_env(_dist(), {}).mode == "none"
    assert plan_from_env(_dist(mode="none"), slurm).mode == "none"
    assert plan_from_env(_dist(), {"TPU_WORKER_HOSTNAMES": "a,b"}).mode == "tpu"
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    p = plan_from_env(_dist(), env)
    assert (p.mode, p.coordinator_address, p.num_processes, p.process_id) == ("explicit", "10.0.0.1:1234", 2, 1)
    p = plan_from_env(_dist(mode="explicit", coordinator_address="h:1", num_processes=2, process_id=0,
                            local_device_ids="0,1", initialization_timeout_s=45), {})
    assert p.local_device_ids == (0, 1) and p.timeout_s == 45
    with pytest.raises(ValueError, match="coordinator_address"):
        plan_from_env(_dist(mode="explicit", num_processes=2, process_id=0), {})
    with pytest.raises(ValueError, match=r"process_id .* must be in \[0, 2\)"):
        plan_from_env(_dist(mode="explicit", coordinator_address="h:1", num_processes=2, process_id=5), {})
    with pytest.raises(ValueError, match="SLURM_NTASKS is not set"):
        plan_from_env(_dist(mode="slurm"), {"SLURM_JOB_ID": "1", "SLURM_PROCID": "0"})
    with pytest.raises(ValueError, match="SLURM_PROCID='x' is not an integer"):
        plan_from_env(_dist(), {**slurm, "SLURM_PROCID": "x"})
    assert isinstance(sharding_config.default_config(), ml_collections.ConfigDict)
