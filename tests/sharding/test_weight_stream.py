"""Weights leave the trainer's layout one bucket at a time (genevolve_jax/sharding/weight_stream.py).

One launch of two real processes (jax.distributed on 127.0.0.1, gloo) with 4 simulated devices
each holds a model fsdp-sharded over all 8, its decoder layers stacked (as tpu_pod trains), whose
largest tensor is 5.4 % of the whole. Through the public surface (MultiProcess) it builds a
JaxEngine on each host (tensor-parallel over 2 of its 4 devices), syncs new weights into it, and
writes the SGLang sync's HF export and the final export (bf16, as the shipped configs). A probe
installed with ``observe_buckets`` sums the bytes of ``jax.live_arrays()`` on each device after
every bucket: on no device does a phase hold more than the larger of its state before and after
plus one bucket and a slack. The exports, read back with safetensors, equal the weights bit for
bit; the engine holds the synced weights.

Measured on this launch before the change (2026-12-07, 2-core CPU box; BENCHMARKS.md, issue 24): a
sync to SGLang put the whole fp32 model, 1,212,672 bytes, on every device of both hosts (8 times
the trainer's share); now a device holds 24,576 bytes more while the export moves.
"""
import json
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from genevolve_jax.models import hf_io
from genevolve_jax.sharding import weight_stream
from tests.fixtures.multiprocess import WORKER_PRELUDE, join_processes, launch_two_processes
from tests.fixtures.toy_task import many_tensor_config

# A few of the largest tensors' worth each (the engine takes fp32, the exports bf16); one bucket
# each, so that the launch compiles few programs.
BUCKETS = {"build": 256 * 1024, "engine_sync": 256 * 1024, "sglang_export": 96 * 1024, "final_export": 96 * 1024}
SLACK = 4 * 1024         # small arrays made along the way

WORKER = WORKER_PRELUDE + textwrap.dedent('''
    import collections
    from flax import nnx
    from genevolve_jax.models import hf_io
    from genevolve_jax.models.qwen3_vl import keymap
    from genevolve_jax.models.qwen3_vl.layer_layout import path_names
    from genevolve_jax.rollout import config as engine_config
    from genevolve_jax.rollout.engine_functions import sampling_shardings
    from genevolve_jax.rollout.jax_engine import JaxEngine
    from genevolve_jax.sharding import weight_stream
    from genevolve_jax.sharding.mesh import make_mesh
    from genevolve_jax.sharding.multihost import MultiProcess
    from genevolve_jax.train.runtime.state import TrainSetup
    from tests.fixtures.toy_task import many_tensor_config

    engine_bucket, export_bucket = int(os.environ["ENGINE_BUCKET"]), int(os.environ["EXPORT_BUCKET"])
    config = many_tensor_config()
    sd = hf_io.random_state_dict(config, seed=3)
    # The trainer's params, fsdp over both processes' devices, each placed straight from the HF
    # tensors (the stacked ones row by row on the host: no program to compile per shape).
    values, rows = {}, collections.defaultdict(dict)
    for e in keymap.key_entries(config):
        if e.stack_index is None:
            values[e.nnx] = e.to_nnx(sd[e.hf])
        else:
            rows[e.nnx][e.stack_index] = e.to_nnx(sd[e.hf])
    values.update({k: np.stack([r[i] for i in sorted(r)]) for k, r in rows.items()})
    mesh = make_mesh({"fsdp": -1})
    graphdef, frozen, abstract, rest = nnx.split(hf_io.abstract_model(config, mesh=mesh, rules="fsdp"),
                                                 nnx.Nothing, nnx.Param, ...)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    train = jax.tree.unflatten(treedef, [jax.device_put(values[path_names(p)], x.sharding) for p, x in flat])
    setup = TrainSetup(graphdef=graphdef, rest=rest, tx=None, schedule=None, mesh=mesh, rules="fsdp",
                       param_shardings=None, opt_shardings=None)
    params = {"train": train, "frozen": frozen}
    doubled = {"train": jax.jit(lambda t: jax.tree.map(lambda x: 2 * x, t))(train), "frozen": frozen}
    hosts = MultiProcess()

    def device_bytes():
        """Bytes of live arrays per local device, each buffer once (a shard's array, which jax
        keeps once asked for, aliases its global array's buffer)."""
        used, seen = collections.Counter({d.id: 0 for d in jax.local_devices()}), set()
        for a in jax.live_arrays():
            for shard in a.addressable_shards:
                key = (shard.device.id, shard.data.unsafe_buffer_pointer())
                if key not in seen:
                    seen.add(key)
                    used[shard.device.id] += shard.data.nbytes
        return used

    def measured(name, action):
        """Run ``action`` with the probe on; record per device the bytes before, after, and at the
        largest seen after a bucket moved."""
        before, peak, buckets = device_bytes(), collections.Counter(), []

        def probe(event):
            buckets.append(event.nbytes)
            for d, n in device_bytes().items():
                peak[d] = max(peak[d], n)
        t0 = time.perf_counter()
        with weight_stream.observe_buckets(probe):
            out = action()
        seconds = time.perf_counter() - t0
        after = device_bytes()
        record[name] = {"before": dict(before), "after": dict(after), "peak": dict(peak), "buckets": buckets,
                        "seconds": seconds}
        return out

    record = {"total_bytes": sum(int(v.nbytes) for v in sd.values()),
              "largest_bytes": max(int(v.nbytes) for v in sd.values())}
    ecfg = engine_config.default_engine_config()
    ecfg.max_slots, ecfg.max_seq_len, ecfg.min_prefill_bucket, ecfg.mesh.tensor = 2, 16, 8, 2

    # -- building the engine: the weights streamed into its layout, then the engine around them
    local = measured("build", lambda: hosts.local_model(setup, params, sampling_shardings(config, ecfg),
                                                         bucket_bytes=engine_bucket))
    engine = JaxEngine(local, None, ecfg)
    del local

    # -- a weight sync to the engine: its weights dropped, the new ones streamed in
    def sync():
        engine.release_weights()
        state = hosts.engine_params(setup.merge(doubled), engine.weight_shardings, bucket_bytes=engine_bucket)
        engine.update_weights(state, 1)
    measured("engine_sync", sync)
    entries = {tuple(e.nnx): e for e in keymap.key_entries(config.replace(scan_layers=False))}
    got = {path_names(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(engine.params)[0]}
    record["engine_equal"] = sorted(got) == sorted(entries) and all(
        np.array_equal(got[k], 2 * e.to_nnx(sd[e.hf])) for k, e in entries.items())
    engine.close()
    del engine

    # -- the SGLang sync's export, then the final export (with a tokenizer file): bf16 both, as the
    # shipped configs export; the second runs the first's compiled rounds
    sync_dir = os.path.join(out, "sglang_weights", "weights_v1")
    measured("sglang_export", lambda: hosts.export_hf(setup.merge(params), sync_dir, dtype="bfloat16",
                                                      bucket_bytes=export_bucket, config=config))

    def tokenizer_file(d):
        with open(os.path.join(d, "tokenizer.json"), "w") as f:
            f.write("{}")
    final = measured("final_export", lambda: hosts.export_hf(setup.merge(params), os.path.join(out, "hf_export"),
                                                             dtype="bfloat16", bucket_bytes=export_bucket,
                                                             write_extra=tokenizer_file))
    record["final"] = final
    with open(os.path.join(out, f"record{rank}.json"), "w") as f:
        json.dump(record, f)
''')


def test_sync_export_and_engine_build_hold_one_bucket(tmp_path):
    env = {"ENGINE_BUCKET": str(BUCKETS["build"]), "EXPORT_BUCKET": str(BUCKETS["sglang_export"])}
    procs = launch_two_processes(tmp_path, WORKER, local_devices=4, extra_env=env)
    join_processes(procs, timeout_s=400)
    records = [json.loads((tmp_path / f"record{r}.json").read_text()) for r in range(2)]
    total, largest = records[0]["total_bytes"], records[0]["largest_bytes"]
    assert largest * 16 < total                          # no tensor is a large part of the whole
    for rank, r in enumerate(records):
        for phase, bucket in BUCKETS.items():
            m = r[phase]
            # Several buckets (rounds of the export), none over the limit, and a whole model (fp32,
            # the engine's; bf16, the export's) is several of them.
            assert len(m["buckets"]) >= 3 and max(m["buckets"]) <= bucket, (phase, m["buckets"])
            assert total // (1 if phase in ("build", "engine_sync") else 2) > 4 * bucket
            for d, peak in m["peak"].items():
                resident = max(m["before"][d], m["after"][d])
                assert peak <= resident + bucket + SLACK, (rank, phase, d, peak, resident)
        assert r["engine_equal"], rank
    assert records[0]["final"] == str(tmp_path / "hf_export")

    # The exports hold the weights bit for bit (bf16 rounded to nearest even, as numpy and torch
    # cast), in files of both processes, and the final one its extra file.
    sd = hf_io.random_state_dict(many_tensor_config(), seed=3)
    for sub in ("sglang_weights/weights_v1", "hf_export"):
        folder = tmp_path / sub
        index = json.loads((folder / hf_io.SAFE_INDEX).read_text())
        files = sorted(set(index["weight_map"].values()))
        assert len(files) >= 2 and sorted(index["weight_map"]) == sorted(sd)
        loaded = {}
        for name in files:
            loaded.update(load_file(str(folder / name)))
        for k, v in sd.items():
            want = v.astype(ml_dtypes.bfloat16)
            assert loaded[k].dtype == want.dtype and np.array_equal(loaded[k].view(np.uint8), want.view(np.uint8)), k
        assert json.loads((folder / hf_io.CONFIG).read_text())["model_type"] == "qwen3_vl"
    assert (tmp_path / "hf_export" / "tokenizer.json").exists()
    assert not list(tmp_path.glob("**/*.partial"))


# --- the plans, in-process -------------------------------------------------------------------------
def test_buckets_keep_order_and_stay_under_the_limit_but_for_a_larger_item():
    rng = np.random.default_rng()
    for _ in range(20):
        sizes = rng.integers(1, 100, int(rng.integers(0, 30))).tolist()
        limit = int(rng.integers(1, 150))
        buckets = weight_stream.plan_buckets(sizes, limit)
        assert [i for b in buckets for i in b] == list(range(len(sizes)))
        for b in buckets:
            assert b and (sum(sizes[i] for i in b) <= limit or len(b) == 1)
        for a, b in zip(buckets, buckets[1:]):     # a bucket closes only when the next item does not fit
            assert sum(sizes[i] for i in a) + sizes[b[0]] > limit
        assert weight_stream.plan_buckets(sizes, None) == ([list(range(len(sizes)))] if sizes else [])
    with pytest.raises(ValueError, match="positive"):
        weight_stream.plan_buckets([1], 0)


def test_a_round_is_planned_from_shapes_alone_and_holds_under_a_bucket_per_device():
    """What a plan phase does for an export (no array allocated): the rounds from abstract params
    on 8 devices, one round compiled, and its memory analysis: what a device receives and the
    temporaries of the all-to-all stay under the round's bucket."""
    from genevolve_jax.models.hf_sharded_export import plan_export
    from genevolve_jax.models.qwen3_vl.layer_layout import path_names
    from genevolve_jax.sharding.mesh import make_mesh

    config = many_tensor_config()
    model = hf_io.abstract_model(config, mesh=make_mesh({"fsdp": 4, "data": 2}), rules="fsdp")
    flat = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    where = {path_names(p): i for i, (p, _) in enumerate(flat)}
    sources = [x for _, x in flat]
    plan = plan_export(config, 1)
    pieces = [weight_stream.piece(sources, where[e.nnx], e.stack_index, ml_dtypes.bfloat16) for e in plan.entries]
    bucket = 96 * 1024
    rounds = weight_stream.owner_rounds(sources, pieces, plan.owners, bucket)
    sizes = weight_stream.bucket_bytes_of(pieces, bucket)
    assert len(rounds) == len(sizes) >= 4 and max(sizes) <= bucket
    biggest = max(range(len(rounds)), key=lambda r: sizes[r])
    rnd = rounds[biggest]
    mem = rnd.program().lower(*[sources[s] for s in rnd.sources]).compile().memory_analysis()
    assert mem.output_size_in_bytes + mem.temp_size_in_bytes <= sizes[biggest]
