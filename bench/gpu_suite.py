"""The GPU suite: every GPU figure this project claims, in one run of at most 8 minutes on one H100/H200.

    python bench/gpu_suite.py --output gpu_suite.json          # on a GPU machine
    python bench/gpu_suite.py --smoke --output smoke.json      # the same code paths on CPU, tiny shapes

Parts (each in its own process, so one part's memory or failure does not leak into the next):
  plan       the plan of the single-GPU 2B SFT step (genevolve_jax.plan) against the peak the device
             allocator measures when that step runs (``memory_stats()["peak_bytes_in_use"]``; on CPU,
             which has no allocator statistics, the bytes of the arrays alive after the step);
  train      train-step tokens/s against transformers on the same weights, bf16, B4 × T2048, text
             only and with one 448² image per sample (bench/train_step.py);
  kl         the fused log-prob / KL op against the naive full-logits one: memory and time
             (bench/kl_kernel.py);
  sampler    decode tokens/s at B1 and B32 against transformers' generate (bench/sampler.py);
  attention  cuDNN attention with packed segments against the XLA path, bf16, max |error| against an
             fp32 XLA reference (on CPU cuDNN does not exist: the XLA path in bf16 is measured);
  logits     the 2B random model's bf16 logits against transformers' bf16 logits (bench/forward.py).
Writes one JSON file (``--output``) and prints the BENCHMARKS.md rows (``--rows``, a Markdown file).

``--smoke`` runs the same commands (each script's ``main`` with the same arguments, each part's
JSON collected the same way) one after another in this process: on tiny shapes the imports of
jax, torch and transformers cost more than the parts, and a process per part paid them six times.
A part that raises or exits non-zero is still reported as failed, with its traceback; the
per-part ``--timeout`` then does not apply (the caller's own timeout stops a hang).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import platform
import resource
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
PARTS = ("plan", "train", "kl", "sampler", "attention", "logits")


def _script(name: str) -> str:
    return os.path.join(HERE, name)


def external_commands(smoke: bool, tmp: str) -> dict[str, list[list[str]]]:
    """The bench scripts each part runs, with GPU or smoke shapes, writing JSON into ``tmp``."""
    py = sys.executable
    if smoke:
        return {
            # The image run only: its step runs the text path too (the GPU suite times both).
            "train": [[py, _script("train_step.py"), "--shape", "tiny", "--batch", "1", "--seq", "64", "--steps", "1",
                       "--image", "32", "--json", os.path.join(tmp, "train_image.json")]],
            "kl": [[py, _script("kl_kernel.py"), "--shape", "2", "64", "64", "4096", "--chunk", "1024",
                    "--repeats", "1", "--json", os.path.join(tmp, "kl.json")]],
            # One batch size (of several rows): each runs the same code, and each compiles an engine.
            "sampler": [[py, _script("sampler.py"), "--shape", "tiny", "--prompt-len", "16", "--new-tokens", "8",
                         "--batches", "2", "--dtype", "float32", "--matmul-floor", "--repeats", "1"]],
            "logits": [[py, _script("forward.py"), "--shape", "tiny", "--batch", "1", "--seq", "32", "--repeats", "1",
                        "--dtype", "float32", "--json", os.path.join(tmp, "logits.json")]],
        }
    return {
        "train": [[py, _script("train_step.py"), "--shape", "2b", "--batch", "4", "--seq", "2048", "--steps", "5",
                   "--json", os.path.join(tmp, "train_text.json")],
                  [py, _script("train_step.py"), "--shape", "2b", "--batch", "4", "--seq", "2048", "--steps", "5",
                   "--image", "448", "--json", os.path.join(tmp, "train_image.json")]],
        "kl": [[py, _script("kl_kernel.py"), "--repeats", "5", "--json", os.path.join(tmp, "kl.json")]],
        "sampler": [[py, _script("sampler.py"), "--shape", "2b", "--batches", "1", "32"]],
        "logits": [[py, _script("forward.py"), "--shape", "2b", "--batch", "4", "--seq", "2048", "--dtype", "bfloat16",
                    "--repeats", "3", "--json", os.path.join(tmp, "logits.json")]],
    }


# --- parts run here (in a child process: python gpu_suite.py --part NAME) --------------------------
def part_plan(smoke: bool) -> dict:
    """Planned peak of one 2B SFT step on this device against the measured peak of that step."""
    import jax
    import numpy as np

    from genevolve_jax.jobs.compare_sharding import abstract_batch, load_model_config, random_batch, sft_loss_for
    from genevolve_jax.plan import report_phase
    from genevolve_jax.plan.phases import step_phase
    from genevolve_jax.plan.targets import DeviceSpec, Target
    from genevolve_jax.sharding import logical
    from genevolve_jax.sharding.mesh import make_mesh
    from genevolve_jax.train.runtime import step_config
    from genevolve_jax.train.runtime.state import create_train_state, is_vision_path
    from genevolve_jax.train.runtime.step import TrainStep

    dev = jax.devices()[0]
    # Arrays an earlier part left alive (the smoke run's parts share this process) are not this step's.
    before = {id(x) for x in jax.live_arrays()}
    # Smoke: the tiny model cut to one decoder layer (the plan and the step trace every layer alike).
    preset, layers, batch_size, seq, dtype = (("tiny", 1, 2, 64, "float32") if smoke
                                              else ("qwen3vl_2b", 0, 4, 2048, "bfloat16"))
    cfg = load_model_config(preset, layers, False, "full", dtype)
    tcfg = step_config.default_config()
    tcfg.compute_dtype, tcfg.remat = dtype, "full"
    mesh = make_mesh({"fsdp": 1}, [dev])
    stats = dev.memory_stats() or {}
    target = Target(f"{dev.platform}:1", dev.platform, 1, DeviceSpec(dev.device_kind, int(stats.get("bytes_limit", 0)),
                                                                      0.0, 0.0))
    batch = random_batch(cfg, batch_size, seq, 0)
    abstract = abstract_batch(batch, mesh, logical.rules_for("fsdp"))
    phase = step_phase("sft", cfg, tcfg, sft_loss_for(cfg), mesh, "fsdp", abstract, target, freeze=is_vision_path)
    report = report_phase(phase, target, 1, 1.0, "whole device", memory_bytes=1 << 62)
    from flax import nnx

    from genevolve_jax.models.qwen3_vl.model import Qwen3VLForConditionalGeneration
    make = lambda: Qwen3VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    setup, params, opt_state = create_train_state(make, tcfg, mesh, "fsdp", total_steps=1000, freeze=is_vision_path)
    step = TrainStep(setup, sft_loss_for(cfg), compute_dtype=jax.numpy.dtype(dtype))
    arrays = step.place_batch(step.split_static(batch)[0])
    compiled = report.fns[0].executable
    t0 = time.perf_counter()
    params, opt_state, m = compiled(params, opt_state, arrays, jax.random.key(0))
    loss = float(np.asarray(m["loss"]))
    step_s = time.perf_counter() - t0
    after = dev.memory_stats() or {}
    measured = after.get("peak_bytes_in_use")
    source = "memory_stats peak_bytes_in_use"
    if measured is None:
        # No allocator statistics (CPU): the bytes of the arrays alive at once after the step (its
        # state, batch and outputs), a lower bound of its peak that the plan must cover. The RSS
        # high-water mark is no measure of a tiny step: the compile before it sets the mark.
        measured = sum(x.nbytes for x in jax.live_arrays() if id(x) not in before)
        source = "bytes of the live arrays after the step (CPU: no allocator peak; a lower bound)"
    return {"model": preset, "batch": f"{batch_size}x{seq}", "dtype": dtype, "remat": "full",
            "planned_peak_bytes": report.peak_bytes, "planned_temp_bytes": report.fns[0].temp_bytes,
            "planned_state_bytes": sum(report.resident_bytes.values()), "measured_peak_bytes": int(measured),
            "measured_with": source, "ratio_measured_over_planned": measured / report.peak_bytes,
            "loss": loss, "first_step_s": step_s}


def part_attention(smoke: bool) -> dict:
    """Packed rows (several segments each) through the GPU path and the XLA path, bf16, against an
    fp32 XLA reference."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from genevolve_jax.ops import attention

    b, t, h, kv, d = (2, 64, 4, 2, 32) if smoke else (4, 2048, 16, 8, 128)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, d)), jnp.float32) for n in (h, kv, kv))
    seg = np.zeros((b, t), np.int32)
    for r in range(b):  # 3 segments of random lengths, then padding (segment 0)
        cuts = np.sort(rng.choice(np.arange(1, int(t * 0.9)), 3, replace=False))
        for i, (lo, hi) in enumerate(zip([0, *cuts[:-1]], cuts)):
            seg[r, lo:hi] = i + 1
    seg = jnp.asarray(seg)
    kw = dict(causal=True, q_segment_ids=seg, kv_segment_ids=seg, kv_valid_mask=seg > 0)
    ref = attention.xla_attention(q, k, v, **kw)
    valid = np.asarray(seg > 0)[..., None, None]
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = {}
    impls = ["xla"] + (["cudnn"] if jax.default_backend() == "gpu" else [])
    for impl in impls:
        attend = attention.cudnn_attention if impl == "cudnn" else attention.xla_attention
        fn = jax.jit(lambda q, k, v, attend=attend: attend(q, k, v, **kw))
        got = fn(*bf).block_until_ready()
        t0 = time.perf_counter()
        for _ in range(3):
            got = fn(*bf).block_until_ready()
        err = np.abs(np.asarray(got, np.float32) - np.asarray(ref)) * valid
        out[impl] = {"max_abs_error_vs_fp32": float(err.max()), "ms": (time.perf_counter() - t0) / 3 * 1e3}
    if "cudnn" in out:
        out["cudnn_vs_xla_bf16_max_abs"] = float(np.abs(np.asarray(fn(*bf), np.float32) - np.asarray(
            jax.jit(lambda q, k, v: attention.xla_attention(q, k, v, **kw))(*bf), np.float32)).__mul__(valid).max())
    else:
        out["cudnn"] = f"not available on {jax.default_backend()}"
    return {"shape": f"B{b} T{t} H{h} KV{kv} d{d}, 3 segments + padding per row", **out}


LOCAL_PARTS = {"plan": part_plan, "attention": part_attention}


# --- the driver --------------------------------------------------------------------------------------
def _device() -> str:
    probe = "import jax; d = jax.devices(); print(f'{d[0].device_kind} x{len(d)}')"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    return out.stdout.strip() or "unknown"


def _cpu_s() -> float:
    """CPU seconds of this process and of its reaped children."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def run_in_process(cmd: list[str]) -> tuple[int, str, str]:
    """``cmd`` (``[python, script, *args]``) run as ``script``'s ``main(args)`` in this process:
    (exit status, stdout, stderr), a raise or ``SystemExit`` turned into the status a process exits with."""
    script, argv = cmd[1], cmd[2:]
    spec = importlib.util.spec_from_file_location(f"gpu_suite_{os.path.basename(script)[:-3]}", script)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            code = module.main(argv) or 0
        except SystemExit as e:             # sys.exit(status) or argparse's error: as a process exits
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except Exception:
            traceback.print_exc()
            code = 1
    return code, out.getvalue(), err.getvalue()


def run_command(cmd: list[str], in_process: bool, env: dict, timeout_s: float) -> tuple[int, str, str]:
    """One command of a part, in a process of its own (the GPU run) or in this one (the smoke run)."""
    if in_process:
        return run_in_process(cmd)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return 1, "", f"timed out after {timeout_s} s"
    return proc.returncode, proc.stdout, proc.stderr


def collect_outputs(cmds: list[list[str]]) -> dict:
    """What a part's commands wrote: each ``--json`` file under its name, a ``--part-output`` merged in."""
    entry: dict = {}
    for cmd in cmds:
        if "--json" in cmd:
            path = cmd[cmd.index("--json") + 1]
            if os.path.exists(path):
                with open(path) as f:
                    entry[os.path.basename(path)[:-5]] = json.load(f)
        if "--part-output" in cmd and os.path.exists(cmd[cmd.index("--part-output") + 1]):
            with open(cmd[cmd.index("--part-output") + 1]) as f:
                entry.update(json.load(f))
    return entry


def run_suite(smoke: bool, tmp: str, parts=PARTS, timeout_s: float = 300) -> dict:
    if smoke:
        # One CPU device, as the suite has one GPU (a parent's simulated device count would make
        # the bench scripts shard a one-row batch over several devices). Set here, before any part
        # imports jax in this process.
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                           if not f.startswith("--xla_force_host_platform_device_count"))
    env = dict(os.environ)
    results = {"smoke": smoke, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "host": platform.node(), "parts": {}}
    commands = external_commands(smoke, tmp)
    for name in parts:
        t0, cpu0 = time.perf_counter(), _cpu_s()
        if name in LOCAL_PARTS:
            out_file = os.path.join(tmp, f"{name}.json")
            cmds = [[sys.executable, os.path.abspath(__file__), "--part", name, "--part-output", out_file]
                    + (["--smoke"] if smoke else [])]
        else:
            cmds = commands[name]
        logs, errors = [], []
        for cmd in cmds:
            code, stdout, stderr = run_command(cmd, smoke, env, timeout_s)
            logs.append(stdout[-3000:])
            if code != 0:
                errors.append(stderr[-2000:] or f"exit status {code}")
        entry = collect_outputs(cmds)
        if errors:
            entry["error"] = errors[-1]
        if name == "sampler":
            entry["stdout"] = "\n".join(logs)[-2000:]
        entry["ok"] = not errors
        entry["wall_s"], entry["cpu_s"] = time.perf_counter() - t0, _cpu_s() - cpu0
        results["parts"][name] = entry
        print(f"gpu_suite: {name}: {'ok' if entry['ok'] else 'FAILED'} in {entry['wall_s']:.1f} s "
              f"({entry['cpu_s']:.1f} CPU-s)", flush=True)
    return results


def markdown_rows(results: dict) -> str:
    """The BENCHMARKS.md rows of one run (one line per figure)."""
    when, smoke = results["date"], results["smoke"]
    dev = results.get("device", "?")
    tag = " (smoke: tiny shapes on CPU, not a benchmark)" if smoke else ""
    lines = [f"GPU suite, {when}, {dev}{tag}", "", "| part | figure | value |", "|---|---|---|"]
    p = results["parts"]
    if "plan" in p and "planned_peak_bytes" in p["plan"]:
        r = p["plan"]
        lines.append(f"| plan | {r['model']} SFT step {r['batch']} {r['dtype']}: planned peak / measured peak | "
                     f"{r['planned_peak_bytes'] / 2**30:.2f} GiB / {r['measured_peak_bytes'] / 2**30:.2f} GiB "
                     f"({r['measured_with']}) |")
    for key in ("train_text", "train_image"):
        for r in p.get("train", {}).get(key, {}).get("results", []):
            tps = r.get("tokens_per_s") or r.get("tok_per_s")
            if tps:
                lines.append(f"| train ({key[6:]}) | {r.get('impl', r.get('name', '?'))} tokens/s | {tps:,.0f} |")
    for r in p.get("kl", {}).get("kl", {}).get("results", []):
        lines.append(f"| kl | {r['op']} {r['variant']}: temp MiB / ms | "
                     f"{(r['temp_bytes'] or 0) / 2**20:.1f} / {r['time_s'] * 1e3:.1f} |")
    if "attention" in p and "xla" in p["attention"]:
        a = p["attention"]
        for impl in ("xla", "cudnn"):
            if isinstance(a.get(impl), dict):
                lines.append(f"| attention | {impl} bf16 packed segments, max abs err vs fp32 | "
                             f"{a[impl]['max_abs_error_vs_fp32']:.3g} |")
    for r in p.get("logits", {}).get("logits", {}).get("results", []):
        if "max_abs_logit_diff_vs_transformers" in r:
            diff = r["max_abs_logit_diff_vs_transformers"]
            lines.append(f"| logits | max abs logit diff vs transformers | {diff:.3g} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (< 2 minutes), for CI")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--output", default="gpu_suite.json")
    ap.add_argument("--rows", default="", help="also write the BENCHMARKS.md rows (Markdown) here")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per part (the GPU run's processes)")
    ap.add_argument("--part", choices=sorted(LOCAL_PARTS), help=argparse.SUPPRESS)
    ap.add_argument("--part-output", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part:
        if args.smoke:
            os.environ["JAX_PLATFORMS"] = "cpu"
        result = LOCAL_PARTS[args.part](args.smoke)   # a part that raises leaves no file behind
        with open(args.part_output, "w") as f:
            json.dump(result, f, indent=2)
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = set(parts) - set(PARTS)
    if bad:
        ap.error(f"unknown parts {sorted(bad)}; choose from {PARTS}")
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        results = run_suite(args.smoke, tmp, parts, args.timeout)
    results["device"] = "CPU (smoke)" if args.smoke else _device()
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    rows = markdown_rows(results)
    print(rows)
    if args.rows:
        with open(args.rows, "w") as f:
            f.write(rows)
    return 0 if all(p["ok"] for p in results["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
