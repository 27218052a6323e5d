"""Compile targets of `genevolve plan`: simulated CPU devices, TPU slices and GPU nodes.

``cpu:N``       N simulated host devices (``--xla_force_host_platform_device_count``, which must
                be set before jax starts: :func:`cpu_xla_flags`). Their memory is the host's RAM
                divided among them, so a plan answers "does this fit on this machine".
``tpu:TOPO``    a deviceless compile through libtpu: ``tpu:v5p:4x4x4`` (64 chips) or a slice
                name: ``tpu:v5p-64`` (v5p and v4 slice names count TensorCores, two per chip, so
                v5p-64 is 32 chips, 4x4x2; v5e / v6e names count chips).
``gpu:KINDxN``  a deviceless compile through JAX's CUDA plugin on a target description written
                here from the vendor's published figures (``gpu:h100x8``, ``gpu:h200x8``).

Peak FLOP/s are dense bf16 from the vendors' data sheets (no sparsity).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    kind: str                 # what the table prints
    memory_bytes: int         # physical memory per device
    peak_flops: float         # dense bf16 FLOP/s per device
    memory_bandwidth: float   # bytes/s


@dataclasses.dataclass(frozen=True)
class GpuSpec(DeviceSpec):
    plugin_name: str = ""              # get_topology_desc's first argument
    compute_capability: tuple[int, int] = (9, 0)
    sms: int = 132
    l2_bytes: int = 50 * 2 ** 20
    clock_ghz: float = 1.98
    shared_per_sm: int = 228 * 1024
    shared_per_block_optin: int = 227 * 1024
    description: str = ""              # the CUDA device name


# Published figures. Memory: what the driver reports (nvidia-smi MiB) for GPUs; the HBM per chip
# for TPUs.
GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec("H100 SXM 80GB", 81559 * 2 ** 20, 989.4e12, 3.35e12, plugin_name="h100",
                    description="NVIDIA H100 80GB HBM3"),
    "h200": GpuSpec("H200 SXM 141GB", 143771 * 2 ** 20, 989.4e12, 4.8e12, plugin_name="h200",
                    description="NVIDIA H200"),
    "a100": GpuSpec("A100 SXM 80GB", 81920 * 2 ** 20, 312e12, 2.039e12, plugin_name="a100",
                    compute_capability=(8, 0), sms=108, l2_bytes=40 * 2 ** 20, clock_ghz=1.41,
                    shared_per_sm=164 * 1024, shared_per_block_optin=163 * 1024,
                    description="NVIDIA A100-SXM4-80GB"),
}
# generation -> (spec, TensorCores per chip in the slice name)
TPUS: dict[str, tuple[DeviceSpec, int]] = {
    "v4": (DeviceSpec("TPU v4", 32 * GIB, 275e12, 1.2e12), 2),
    "v5p": (DeviceSpec("TPU v5p", 95 * GIB, 459e12, 2.765e12), 2),
    "v5e": (DeviceSpec("TPU v5e", 16 * GIB, 197e12, 0.819e12), 1),
    "v6e": (DeviceSpec("TPU v6e", 32 * GIB, 918e12, 1.64e12), 1),
}


class TargetError(ValueError):
    """A target string that names no known hardware, or hardware this machine cannot compile for."""


@dataclasses.dataclass(frozen=True)
class Target:
    spec: str                 # as given
    platform: str             # "cpu" | "tpu" | "gpu"
    num_devices: int
    device: DeviceSpec
    topology: str = ""        # TPU "4x4x2", GPU "1x1x8"
    generation: str = ""      # TPU "v5p", GPU "h100"
    attention: str = ""       # "": the kernel the run picks on this hardware; "xla": the XLA path

    @property
    def attention_backend(self) -> str:
        """The backend the model's attention dispatch should pick kernels for."""
        return self.platform


def _tpu_topology(gen: str, chips: int) -> str:
    """A near-cubic 3D (v4, v5p) or 2D (v5e, v6e) topology of ``chips`` chips, as TPU slices are."""
    dims3 = gen in ("v4", "v5p")
    if chips < 1 or chips & (chips - 1):
        raise TargetError(f"tpu:{gen}-… needs a power-of-two chip count, got {chips}")
    n = [1, 1, 1] if dims3 else [1, 1]
    i = 0
    while math.prod(n) < chips:
        n[i % len(n)] *= 2
        i += 1
    # Slices list the larger dims first (v5p-64 is 4x4x2).
    return "x".join(str(d) for d in sorted(n, reverse=True))


def parse_target(spec: str, host_memory_bytes: int | None = None) -> Target:
    """``cpu:N`` | ``tpu:GEN:AxBxC`` | ``tpu:GEN-N`` (alias ``GEN-N``) | ``gpu:KINDxN``."""
    s = spec.strip().lower()
    if re.fullmatch(r"(v4|v5p|v5e|v6e)-\d+", s):
        s = "tpu:" + s
    if s.startswith("cpu:"):
        try:
            n = int(s[4:])
        except ValueError:
            raise TargetError(f"target {spec!r}: cpu:N needs a device count") from None
        if n < 1:
            raise TargetError(f"target {spec!r}: the device count must be >= 1")
        mem = host_memory_bytes if host_memory_bytes is not None else _host_memory()
        return Target(spec, "cpu", n, DeviceSpec(f"CPU (1/{n} of host RAM)", mem // n, 0.0, 0.0))
    if s.startswith("tpu:"):
        rest = s[4:]
        m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", rest)
        if m:
            gen, cores = m.group(1), int(m.group(2))
            dev, per_chip = TPUS[gen]
            if cores % per_chip:
                raise TargetError(f"target {spec!r}: {gen} slice names count {per_chip} cores per chip")
            chips = cores // per_chip
            return Target(spec, "tpu", chips, dev, _tpu_topology(gen, chips), gen)
        m = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+)+)", rest)
        if m:
            gen, topo = m.group(1), m.group(2)
            chips = math.prod(int(d) for d in topo.split("x"))
            return Target(spec, "tpu", chips, TPUS[gen][0], topo, gen)
        raise TargetError(f"target {spec!r}: expected tpu:GEN:AxBxC or tpu:GEN-N with GEN in {sorted(TPUS)}")
    if s.startswith("gpu:"):
        m = re.fullmatch(r"([a-z0-9]+)x(\d+)", s[4:])
        if not m or m.group(1) not in GPUS:
            raise TargetError(f"target {spec!r}: expected gpu:KINDxN with KIND in {sorted(GPUS)}")
        n = int(m.group(2))
        if n < 1 or (n > 8 and n % 8):
            raise TargetError(f"target {spec!r}: N must be 1..8 (one node) or a multiple of 8 (nodes of 8)")
        hosts, per_host = (1, n) if n <= 8 else (n // 8, 8)
        return Target(spec, "gpu", n, GPUS[m.group(1)], f"1x{hosts}x{per_host}", m.group(1))
    raise TargetError(f"target {spec!r}: expected cpu:N, tpu:GEN:TOPOLOGY, tpu:GEN-N or gpu:KINDxN")


def _host_memory() -> int:
    import psutil
    return int(psutil.virtual_memory().total)


def cpu_xla_flags(n: int, flags: str | None = None) -> str:
    """XLA_FLAGS with ``n`` simulated host devices (replacing any earlier count)."""
    kept = [f for f in (os.environ.get("XLA_FLAGS", "") if flags is None else flags).split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join(kept + [f"--xla_force_host_platform_device_count={n}"])


def gpu_target_config(spec: GpuSpec) -> str:
    """A ``GpuTargetConfigProto`` in text form, with only the fields the 0.10.2 plugin accepts."""
    major, minor = spec.compute_capability
    return "\n".join([
        "gpu_device_info {",
        f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
        "  threads_per_block_limit: 1024",
        "  threads_per_warp: 32",
        "  shared_memory_per_block: 49152",
        f"  shared_memory_per_block_optin: {spec.shared_per_block_optin}",
        f"  shared_memory_per_core: {spec.shared_per_sm}",
        "  threads_per_core_limit: 2048",
        f"  core_count: {spec.sms}",
        "  fpus_per_core: 128",
        "  block_dim_limit_x: 2147483647",
        "  block_dim_limit_y: 65535",
        "  block_dim_limit_z: 65535",
        f"  memory_bandwidth: {int(spec.memory_bandwidth)}",
        f"  l2_cache_size: {spec.l2_bytes}",
        f"  clock_rate_ghz: {spec.clock_ghz}",
        f"  device_memory_size: {spec.memory_bytes}",
        "  registers_per_core_limit: 65536",
        "  registers_per_block_limit: 65536",
        "}",
        'platform_name: "CUDA"',
        "dnn_version_info { major: 9 minor: 8 }",
        f'device_description_str: "{spec.description}"',
    ])


def target_devices(target: Target) -> list:
    """The devices to build the mesh from: real (simulated) CPU devices or compile-only ones."""
    import jax
    if target.platform == "cpu":
        devs = jax.devices("cpu")
        if len(devs) < target.num_devices:
            raise TargetError(f"target {target.spec}: jax started with {len(devs)} CPU devices; set "
                              f"XLA_FLAGS={cpu_xla_flags(target.num_devices)!r} before jax starts "
                              f"(`genevolve plan` does this itself when it starts jax)")
        return devs[:target.num_devices]
    from jax.experimental import topologies
    if target.platform == "tpu":
        # A deviceless compile touches no chip: let it run beside another libtpu process (a
        # second plan, a test) instead of failing on libtpu's single-process lockfile.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        try:
            topo = topologies.get_topology_desc(platform="tpu", topology_name=f"{target.generation}:{target.topology}")
        except Exception as e:  # noqa: BLE001 - libtpu missing or topology unknown: say which
            raise TargetError(f"target {target.spec}: no deviceless TPU compile here ({type(e).__name__}: "
                              f"{str(e)[:200]}); install libtpu: pip install 'jax[tpu]==<installed jax>'") from e
    else:
        spec = target.device
        assert isinstance(spec, GpuSpec)
        try:
            topo = topologies.get_topology_desc(spec.plugin_name, platform="cuda", topology=target.topology,
                                                target_config=gpu_target_config(spec))
        except Exception as e:  # noqa: BLE001
            raise TargetError(f"target {target.spec}: no deviceless GPU compile here ({type(e).__name__}: "
                              f"{str(e)[:200]}); install jax-cuda12-plugin and jax-cuda12-pjrt of the "
                              f"installed jax version") from e
    devs = list(topo.devices)
    if len(devs) != target.num_devices:
        raise TargetError(f"target {target.spec}: the topology gave {len(devs)} devices, expected {target.num_devices}")
    return devs
