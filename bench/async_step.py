"""Asynchronous RL on the tiny_cpu agent task: today's barrier, streaming rewards, and rollouts one
step ahead (rl.max_staleness = 1), against a render service and a judge with the latency of remote ones.

    python bench/async_step.py --render-latency 8.0 --render-concurrency 32 --judge-latency 1.0 \\
        --json runs/bench_async/async_step.json
    python bench/async_step.py --smoke          # CI: small shapes, a random policy, short latencies

Each mode runs ``--steps`` GRPO steps of configs/tiny_cpu.py through the real trainer, agent loop,
offline tools, reward scorer and render service: `genevolve render-server --tiny --latency L
--slots C` in a subprocess, reached over HTTP (``render.backend = "http"``); every image waits L
seconds there, C at a time, a stand-in for a remote Qwen-Image-Edit-2511 (more than 8 s an image
even on an H100). The judge is tiny_cpu's offline rule judge, answering ``--judge-latency`` seconds
after the render (as the VLM judge answers after the image exists), at most
``reward.endpoint.max_concurrency`` at once. The policy is the SFT model of the README's run (made
once under ``--workdir``/sft and reused), so that rollouts end with programs to render; ``--smoke``
uses the random model (no program parses, nothing renders: it checks the harness only).

Modes: ``barrier`` (rl.stream_rewards = False: every rollout, then the groups one after another),
``streaming`` (rl.stream_rewards = True) and ``stale1`` (streaming and rl.max_staleness = 1).
Reported per mode: the steady step wall time (mean over the steps after the first two, less any
compile seconds a later step spent on a new row length; the median too), the rollout phase's
critical path (``time/rollout_s``: generation, then the render and judge tails), the trainer's
idle seconds a step (waiting for rollouts: the collect in a synchronous step,
``time/rollout_wait_s`` with a producer) and the mean reward per step; with the ratios the issue
asks for: streaming's rollout phase over the barrier's, and stale1's steady step over
streaming's.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {"barrier": {"rl.stream_rewards": False, "rl.max_staleness": 0},
         "streaming": {"rl.stream_rewards": True, "rl.max_staleness": 0},
         "stale1": {"rl.stream_rewards": True, "rl.max_staleness": 1}}
# Small shapes for --smoke: tests/train/runtime/test_run_faults.py's run, whose programs a test
# session has compiled already (its compilation cache), a few seconds a step.
SMOKE_OVERRIDES = {"data.rl.prompts_per_step": 2, "rl.group_size": 2, "train.grad_accum_steps": 1,
                   "agent.max_rounds": 2, "agent.round_max_tokens": 24, "agent.response_max_tokens": 48,
                   "loss.grpo.mask_truncated": False, "train.optimizer.weight_decay": 0.1}


class LatentJudge:
    """The phase's scorer, answering ``latency_s`` after its record is ready (after the render),
    ``concurrency`` calls at a time, like a remote judge endpoint."""

    def __init__(self, inner, latency_s: float, concurrency: int):
        self.inner, self.latency_s = inner, latency_s
        self.concurrency = concurrency
        self.slots: asyncio.Semaphore | None = None
        self.loop = None

    async def score_logged(self, sample):
        record = await self.inner.score_logged(sample)
        if self.loop is not asyncio.get_running_loop():      # one semaphore per rollout phase's event loop
            self.loop, self.slots = asyncio.get_running_loop(), asyncio.Semaphore(self.concurrency)
        async with self.slots:
            await asyncio.sleep(self.latency_s)
        return record


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_render_server(latency: float, slots: int, log_path: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "genevolve_jax.cli", "render-server", "--tiny", "--port", str(port),
                             "--long-side", "32", "--steps", "2", "--latency", str(latency), "--slots", str(slots)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"render-server exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if json.loads(r.read()).get("workers") == slots:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"render-server did not answer /health in 300 s; see {log_path}")


def base_config(args, workdir: str):
    from genevolve_jax.config_loader import apply_overrides, load_config

    overrides = dict(SMOKE_OVERRIDES) if args.smoke else {}
    overrides.update({"rl.export_hf": False, "checkpoint.save_every": 10_000, "logging.progress": False,
                      "logging.tensorboard": False, "logging.sample_every": 0, "rl.num_steps": args.steps})
    cfg = apply_overrides(load_config("tiny_cpu"), [f"--config.{k}={v!r}" for k, v in overrides.items()])
    cfg.workdir = workdir
    return cfg


def policy(args, root: str) -> tuple[str, str]:
    """(model.path, model.tokenizer) of the SFT model, made once under ``root``/sft ("": random)."""
    if args.smoke:
        return "", ""
    from genevolve_jax.jobs.sft import run_sft_config

    model = os.path.join(root, "sft", "model")
    if not os.path.isdir(os.path.join(model, "hf_assets")):
        model = run_sft_config(base_config(args, os.path.join(root, "sft")), progress=False)["model"]
    return model, os.path.join(model, "hf_assets")


def run_mode(args, mode: str, root: str, url: str, model: tuple[str, str]) -> dict:
    from genevolve_jax.config_loader import apply_overrides
    from genevolve_jax.jobs.sft import prepare_data
    from genevolve_jax.train.rl.trainer import EvolveTrainer

    cfg = base_config(args, os.path.join(root, mode))
    cfg = apply_overrides(cfg, [f"--config.{k}={v!r}" for k, v in MODES[mode].items()])
    cfg.model.path, cfg.model.tokenizer = model[0] or cfg.model.path, model[1] or cfg.model.tokenizer
    cfg.render.backend, cfg.render.http.urls = "http", [url]
    # The pixels the README's run renders in process (render.tiny), asked of the service instead.
    cfg.render.sampling.long_side = cfg.render.tiny.long_side
    cfg.render.sampling.num_inference_steps = cfg.render.tiny.num_inference_steps
    cfg.render.throughput.max_concurrency = args.render_concurrency
    prepare_data(cfg, sft=False, rl=True)
    trainer = EvolveTrainer(cfg, progress=False)
    trainer.rollout.scorer = LatentJudge(trainer.rollout.scorer, args.judge_latency,
                                         int(cfg.reward.endpoint.max_concurrency))
    walls, rows = [], []
    try:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            rows.append(trainer.train_one_step())
            walls.append(time.perf_counter() - t0)
    finally:
        trainer.close()
    # Steady: the steps after the first two, less the seconds they spent compiling (a new row
    # length, time/compile_s), which the other modes may have read from the cache instead.
    steady = [w - float(r.get("time/compile_s", 0.0)) for w, r in zip(walls, rows)][2:] or walls
    idle_key = "time/rollout_wait_s" if MODES[mode]["rl.max_staleness"] else "time/rollout_s"

    def mean(key, rows=rows[2:] or rows):
        return sum(float(r.get(key, 0.0)) for r in rows) / len(rows)
    return {"mode": mode, **{k.split(".")[1]: v for k, v in MODES[mode].items()}, "steps": args.steps,
            "step_wall_s": walls, "steady_step_s": sum(steady) / len(steady),
            "steady_step_median_s": sorted(steady)[len(steady) // 2] if len(steady) % 2 else
            sum(sorted(steady)[len(steady) // 2 - 1:len(steady) // 2 + 1]) / 2,
            "compile_s": [float(r.get("time/compile_s", 0.0)) for r in rows],
            "rollout_phase_s": mean("time/rollout_s"), "generation_s": mean("time/generation_s"),
            "render_wait_s": mean("time/render_wait_s"), "judge_wait_s": mean("time/judge_wait_s"),
            "reward_overlap_s": mean("time/reward_overlap_s"), "trainer_idle_s": mean(idle_key),
            "train_step_s": mean("time/train_step_s"), "staleness_mean": mean("rollout/staleness_mean"),
            "dropped_stale": sum(float(r.get("rollout/dropped_stale", 0.0)) for r in rows),
            "reward_curve": [float(r["reward/mean"]) for r in rows]}


def table(result: dict) -> str:
    lines = ["| mode | steady step (s) | rollout phase (s) | generation / render tail / judge tail (s) "
             "| trainer idle (s) | train step (s) | rewards |", "|---|---|---|---|---|---|---|"]
    for r in result["modes"]:
        lines.append(f"| {r['mode']} | {r['steady_step_s']:.1f} | {r['rollout_phase_s']:.1f} | "
                     f"{r['generation_s']:.1f} / {r['render_wait_s']:.1f} / {r['judge_wait_s']:.1f} | "
                     f"{r['trainer_idle_s']:.1f} | {r['train_step_s']:.1f} | "
                     f"{' '.join(f'{x:.2f}' for x in r['reward_curve'])} |")
    ratios = result.get("ratios", {})
    lines += [f"{k}: {v:.2f}" for k, v in ratios.items()]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--render-latency", type=float, default=8.0)
    p.add_argument("--render-concurrency", type=int, default=32)
    p.add_argument("--judge-latency", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--workdir", default="")
    p.add_argument("--json", default="")
    p.add_argument("--smoke", action="store_true",
                   help="small shapes, random policy, 0.2 s / 0.05 s latencies, 2 steps")
    args = p.parse_args(argv)
    if args.smoke:
        args.render_latency, args.judge_latency, args.steps = 0.2, 0.05, 2
        args.render_concurrency = min(args.render_concurrency, 4)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        p.error(f"unknown modes {unknown}; known: {list(MODES)}")
    root = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="bench-async-"))
    os.makedirs(root, exist_ok=True)
    # One compilation cache for the modes: the second and third read the first's programs.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(root, "jax_cache"))
    server, url = start_render_server(args.render_latency, args.render_concurrency,
                                      os.path.join(root, "render_server.log"))
    try:
        model = policy(args, root)
        rows = [run_mode(args, mode, root, url, model) for mode in modes]
    finally:
        server.terminate()
        server.wait(timeout=30)
    by = {r["mode"]: r for r in rows}
    ratios = {}
    if {"barrier", "streaming"} <= set(by):
        ratios["streaming rollout phase / barrier's"] = \
            by["streaming"]["rollout_phase_s"] / by["barrier"]["rollout_phase_s"]
    if {"streaming", "stale1"} <= set(by):
        ratios["stale1 steady step / streaming's"] = by["stale1"]["steady_step_s"] / by["streaming"]["steady_step_s"]
    result = {"render_latency_s": args.render_latency, "render_concurrency": args.render_concurrency,
              "judge_latency_s": args.judge_latency, "smoke": args.smoke, "modes": rows, "ratios": ratios,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count()}
    print(table(result), flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
