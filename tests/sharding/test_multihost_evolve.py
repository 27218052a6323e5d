"""Multi-host `genevolve train`: two real processes (jax.distributed on 127.0.0.1, CPU collectives
over gloo, one device each) split each step's prompts, roll out through host-local samplers,
gather the samples, run the experience stage on process 0 and train one fsdp-sharded state. The
same global prompts on one process with two devices must give the same rewards, losses and
params. One two-process run shows it and is then preempted (a real SIGTERM to one process) and
resumed to the same losses as the one-process run. The same job also checks the collectives
themselves on ragged input (a process whose samples are all masked, a process with none), images
crossing hosts, and the host-local reshard."""
import json
import textwrap

import jax
import numpy as np
import pytest

from genevolve_jax.sharding import multihost
from genevolve_jax.sharding.collective import SingleProcess
from genevolve_jax.train.rl.records import IMAGE_UNREADABLE, RolloutSample
from tests.fixtures.multiprocess import WORKER_PRELUDE, join_processes, launch_two_processes

HEADER = WORKER_PRELUDE + textwrap.dedent('''
    from jax.sharding import NamedSharding, PartitionSpec
    from PIL import Image
    from genevolve_jax.sharding import multihost
    from genevolve_jax.sharding.mesh import make_mesh
    from genevolve_jax.train.rl.records import RolloutSample

    out_dir = out
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
    got, payloads = multihost.gather_samples(multihost.portable_samples(mine), {"rank": rank, "n": len(mine)})
    if rank == 1:
        os.remove(path)          # process 0 must hold the pixels, not the path
    first_image = next(s.images[0] for s in got if s.sample_id == "b0")
    none, payloads2 = multihost.gather_samples(mine if rank == 0 else [], rank)
    big = {"x": np.random.default_rng(7).integers(0, 9, 100000).tolist(), "s": "é" * 5000} if rank == 0 else None
    bcast = multihost.broadcast_object(big)

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
                               and np.array_equal(np.asarray(local["b"]), value[0] * 2) and split_ok)}

    with open(os.path.join(out_dir, f"record{rank}.json"), "w") as f:
        json.dump(record, f)
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
    phase = os.environ["PHASE"]
    cfg = toy_run_config(os.path.join(out_dir, "run"), lr=1e-2, sdl=2.0, kl=1e-3, steps=4, save_every=100,
                         mesh={"fsdp": 2})
    cfg.loss.sdl.topk_frac = 1.0

    class Phase(TokenChoicePhase):
        def collect(self, step, prompts, group_ids):
            if phase == "first" and rank == 1 and step == 2:
                os.kill(os.getpid(), signal.SIGTERM)      # mid-step: the rollouts are still to come
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
    record["memory"] = trainer.experience.state_dict()
    record["engine_processes"] = sorted(d.process_index for d in trainer.engine.mesh.devices.flat)
    record["checkpoints"] = trainer.ckpt.all_steps()
    full = multihost_utils.process_allgather(trainer.params, tiled=True)
    trainer.close()
    np.savez(os.path.join(out_dir, f"params_{phase}{rank}.npz"), *[np.asarray(x) for x in jax.tree.leaves(full)])
    with open(os.path.join(out_dir, f"record{rank}.json"), "w") as f:
        json.dump(record, f)
''')


def _finish(out, procs) -> list[dict]:
    join_processes(procs, timeout_s=400)
    return [json.loads((out / f"record{r}.json").read_text()) for r in range(2)]


def test_gather_and_broadcast_on_ragged_input(tmp_path):
    r0, r1 = _finish(tmp_path, launch_two_processes(tmp_path, GATHER_WORKER, local_devices=2))
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
    """One toy evolve run over two processes against the same run on one process with two devices:

    - steps 1 and 2 give the same rewards, losses and SDL losses, guides from process 0 reach
      every sample, process 1 holds process 0's experience memory, each host samples on its own
      device, and the trained params after step 2 are the one-process run's;
    - a real SIGTERM to process 1 in the middle of step 2: both processes finish that step, agree,
      save it and exit 0 (process 0 on process 1's signal);
    - the same command resumes both from step 2, and the losses of all four steps are the
      one-process run's."""
    from tests.fixtures.toy_task import (
        FixedGuideExperience,
        toy_run_config,
        toy_trainer,
    )

    procs = launch_two_processes(tmp_path, PREEMPTED_WORKER, extra_env={"PHASE": "first"})
    try:  # the one-process reference runs while the workers compile
        cfg = toy_run_config(str(tmp_path / "single"), lr=1e-2, sdl=2.0, kl=1e-3, steps=4, save_every=100,
                             mesh={"fsdp": 2})
        cfg.loss.sdl.topk_frac = 1.0
        trainer = toy_trainer(cfg, experience=FixedGuideExperience(), devices=jax.devices()[:2])
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
    resumed = _finish(tmp_path, launch_two_processes(tmp_path, PREEMPTED_WORKER, extra_env={"PHASE": "resume"}))
    for r in resumed:
        assert r["start_step"] == 2 and r["stopped"] is None and 4 in r["checkpoints"]
        np.testing.assert_allclose(r["losses"], [h["loss"] for h in history], rtol=1e-5, atol=1e-6)
