"""The JaxEngine's plan: the planned engine state is the one a real engine holds, shard for shard;
the planned functions lower to the same program as the engine's own calls; and `genevolve plan
--phase engine` reports the KV cache and the trainer's state beside it."""
import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from genevolve_jax.cli import main
from genevolve_jax.config_loader import load_config
from genevolve_jax.models.qwen3_vl.model import Qwen3VLForConditionalGeneration
from genevolve_jax.plan import abstract as plan_abstract
from genevolve_jax.plan.engine_phase import abstract_engine
from genevolve_jax.rollout.engine_functions import engine_mesh
from genevolve_jax.rollout.jax_engine import JaxEngine


def _same_program(jitted, real_args, abstract_args):
    """The engine's call and the plan's trace the same program (jaxpr), with the same argument
    layouts and donations once compiled."""
    real, abstract = jitted.trace(*real_args), jitted.trace(*abstract_args)
    assert str(real.jaxpr) == str(abstract.jaxpr)
    r, a = real.lower(), abstract.lower()
    assert ([x.donated for x in jax.tree.leaves(r.args_info)] == [x.donated for x in jax.tree.leaves(a.args_info)])
    rs, as_ = jax.tree.leaves(r.compile().input_shardings), jax.tree.leaves(a.compile().input_shardings)
    assert len(rs) == len(as_) and all(x.is_equivalent_to(y, 4) or x == y for x, y in zip(rs, as_))


def _config(rng, mesh: dict):
    cfg = load_config("tiny_cpu")
    cfg.model.hidden_size = int(rng.choice([64, 128]))
    cfg.model.num_layers = int(rng.integers(2, 4))
    cfg.engine.max_slots = int(rng.choice([4, 8]))
    cfg.engine.max_seq_len = int(rng.choice([128, 256]))
    cfg.engine.min_prefill_bucket = 32
    cfg.engine.steps_per_sync = int(rng.integers(2, 6))
    cfg.engine.mesh.update(mesh)
    return cfg


@pytest.mark.parametrize("mesh", [{"tensor": 2, "data": 2}, {"tensor": 4}, {"data": 8}])
def test_planned_engine_state_and_calls_are_the_engines(mesh):
    rng = np.random.default_rng(sum(mesh.values()) * 7 + len(mesh))
    cfg = _config(rng, mesh)
    config = plan_abstract.model_config(cfg, cfg.train)
    model = Qwen3VLForConditionalGeneration(config, rngs=nnx.Rngs(int(rng.integers(1000))))
    _, _, rest = nnx.split(model, nnx.Param, ...)
    engine = JaxEngine(model, None, cfg.engine, mesh=engine_mesh(cfg.engine, jax.devices()))
    try:
        planned = abstract_engine(cfg, config, jax.devices())
        assert dict(planned.fns.mesh.shape) == dict(engine.fns.mesh.shape)
        real_cache = engine.fns.new_cache()
        for abstract_tree, real_tree in ((planned.params, engine.params), (planned.fns.abstract_cache(), real_cache)):
            a_leaves, r_leaves = jax.tree.leaves(abstract_tree), jax.tree.leaves(real_tree)
            assert len(a_leaves) == len(r_leaves) > 0
            for a, r in zip(a_leaves, r_leaves):
                assert (a.shape, a.dtype) == (r.shape, r.dtype)
                assert a.sharding.is_equivalent_to(r.sharding, len(a.shape))
                assert plan_abstract.shard_bytes(a) == max(s.data.nbytes for s in r.addressable_shards)
        # The KV cache: layers × (k, v) × slots × capacity × kv heads × head dim, in the model's dtype.
        t = config.text
        capacity = cfg.engine.max_seq_len + cfg.engine.steps_per_sync
        kv = t.num_hidden_layers * 2 * cfg.engine.max_slots * capacity * t.num_key_value_heads * t.head_dim
        kv_bytes = sum(x.nbytes for x in real_cache.k + real_cache.v)
        assert kv_bytes == kv * np.dtype(config.jnp_dtype).itemsize

        # One decode chunk as the engine calls it (its weights, a cache, the host arrays it builds)
        # and as the plan traces it: the same program.
        fns = engine.fns
        h = fns.decode_host_arrays()
        window = fns.decode_window(int(rng.integers(1, cfg.engine.max_seq_len)))
        with fns.rules():
            _same_program(fns.decode_chunk,
                          (engine.params, rest, None, h["tokens"], real_cache, h["live"], h["temp"], h["top_p"],
                           h["top_k"], h["seeds"], h["counters"], "filter", window),
                          planned.fns.abstract_decode_args(planned.params, planned.rest, None, mode="filter",
                                                           window=window))
        # A fresh prefill of 3 requests, padded to a random bucket, likewise.
        length = fns.prefill_window(int(rng.integers(8, 64)))
        from genevolve_jax.models.qwen3_vl.model import prepare_inputs
        ids = rng.integers(0, t.vocab_size, (3, length)).astype(np.int32)
        batch = prepare_inputs(config, ids, np.ones_like(ids))
        h = fns.prefill_host_arrays(3)
        with fns.rules():
            _same_program(fns.prefill,
                          (engine.params, rest, batch, real_cache, h["src"], h["dst"], h["start"], h["offset"],
                           (h["temp"], h["top_p"], h["top_k"], h["seed"]), "sample", length),
                          planned.fns.abstract_prefill_args(planned.params, planned.rest, 3, length, mode="sample"))
    finally:
        engine.close()


def test_engine_mesh_larger_than_the_devices_is_refused():
    cfg = load_config("tiny_cpu")
    cfg.engine.mesh.tensor = 16
    with pytest.raises(ValueError, match="needs 16 devices; 8 are available"):
        engine_mesh(cfg.engine, jax.devices())


def test_plan_engine_phase_reports_cache_and_trainer_state(tmp_path, capsys):
    """tiny_cpu samples with the JaxEngine: its phase holds the engine's weights and KV cache and the
    trainer's state; the RL phase holds the engine's too. Both engine calls compile, and so do the
    weight sync's and the engine construction's bucket programs."""
    out = tmp_path / "plan.json"
    rng = np.random.default_rng(5)
    slots, seq = int(rng.choice([8, 16])), int(rng.choice([256, 512]))
    rc = main(["plan", "--config", "tiny_cpu", "--target", "cpu:8", "--phase", "all", "--output", str(out),
               "--config.sharding.mesh.fsdp=8", "--config.engine.mesh.tensor=2",
               f"--config.engine.max_slots={slots}", f"--config.engine.max_seq_len={seq}",
               "--config.data.sft.rows_per_batch=8", "--config.data.sft.row_len=256",
               "--config.data.sft.cutoff_len=256", "--rl-seq-len=256"])
    assert rc == 0, capsys.readouterr()
    assert "phase engine" in capsys.readouterr().out
    plan = json.loads(out.read_text())
    phases = {p["phase"]: p for p in plan["phases"]}
    assert set(phases) == {"sft", "rl", "engine", "sync", "export", "engine_build"}
    eng = phases["engine"]
    assert [f["name"] for f in eng["functions"]] == ["engine_prefill", "engine_decode_chunk"]
    assert all(f["temp_bytes"] > 0 and f["flops"] > 0 for f in eng["functions"])
    cfg = load_config("tiny_cpu")
    config = plan_abstract.model_config(cfg, cfg.train)
    t = config.text
    capacity = seq + cfg.engine.steps_per_sync
    kv_heads_per_device = t.num_key_value_heads // math.gcd(t.num_key_value_heads, 2)
    cache = (t.num_hidden_layers * 2 * slots * capacity * kv_heads_per_device * t.head_dim
             * np.dtype(config.jnp_dtype).itemsize + slots * capacity + 2 * slots * 4)
    assert eng["resident_bytes"]["engine KV cache"] == cache
    assert {"engine params", "trainer params", "trainer optimizer"} <= set(eng["resident_bytes"])
    assert eng["resident_bytes"]["trainer params"] == phases["rl"]["resident_bytes"]["params"]
    assert phases["rl"]["resident_bytes"]["engine KV cache"] == cache
    # The decode chunk samples slots × steps tokens: its output projection alone is
    # 2 · D · V FLOPs a token, over the engine's 2 devices (tensor 2).
    decode = eng["functions"][1]
    head = 2 * t.hidden_size * t.vocab_size * slots * cfg.engine.steps_per_sync / 2
    assert head <= decode["flops"] < 20 * head
    assert eng["peak_bytes"] <= eng["budget_bytes"]
    # One process: the HF export reads each tensor into host memory (no device program); the sync
    # and the engine's construction run the bucket programs (the model is one 1 GiB bucket), the
    # sync beside the engine's KV cache, the construction before it exists.
    export, sync, build = phases["export"], phases["sync"], phases["engine_build"]
    assert export["functions"] == [] and export["peak_bytes"] == sum(export["resident_bytes"].values())
    assert [f["runs_per_step"] for f in sync["functions"]] == [1] == [f["runs_per_step"] for f in build["functions"]]
    assert sync["resident_bytes"]["engine KV cache"] == cache and "engine KV cache" not in build["resident_bytes"]
    assert sync["peak_bytes"] > build["peak_bytes"]


def test_an_asynchronous_run_plans_a_second_copy_of_the_engine_weights():
    """rl.max_staleness ≥ 1: the trainer publishes each version as a copy in the engine's layout
    while the engine samples with its own (train/rl/trainer.py:publish_weights), so every phase
    that holds the engine holds its weights twice; a synchronous run once."""
    cfg = load_config("tiny_cpu")
    config = plan_abstract.model_config(cfg, cfg.train)
    sync = abstract_engine(cfg, config, jax.devices()).resident()
    cfg.rl.max_staleness = int(np.random.default_rng().integers(1, 4))
    stale = abstract_engine(cfg, config, jax.devices()).resident()
    second = "engine params, the published next version"
    assert set(stale) - set(sync) == {second} and set(sync) <= set(stale)
    weights = plan_abstract.bytes_per_device(sync["engine params"])
    assert plan_abstract.bytes_per_device(stale[second]) == weights > 0
