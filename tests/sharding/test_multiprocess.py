"""A real two-process run: two processes on this machine join through ``jax.distributed`` on
127.0.0.1 (CPU collectives over gloo), planned from SLURM-style environment variables exactly as
a SLURM job would be, and run the fsdp train step over a mesh spanning both. Loss and updated
parameters must equal the single-process step."""
import textwrap

import jax
import numpy as np
import pytest

from tests.fixtures.multiprocess import join_processes, launch_two_processes

COMMON = textwrap.dedent('''
    import dataclasses
    import numpy as np
    import jax
    from flax import nnx
    from genevolve_jax.data.packing import Trajectory, pack
    from genevolve_jax.models.qwen3_vl.config import tiny
    from genevolve_jax.models.qwen3_vl.model import Qwen3VLForConditionalGeneration
    from genevolve_jax.sharding.mesh import make_mesh
    from genevolve_jax.train.losses.step_losses import SFTLoss
    from genevolve_jax.train.runtime import step_config
    from genevolve_jax.train.runtime.state import create_train_state, is_vision_path
    from genevolve_jax.train.runtime.step import TrainStep

    FAST = {"xla_backend_optimization_level": 0}

    def build():
        cfg = tiny()
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=1),
                          vision=dataclasses.replace(cfg.vision, depth=1, deepstack_visual_indexes=(0,)))
        make = lambda: Qwen3VLForConditionalGeneration(cfg, rngs=nnx.Rngs(11))
        graphdef, _ = nnx.split(nnx.eval_shape(make))
        model = nnx.merge(graphdef, jax.jit(lambda: nnx.split(make())[1], compiler_options=FAST)())
        rng = np.random.default_rng(11)
        for path, v in nnx.iter_graph(model):
            if isinstance(v, nnx.Param) and path[-1] == "scale":
                x = np.asarray(v.get_value())
                v.set_value((x + 0.2 * rng.standard_normal(x.shape)).astype(x.dtype))
        trajs = [Trajectory(rng.integers(1, 400, n), (rng.random(n) < 0.6).astype(np.float32))
                 for n in rng.integers(5, 17, 12)]
        batch, _ = pack(trajs, 16, num_rows=16)
        batch = {k: v[:8] for k, v in batch.items()}
        tcfg = step_config.default_config()
        tcfg.optimizer.learning_rate, tcfg.optimizer.eps = 1e-2, 1e-3
        tcfg.schedule.warmup_ratio = 0.0
        return model, batch, tcfg

    def step(model, batch, tcfg, mesh):
        setup, params, opt = create_train_state(model, tcfg, mesh, "fsdp", total_steps=1000, freeze=is_vision_path)
        new, _, metrics = TrainStep(setup, SFTLoss(chunk_size=128), compiler_options=FAST)(
            params, opt, batch, jax.random.key(0))
        return new["train"], metrics
''')

WORKER = COMMON + textwrap.dedent('''
    import os, sys
    from jax.experimental import multihost_utils
    from genevolve_jax.sharding import config as sharding_config, distributed

    cfg = sharding_config.default_config()
    cfg.distributed.initialization_timeout_s = 120
    plan = distributed.initialize(cfg.distributed)
    assert plan.mode == "slurm", plan
    assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
    model, batch, tcfg = build()
    train, metrics = step(model, batch, tcfg, make_mesh({"fsdp": -1}))
    full = multihost_utils.process_allgather(train, tiled=True)
    loss = float(np.asarray(metrics["loss"]))
    if jax.process_index() == 0:
        leaves = {str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(full))}
        np.savez(os.path.join(sys.argv[1], "result.npz"), loss=loss, **leaves)
    print("done", jax.process_index(), loss)
''')


@pytest.mark.slow
def test_two_processes_fsdp_equal_single_process(tmp_path):
    join_processes(launch_two_processes(tmp_path, WORKER, local_devices=4), timeout_s=540)
    out = tmp_path / "result.npz"

    ns: dict = {}
    exec(COMMON, ns)
    model, batch, tcfg = ns["build"]()
    train, metrics = ns["step"](model, batch, tcfg, ns["make_mesh"]({"fsdp": 1}, jax.devices()[:1]))
    got = np.load(out)
    np.testing.assert_allclose(got["loss"], np.asarray(metrics["loss"]), rtol=1e-5)
    ref = [np.asarray(x) for x in jax.tree.leaves(train)]
    assert len(ref) == len(got.files) - 1
    for i, r in enumerate(ref):
        np.testing.assert_allclose(got[str(i)], r, rtol=0, atol=1e-5)
