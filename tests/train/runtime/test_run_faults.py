"""Real `genevolve train` runs under the faults clusters produce (CPU, tiny config, a few steps):

- SIGTERM in the middle of the run: the process finishes the step it is in, saves that step,
  says where, exits 0; the resume then gives the same per-step numbers as an uninterrupted run;
- the newest checkpoint truncated on disk: the next start says which step it skipped and why,
  restores the step before it and trains on to the same numbers;
- the render service killed for longer than its client's retries: the step waits for it, collects
  again once it is back, and the run completes.

Every run of the first test is a subprocess of the real CLI. The policy is the tiny random model:
its rollouts earn reward 0, so the loss that moves is the KL to the reference (weight decay pulls
the policy off it), which depends on every parameter, optimiser moment, RNG key and data position.
The four processes compile the same programs: the first compiles them, the others read them from
the session's compilation cache (tests/conftest.py), which is what keeps the test short.

No check here depends on wall time: the time limits only stop a process that hangs.
"""
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from genevolve_jax.train.rl.outage import OutagePolicy
from genevolve_jax.train.runtime.checkpoint import UNRESTORABLE_DIR
from tests.fixtures.multiprocess import REPO_ROOT, suite_xla_flags

HANG_GUARD_S = 600      # only stops a process that hangs; never what a test asserts
STEPS = 3
SAVE_EVERY = 2          # checkpoints at steps 2 and 3 (the last step is always saved)
ARGS = ["--config", "tiny_cpu", "--no-progress", f"--config.rl.num_steps={STEPS}",
        "--config.data.rl.prompts_per_step=2", "--config.rl.group_size=2", "--config.train.grad_accum_steps=1",
        "--config.agent.max_rounds=2", "--config.agent.round_max_tokens=24", "--config.agent.response_max_tokens=48",
        f"--config.checkpoint.save_every={SAVE_EVERY}", "--config.checkpoint.keep=5", "--config.rl.export_hf=False",
        "--config.logging.tensorboard=False", "--config.loss.grpo.mask_truncated=False",
        "--config.train.optimizer.weight_decay=0.1"]
# Numbers that must repeat exactly after a resume (times and counters of waits do not).
COMPARED = ("loss", "grad_norm", "grpo/kl", "grpo/entropy", "reward/mean", "agent/response_tokens",
            "rollout/logprob_mismatch")


def _cmd(workdir):
    return [sys.executable, "-m", "genevolve_jax.cli", "train", "--workdir", str(workdir), *ARGS]


def _env():
    env = dict(os.environ)                # the session's compilation cache included
    env["XLA_FLAGS"] = suite_xla_flags(1)  # one CPU device, as tiny_cpu's mesh asks
    return env


def _rows(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def _by_step(rows):
    return {int(r["step"]): {k: r[k] for k in COMPARED if k in r} for r in rows}


def _run(workdir):
    proc = subprocess.run(_cmd(workdir), capture_output=True, text=True, timeout=HANG_GUARD_S, env=_env(),
                          cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _checkpoint_steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


@pytest.mark.slow
def test_sigterm_and_truncated_checkpoint_resume_like_an_uninterrupted_run(tmp_path):
    """Four runs of the same command: uninterrupted (the reference); SIGTERMed once step 1 is
    logged, so that the signal lands in step 2 (it finishes that step, saves it, exits 0); the
    resume of that run, whose every step equals the reference's; and the reference's workdir again
    with its newest checkpoint truncated, which skips it, restores the one before and trains the
    last step again to the reference's numbers."""
    straight = tmp_path / "straight"
    _run(straight)
    want = _by_step(_rows(straight))
    assert sorted(want) == list(range(1, STEPS + 1))
    assert any(want[s]["loss"] != 0 for s in want)        # the compared numbers move
    assert _checkpoint_steps(straight) == [2, 3]

    # -- SIGTERM while step 2 or later is under way ------------------------------------------------
    preempted = tmp_path / "preempted"
    proc = subprocess.Popen(_cmd(preempted), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            cwd=REPO_ROOT)
    try:
        hang_guard = time.monotonic() + HANG_GUARD_S
        while len(_rows(preempted)) < 1:                   # step 1 done (its compiles too)
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            if time.monotonic() > hang_guard:
                pytest.fail(f"step 1 was not logged in {HANG_GUARD_S} s (hung?)")
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    done = len(_rows(preempted))
    assert 1 <= done < STEPS
    ckpt_dir = os.path.join(preempted, "checkpoints")
    assert f"saved checkpoint step {done} under {ckpt_dir}" in stdout
    assert "received SIGTERM" in stderr
    assert done in _checkpoint_steps(preempted)
    _run(preempted)                                        # the same command resumes
    got = _by_step(_rows(preempted))
    assert got == want

    # -- the newest checkpoint truncated ----------------------------------------------------------
    ckpt_dir = os.path.join(straight, "checkpoints")
    newest, before_newest = STEPS, SAVE_EVERY
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(ckpt_dir, str(newest), "params")) for f in fs]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    logged = len(_rows(straight))
    proc = _run(straight)
    assert f"checkpoint step {newest} skipped: cannot be read" in proc.stdout
    assert f"resumed from step {before_newest}" in proc.stdout
    assert os.listdir(os.path.join(ckpt_dir, UNRESTORABLE_DIR))
    rerun = _rows(straight)[logged:]
    assert [int(r["step"]) for r in rerun] == [STEPS]       # step 3 trained again from step 2
    assert _by_step(rerun)[STEPS] == want[STEPS]


# --- the render service killed for longer than its client's retries, then restarted ----------------
def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_render_server(port: int) -> subprocess.Popen:
    import httpx
    proc = subprocess.Popen([sys.executable, "-m", "genevolve_jax.cli", "render-server", "--tiny", "--port", str(port),
                             "--long-side", "32", "--steps", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=_env())
    hang_guard = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < hang_guard:
        assert proc.poll() is None, "render-server exited"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"render-server did not come up in {HANG_GUARD_S} s (hung?)")


class OutageLog(logging.Handler):
    """Keeps the outage policy's messages in order, and flags its first "still down" (the policy
    polled the services, found them down, and is about to pause)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self.still_down = threading.Event()

    def emit(self, record):
        message = record.getMessage()
        self.messages.append(message)
        if "still down" in message:
            self.still_down.set()


@pytest.mark.slow
@pytest.mark.parametrize("staleness", [0, 1])
def test_render_service_down_past_its_retries_then_back(tmp_path, staleness):
    """A real render-server killed after step 1: step 2's renders fail past the client's retries,
    the step is degraded, the policy polls the service's /health and pauses while it is down; the
    server is started again only once the policy has seen it down, the next poll finds it back,
    and step 2 is collected again and trains on rendered images; step 3 is clean, and the totals
    carry. At rl.max_staleness = 1 step 2's rollouts were made during step 1 (the kill waits for
    them), so the hit is step 3's, rolled out by the producer while step 2 trains; it is collected
    again by the producer, and no producer thread outlives the run."""
    import jax

    from genevolve_jax.agent.protocol import format_answer, format_tool_call
    from genevolve_jax.config_loader import load_config
    from genevolve_jax.jobs.sft import prepare_data
    from genevolve_jax.train.rl.trainer import EvolveTrainer
    from genevolve_jax.train.runtime.model_setup import build_tokenizer
    from tests.fixtures.engines import ScriptedEngine

    port = _free_port()
    cfg = load_config("tiny_cpu")
    cfg.workdir = str(tmp_path / "run")
    cfg.rl.num_steps = 3
    cfg.rl.max_staleness = staleness
    cfg.data.rl.prompts_per_step = 2
    cfg.rl.group_size = 2
    cfg.train.grad_accum_steps = 1
    cfg.agent.max_rounds = 2
    cfg.rl.export_hf = False
    cfg.logging.tensorboard = False
    cfg.logging.sample_every = 0
    cfg.checkpoint.save_every = 100
    cfg.render.backend = "http"
    cfg.render.http.urls = [f"http://127.0.0.1:{port}"]
    cfg.render.http.max_retries = 1          # the client gives up in well under a second
    cfg.render.http.backoff_s = 0.05
    cfg.render.http.timeout_s = 30.0
    cfg.render.sampling.long_side = 32
    cfg.render.sampling.num_inference_steps = 2
    o = cfg.rl.outage
    o.backoff_s, o.max_backoff_s, o.max_wait_s, o.health_timeout_s = 0.25, 1.0, 300.0, 2.0
    prepare_data(cfg, sft=False, rl=True)
    tok = build_tokenizer(cfg.model)
    # Every rollout looks an image up in the offline corpus and answers with a program that uses it;
    # each program is its own (the render cache would otherwise answer without the service).
    def turns(traj_id):
        return ["<think>look</think>\n" + format_tool_call("image_search", {"query": "snowman night", "top_k": 1}),
                "<think>done</think>" + format_answer({"gen_prompt": f"A snowman like the first reference ({traj_id}).",
                                                        "reference_images": [{"img_id": "IMG_001", "note": "snowman"}]})]
    # Twice over: a step collected again after the outage replays its trajectories' ids.
    scripts = {f"s{s}-p{p}-k{k}": turns(f"s{s}-p{p}-k{k}") * 2 for s in range(1, 4) for p in range(2) for k in range(2)}
    server = _start_render_server(port)
    trainer = None
    restarted: list = []
    outage_log = OutageLog()
    outage_logger = logging.getLogger(OutagePolicy.__module__)
    level = outage_logger.level
    outage_logger.addHandler(outage_log)
    outage_logger.setLevel(logging.INFO)
    try:
        trainer = EvolveTrainer(cfg, engine=ScriptedEngine(scripts, tok), tokenizer=tok, progress=False,
                                devices=jax.devices()[:1])
        first = trainer.train_one_step()
        assert first["outage/degraded"] == 0 and "masked/render_failed" not in first
        assert first["samples/masked"] == 0
        if staleness:                                        # step 2's rollouts are in, rendered
            assert trainer.producer.wait_collected(2), "the producer stopped before step 2's rollouts"
        server.kill()                                        # down, for longer than the client's retries
        server.wait(timeout=HANG_GUARD_S)

        def restart():                                       # back once the policy has seen it down
            if outage_log.still_down.wait(HANG_GUARD_S):
                outage_log.messages.append("TEST: render-server restarting")
                restarted.append(_start_render_server(port))
        threading.Thread(target=restart, daemon=True).start()
        out = trainer.run()                                  # steps 2 and 3: the run completes
    finally:
        outage_logger.removeHandler(outage_log)
        outage_logger.setLevel(level)
        if trainer is not None:
            trainer.close()
        for p in [server, *restarted]:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert out["steps"] == 3 and 3 in out["checkpoints"]
    rows = {int(r["step"]): r for r in _rows(cfg.workdir)}
    assert not [t for t in threading.enumerate() if t.name == "rollout-producer"]
    hit = rows[2 + staleness]
    assert rows[2]["outage/degraded"] == (staleness == 0)
    print({k: v for k, v in hit.items() if k.startswith("outage/")})
    assert hit["outage/degraded"] == 1 and hit["outage/recovered"] == 1 and hit["outage/recollected"] == 1
    assert hit["outage/masked/render_failed"] == 4 and hit["outage/masked_samples"] == 4
    # The order of events: polled and found down, restarted, back (the step's one outage record).
    events = [m for m in outage_log.messages if "still down" in m or "TEST:" in m or "services back" in m]
    assert "still down" in events[0] and "services back" in events[-1], outage_log.messages
    assert sum("TEST:" in m for m in events) == 1 and sum("services back" in m for m in events) == 1, events
    assert hit["outage/wait_s"] > 0                          # it paused, and says so
    assert hit.get("masked/render_failed", 0) == 0 and hit["samples/masked"] == 0   # trained on the recollection
    if staleness == 0:
        assert rows[3]["outage/degraded"] == 0 and rows[3]["outage/degraded_steps"] == 1
        assert rows[3]["outage/wait_s_total"] == hit["outage/wait_s"]
    else:
        assert hit["rollout/staleness_max"] <= 1 and hit["outage/degraded_steps"] == 1
