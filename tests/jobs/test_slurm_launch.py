"""The README's multi-node command, `launch/slurm_gpu.sh genevolve train --config qwen3vl_8b_gpu`, run
as SLURM would run it on two nodes, on this machine.

The script itself runs, with stand-ins for what a cluster provides (tests/fixtures/fake_slurm):
`srun` starts one task per "node" (127.0.0.1 and 127.0.0.2) with SLURM's task variables,
`scontrol` lists the nodes, `hostname` names a task's node, and `python -m sglang.launch_server`
(what launch/sglang_server.sh execs) is the stand-in SGLang server of tests/fixtures/sglang_fake.py.
So the whole launch path is the shipped one: the script starts a policy server per node, waits for
their /health, hands the trainer every node's URL and the shared weights directory, and starts
`genevolve train` once per node; each process joins `jax.distributed` from the SLURM variables
(sharding/distributed.py). Each process has 4 simulated CPU devices, so the config's mesh
(`sharding.mesh.fsdp = -1`) must come out as fsdp 8 over both processes, and its micro-batches
(`train.grad_accum_steps = -1`) as 48 rollouts / 8 = 6, the 8-GPU node's values. The model is
the tiny one (one layer), the rollouts short, the judge the offline rule judge, one RL step.
"""
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from tests.fixtures.multiprocess import COMPILE_CACHE_VARS, REPO_ROOT, free_port, suite_xla_flags

FAKE = os.path.join(REPO_ROOT, "tests", "fixtures", "fake_slurm")
NODES = ("127.0.0.1", "127.0.0.2")
# The paper's batch is kept (8 prompts × 6 rollouts: the micro-batching under test); everything
# else shrinks to what one CPU step of the tiny model needs. The stand-in server never ends a turn,
# so every rollout is masked (too_long) and the step trains masked rows: the launch is under test,
# not the loss. The loss terms with forwards of their own (the KL reference, the SDL teacher) are
# off: their compiles in both processes were a quarter of the test's CPU time (83 s against 61 s),
# and the single-process trainer tests run them.
TINY = ("--config.model.preset=tiny", "--config.model.num_layers=1", "--config.model.vision_depth=1",
        "--config.rl.num_steps=1", "--config.rl.max_tokens_per_row=512",
        "--config.agent.system_prompt=compact", "--config.agent.max_rounds=2", "--config.agent.round_max_tokens=8",
        "--config.agent.response_max_tokens=16", "--config.agent.prompt_max_tokens=256",
        "--config.reward.judge_kind=rule", "--config.render.backend=tiny",
        "--config.experience.summariser.backend=rule", "--config.logging.tensorboard=False",
        "--config.loss.grpo.kl_coef=0", "--config.loss.sdl.coef=0",
        # float32 without rematerialisation: a simpler program to compile for a step that trains masked rows
        # (the bf16 and remat paths have tests of their own: tests/train/runtime/test_step.py).
        "--config.train.compute_dtype=float32", "--config.train.remat=none")


def job_environment(tmp_path, policy_port: int) -> dict:
    """What sbatch --nodes=2 gives the script, plus the stand-ins first on PATH and PYTHONPATH."""
    # No inherited SLURM/JAX/TPU/launch settings (they would plan another job) nor proxies (the
    # nodes are loopback addresses), but the session's compilation cache (tests/conftest.py).
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith(("SLURM_", "JAX_", "TPU_", "GENEVOLVE_")) or "proxy" in k.lower())
           or k.startswith(COMPILE_CACHE_VARS)}
    env.update({
        "PATH": os.pathsep.join([os.path.join(FAKE, "bin"), os.path.dirname(sys.executable), env.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join(filter(None, [os.path.join(FAKE, "python"), REPO_ROOT,
                                                    os.environ.get("PYTHONPATH")])),
        "JAX_PLATFORMS": "cpu", "XLA_FLAGS": suite_xla_flags(4),
        "SLURM_JOB_ID": "4343", "SLURM_JOB_NODELIST": ",".join(NODES), "SLURM_JOB_NUM_NODES": str(len(NODES)),
        "GENEVOLVE_COORDINATOR_PORT": str(free_port()),
        "GENEVOLVE_POLICY_MODEL": str(tmp_path / "hf_policy"),      # the stand-in server only needs a path
        "GENEVOLVE_WEIGHTS_DIR": str(tmp_path / "shared" / "sglang_weights"),
        "GENEVOLVE_POLICY_PORT": str(policy_port), "GENEVOLVE_POLICY_TP": "1", "GENEVOLVE_POLICY_DP": "1",
    })
    return env


def prompt_file(tmp_path) -> str:
    from genevolve_jax.data.synthetic import prompt_rows
    path = tmp_path / "rl_prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in prompt_rows(8)))
    return str(path)


@pytest.mark.slow  # two trainer processes compile one evolve step over 8 devices
def test_the_readme_slurm_command_trains_over_two_nodes(tmp_path):
    port = free_port()
    workdir = tmp_path / "shared" / "run"
    cmd = [os.path.join(REPO_ROOT, "launch", "slurm_gpu.sh"), "genevolve", "train", "--config", "qwen3vl_8b_gpu",
           "--no-progress", f"--config.workdir={workdir}", f"--config.data.rl.paths=['{prompt_file(tmp_path)}']",
           *TINY]
    job = subprocess.Popen(cmd, cwd=tmp_path, env=job_environment(tmp_path, port), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out = job.communicate(timeout=400)[0]       # only stops a hang
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, out[-6000:]

    # The script gave the trainer both nodes' servers and the shared weights directory.
    urls = [f"http://{node}:{port}" for node in NODES]
    assert f"--config.rl.sglang.urls=[{','.join(json.dumps(u) for u in urls)}]" in out
    assert f"--config.rl.sglang.weights_dir={tmp_path / 'shared' / 'sglang_weights'}" in out
    # The mesh and micro-batches of one 8-GPU node, over two processes of 4 devices.
    mesh = re.findall(r"genevolve: evolve on (\d+) devices of (\d+) process\(es\): mesh (\{.*?\}), "
                      r"(\d+) micro-batch\(es\) a step", out)
    assert mesh == [("8", "2", str({"data": 1, "fsdp": 8, "tensor": 1, "sequence": 1}), "6")], out[-6000:]
    summaries = [json.loads(m) for m in re.findall(r'^\{\n  "steps".*?^\}', out, re.M | re.S)]
    assert len(summaries) == 2 and all(s["steps"] == 1 for s in summaries), out[-6000:]

    # Each node's server was started by launch/sglang_server.sh as the policy (token ids only) on its
    # own address, rolled out, and reloaded the trainer's weights at the start and after the step.
    for node in NODES:
        log = (tmp_path / f"sglang-policy-4343-{node}.log").read_text()
        args = json.loads(log.splitlines()[0].split(" ", 2)[2])
        assert args[args.index("--host") + 1] == node and args[args.index("--port") + 1] == str(port), args
        assert "--skip-tokenizer-init" in args and args[args.index("--mem-fraction-static") + 1] == "0.30"
        assert log.count('"POST /generate HTTP/1.1" 200') > 0, log[-3000:]
        assert log.count('"POST /update_weights_from_disk HTTP/1.1" 200') == 2, log[-3000:]
