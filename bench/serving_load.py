"""Load on genevolve's two HTTP servers over loopback, each in a subprocess (so the RSS sampled is the
server's), driven by closed-loop concurrent clients.

    python bench/serving_load.py serve                    # 32 openai clients, 30 s warm-up, 60 s measured
    python bench/serving_load.py render-server            # 8 clients against --tiny, queue of 4, 60 s
    python bench/serving_load.py serve --requests 48 --warmup-s 0 --json out.json

`genevolve serve` gets a tiny random Qwen3-VL (with the default tokenizer) unless ``--hf-dir`` names a
model; its clients are the official ``openai`` package's, with random short prompts, max_tokens and
temperatures. `genevolve render-server --tiny` gets 32x32 one-step requests, every other one with a
reference image. A refused request (503) waits min(Retry-After, --max-backoff-s) and goes again.

A run lasts ``--duration-s`` seconds, or until ``--requests`` requests were answered (a 503 does not
count as an answer: the request is still owed). Reported: status counts, transport errors, answers
and refusals whose shape is wrong, p50/p99 latency of answered requests, the server's own counters
before and after (/health), the largest in-flight (serve) or queue depth (render) /health showed,
and the server's RSS: mean of each half, and growth over the second half.

tests/serving/test_load.py runs the same functions bounded by a request count and asserts what the
long run shows; this module holds no assertion.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from typing import Awaitable, Callable

import httpx
import numpy as np

CHAT_WORDS = "red blue circle square draw a an the small large green over under next to".split()


# --- the served model and the server process ---------------------------------------------------------------
def tiny_config(tok, **overrides):
    """config.tiny() sized to ``tok``'s vocabulary, its vision token ids taken from ``tok``."""
    from genevolve_jax.models.qwen3_vl import config as qwen_config
    from genevolve_jax.processing.tokenizer import special_token_ids
    sp = special_token_ids(tok)
    return qwen_config.tiny(**{"vocab_size": len(tok), **overrides}).replace(
        image_token_id=sp["<|image_pad|>"], video_token_id=sp["<|video_pad|>"],
        vision_start_token_id=sp["<|vision_start|>"], vision_end_token_id=sp["<|vision_end|>"])


def save_tiny_hf_dir(path, *, vocab_size: int | None = None, seed: int = 21) -> str:
    """A random tiny Qwen3-VL HF directory served with the default tokenizer (no tokenizer files:
    load_tokenizer falls back to it)."""
    from genevolve_jax.models.hf_io import model_from_state_dict, random_state_dict, save_pretrained
    from genevolve_jax.processing.tokenizer import default_tokenizer
    tok = default_tokenizer()
    cfg = tiny_config(tok, **({"vocab_size": vocab_size} if vocab_size else {}))
    save_pretrained(model_from_state_dict(cfg, random_state_dict(cfg, seed=seed)), path, dtype="float32")
    return os.fspath(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A `genevolve ...` server subprocess on a free loopback port; ``url`` once /health answers."""

    def __init__(self, argv: list[str], *, env: dict | None = None, startup_s: float = 180.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [sys.executable, "-m", "genevolve_jax.cli", *argv, "--port", str(self.port)]
        self.env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
        self.startup_s = startup_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        self.log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: access logs never block the server
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError("server did not answer /health in time")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def rss_bytes(self) -> int:
        import psutil
        return psutil.Process(self.proc.pid).memory_info().rss

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- a closed-loop load driver -----------------------------------------------------------------------------
class LoadReport:
    """What a load run saw: status counts, latencies of answered requests, malformed replies, server
    RSS and /health samples, and the server's counters before and after the run."""

    def __init__(self):
        self.codes: dict[int, int] = {}
        self.latencies: list[float] = []
        self.rss: list[tuple[float, int]] = []  # (seconds since start, bytes)
        self.health: list[dict] = []            # /health during the run
        self.health_before: dict = {}
        self.health_after: dict = {}
        self.errors: list[str] = []             # transport failures
        self.malformed: list[str] = []          # replies whose shape is wrong for their status
        self.duration_s = 0.0
        self.server_alive = True

    @property
    def requests(self) -> int:
        return sum(self.codes.values()) + len(self.errors)

    def counted(self, key: str) -> int:
        """How much the server's /health counter ``key`` grew over the run."""
        return self.health_after[key] - self.health_before[key]

    def peak(self, key: str) -> int:
        """The largest value of /health's ``key`` seen during the run."""
        return max(h[key] for h in self.health)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    def rss_growth_second_half(self, window_s: float = 5.0) -> tuple[float, float, float]:
        """(median RSS just after the midpoint, median RSS over the last ``window_s``, relative
        growth); NaNs when the run is too short to hold both windows."""
        last = self.rss[-1][0] if self.rss else 0.0
        if last < 2 * window_s:
            return float("nan"), float("nan"), float("nan")
        mid = [b for t, b in self.rss if last / 2 <= t < last / 2 + window_s]
        end = [b for t, b in self.rss if t >= last - window_s]
        a, b = float(np.median(mid)), float(np.median(end))
        return a, b, (b - a) / a

    def mean_rss(self, first_half: bool) -> float:
        half = self.rss[-1][0] / 2
        values = [b for t, b in self.rss if (t < half) == first_half]
        return float(np.mean(values)) if values else float("nan")

    def as_dict(self) -> dict:
        """The figures, NaN (a run too short to measure) as None so that the JSON stays strict."""
        a, b, growth = self.rss_growth_second_half()
        mib = 2 ** 20

        def fig(x: float, scale: float = 1.0, digits: int = 1) -> float | None:
            return None if np.isnan(x) else round(x * scale, digits)
        return {"requests": self.requests, "duration_s": round(self.duration_s, 2),
                "codes": {str(k): v for k, v in sorted(self.codes.items())}, "transport_errors": len(self.errors),
                "malformed": len(self.malformed), "p50_ms": fig(self.percentile(50), 1e3),
                "p99_ms": fig(self.percentile(99), 1e3),
                "rss_mean_first_half_mib": fig(self.mean_rss(True), 1 / mib),
                "rss_mean_second_half_mib": fig(self.mean_rss(False), 1 / mib),
                "rss_second_half_mib": [fig(a, 1 / mib), fig(b, 1 / mib)],
                "rss_growth_second_half": fig(growth, digits=4), "health_before": self.health_before,
                "health_after": self.health_after, "server_alive": self.server_alive,
                "load_average": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count()}

    def summary(self, name: str) -> str:
        d = self.as_dict()
        growth = d["rss_growth_second_half"]
        trend = "too short for an RSS trend" if growth is None else (
            f"second-half growth {d['rss_second_half_mib'][0]:.0f} -> {d['rss_second_half_mib'][1]:.0f} MiB "
            f"({100 * growth:+.1f}%)")
        return (f"{name}: {d['requests']} requests in {d['duration_s']:.0f} s, status {d['codes']}, transport "
                f"errors {d['transport_errors']}, malformed {d['malformed']}, p50 {d['p50_ms']} ms, p99 "
                f"{d['p99_ms']} ms (answered requests), RSS mean first half {d['rss_mean_first_half_mib']} MiB, "
                f"second half {d['rss_mean_second_half_mib']} MiB, {trend}; machine load average "
                f"{d['load_average']:.1f} on {d['cpu_count']} cores")


Sender = Callable[[int, int], Awaitable[httpx.Response]]


async def _sample(report: LoadReport, finished: asyncio.Event, rss_of: Callable[[], int],
                  health_of: Callable[[], Awaitable[dict]] | None, every_s: float) -> None:
    """Server RSS and /health into ``report`` every ``every_s`` until ``finished``, and once after."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        report.rss.append((loop.time() - start, rss_of()))
        if health_of is not None:
            try:
                report.health.append(await health_of())
            except Exception as e:  # a server that stops answering /health is a finding, not a crash
                report.errors.append(f"/health: {type(e).__name__}: {e}")
        if finished.is_set():
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(finished.wait(), every_s)


async def drive_load(send_one: Sender, *, clients: int, rss_of: Callable[[], int], duration_s: float | None = None,
                     requests: int | None = None, health_of: Callable[[], Awaitable[dict]] | None = None,
                     check: Callable[[httpx.Response], str | None] | None = None, max_backoff_s: float = 0.25,
                     sample_every_s: float = 0.5, max_attempts: int | None = None) -> LoadReport:
    """``clients`` closed-loop clients, each calling ``await send_one(client_index, i)``, for
    ``duration_s`` or until ``requests`` were answered (a 503 leaves its request owed; at most
    ``max_attempts`` sends, 100 per request by default, so a server that refuses everything ends the
    run). A 503 sleeps min(Retry-After, ``max_backoff_s``). ``check(response)`` returns a complaint
    about a reply's shape, or None. ``rss_of()`` and ``health_of()`` are sampled every
    ``sample_every_s`` and once more at the end."""
    if (duration_s is None) == (requests is None):
        raise ValueError("give duration_s or requests, not both")
    report = LoadReport()
    loop = asyncio.get_running_loop()
    start = loop.time()
    stop = None if duration_s is None else start + duration_s
    owed = requests or 0
    attempts_left = max_attempts or 100 * owed

    def more() -> bool:
        return loop.time() < stop if stop is not None else owed > 0 and attempts_left > 0

    async def client(k: int):
        nonlocal owed, attempts_left
        i = 0
        while more():
            owed, attempts_left = owed - 1, attempts_left - 1
            t0 = loop.time()
            try:
                r = await send_one(k, i)
            except Exception as e:  # a transport failure: counted, never hidden
                report.errors.append(f"{type(e).__name__}: {e}")
                await asyncio.sleep(0.1)
                continue
            finally:
                i += 1
            report.codes[r.status_code] = report.codes.get(r.status_code, 0) + 1
            complaint = check(r) if check is not None else None
            if complaint:
                report.malformed.append(f"{r.status_code}: {complaint}")
            if r.status_code == 503:
                owed += 1
                await asyncio.sleep(min(float(r.headers.get("retry-after", "1")), max_backoff_s))
            elif r.status_code < 500:
                report.latencies.append(loop.time() - t0)

    finished = asyncio.Event()
    sampling = asyncio.ensure_future(_sample(report, finished, rss_of, health_of, sample_every_s))
    try:
        await asyncio.gather(*(client(k) for k in range(clients)))
    finally:
        finished.set()
        await sampling
    report.duration_s = loop.time() - start
    return report


def _refusal_complaint(r: httpx.Response, shape_ok: Callable[[dict], bool]) -> str | None:
    """What is wrong with a 503: no Retry-After, or a body not in the server's refusal shape."""
    if "retry-after" not in r.headers:
        return "503 without Retry-After"
    try:
        ok = shape_ok(r.json())
    except ValueError:
        ok = False
    return None if ok else f"503 body {r.text[:200]!r}"


async def _measured(server: ServerProcess, send_one: Sender, check: Callable[[httpx.Response], str | None],
                    **load) -> LoadReport:
    """:func:`drive_load` (``load``: its clients and length) between two reads of /health, sampling
    /health and the server's RSS as it goes; whether the server still runs at the end."""
    async with httpx.AsyncClient(timeout=30) as probe:
        async def health_of() -> dict:
            return (await probe.get(server.url + "/health")).json()
        before = await health_of()
        report = await drive_load(send_one, rss_of=server.rss_bytes, health_of=health_of, check=check, **load)
        report.health_before, report.health_after = before, await health_of()
    report.server_alive = server.alive()
    return report


# --- `genevolve serve` -------------------------------------------------------------------------------------
def _openai_overloaded(body: dict) -> bool:
    error = body.get("error") or {}
    return error.get("code") == "overloaded" and error.get("type") == "server_error" and \
        isinstance(error.get("message"), str)


def _chat_complaint(r: httpx.Response) -> str | None:
    if r.status_code == 503:
        return _refusal_complaint(r, _openai_overloaded)
    if r.status_code == 200:
        body = r.json()
        choices, usage = body.get("choices") or [], body.get("usage") or {}
        if len(choices) != 1 or not isinstance(choices[0].get("message", {}).get("content"), str) or \
                usage.get("total_tokens") != usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0):
            return f"completion {r.text[:200]!r}"
    return None


def serve_load(hf_dir: str, *, clients: int = 32, duration_s: float | None = None, requests: int | None = None,
               warmup_s: float = 0.0, max_slots: int = 4, max_in_flight: int = 8, max_tokens: int = 16,
               max_backoff_s: float = 0.25, seed: int = 0) -> LoadReport:
    """`genevolve serve --hf-dir hf_dir` under ``clients`` concurrent ``openai.AsyncOpenAI`` clients;
    ``warmup_s`` of the same load first, unmeasured (the engine compiles its shapes there). A refused
    client waits min(Retry-After, ``max_backoff_s``)."""
    import openai

    argv = ["serve", "--hf-dir", hf_dir, "--model-name", "tiny", "--max-slots", str(max_slots), "--max-seq-len", "128",
            "--max-in-flight", str(max_in_flight), "--max-tokens", str(max_tokens)]
    rng = random.Random(seed)
    with ServerProcess(argv) as server:
        chats = [openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
                 for _ in range(clients)]

        async def send_one(k: int, i: int) -> httpx.Response:
            prompt = " ".join(rng.choice(CHAT_WORDS) for _ in range(rng.randint(2, 20)))
            try:
                raw = await chats[k].chat.completions.with_raw_response.create(
                    model="tiny", messages=[{"role": "user", "content": prompt}],
                    max_tokens=rng.randint(1, max_tokens), temperature=rng.choice([0.0, 0.7, 1.0]))
            except openai.APIStatusError as e:  # 503 (and anything else): the driver counts the status
                return e.response
            raw.parse()  # a 200 must carry a completion the client can read
            return raw.http_response

        async def main() -> LoadReport:
            if warmup_s:
                await drive_load(send_one, clients=clients, duration_s=warmup_s, rss_of=server.rss_bytes,
                                 max_backoff_s=max_backoff_s)
            return await _measured(server, send_one, _chat_complaint, clients=clients, duration_s=duration_s,
                                   requests=requests, max_backoff_s=max_backoff_s)

        return asyncio.run(main())


# --- `genevolve render-server --tiny` ----------------------------------------------------------------------
def _render_overloaded(body: dict) -> bool:
    return body.get("success") is False and body.get("code") == "overloaded" and isinstance(body.get("error"), str)


def _render_complaint(r: httpx.Response) -> str | None:
    if r.status_code == 503:
        return _refusal_complaint(r, _render_overloaded)
    if r.status_code == 200:
        body = r.json()
        if body.get("success") is not True or body.get("width") != 32 or body.get("height") != 32 or \
                not body.get("image"):
            return f"render {r.text[:200]!r}"
    return None


def reference_data_uri(seed: int = 0) -> str:
    """A random 32x24 JPEG as the data URI the render service's clients send."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def render_service_load(*, clients: int = 8, duration_s: float | None = None, requests: int | None = None,
                        queue_size: int = 4, max_backoff_s: float = 0.25, seed: int = 0) -> LoadReport:
    """`genevolve render-server --tiny` (one CPU worker, a queue of ``queue_size``) under ``clients``
    concurrent clients; one request first, unmeasured, loads the pipelines' lazy parts. A refused
    client waits min(Retry-After, ``max_backoff_s``)."""
    argv = ["render-server", "--tiny", "--devices", "cpu", "--steps", "1", "--long-side", "32",
            "--queue-size", str(queue_size)]
    ref = reference_data_uri(seed)
    with ServerProcess(argv) as server:
        async def main() -> LoadReport:
            async with httpx.AsyncClient(timeout=120) as http:
                async def send_one(k: int, i: int) -> httpx.Response:
                    body = {"prompt": f"a cat number {k}.{i}", "seed": 1000 * k + i, "num_inference_steps": 1,
                            "width": 32, "height": 32, "true_cfg_scale": 4.0, "negative_prompt": " "}
                    if i % 2:
                        body["image_urls"] = [ref]
                    return await http.post(server.url + "/generate", json=body)

                await send_one(0, 0)
                return await _measured(server, send_one, _render_complaint, clients=clients, duration_s=duration_s,
                                       requests=requests, max_backoff_s=max_backoff_s)

        return asyncio.run(main())


# --- the command line --------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="server", required=True)
    serve = sub.add_parser("serve", help="`genevolve serve` with openai clients")
    serve.add_argument("--clients", type=int, default=32)
    serve.add_argument("--warmup-s", type=float, default=30.0, help="unmeasured load first (compiles)")
    serve.add_argument("--max-slots", type=int, default=4)
    serve.add_argument("--max-in-flight", type=int, default=8, help="the server's admission bound")
    serve.add_argument("--hf-dir", default="", help="the model to serve (default: a tiny random one)")
    render = sub.add_parser("render-server", help="`genevolve render-server --tiny`")
    render.add_argument("--clients", type=int, default=8)
    render.add_argument("--queue-size", type=int, default=4)
    for p in (serve, render):
        length = p.add_mutually_exclusive_group()
        length.add_argument("--duration-s", type=float, default=None, help="measured seconds (default 60)")
        length.add_argument("--requests", type=int, default=None, help="answered requests instead of a duration")
        p.add_argument("--max-backoff-s", type=float, default=0.25, help="longest wait after a 503")
        p.add_argument("--json", default="", help="write the report here as JSON")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.duration_s = duration = args.duration_s if args.duration_s is not None or args.requests else 60.0
    if args.server == "serve":
        with tempfile.TemporaryDirectory() as tmp:
            hf_dir = args.hf_dir or save_tiny_hf_dir(os.path.join(tmp, "hf"))
            report = serve_load(hf_dir, clients=args.clients, duration_s=duration, requests=args.requests,
                                warmup_s=args.warmup_s, max_slots=args.max_slots, max_in_flight=args.max_in_flight,
                                max_backoff_s=args.max_backoff_s)
        name = f"genevolve serve, {args.clients} openai clients, max_in_flight {args.max_in_flight}"
        peak = {"in_flight": report.peak("in_flight")}
    else:
        report = render_service_load(clients=args.clients, duration_s=duration, requests=args.requests,
                                     queue_size=args.queue_size, max_backoff_s=args.max_backoff_s)
        name = f"render-server --tiny, {args.clients} clients, queue {args.queue_size}"
        peak = {"queue_depth": report.peak("queue_depth")}
    print(report.summary(name) + f"; peak {peak}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"name": name, "args": vars(args), "peak": peak, "report": report.as_dict()}, f, indent=2)
    return 0 if report.server_alive and not report.errors and not report.malformed else 1


if __name__ == "__main__":
    sys.exit(main())
