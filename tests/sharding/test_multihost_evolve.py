"""Multi-host `genevolve train`: two real processes (jax.distributed on 127.0.0.1, planned from
SLURM-style variables as a SLURM job is, CPU collectives over gloo, two devices each) split each
step's prompts, roll out through host-local samplers, gather the samples, run the experience
stage on process 0 and train one state sharded (fsdp) over all four devices. The same global
prompts on one process with four devices must give the same rewards, losses and params. One two-process run shows it and is then preempted (a real SIGTERM to one process) and
resumed to the same losses as the one-process run. The same job also checks the collectives
themselves on ragged input (a process whose samples are all masked, a process with none), images
crossing hosts, and the host-local reshard."""
import json
import textwrap

import jax
import numpy as np
import pytest

from genevolve_jax.rollout.engine import RolloutEngine
from genevolve_jax.rollout.sglang_weights import WeightLagError
from genevolve_jax.sharding import multihost
from genevolve_jax.sharding.collective import SingleProcess
from genevolve_jax.train.rl.records import IMAGE_UNREADABLE, RolloutSample
from tests.fixtures.multiprocess import WORKER_PRELUDE, join_processes, launch_two_processes

HEADER = WORKER_PRELUDE + textwrap.dedent('''
    import hashlib
    from jax.sharding import NamedSharding, PartitionSpec
    from PIL import Image
    from genevolve_jax.sharding import multihost
    from genevolve_jax.sharding.mesh import make_mesh
    from genevolve_jax.train.rl.records import RolloutSample

    out_dir = out
    assert plan.mode == "slurm", plan
    assert jax.process_count() == 2 and len(jax.local_devices()) == int(os.environ["LOCAL_DEVICES"])
    rng = np.random.default_rng(100 + rank)

''')

GATHER_WORKER = HEADER + textwrap.dedent('''
    # -- gather on ragged input: process 0 has 5 samples of random lengths over global groups 0 and 2,
    # process 1 has 3 of group 1, masked or masked on the way (one with an image only it can read, one
    # valid with a missing image, which its owner masks); then process 1 sends nothing at all.
    def sample(sid, group, valid=True, images=()):
        n = int(rng.integers(3, 40))
        return RolloutSample(sid, group, rng.integers(1, 60, n).tolist(), [0] + [1] * (n - 1),
                             (-rng.random(n)).tolist(), float(rng.random()) if valid else None, valid,
                             "" if valid else "error", prompt_length=1, images=list(images))
    if rank == 0:
        mine = [sample(f"a{i}", g) for i, g in enumerate([0, 0, 2, 2, 2])]
    else:
        pixels = rng.integers(0, 255, (6, 5, 3), dtype=np.uint8)
        path = os.path.join(out_dir, "only_on_1.png")
        Image.fromarray(pixels).save(path)
        np.save(os.path.join(out_dir, "pixels.npy"), pixels)
        mine = [sample("b0", 1, False, [path]), sample("b1", 1, True, [path + ".missing"]), sample("b2", 1, False)]
    # Through host memory only: with every transfer to a device refused, and no array left behind.
    hosts = multihost.MultiProcess()
    multihost.host_exchange()    # set up (its one bootstrap broadcast of a few bytes uses jax's collectives)
    hosts.exchange_metrics()
    ready = multihost.portable_samples(mine)
    blob = rng.bytes(int(rng.integers(1, 3 << 20)))           # up to 3 MiB, a different size per process
    live_before, moved_before = len(jax.live_arrays()), multihost.host_exchange().moved_bytes
    with jax.transfer_guard("disallow_explicit"):
        got, payloads = multihost.gather_samples(ready, {"rank": rank, "n": len(mine)})
        none, payloads2 = multihost.gather_samples(mine if rank == 0 else [], rank)
        big = {"x": np.random.default_rng(7).integers(0, 9, 100000).tolist(), "s": "é" * 5000} if rank == 0 else None
        bcast = multihost.broadcast_object(big)
        blobs = multihost.allgather_objects(blob)
        agreed = [hosts.any_process(rank == 1), hosts.all_processes(rank == 1), hosts.all_processes(True)]
        hosts.barrier("gathered")
    moved = multihost.host_exchange().moved_bytes - moved_before
    host_memory = {"live_arrays_added": len(jax.live_arrays()) - live_before, "moved": moved,
                   "metric": hosts.exchange_metrics()["multihost/gathered_bytes"],
                   "blob_sizes": [len(b) for b in blobs], "agreed": agreed,
                   "blob_mine_ok": blobs[rank] == blob, "blob_sha": [hashlib.sha256(b).hexdigest() for b in blobs]}
    if rank == 1:
        os.remove(path)          # process 0 must hold the pixels, not the path
    first_image = next(s.images[0] for s in got if s.sample_id == "b0")

    # -- host_local_params: an array fsdp-sharded over all 4 devices → on each host, a replicated copy
    # on its first device, and a copy split over its 2 devices (columns over "tensor").
    mesh = make_mesh({"fsdp": 4})
    value = np.arange(8 * 6, dtype=np.float32).reshape(8, 6) / 7.0
    glob = jax.make_array_from_callback(value.shape, NamedSharding(mesh, PartitionSpec("fsdp")), lambda i: value[i])
    one = multihost.local_mesh()
    two = multihost.local_mesh({"tensor": 2})
    split = NamedSharding(two, PartitionSpec(None, "tensor"))
    rep = NamedSharding(one, PartitionSpec())
    local = multihost.host_local_params({"w": glob, "b": glob[0] * 2, "t": glob}, {"w": rep, "b": rep, "t": split})
    t = local["t"]
    split_ok = (t.is_fully_addressable and t.sharding == split and np.array_equal(np.asarray(t), value)
                and sorted((s.device.id, s.data.shape, s.index[1].start) for s in t.addressable_shards)
                == sorted((d.id, (8, 3), 3 * k) for k, d in enumerate(two.devices.reshape(-1))))

    record = {"ids": [s.sample_id for s in got], "groups": [s.group for s in got],
              "lens": [len(s.token_ids) for s in got], "valid": [s.valid for s in got],
              "reasons": [s.mask_reason for s in got], "payloads": payloads,
              "image_equal": bool(np.array_equal(np.asarray(first_image),
                                                 np.load(os.path.join(out_dir, "pixels.npy")))),
              "ids_when_empty": [s.sample_id for s in none], "payloads2": payloads2,
              "bcast_ok": bcast == {"x": np.random.default_rng(7).integers(0, 9, 100000).tolist(), "s": "é" * 5000},
              "local_ok": bool(np.array_equal(np.asarray(local["w"]), value) and local["w"].is_fully_addressable
                               and np.array_equal(np.asarray(local["b"]), value[0] * 2) and split_ok),
              "host_memory": host_memory}

    # -- SGLang on two hosts: each process has its own stand-in server, and rl.sglang.urls lists both.
    # Process 1's server refuses every reload; process 0 pushes for both (Collective.sync_engine).
    from flax import nnx
    from genevolve_jax.models.hf_io import model_from_state_dict, random_state_dict
    from genevolve_jax.models.qwen3_vl.config import tiny
    from genevolve_jax.rollout.engine import GenerationRequest, SamplingParams
    from genevolve_jax.rollout.sglang_engine import SGLangEngine, WeightLagError
    from tests.fixtures.sglang_fake import FakeBehaviour, running_fake_sglang

    class Unrebuildable(Exception):
        """Pickles, but cannot be rebuilt from its args: its type and message must travel instead."""

        def __init__(self, what, where):
            super().__init__(f"{what} at {where}")

    class InjectedFailure(RuntimeError):
        pass

    def fail(exc):
        raise exc

    with running_fake_sglang(FakeBehaviour(refuse_reloads=10**6 if rank == 1 else 0)) as (url, server_log):
        urls = multihost.allgather_objects(url)
        model_cfg = tiny()
        params = nnx.state(model_from_state_dict(model_cfg, random_state_dict(model_cfg, seed=3)), nnx.Param) \
            if rank == 0 else None      # only the writer exports
        engine = SGLangEngine(urls, timeout_s=30, retries=0, backoff_s=0.01, model_config=model_cfg,
                              weights_dir=os.path.join(out_dir, "weights"), export_dtype="float32",
                              max_weight_lag_steps=2)
        lags = []
        for step in (1, 2):
            m = hosts.sync_engine(engine, lambda: engine.update_weights(params, step))
            lags.append([m["sglang/weight_version_lag"], m["sglang/servers_behind"]])
        picks = sorted({engine.pick_server() for _ in range(64)})
        results = engine.generate([GenerationRequest([3, rank, i], SamplingParams(max_new_tokens=2))
                                   for i in range(8)])
        hosts.barrier("rolled out")
        sglang = {"urls": urls, "lags": lags, "picks": picks, "table": engine.weight_sync_state(),
                  "served": len(server_log.generate_bodies), "finished": [r.finish_reason for r in results]}
        # Past rl.sglang.max_weight_lag_steps the push raises on process 0: every process raises it.
        try:
            hosts.sync_engine(engine, lambda: engine.update_weights(params, 3))
            sglang["lag_error"] = None
        except WeightLagError as exc:
            sglang["lag_error"] = [type(exc).__name__, str(exc)]
        try:
            hosts.on_writer(lambda: fail(Unrebuildable("a failed export", "step 3")))
        except Exception as exc:
            sglang["unrebuildable"] = [type(exc).__name__, str(exc)]
        record["sglang"] = sglang
        with open(os.path.join(out_dir, f"record{rank}.json"), "w") as f:
            json.dump(record, f)
        # Last, an exception injected into the writer's action, left uncaught: both processes must
        # exit non-zero with its message.
        hosts.on_writer(lambda: fail(InjectedFailure(f"injected into the writer's action {out_dir}")))
        print("process", rank, "went on after the writer failed")
''')

PREEMPTED_WORKER = HEADER + textwrap.dedent('''
    # -- the toy evolve run (GRPO + SDL, guides from process 0's experience stage), fsdp over both
    # processes, preempted and resumed. PHASE=first: process 1 sends itself a real SIGTERM in the
    # middle of step 2; both must stop after that step, save it and exit 0. PHASE=resume: the same
    # command resumes from that checkpoint and runs to step 4. Each phase records its metrics and
    # the whole trained state (gathered from both processes) where it ends.
    import signal, types
    from genevolve_jax.train.rl.trainer import EvolveTrainer
    from genevolve_jax.train.runtime.preemption import RunStopped
    from tests.fixtures.toy_task import (TOY_GUIDE, TOY_PROMPTS, TOY_TARGETS, CyclingPrompts,
                                         FixedGuideExperience, TokenChoicePhase, toy_model, toy_run_config)
    import threading
    phase = os.environ["PHASE"]
    cfg = toy_run_config(os.path.join(out_dir, "run"), lr=1e-2, sdl=2.0, kl=1e-3, steps=4, save_every=100,
                         mesh={"fsdp": 4})
    cfg.loss.sdl.topk_frac = 1.0
    cfg.rl.max_staleness = 1 if phase == "stale" else 0      # PHASE=stale: asynchronous, one step off
    collected = []

    class Phase(TokenChoicePhase):
        def collect(self, step, prompts, group_ids):
            if phase == "first" and rank == 1 and step == 2:
                os.kill(os.getpid(), signal.SIGTERM)      # mid-step: the rollouts are still to come
            collected.append({"step": step, "prompts": [list(p) for p in prompts], "groups": list(group_ids),
                              "thread": threading.current_thread().name})
            return super().collect(step, prompts, group_ids)

    trainer = EvolveTrainer(
        cfg, model=toy_model(), tokenizer=types.SimpleNamespace(pad_token_id=0),
        rollout_phase=lambda t: Phase(t.engine, cfg.rl.group_size, TOY_TARGETS, guide_ids=TOY_GUIDE),
        prompt_source=CyclingPrompts(TOY_PROMPTS, cfg.data.rl.prompts_per_step, shard_index=rank, shard_count=2),
        experience=FixedGuideExperience(), progress=False)
    record = {"start_step": trainer.step}
    try:
        trainer.run()
        record["stopped"] = None
    except RunStopped as stop:
        record["stopped"] = {"step": stop.step, "exit_code": stop.exit_code, "message": stop.message}
    history = trainer.logger.history
    record["losses"] = list(trainer.losses)
    record["rewards"] = [h["reward/mean"] for h in history]
    record["sdl"] = [h["sdl/loss"] for h in history]
    record["retrieved"] = [h["experience/retrieved"] for h in history]
    record["gathered_bytes"] = [h["multihost/gathered_bytes"] for h in history]
    record["memory"] = trainer.experience.state_dict()
    record["engine_processes"] = sorted({d.process_index for d in trainer.engine.mesh.devices.flat})
    record["checkpoints"] = trainer.ckpt.all_steps()
    record["collected"] = collected
    record["staleness_max"] = [h.get("rollout/staleness_max", 0.0) for h in history]
    record["dropped_stale"] = [h.get("rollout/dropped_stale", 0.0) for h in history]
    full = multihost_utils.process_allgather(trainer.params, tiled=True)
    trainer.close()
    np.savez(os.path.join(out_dir, f"params_{phase}{rank}.npz"), *[np.asarray(x) for x in jax.tree.leaves(full)])
    record["threads_after_close"] = sorted(t.name for t in threading.enumerate() if t.name == "rollout-producer")
    with open(os.path.join(out_dir, f"record{rank}.json"), "w") as f:
        json.dump(record, f)
''')


def _finish(out, procs) -> list[dict]:
    join_processes(procs, timeout_s=400)
    return [json.loads((out / f"record{r}.json").read_text()) for r in range(2)]


def test_two_processes_gather_through_host_memory_and_share_sglang_state(tmp_path):
    """One launch of two processes (2 CPU devices each) checks the collectives:

    - gathers on ragged input (a process whose samples are all masked, a process with none),
      images crossing hosts, a broadcast, 3 MiB objects, flags and a barrier, all under
      ``jax.transfer_guard("disallow_explicit")`` (nothing goes to a device) and leaving no array behind;
      ``multihost/gathered_bytes`` counts the bytes, the same on both processes;
    - the host-local reshard;
    - SGLang on two hosts, a stand-in server each, process 1's refusing reloads: both processes
      hold the same version table, report the same lag, and send it no rollouts; past the lag limit
      both raise the same WeightLagError; an exception that cannot be rebuilt arrives as its type
      and message; an exception injected into the writer's action ends both processes non-zero
      with its message (the join's timeout only stops a hang)."""
    procs = launch_two_processes(tmp_path, GATHER_WORKER, local_devices=2)
    logs = join_processes(procs, timeout_s=120, check=False)
    r0, r1 = [json.loads((tmp_path / f"record{r}.json").read_text()) for r in range(2)]
    for r in (r0, r1):
        # Ordered by global group; within a group, rollout order; process 1's masked samples kept.
        assert r["ids"] == ["a0", "a1", "b0", "b1", "b2", "a2", "a3", "a4"]
        assert r["groups"] == [0, 0, 1, 1, 1, 2, 2, 2]
        assert r["valid"] == [True, True, False, False, False, True, True, True]
        assert r["payloads"] == [{"rank": 0, "n": 5}, {"rank": 1, "n": 3}]
        assert r["ids_when_empty"] == ["a0", "a1", "a2", "a3", "a4"] and r["payloads2"] == [0, 1]
        assert r["image_equal"] and r["bcast_ok"] and r["local_ok"]
    assert r0["lens"] == r1["lens"] and len(set(r0["lens"])) > 2
    # The missing image was masked by its owner, so every process assembles the same batch.
    assert r0["reasons"][3] == r1["reasons"][3] and r0["reasons"][3].startswith(IMAGE_UNREADABLE)

    # -- through host memory --------------------------------------------------------------------------
    h0, h1 = r0["host_memory"], r1["host_memory"]
    for h in (h0, h1):
        assert h["live_arrays_added"] == 0 and h["blob_mine_ok"]
        assert h["agreed"] == [True, False, True]
        assert h["metric"] == h["moved"] > sum(h["blob_sizes"])     # the blobs and everything else gathered
    assert h0["blob_sha"] == h1["blob_sha"] and h0["moved"] == h1["moved"]

    # -- SGLang on two hosts ----------------------------------------------------------------------------
    s0, s1 = r0["sglang"], r1["sglang"]
    url0, url1 = s0["urls"]
    assert s1["urls"] == [url0, url1]
    assert s0["lags"] == s1["lags"] == [[1.0, 1.0], [2.0, 1.0]]      # the same lag, reported on both
    assert s0["picks"] == s1["picks"] == [url0]                       # neither sends to the server behind
    assert s0["finished"] == s1["finished"] == ["length"] * 8
    assert s0["served"] == 16 and s1["served"] == 0                   # both processes' rollouts went to process 0's
    assert s0["table"] == s1["table"] and s0["table"]["servers"][url1]["held"] is None
    assert s0["lag_error"][0] == s1["lag_error"][0] == "WeightLagError"
    assert s0["lag_error"][1] == s1["lag_error"][1] and url1 in s1["lag_error"][1]
    assert s0["unrebuildable"] == ["Unrebuildable", "a failed export at step 3"]
    assert s1["unrebuildable"] == ["WriterActionError", "__main__.Unrebuildable: a failed export at step 3"]
    # The injected failure: both exit non-zero, with its message, and neither went on.
    for p, log in zip(procs, logs):
        assert p.returncode != 0, log[-3000:]
        assert f"InjectedFailure: injected into the writer's action {tmp_path}" in log, log[-3000:]
        assert "went on after the writer failed" not in log


# --- pure pieces, in-process ------------------------------------------------------------------------
def _s(sid, group, n=4):
    return RolloutSample(sid, group, list(range(1, n + 1)), [0] + [1] * (n - 1), [0.0] * n, 0.5)


def test_global_group_ids_invert_the_strided_host_shard():
    rng = np.random.default_rng(5)
    for n in (1, 2, 3, 4):
        per_host = int(rng.integers(1, 5))
        step = list(range(100, 100 + n * per_host))            # the step's global prompts, in order
        seen = {}
        for i in range(n):
            local = step[i::n]                                  # data/rows.py shard: i, i+n, ...
            for g, gid in enumerate(SingleProcess().group_ids(len(local), (i, n))):
                seen[gid] = local[g]
        assert [seen[k] for k in range(len(step))] == step


def test_order_samples_is_stable_within_groups():
    a = [_s("p0g0k0", 0), _s("p0g0k1", 0), _s("p0g2k0", 2), _s("p0g2k1", 2)]
    b = [_s("p1g1k0", 1), _s("p1g1k1", 1), _s("p1g3k0", 3), _s("p1g3k1", 3)]
    got = [s.sample_id for s in multihost.order_samples([a, [], b])]
    assert got == ["p0g0k0", "p0g0k1", "p1g1k0", "p1g1k1", "p0g2k0", "p0g2k1", "p1g3k0", "p1g3k1"]


def test_merge_rollout_infos():
    infos = [{"time/rollout_s": 2.0, "masked_reasons": {"error": 1}, "reward_dims": {"reward/r_img": 0.2}},
             {"time/rollout_s": 3.5, "masked_reasons": {"error": 2, "too_long": 1},
              "reward_dims": {"reward/r_img": 0.8, "reward/r_text": 0.5}}]
    got = multihost.merge_rollout_infos(infos, [1, 3])
    assert got["time/rollout_s"] == 3.5
    assert got["masked_reasons"] == {"error": 3, "too_long": 1}
    assert got["reward_dims"] == pytest.approx({"reward/r_img": (0.2 + 3 * 0.8) / 4, "reward/r_text": 0.5})


class _PushEngine(RolloutEngine):
    """An engine that serves every host and records its pushes (what Collective.sync_engine drives)."""

    def __init__(self, fail: Exception | None = None):
        self.pushed, self.adopted, self.fail = [], [], fail

    def generate(self, requests):
        return []

    def update_weights(self, params, step):
        self.pushed.append(step)
        if self.fail is not None:
            raise self.fail
        return {"sglang/weight_version_lag": float(step % 3)}

    @property
    def serves_every_host(self):
        return True

    def weight_sync_state(self):
        return {"pushed": list(self.pushed)}

    def adopt_weight_sync_state(self, state):
        self.adopted.append(state)


@pytest.mark.parametrize("collective", [SingleProcess(), multihost.MultiProcess()], ids=["single", "multi"])
def test_a_writer_only_action_raises_its_own_exception_and_a_push_returns_its_metrics(collective):
    """One process is the writer: a push runs once, adopts nothing, returns the engine's metrics;
    an exception inside a writer-only action or a push comes out as itself (class and message)."""
    step = int(np.random.default_rng().integers(1, 100))
    engine = _PushEngine()
    pushed = collective.sync_engine(engine, lambda: engine.update_weights(None, step))
    assert pushed == {"sglang/weight_version_lag": float(step % 3)}
    assert engine.pushed == [step] and engine.adopted == []
    lagging = _PushEngine(WeightLagError(f"server behind at step {step}"))
    with pytest.raises(WeightLagError, match=f"^server behind at step {step}$"):
        collective.sync_engine(lagging, lambda: lagging.update_weights(None, step))
    with pytest.raises(KeyError, match="no such export"):
        collective.on_writer(lambda: {}["no such export"])
    assert collective.on_writer_shared(lambda: step, adopt=lambda out: pytest.fail("the writer adopts")) == step


def test_a_single_process_reads_every_prompt():
    SingleProcess().check_prompt_shard((0, 1), "data.sharding")
    with pytest.raises(ValueError, match="data.sharding: a one-process run reads every prompt"):
        SingleProcess().check_prompt_shard((1, 2), "data.sharding")


def test_cycling_prompts_shards_rebuild_the_global_batches():
    from tests.fixtures.toy_task import CyclingPrompts
    prompts = [[i] for i in range(7)]
    whole = CyclingPrompts(prompts, 4)
    shards = [CyclingPrompts(prompts, 4, shard_index=i, shard_count=2) for i in range(2)]
    for _ in range(3):
        step = next(whole)
        rebuilt = {}
        for i, sh in enumerate(shards):
            for gid, p in zip(SingleProcess().group_ids(2, (i, 2)), next(sh)):
                rebuilt[gid] = p
        assert [rebuilt[k] for k in range(4)] == step
    assert shards[0].get_state() == shards[1].get_state() == whole.get_state()
    with pytest.raises(ValueError, match="evenly"):
        CyclingPrompts(prompts, 3, shard_index=0, shard_count=2)


def test_portable_samples_carry_image_bytes(tmp_path):
    import dataclasses
    import pickle

    from PIL import Image
    pixels = np.random.default_rng(2).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    path = tmp_path / "ref.png"
    Image.fromarray(pixels).save(path)
    render = tmp_path / "out.png"
    render.write_bytes(b"\x89PNG-rendered")
    s = dataclasses.replace(_s("x", 0), images=[str(path)], extra={"image_path": str(render)})
    t = dataclasses.replace(_s("y", 0), images=[str(tmp_path / "gone.png")])
    sent = pickle.dumps(multihost.portable_samples([s, t], embed_rendered=True))
    path.unlink()
    got_s, got_t = pickle.loads(sent)
    np.testing.assert_array_equal(np.asarray(got_s.images[0]), pixels)
    assert got_s.extra["image_bytes"] == (".png", b"\x89PNG-rendered") and got_s.valid
    assert not got_t.valid and got_t.mask_reason.startswith(IMAGE_UNREADABLE) and "gone.png" in got_t.mask_reason
    assert s.images == [str(path)] and "image_bytes" not in s.extra      # the caller's records are unchanged


@pytest.mark.parametrize("scan", [False, True])
def test_host_local_engine_params_and_weight_sync(scan):
    """What a multi-host run does for its engine, on 8 in-process devices: the fsdp-sharded train
    params go to a JaxEngine on this host's devices (tensor-parallel over 2) in one reshard, and
    after a sync the engine samples with the new values: its recorded log-probs equal the
    model's own on the new params. ``scan``: the trainer holds its layers stacked (tpu_pod); the
    reshard lays them out as the engine's list."""
    from genevolve_jax.models.qwen3_vl.layer_layout import with_layer_layout
    from genevolve_jax.rollout.engine import GenerationRequest, SamplingParams
    from genevolve_jax.rollout.jax_engine import JaxEngine
    from genevolve_jax.sharding.mesh import make_mesh
    from genevolve_jax.train.runtime.state import create_train_state
    from tests.fixtures.toy_task import toy_model, toy_run_config

    cfg = toy_run_config("unused", mesh={"fsdp": -1})
    cfg.engine.mesh.tensor = 2
    cfg.engine.max_seq_len, cfg.engine.max_slots, cfg.engine.min_prefill_bucket = 64, 2, 16
    model = with_layer_layout(toy_model(), scan_layers=scan)
    setup, params, _ = create_train_state(model, cfg.train, make_mesh({"fsdp": -1}), "fsdp",
                                          total_steps=int(cfg.rl.num_steps))
    hosts = multihost.MultiProcess()
    engine = JaxEngine(hosts.local_model(setup, params), None, cfg.engine)
    try:
        assert {len(sh.device_set) for sh in jax.tree.leaves(engine.weight_shardings)} == {2}
        rng = np.random.default_rng(4)
        scaled = jax.tree.map(lambda x: _scaled(x, rng), params)
        state = hosts.engine_params(setup.merge(scaled), engine.weight_shardings)
        assert all(x.is_fully_addressable and x.sharding == sh
                   for x, sh in zip(jax.tree.leaves(state), jax.tree.leaves(engine.weight_shardings)))
        engine.update_weights(state, 1)
        prompt = [1, 2, 3, 4]
        res = engine.generate([GenerationRequest(prompt, SamplingParams(max_new_tokens=3, temperature=1.0,
                                                                        top_p=1.0, seed=0))])[0]
        ids = np.asarray([prompt + list(res.token_ids)], np.int32)
        logits = np.asarray(setup.merge(jax.device_get(scaled))(ids), np.float64)[0]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        want = [logp[len(prompt) - 1 + i, t] for i, t in enumerate(res.token_ids)]
        np.testing.assert_allclose(res.logprobs, want, atol=1e-4)
        assert engine.weight_version == 1
    finally:
        engine.close()


def _scaled(x, rng):
    """x · a random factor, keeping x's sharding (a fresh array, as a train step would make)."""
    return jax.jit(lambda v: v * np.float32(rng.uniform(0.5, 1.5)), out_shardings=x.sharding)(x)


@pytest.mark.slow
def test_two_processes_equal_one_then_resume_after_sigterm_to_its_losses(tmp_path):
    """One toy evolve run over two processes of two devices each, fsdp over all four, against the
    same run on one process with four devices:

    - steps 1 and 2 give the same rewards, losses and SDL losses, guides from process 0 reach
      every sample, process 1 holds process 0's experience memory, each host samples on its own
      devices, and the trained params after step 2 are the one-process run's;
    - a real SIGTERM to process 1 in the middle of step 2: both processes finish that step, agree,
      save it and exit 0 (process 0 on process 1's signal);
    - the same command resumes both from step 2, and the losses of all four steps are the
      one-process run's."""
    from tests.fixtures.toy_task import (
        FixedGuideExperience,
        toy_run_config,
        toy_trainer,
    )

    procs = launch_two_processes(tmp_path, PREEMPTED_WORKER, local_devices=2, extra_env={"PHASE": "first"})
    try:  # the one-process reference runs while the workers compile
        cfg = toy_run_config(str(tmp_path / "single"), lr=1e-2, sdl=2.0, kl=1e-3, steps=4, save_every=100,
                             mesh={"fsdp": 4})
        cfg.loss.sdl.topk_frac = 1.0
        trainer = toy_trainer(cfg, experience=FixedGuideExperience(), devices=jax.devices()[:4])
        try:
            start = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(trainer.params))]
            history = [trainer.train_one_step() for _ in range(2)]
            at_step_2 = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(trainer.params))]
            memory_at_step_2 = trainer.experience.state_dict()
            history += [trainer.train_one_step() for _ in range(2)]
        finally:
            trainer.close()
    finally:
        first = _finish(tmp_path, procs)

    # -- two processes, steps 1 and 2, as one process ----------------------------------------------
    for r in first:
        assert r["rewards"] == pytest.approx([h["reward/mean"] for h in history[:2]], abs=1e-6)
        np.testing.assert_allclose(r["losses"], [h["loss"] for h in history[:2]], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r["sdl"], [h["sdl/loss"] for h in history[:2]], rtol=1e-5, atol=1e-6)
        assert r["retrieved"] == [16, 16]            # guides from process 0 reached every sample
        assert all(b > 1000 for b in r["gathered_bytes"])   # each step's rollouts crossed, and were counted
        assert r["memory"] == memory_at_step_2 == {"updates": 2}  # process 1 holds process 0's memory
    assert first[0]["engine_processes"] == [0] and first[1]["engine_processes"] == [1]  # host-local samplers
    got = np.load(tmp_path / "params_first0.npz")
    assert len(got.files) == len(at_step_2)
    for i, x in enumerate(at_step_2):
        np.testing.assert_allclose(got[f"arr_{i}"], x, rtol=0, atol=1e-5)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(at_step_2, start))
    assert moved > 1e-4                              # the steps trained: the comparison is not vacuous

    # -- ... preempted in step 2 by a SIGTERM to process 1 -------------------------------------------
    for r in first:
        assert r["stopped"]["step"] == 2 and r["stopped"]["exit_code"] == 0, r["stopped"]
        assert "saved checkpoint step 2" in r["stopped"]["message"] and r["checkpoints"] == [2]
    assert "SIGTERM" in first[1]["stopped"]["message"]        # process 0 stopped on process 1's signal

    # -- ... and resumed by the same command to the one-process losses -----------------------------
    for rank in range(2):
        (tmp_path / f"record{rank}.json").unlink()
    resumed = _finish(tmp_path, launch_two_processes(tmp_path, PREEMPTED_WORKER, local_devices=2,
                                                      extra_env={"PHASE": "resume"}))
    for r in resumed:
        assert r["start_step"] == 2 and r["stopped"] is None and 4 in r["checkpoints"]
        np.testing.assert_allclose(r["losses"], [h["loss"] for h in history], rtol=1e-5, atol=1e-6)


def test_two_processes_train_one_step_off_policy(tmp_path):
    """The toy evolve run of the test above at ``rl.max_staleness=1`` over two processes: each
    process's producer thread rolls out its own shard of the data order (steps 1 to 4, each once and
    in order, on the producer thread, not the trainer's), the trainer thread hands the rollouts to
    every process through the Collective, both train the same sharded state on every sample
    (nothing dropped; the policy at most one version behind, and some step one behind), and the run
    ends with no producer thread left."""
    from tests.fixtures.toy_task import TOY_PROMPTS, CyclingPrompts, toy_run_config

    runs = _finish(tmp_path, launch_two_processes(tmp_path, PREEMPTED_WORKER, local_devices=2,
                                                  extra_env={"PHASE": "stale"}))
    per_step = toy_run_config(str(tmp_path / "unused"), steps=4).data.rl.prompts_per_step
    for rank, r in enumerate(runs):
        assert r["stopped"] is None and len(r["losses"]) == 4 and all(np.isfinite(r["losses"]))
        shard = CyclingPrompts(TOY_PROMPTS, per_step, shard_index=rank, shard_count=2)
        assert [c["step"] for c in r["collected"]] == [1, 2, 3, 4]
        assert [c["prompts"] for c in r["collected"]] == [next(shard) for _ in range(4)]
        assert {c["thread"] for c in r["collected"]} == {"rollout-producer"}
        assert [c["groups"] for c in r["collected"]][0] == list(range(rank, per_step, 2))
        assert r["retrieved"] == [16] * 4 and all(b > 1000 for b in r["gathered_bytes"])
        assert max(r["staleness_max"]) == 1.0 and r["dropped_stale"] == [0.0] * 4
        assert r["threads_after_close"] == []
    assert runs[0]["losses"] == runs[1]["losses"] and runs[0]["rewards"] == runs[1]["rewards"]
    a, b = np.load(tmp_path / "params_stale0.npz"), np.load(tmp_path / "params_stale1.npz")
    assert all(np.array_equal(a[k], b[k]) for k in a.files)
