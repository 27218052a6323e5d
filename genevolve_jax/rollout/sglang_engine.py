"""SGLangEngine: a client of SGLang's native HTTP API (or of `genevolve serve`, which speaks the same).

Per request: ``POST /generate`` with ``input_ids`` (vision placeholders already expanded),
``image_data`` (one entry per image: a local path, which the server must be able to read, or a
base64 PNG for in-memory images), ``sampling_params``, ``return_logprob: true`` and
``logprob_start_len: -1`` (output tokens only). The response's ``output_ids`` (or the token ids of
``meta_info.output_token_logprobs``) and their log-probs become the result, and
``meta_info.finish_reason.type`` its finish reason.

Several server URLs are load-balanced (least in-flight requests first); a failing server is put on
probation and rechecked through ``GET /health``; every call has a timeout and is retried with
backoff on another server; a request that still fails becomes an "abort" result naming the error.

Weight sync (:meth:`update_weights`): the trainer's model is exported as HF safetensors to a shared
directory (genevolve_jax.models.hf_io.save_pretrained), then each server is asked to reload it with
``POST /update_weights_from_disk {model_path, flush_cache: true}`` and ``POST /flush_cache``.
:class:`DiskWeightSync` is the trainer's form: one directory per weight version under a directory
every server can read, written under a temporary name and renamed when complete (a server never
sees half a checkpoint), older versions deleted once every server has reloaded, export and reload
timed apart.

What SGLang's ``output_token_logprobs`` mean (temperature, precision, release differences) is
written down in genevolve_jax/train/run_config.py, next to ``rl.old_logprobs``.
"""
from __future__ import annotations

import asyncio
import base64
import io
import os
import random
import re
import shutil
import time
from typing import Any, Sequence

import httpx

from genevolve_jax.rollout.engine import GenerationRequest, GenerationResult, RolloutEngine


class SGLangError(RuntimeError):
    """A server answered with an error or an unusable body."""


def _image_entry(image) -> str:
    if isinstance(image, (str, os.PathLike)):
        return os.path.abspath(os.fspath(image))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def request_body(req: GenerationRequest) -> dict:
    body: dict[str, Any] = {"input_ids": [int(t) for t in req.prompt_ids],
                            "sampling_params": req.sampling.to_sglang(),
                            "return_logprob": True, "logprob_start_len": -1}
    if req.images:
        body["image_data"] = [_image_entry(x) for x in req.images]
    if req.request_id:
        body["rid"] = req.request_id
    return body


def parse_response(data: Any) -> GenerationResult:
    """SGLang's /generate body -> GenerationResult; raises SGLangError on a malformed body."""
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, dict) or not isinstance(data.get("meta_info"), dict):
        raise SGLangError(f"/generate response has no meta_info object: {str(data)[:200]}")
    meta = data["meta_info"]
    finish = meta.get("finish_reason") or {}
    kind = finish.get("type") if isinstance(finish, dict) else str(finish)
    if kind not in ("stop", "length", "abort"):
        raise SGLangError(f"/generate finish_reason {finish!r} is not stop|length|abort")
    entries = meta.get("output_token_logprobs")
    if not isinstance(entries, list):
        raise SGLangError("/generate response lacks meta_info.output_token_logprobs (return_logprob ignored?)")
    try:
        logprobs = [float(e[0]) for e in entries]
        lp_ids = [int(e[1]) for e in entries]
    except (TypeError, ValueError, IndexError) as exc:
        raise SGLangError(f"malformed output_token_logprobs entry: {exc}") from None
    ids = data.get("output_ids")
    ids = lp_ids if ids is None else [int(t) for t in ids]
    if ids != lp_ids:
        raise SGLangError(f"output_ids ({len(ids)}) disagree with output_token_logprobs ({len(lp_ids)})")
    if kind == "abort":
        return GenerationResult([], [], "abort", error=str(finish.get("message", "aborted by server")))
    return GenerationResult(ids, logprobs, kind)


class SGLangEngine(RolloutEngine):
    def __init__(self, urls: Sequence[str] | str, *, timeout_s: float = 600.0, retries: int = 3,
                 backoff_s: float = 1.0, max_concurrency: int = 256, probation_s: float = 10.0,
                 api_key_env: str = ""):
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("SGLangEngine needs at least one server URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.max_concurrency, self.probation_s = max_concurrency, probation_s
        self._headers = {}
        if api_key_env and os.environ.get(api_key_env):
            self._headers["Authorization"] = f"Bearer {os.environ[api_key_env]}"
        self._inflight = {u: 0 for u in self.urls}
        self._down_until = {u: 0.0 for u in self.urls}
        self.stats = {"requests": 0, "retries": 0, "failures": 0}

    @classmethod
    def from_config(cls, cfg) -> "SGLangEngine":
        """From an ``rl.sglang`` section (train/run_config.py)."""
        return cls(list(cfg.urls), timeout_s=float(cfg.timeout_s), retries=int(cfg.retries),
                   backoff_s=float(cfg.backoff_s), max_concurrency=int(cfg.max_concurrency),
                   api_key_env=str(cfg.api_key_env))

    # -- server choice --------------------------------------------------------------------------
    def _pick(self, avoid: set[str]) -> str:
        now = time.monotonic()
        up = [u for u in self.urls if self._down_until[u] <= now and u not in avoid]
        pool = up or [u for u in self.urls if u not in avoid] or self.urls
        least = min(self._inflight[u] for u in pool)
        return random.choice([u for u in pool if self._inflight[u] == least])

    async def _healthy(self, client: httpx.AsyncClient, url: str) -> bool:
        try:
            r = await client.get(url + "/health", timeout=min(10.0, self.timeout_s), headers=self._headers)
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    async def health(self) -> dict[str, bool]:
        async with httpx.AsyncClient() as client:
            states = await asyncio.gather(*(self._healthy(client, u) for u in self.urls))
        return dict(zip(self.urls, states))

    def wait_healthy(self, wait_s: float = 0.0, *, field: str = "urls", poll_s: float = 1.0) -> dict[str, bool]:
        """Poll ``GET /health`` of every server until one answers 200 or ``wait_s`` has passed.
        Raises SGLangError naming ``field`` and the unreachable URLs when none is healthy; servers
        still down are put on probation (requests go elsewhere until they recover)."""
        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            states = asyncio.run(self.health())
            if any(states.values()) or time.monotonic() >= deadline:
                break
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        down = [u for u, ok in states.items() if not ok]
        if len(down) == len(self.urls):
            raise SGLangError(f"{field}: no SGLang server is healthy after {wait_s:g} s; GET /health failed on "
                              f"{', '.join(down)} (is the server started, on that host and port?)")
        for url in down:
            self._down_until[url] = time.monotonic() + self.probation_s
        return states

    # -- generation -----------------------------------------------------------------------------
    async def _one(self, client: httpx.AsyncClient, sem: asyncio.Semaphore, req: GenerationRequest) -> GenerationResult:
        body = request_body(req)
        tried: set[str] = set()
        last = ""
        async with sem:
            for attempt in range(self.retries + 1):
                url = self._pick(tried)
                self._inflight[url] += 1
                try:
                    r = await client.post(url + "/generate", json=body, timeout=self.timeout_s, headers=self._headers)
                    if r.status_code == 200:
                        self.stats["requests"] += 1
                        return parse_response(r.json())
                    last = f"{url}/generate HTTP {r.status_code}: {r.text[:200]}"
                    if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                        break  # the request itself is bad: another server will not help
                except (httpx.HTTPError, SGLangError, ValueError) as exc:
                    last = f"{url}/generate: {type(exc).__name__}: {exc}"
                    if not await self._healthy(client, url):
                        self._down_until[url] = time.monotonic() + self.probation_s
                finally:
                    self._inflight[url] -= 1
                tried.add(url)
                if len(tried) == len(self.urls):
                    tried.clear()
                if attempt < self.retries:
                    self.stats["retries"] += 1
                    await asyncio.sleep(self.backoff_s * 2 ** attempt * (0.5 + random.random() / 2))
        self.stats["failures"] += 1
        return GenerationResult([], [], "abort", error=last or "request failed")

    async def agenerate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        sem = asyncio.Semaphore(self.max_concurrency)
        async with httpx.AsyncClient() as client:
            return list(await asyncio.gather(*(self._one(client, sem, r) for r in requests)))

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return asyncio.run(self.agenerate(requests))

    # -- weights --------------------------------------------------------------------------------
    async def _post_all(self, path: str, body: dict | None) -> dict[str, dict]:
        async with httpx.AsyncClient() as client:
            async def one(url):
                r = await client.post(url + path, json=body or {}, timeout=self.timeout_s, headers=self._headers)
                try:
                    data = r.json()
                except ValueError:
                    data = {"text": r.text[:200]}
                if r.status_code != 200 or (isinstance(data, dict) and data.get("success") is False):
                    raise SGLangError(f"{url}{path} failed (HTTP {r.status_code}): {str(data)[:300]}")
                return data if isinstance(data, dict) else {"result": data}
            results = await asyncio.gather(*(one(u) for u in self.urls))
        return dict(zip(self.urls, results))

    def reload_from_disk(self, model_path: str, weight_version: str | None = None) -> dict[str, dict]:
        """Ask every server to load the HF directory ``model_path`` and flush its cache."""
        body: dict[str, Any] = {"model_path": os.path.abspath(model_path), "flush_cache": True}
        if weight_version is not None:
            body["weight_version"] = weight_version
        out = asyncio.run(self._post_all("/update_weights_from_disk", body))
        asyncio.run(self._post_all("/flush_cache", None))
        return out

    def update_weights(self, model, export_dir: str, *, dtype: str = "bfloat16",
                       weight_version: str | None = None) -> dict[str, dict]:
        """Export ``model`` (an nnx Qwen3-VL) to ``export_dir`` (a path every server can read) and
        reload it on every server."""
        from genevolve_jax.models.hf_io import save_pretrained
        os.makedirs(export_dir, exist_ok=True)
        save_pretrained(model, export_dir, dtype=dtype)
        return self.reload_from_disk(export_dir, weight_version)


_VERSION_DIR = re.compile(r"weights_v[0-9A-Za-z_-]+")


class DiskWeightSync:
    """The trainer's weight sync to SGLang servers through a shared directory.

    :meth:`push` exports the model to ``<weights_dir>/weights_v<version>`` (written as ``….partial``
    and renamed when complete), asks every server to reload it (retried with backoff, since a
    reload that fails leaves that server on its old weights), then deletes the other
    ``weights_v*`` directories: ``weights_dir`` belongs to the trainer. Returns the seconds spent
    exporting and reloading, apart.
    """

    def __init__(self, engine: SGLangEngine, weights_dir: str, *, dtype: str = "bfloat16", retries: int = 3,
                 backoff_s: float = 1.0):
        self.engine, self.dtype = engine, dtype
        self.weights_dir = os.path.abspath(weights_dir)
        self.retries, self.backoff_s = retries, backoff_s
        self.current: str | None = None

    @classmethod
    def from_config(cls, engine: SGLangEngine, cfg, workdir: str) -> "DiskWeightSync":
        """From an ``rl.sglang`` section; an empty ``weights_dir`` is ``<workdir>/sglang_weights``."""
        return cls(engine, cfg.weights_dir or os.path.join(workdir, "sglang_weights"), dtype=str(cfg.export_dtype),
                   retries=int(cfg.retries), backoff_s=float(cfg.backoff_s))

    def export(self, model, version: str) -> str:
        from genevolve_jax.models.hf_io import save_pretrained
        name = f"weights_v{version}"
        if not _VERSION_DIR.fullmatch(name):
            raise ValueError(f"weight version {version!r} must be letters, digits, '_' or '-'")
        final = os.path.join(self.weights_dir, name)
        partial = final + ".partial"
        for stale in (partial, final):
            if os.path.isdir(stale):
                shutil.rmtree(stale)
        os.makedirs(partial)
        save_pretrained(model, partial, dtype=self.dtype)
        os.replace(partial, final)
        return final

    def reload(self, path: str, version: str) -> dict[str, dict]:
        attempt = 0
        while True:
            try:
                return self.engine.reload_from_disk(path, weight_version=version)
            except (SGLangError, httpx.HTTPError) as exc:
                if attempt >= self.retries:
                    raise SGLangError(f"weight reload of {path} (version {version}) failed on the SGLang servers "
                                      f"after {attempt + 1} attempt(s): {exc}") from exc
            time.sleep(self.backoff_s * 2 ** attempt)
            attempt += 1

    def push(self, model, version: str) -> dict[str, float]:
        t = time.perf_counter()
        path = self.export(model, version)
        exported = time.perf_counter()
        self.reload(path, version)
        reloaded = time.perf_counter()
        self.current = path
        for name in os.listdir(self.weights_dir):
            full = os.path.join(self.weights_dir, name)
            if full != path and os.path.isdir(full) and (_VERSION_DIR.fullmatch(name) or name.endswith(".partial")):
                shutil.rmtree(full, ignore_errors=True)
        return {"time/weight_export_s": exported - t, "time/weight_reload_s": reloaded - exported}
