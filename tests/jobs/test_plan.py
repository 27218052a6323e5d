"""`genevolve plan`: planned bytes against the bytes a real run holds, the 8B model's count on a TPU
slice, an infeasible plan, a deviceless TPU compile of a small config, and a deviceless GPU compile
(cuDNN attention, the weight sync and the export) of a scaled-down GPU config."""
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from genevolve_jax.cli import main
from genevolve_jax.config_loader import load_config
from genevolve_jax.plan import abstract
from genevolve_jax.plan.targets import TargetError, parse_target
from genevolve_jax.sharding.mesh import make_mesh

REPO_ROOT = str(Path(__file__).resolve().parents[2])
# The libtpu that the installed jax's [tpu] extra pins (e.g. "libtpu==0.0.42.*").
LIBTPU = next(r.split(";")[0].strip() for r in importlib.metadata.requires("jax") if r.startswith("libtpu"))


@pytest.fixture(scope="module")
def libtpu_env():
    """The environment of a subprocess that finds libtpu. It is installed (about 680 MB) into a cache
    directory on first use and put on that subprocess's PYTHONPATH only, so no other test's jax
    loads it: the TPU target is compiled deviceless, with JAX_PLATFORMS=cpu."""
    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    if importlib.util.find_spec("libtpu") is not None:
        return env
    target = Path(os.environ.get("GENEVOLVE_LIBTPU_DIR") or
                  Path.home() / ".cache" / "genevolve" / f"libtpu-{jax.__version__}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{target}.lock", "w") as lock:          # two xdist workers may get here at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "libtpu").is_dir():
            partial = Path(f"{target}.partial")
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(partial),
                            LIBTPU], check=True, timeout=1800)
            os.replace(partial, target)
    env["PYTHONPATH"] = os.pathsep.join([str(target), env["PYTHONPATH"]])
    return env


# A deviceless GPU compile: JAX's CUDA plugin of the installed jax (about 180 MB, no CUDA libraries)
# and the cuDNN libraries that its fused attention compiles against (about 700 MB; the plugin's own
# requirement range). Measured on the 2-core box, 2026-12-07: downloaded and installed (pip install
# --no-compile --no-deps --target) in 13.5 s wall, 12.2 s CPU, 1.6 GB on disk (cuDNN 9.28), once
# per machine; the test then costs about 30 s of CPU.
CUDA_PACKAGES = (f"jax-cuda12-plugin=={jax.__version__}", f"jax-cuda12-pjrt=={jax.__version__}",
                 "nvidia-cudnn-cu12>=9.8,<10")


@pytest.fixture(scope="module")
def cuda_env():
    """The environment of a subprocess that compiles for GPUs that are not here: the CUDA plugin and
    cuDNN installed into a cache directory on first use (like libtpu above), on that subprocess's
    PYTHONPATH only, with JAX_PLATFORMS=cpu (the plugin is compiled for, never run)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    target = Path(os.environ.get("GENEVOLVE_CUDA_PLUGIN_DIR") or
                  Path.home() / ".cache" / "genevolve" / f"cuda-plugin-{jax.__version__}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{target}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "jax_plugins").is_dir():
            partial = Path(f"{target}.partial")
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-compile", "--no-deps", "--target",
                            str(partial), *CUDA_PACKAGES], check=True, timeout=1800)
            os.replace(partial, target)
    env["PYTHONPATH"] = os.pathsep.join([str(target), env["PYTHONPATH"]])
    return env


def run_with_libtpu(env, code: str, timeout: int = 900) -> dict:
    """Run ``code`` (which prints one JSON line last) in a Python that finds libtpu."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _tiny_cfg(rng):
    cfg = load_config("tiny_cpu")
    cfg.model.hidden_size = int(rng.choice([64, 128]))
    cfg.model.num_layers = int(rng.integers(2, 4))
    return cfg


@pytest.mark.parametrize("strategy,mesh,scan", [("fsdp", {"fsdp": 8}, False),
                                                ("fsdp_tp", {"fsdp": 4, "tensor": 2}, False),
                                                ("tp", {"data": 4, "tensor": 2}, False), ("dp", {"data": 8}, False),
                                                ("fsdp_tp", {"fsdp": 4, "tensor": 2}, True)])
def test_planned_state_bytes_equal_the_real_shards(strategy, mesh, scan):
    """Per device and per array, the abstract state's shards are the ones create_train_state holds
    (also with the decoder layers stacked for a scanning trainer, ``model.scan_layers``)."""
    from genevolve_jax.processing.tokenizer import default_tokenizer
    from genevolve_jax.train.runtime.model_setup import model_source
    from genevolve_jax.train.runtime.state import bytes_per_device, create_train_state, is_vision_path

    rng = np.random.default_rng(abs(hash(strategy)) % 2 ** 32)
    cfg = _tiny_cfg(rng)
    cfg.model.scan_layers = scan
    m = make_mesh(mesh, jax.devices()[:8])
    config = abstract.model_config(cfg, cfg.sft)
    planned = abstract.abstract_train_state(config, cfg.sft, m, strategy, freeze=is_vision_path)
    tok = default_tokenizer()
    _, params, opt_state = create_train_state(model_source(cfg.model, tok), cfg.sft, m, strategy, total_steps=1000,
                                              freeze=is_vision_path)

    assert abstract.bytes_per_device(planned.params) == bytes_per_device(params)
    assert abstract.bytes_per_device(planned.opt_state) == bytes_per_device(opt_state)
    # Array by array: same shapes, dtypes and the shard each device holds.
    for abstract_tree, real_tree in ((planned.params, params), (planned.opt_state, opt_state)):
        a_leaves, r_leaves = jax.tree.leaves(abstract_tree), jax.tree.leaves(real_tree)
        assert len(a_leaves) == len(r_leaves)
        if scan:   # one [layers, ...] array per decoder parameter
            assert any(a.shape[:1] == (cfg.model.num_layers,) and a.ndim >= 2 for a in a_leaves)
        for a, r in zip(a_leaves, r_leaves):
            assert (a.shape, a.dtype) == (r.shape, r.dtype)
            assert abstract.shard_bytes(a) == max(s.data.nbytes for s in r.addressable_shards)
    del params, opt_state


def _hf_parameter_count(config) -> int:
    """The same model's parameter count from transformers (meta device: nothing allocated)."""
    torch = pytest.importorskip("torch")
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**config.to_hf_dict()))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_8b_on_v5p_64_is_the_analytic_count(libtpu_env):
    """8B, fp32 master weights, fsdp over a v5p-64 slice (32 chips): per device, params × 4 / 32 and
    Adam's two fp32 moments for the trained (language) part; counted by transformers."""
    got = run_with_libtpu(libtpu_env, """
        import json, math
        import jax
        from genevolve_jax.config_loader import load_config
        from genevolve_jax.plan import abstract
        from genevolve_jax.plan.targets import parse_target, target_devices
        from genevolve_jax.sharding.mesh import make_mesh
        from genevolve_jax.train.runtime.state import is_vision_path
        target = parse_target("v5p-64")
        devices = target_devices(target)
        cfg = load_config("tpu_pod")
        state = abstract.abstract_train_state(abstract.model_config(cfg, cfg.train), cfg.train,
                                              make_mesh({"fsdp": 32}, devices), "fsdp", freeze=is_vision_path)
        def counts(tree):
            leaves = jax.tree.leaves(tree)
            return (sum(math.prod(x.shape) for x in leaves),
                    sum(math.prod(x.shape) * 4 for x in leaves if all(s is None for s in x.sharding.spec)))
        print(json.dumps({"devices": [target.num_devices, target.topology],
                          "platforms": sorted({d.platform for d in devices}),
                          "params": counts(state.params), "trained": counts(state.params["train"]),
                          "param_bytes": abstract.bytes_per_device(state.params),
                          "opt_bytes": abstract.bytes_per_device(state.opt_state)}))
    """)
    assert got["devices"] == [32, "4x4x2"] and got["platforms"] == ["tpu"]
    count, replicated = got["params"]
    cfg = load_config("tpu_pod")
    assert count == _hf_parameter_count(abstract.model_config(cfg, cfg.train))
    assert 8.0e9 < count < 9.5e9
    # Arrays whose dims 32 does not divide stay whole on every device (q/k norms: a few KiB).
    assert replicated < 1e-4 * count * 4
    assert got["param_bytes"] == (count * 4 - replicated) / 32 + replicated
    trained, trained_replicated = got["trained"]
    moments = 2 * ((trained * 4 - trained_replicated) / 32 + trained_replicated)
    assert moments <= got["opt_bytes"] < moments + 64   # + the step counters


def test_infeasible_plan_exits_3_and_names_the_largest_buffers(tmp_path, capsys, monkeypatch):
    """8B in fp32 with Adam on one 16 GiB device: the state alone (~100 GiB) cannot fit."""
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    out = tmp_path / "plan.json"
    rc = main(["plan", "--config", "qwen3vl_8b_gpu", "--target", "cpu:1", "--device-memory", "16GiB",
               "--phase", "sft", "--output", str(out), "--config.sharding.mesh.fsdp=1"])
    assert rc == 3
    printed = capsys.readouterr().out
    assert "does not fit" in printed and "embed_tokens" in printed and "lm_head" in printed
    plan = json.loads(out.read_text())
    assert plan["fits"] is False
    phase = plan["phases"][0]
    assert phase["peak_bytes"] > phase["budget_bytes"] == 16 * 2 ** 30
    biggest = phase["largest_buffers"][0]
    # The largest per-device buffers are the vocabulary matrices (151936 × 4096 × 4 bytes).
    assert biggest["bytes_per_device"] == 151936 * 4096 * 4
    assert phase["resident_bytes"]["params"] > 8e9 * 4


def test_target_parsing():
    assert parse_target("v5p-64").topology == "4x4x2"
    assert parse_target("tpu:v5p:4x4x4").num_devices == 64
    h = parse_target("gpu:h200x8")
    assert h.num_devices == 8 and h.device.memory_bytes > 140e9 and h.topology == "1x1x8"
    assert parse_target("cpu:8", host_memory_bytes=8 << 30).device.memory_bytes == 1 << 30
    for bad in ("tpu:v9:2x2", "gpu:h100x12", "cpu:0", "banana"):
        with pytest.raises(TargetError):
            parse_target(bad)


def test_default_target_is_the_config_mesh_with_minus_one_filling_a_node():
    from genevolve_jax.jobs.plan import default_target
    assert default_target(load_config("tiny_cpu")) == "cpu:1"
    assert default_target(load_config("qwen3vl_8b_gpu")) == "cpu:8"          # fsdp -1
    assert default_target(load_config("qwen3vl_2b_gpu")) == "cpu:8"          # fsdp -1 × tensor 2
    cfg = load_config("tpu_pod")                                              # fsdp -1 × tensor 8
    assert default_target(cfg) == "cpu:8"
    cfg.sharding.mesh.tensor = 16                                             # more than a node: the fixed axes
    assert default_target(cfg) == "cpu:16"


def test_small_config_compiles_for_a_tpu_slice(tmp_path, libtpu_env):
    """A deviceless compile through libtpu: the tiny config's SFT step on v5p 2x2x1 (4 chips)."""
    out = tmp_path / "tpu.json"
    args = ["plan", "--config", "tiny_cpu", "--target", "tpu:v5p:2x2x1", "--phase", "sft", "--output", str(out),
            "--config.sharding.mesh.fsdp=-1", "--config.data.sft.rows_per_batch=4",
            "--config.data.sft.row_len=256", "--config.data.sft.cutoff_len=256"]
    got = run_with_libtpu(libtpu_env, f"""
        import json
        from genevolve_jax.cli import main
        print(json.dumps({{"rc": main({args!r})}}))
    """)
    assert got["rc"] == 0
    plan = json.loads(out.read_text())
    assert plan["num_devices"] == 4 and plan["device_kind"] == "TPU v5p" and plan["attention"] == "splash"
    phase = plan["phases"][0]
    fn = phase["functions"][0]
    assert fn["temp_bytes"] > 0 and fn["xla_flops"] > 0 and fn["flops"] > 0 and phase["fits"]
    # fsdp over 4 chips gathers weights and reduce-scatters or all-reduces gradients.
    assert phase["collective_bytes"]["all-gather"] > 0
    assert phase["collective_bytes"]["all-reduce"] + phase["collective_bytes"]["reduce-scatter"] > 0


@pytest.mark.parametrize("kl,old", [(True, True), (False, False)])
def test_planned_evolve_batch_is_the_assembled_layout(kl, old):
    """Field names, shapes and dtypes of the planned evolve batch are the trainer's own assembly."""
    from genevolve_jax.train.rl.batch_assembly import assemble_evolve_batch
    from genevolve_jax.train.rl.records import RolloutSample

    rng = np.random.default_rng(7)
    n = int(rng.integers(5, 40))
    sample = RolloutSample(sample_id="s", group=0, token_ids=list(rng.integers(0, 100, n)),
                           loss_mask=[0] * 3 + [1] * (n - 3), logprobs=list(-rng.random(n)), reward=1.0,
                           prompt_length=3)
    real = assemble_evolve_batch([sample], [0.5], seq_len=64, num_rows=4, old_logprobs=old)
    if kl:
        real["ref_logprobs"] = np.zeros(real["targets"].shape, np.float32)   # the trainer adds it
    cfg = load_config("tiny_cpu")
    m = make_mesh({"fsdp": 4}, jax.devices()[:4])
    config = abstract.model_config(cfg, cfg.train)
    planned = abstract.evolve_batch(config, 4, 64, m, {"batch": ("data", "fsdp")}, kl=kl, old_logprobs=old)
    assert set(planned) == set(real)
    for k, v in real.items():
        assert (planned[k].shape, planned[k].dtype) == (v.shape, v.dtype), k


def test_matmul_flops_count_scans_and_gradients():
    """2·B·D·D per matmul, × the scan length, and × 3 for value-and-grad (forward, two backward)."""
    import jax.numpy as jnp

    from genevolve_jax.plan.compile import matmul_flops

    rng = np.random.default_rng(3)
    b, d, n = (int(x) for x in rng.integers(2, 9, 3))

    def f(w, x):
        def body(h, wi):
            return jnp.tanh(h @ wi), None
        return jnp.sum(jax.lax.scan(body, x, w)[0])

    w, x = jnp.zeros((n, d, d)), jnp.zeros((b, d))
    assert matmul_flops(jax.make_jaxpr(f)(w, x)) == n * 2 * b * d * d
    assert matmul_flops(jax.make_jaxpr(jax.grad(f))(w, x)) == 3 * n * 2 * b * d * d
    remat = jax.checkpoint(f)
    assert matmul_flops(jax.make_jaxpr(jax.grad(remat))(w, x)) == 4 * n * 2 * b * d * d


@pytest.mark.parametrize("devices, sft, rl, rl_rows", [(8, 4, 6, 48), (16, 2, 3, 48), (32, 1, 2, 64)])
def test_a_plan_takes_micro_batches_and_rows_from_the_target_mesh(devices, sft, rl, rl_rows):
    """``grad_accum_steps = -1`` (the GPU configs): the plan resolves it on the target's mesh as the
    trainer does on its devices, one packed row per device per micro-batch, and plans the RL batch at
    the trainer's row count (48 rollouts on 32 devices: 2 micro-batches of 32 rows)."""
    from jax.sharding import AbstractMesh

    from genevolve_jax.plan import resolve_micro_batches
    from genevolve_jax.plan.phases import Shapes

    cfg = load_config("qwen3vl_8b_gpu").copy_and_resolve_references()
    mesh = AbstractMesh((1, devices, 1, 1), ("data", "fsdp", "tensor", "sequence"))
    shapes = resolve_micro_batches(cfg, Shapes(), mesh)
    assert (cfg.sft.grad_accum_steps, cfg.train.grad_accum_steps) == (sft, rl)
    assert shapes.rl(cfg) == (rl_rows, 32768) and shapes.sft(cfg) == (32, 32768)
    kept = resolve_micro_batches(cfg, Shapes(rl_rows=96), mesh)     # rows asked for are planned as asked
    assert kept.rl(cfg)[0] == 96


# The 2B GPU config scaled down (2 layers of width 512, one vision block), with its own sharding
# (fsdp 4 × tensor 2), bf16 compute and remat: small enough to compile in seconds.
SCALED_2B = ["--config.model.num_layers=2", "--config.model.hidden_size=512", "--config.model.vision_depth=1"]


@pytest.mark.slow
def test_scaled_gpu_config_compiles_for_h100s(tmp_path, cuda_env):
    """A deviceless compile through the CUDA plugin with the run's cuDNN attention: the evolve step
    of a scaled-down qwen3vl_2b_gpu on 8 H100s. Then, on two nodes
    (h100x16), the weight sync into the JaxEngine (one program per kind of bucket, into the twin
    of one host's engine mesh) and the HF export's all-to-all rounds: every weight moves once."""
    out = tmp_path / "rl.json"
    bucket = 50_000_000
    args = ["plan", "--config", "qwen3vl_2b_gpu", *SCALED_2B, "--target", "gpu:h100x8", "--phase", "rl",
            "--rl-rows", "8", "--rl-seq-len", "256", "--config.train.grad_accum_steps=1",
            "--config.loss.grpo.kl_coef=0", "--output", str(out)]   # no KL: no reference forward to compile
    two_nodes = [o.replace("--config.", "", 1) for o in SCALED_2B] + [
        "sharding.mesh.fsdp=8", "rl.engine=jax", f"rl.sync_bucket_bytes={bucket}"]
    got = run_with_libtpu(cuda_env, f"""
        import json
        from genevolve_jax.cli import main
        from genevolve_jax.config_loader import load_config
        from genevolve_jax.plan import build_plan
        from genevolve_jax.plan.targets import parse_target
        rc = main({args!r})
        cfg = load_config("qwen3vl_2b_gpu", ["--config." + o for o in {two_nodes!r}])
        plan = build_plan(cfg, parse_target("gpu:h100x16"), ("sync", "export"))
        print(json.dumps({{"rc": rc, "two_nodes": plan.to_json()}}))
    """)
    assert got["rc"] == 0
    plan = json.loads(out.read_text())
    assert plan["attention"] == "cudnn" and plan["device_kind"].startswith("H100") and plan["num_devices"] == 8
    (phase,) = plan["phases"]
    assert [f["name"] for f in phase["functions"]] == ["evolve_step"]
    assert all(f["temp_bytes"] > 0 and f["flops"] > 0 for f in phase["functions"]) and phase["fits"]

    cfg = load_config("qwen3vl_2b_gpu", SCALED_2B)
    config = abstract.model_config(cfg, cfg.train)
    sync, export = got["two_nodes"]["phases"]
    assert (sync["phase"], export["phase"]) == ("sync", "export") and sync["fits"] and export["fits"]
    # Each weight lands once, in the engine's shards (tensor 8 over one node's 8 GPUs): the bytes
    # the bucket programs write per device add up to the engine's weights per device.
    moved = sum(f["output_bytes"] * f["runs_per_step"] for f in sync["functions"])
    assert moved == pytest.approx(sync["resident_bytes"]["engine params"], rel=1e-4)
    # No program writes more than a bucket (or one larger weight alone: the embedding) per node.
    largest = max(bucket, config.text.vocab_size * config.text.hidden_size * 2)
    assert max(f["output_bytes"] for f in sync["functions"]) <= largest / 8 * 1.001
    # The export's rounds bring each node the bf16 tensors it writes: the devices receive at least
    # the model's bf16 bytes over 16 devices, and in each round at most a bucket (or the one
    # larger weight) per node over its 8 devices (the node with less to write pads to the other).
    received = export["collective_bytes"]["all-to-all"]
    rounds = sum(f["runs_per_step"] for f in export["functions"])
    exported = _hf_parameter_count(config) * 2
    assert exported / 16 <= received <= rounds * largest / 8 * 1.001
