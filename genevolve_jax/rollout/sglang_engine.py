"""SGLangEngine: a client of SGLang's native HTTP API (0.5.23; `genevolve serve` speaks the same).

Per request: ``POST /generate`` with ``input_ids``, ``image_data`` (one entry per image: an absolute
path the server can read, or a base64 PNG for in-memory images), ``sampling_params``,
``return_logprob: true``, ``logprob_start_len: -1`` (output tokens only) and, for image prompts,
``return_prompt_token_ids: true``. The field-by-field wire format, with where each field is defined
in the 0.5.23 wheel, is written down in tests/fixtures/sglang_responses.py and checked against
SGLang's own request models by tests/rollout/test_sglang_contract.py.

Image prompts go out in SGLang's form. The trainer's sequence holds each image expanded to N
``<|image_pad|>`` tokens; SGLang's Qwen-VL processor expands every pad it finds again (a pre-expanded
run fails server-side with a 500). So each run of pads is sent as ONE pad, and the server is asked
for the prompt ids it built. When its expansion gives any image another token count than the
trainer's sequence (its image processor resizes with other min/max pixels), the request ends as an
"abort" result whose error starts with ``image_token_mismatch_server`` (``prompt_token_mismatch_server``
when the image counts agree but other ids differ): the agent loop masks that trajectory with the
reason (termination "error") rather than train on log-probs of a sequence the trainer does not have.

Servers: several URLs are load-balanced (least in-flight requests first) over the servers that are
healthy and hold the newest weights. Every call has a timeout. A failed call (timeout, connection
error, 5xx, 408/429) is retried with a NEW ``rid`` (SGLang refuses a rid it still holds, and it
notices a dropped client only on a 4 s poll), on another healthy server when there is one; a retry
on the same server after a dropped connection waits at least that poll. A server whose call failed
and whose ``/health`` does not answer is put on probation. A request that still fails becomes an
"abort" result naming the error.

Seeds: SGLang 0.5.23 ignores ``sampling_seed`` unless the server runs with
``--enable-deterministic-inference`` (srt/sampling/sampling_batch_info.py). :meth:`wait_healthy`
reads ``/server_info`` (``/get_server_info`` on older servers) and logs a warning for every server
that does not report it.

Weight sync (:meth:`update_weights`): the policy's parameters are exported as an HF directory under
``weights_dir`` and every server reloads it with ``POST /update_weights_from_disk`` (which flushes
the server's cache itself; no ``/flush_cache``, which answers 400 while requests are queued). A
trainer writes that export through its Collective instead (on several hosts every process writes
its share of the files) and then calls :meth:`reload_weights`. A
failed reload is retried against the same export, then again at the next step; meanwhile that
server gets no rollouts, and the run stops only past ``rl.sglang.max_weight_lag_steps``
(rollout/sglang_weights.py). On several hosts process 0 pushes for all, and every process adopts
its version table (:meth:`weight_sync_state`), so no host sends rollouts to a server behind.

What SGLang's ``output_token_logprobs`` mean (temperature, precision, release differences) is
written down in genevolve_jax/train/rl/config.py, next to ``rl.old_logprobs``.
"""
from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import random
import time
import uuid
from typing import Any, Sequence

import httpx

from genevolve_jax.models.qwen3_vl.config import HEAD_LORA_TARGET
from genevolve_jax.rollout.engine import GenerationRequest, GenerationResult, RolloutEngine
from genevolve_jax.rollout.sglang_weights import WeightExport, WeightLagError, WeightVersions

log = logging.getLogger(__name__)

# SGLang 0.5.23 checks a dropped HTTP client every SGLANG_REQUEST_STATE_WAIT_TIMEOUT seconds
# (srt/environ.py: EnvInt(4); used as _REQUEST_STATE_WAIT_TIMEOUT in srt/managers/tokenizer_manager.py
# `_stream_one_response`) and only then aborts its request.
SGLANG_DISCONNECT_POLL_S = 4.0
SGLANG_VERSION = "0.5.23"  # the release launch/sglang_server.sh targets and the contract tests check against
QWEN3_VL_IMAGE_PAD_ID = 151655
IMAGE_MISMATCH = "image_token_mismatch_server"
PROMPT_MISMATCH = "prompt_token_mismatch_server"
__all__ = ["SGLangEngine", "SGLangError", "WeightLagError", "request_body", "parse_response", "collapse_image_pads",
           "image_pad_runs", "error_message", "IMAGE_MISMATCH", "PROMPT_MISMATCH", "SGLANG_DISCONNECT_POLL_S", "SGLANG_VERSION"]


class SGLangError(RuntimeError):
    """A server answered with an error or an unusable body."""


# --- request bodies ------------------------------------------------------------------------------
def image_pad_runs(ids: Sequence[int], image_pad: int) -> list[int]:
    """Lengths of the runs of consecutive ``image_pad`` tokens, in order (one run per image)."""
    runs: list[int] = []
    previous = None
    for t in ids:
        if t == image_pad:
            if previous == image_pad:
                runs[-1] += 1
            else:
                runs.append(1)
        previous = t
    return runs


def collapse_image_pads(ids: Sequence[int], image_pad: int) -> list[int]:
    """``ids`` with every run of ``image_pad`` tokens reduced to one pad (SGLang's prompt form)."""
    out: list[int] = []
    for t in ids:
        if not (t == image_pad and out and out[-1] == image_pad):
            out.append(int(t))
    return out


def _image_entry(image) -> str:
    if isinstance(image, (str, os.PathLike)):
        return os.path.abspath(os.fspath(image))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def request_body(req: GenerationRequest, *, image_pad: int = QWEN3_VL_IMAGE_PAD_ID, rid: str | None = None) -> dict:
    """The /generate body of one request. Raises ValueError when the prompt's pad runs do not match
    its images (the trainer would not know which tokens belong to which image)."""
    ids = [int(t) for t in req.prompt_ids]
    body: dict[str, Any] = {"input_ids": ids, "sampling_params": req.sampling.to_sglang(),
                            "return_logprob": True, "logprob_start_len": -1}
    runs = image_pad_runs(ids, image_pad)
    if len(runs) != len(req.images):
        raise ValueError(f"the prompt has {len(runs)} runs of image-pad tokens (id {image_pad}) but the request "
                         f"carries {len(req.images)} images")
    if req.images:
        body["input_ids"] = collapse_image_pads(ids, image_pad)
        body["image_data"] = [_image_entry(x) for x in req.images]
        body["return_prompt_token_ids"] = True
    if rid:
        body["rid"] = rid
    return body


# --- responses -----------------------------------------------------------------------------------
def error_message(data: Any) -> str:
    """The message of an error body in any of the shapes SGLang 0.5.23 answers with (schema gate
    ``{"error": str}``, ValueError ``{"error": {"message"}}``, validation ``{"message", "code"}``) or
    OpenAI's nested shape; the raw body (cut) otherwise."""
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
        if isinstance(data.get("message"), str):
            return data["message"]
    return str(data)[:300]


def parse_response(data: Any, expected_prompt: Sequence[int] | None = None,
                   image_pad: int = QWEN3_VL_IMAGE_PAD_ID) -> GenerationResult:
    """SGLang's /generate body -> GenerationResult; raises SGLangError on a malformed body.

    ``expected_prompt``: the trainer's prompt ids (images expanded), for image prompts. The server's
    ``prompt_token_ids`` must then expand each image to as many pads as the trainer's sequence has,
    else the result is an abort whose error starts with ``image_token_mismatch_server``; and equal
    the trainer's ids, else an abort starting with ``prompt_token_mismatch_server`` (a server that
    re-tokenises the decoded prompt: SGLANG_MM_AVOID_RETOKENIZE=0)."""
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, dict) or not isinstance(data.get("meta_info"), dict):
        raise SGLangError(f"/generate response has no meta_info object: {str(data)[:200]}")
    meta = data["meta_info"]
    finish = meta.get("finish_reason") or {}
    kind = finish.get("type") if isinstance(finish, dict) else str(finish)
    if kind not in ("stop", "length", "abort"):
        raise SGLangError(f"/generate finish_reason {finish!r} is not stop|length|abort")
    if kind == "abort":
        message = finish.get("message") if isinstance(finish, dict) else None
        return GenerationResult([], [], "abort", error=str(message or "aborted by server"))
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
    if expected_prompt is not None:
        served = data.get("prompt_token_ids")
        if not isinstance(served, list):
            return GenerationResult([], [], "abort", mask_kind=IMAGE_MISMATCH, error=(
                f"{IMAGE_MISMATCH}: the server did not return prompt_token_ids for an image prompt, so its image "
                f"expansion cannot be checked against the trainer's (an SGLang older than 0.5.23?)"))
        got, want = image_pad_runs(served, image_pad), image_pad_runs(expected_prompt, image_pad)
        if got != want:
            return GenerationResult([], [], "abort", mask_kind=IMAGE_MISMATCH, error=(
                f"{IMAGE_MISMATCH}: the server expanded the images to {got} image tokens, the trainer's sequence "
                f"has {want}; make the server's image processor use the trainer's min/max pixels (README, "
                f"SGLang section)"))
        if [int(t) for t in served] != [int(t) for t in expected_prompt]:
            at = next((i for i, (a, b) in enumerate(zip(served, expected_prompt)) if a != b),
                      min(len(served), len(expected_prompt)))
            return GenerationResult([], [], "abort", mask_kind=PROMPT_MISMATCH, error=(
                f"{PROMPT_MISMATCH}: the server's prompt ids differ from the trainer's from position {at} "
                f"({len(served)} vs {len(expected_prompt)} ids); is SGLANG_MM_AVOID_RETOKENIZE off on the server?"))
    return GenerationResult(ids, logprobs, kind)


def _find_key(tree: Any, key: str, depth: int = 4) -> Any:
    """``tree[key]`` at the top level, else in a nested dict (server_info nests some records)."""
    if not isinstance(tree, dict) or depth < 0:
        return None
    if key in tree:
        return tree[key]
    for value in tree.values():
        found = _find_key(value, key, depth - 1)
        if found is not None:
            return found
    return None


# --- the engine ----------------------------------------------------------------------------------
class SGLangEngine(RolloutEngine):
    def __init__(self, urls: Sequence[str] | str, *, timeout_s: float = 600.0, retries: int = 3,
                 backoff_s: float = 1.0, max_concurrency: int = 256, probation_s: float = 10.0,
                 api_key_env: str = "", model_config=None, weights_dir: str = "", export_dtype: str = "bfloat16",
                 max_weight_lag_steps: int = 3, disconnect_poll_s: float = SGLANG_DISCONNECT_POLL_S,
                 adapters_kept: int = 1):
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("SGLangEngine needs at least one server URL")
        self.urls = list(dict.fromkeys(u.rstrip("/") for u in urls))
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.max_concurrency, self.probation_s = max_concurrency, probation_s
        self.disconnect_poll_s = disconnect_poll_s
        self.image_pad = int(model_config.image_token_id) if model_config is not None else QWEN3_VL_IMAGE_PAD_ID
        self._headers = {}
        if api_key_env and os.environ.get(api_key_env):
            self._headers["Authorization"] = f"Bearer {os.environ[api_key_env]}"
        self._inflight = {u: 0 for u in self.urls}
        self._down_until = {u: 0.0 for u in self.urls}
        self.export = WeightExport(weights_dir, model_config, dtype=export_dtype) if weights_dir else None
        self.versions = WeightVersions(self.urls, max_weight_lag_steps)
        # LoRA: the adapter each server loaded last, named in the lora_path of its requests (absent:
        # the server samples its own weights). Only a loaded version is ever named. Each server keeps
        # its last ``adapters_kept`` versions loaded (``loaded_adapters``, oldest first): with
        # rl.max_staleness = N, requests of the N versions before the newest may still be in flight
        # when it loads, so the trainer keeps N + 1.
        if int(adapters_kept) < 1:
            raise ValueError(f"adapters_kept must be >= 1, got {adapters_kept}")
        self.adapters_kept = int(adapters_kept)
        self.adapters: dict[str, str] = {}
        self.loaded_adapters: dict[str, list[str]] = {}
        self.deterministic: dict[str, bool | None] = {}
        # ``disconnect_waits``: retries held back to SGLang's disconnect poll (same server, dropped request).
        self.stats = {"requests": 0, "retries": 0, "failures": 0, "prompt_mismatches": 0, "disconnect_waits": 0}

    @classmethod
    def from_config(cls, cfg, *, model_config=None, weights_dir: str = "", adapters_kept: int = 1) -> "SGLangEngine":
        """From an ``rl.sglang`` section (train/rl/config.py). ``model_config`` (the policy's
        Qwen3VLConfig: image-pad id, export layout) and ``weights_dir`` (a directory every server can
        read; the trainer resolves an empty ``rl.sglang.weights_dir``) are needed for weight sync;
        ``adapters_kept``: LoRA versions each server keeps loaded (rl.max_staleness + 1)."""
        return cls(list(cfg.urls), timeout_s=float(cfg.timeout_s), retries=int(cfg.retries),
                   backoff_s=float(cfg.backoff_s), max_concurrency=int(cfg.max_concurrency),
                   api_key_env=str(cfg.api_key_env), model_config=model_config,
                   weights_dir=weights_dir or str(cfg.weights_dir), export_dtype=str(cfg.export_dtype),
                   max_weight_lag_steps=int(cfg.max_weight_lag_steps), adapters_kept=adapters_kept)

    @property
    def serves_every_host(self) -> bool:
        return True  # rl.sglang.urls lists every host's servers: one process pushes for all

    def weight_sync_state(self) -> dict:
        return {**self.versions.state_dict(), "adapters": dict(self.adapters),
                "loaded_adapters": {u: list(names) for u, names in self.loaded_adapters.items()}}

    def adopt_weight_sync_state(self, state) -> None:
        state = dict(state)
        self.adapters = dict(state.pop("adapters", {}))
        self.loaded_adapters = {u: list(names) for u, names in state.pop("loaded_adapters", {}).items()}
        self.versions.load_state_dict(state)

    @property
    def adapter_sync(self) -> bool:
        return self.export is not None   # the adapter folders go where the servers read exports

    @property
    def weight_export(self):
        return self.export

    # -- server choice --------------------------------------------------------------------------
    def pick_server(self, avoid: Sequence[str] = ()) -> str:
        """The server for the next request: healthy (not on probation), holding the newest weights
        (servers behind get none while another is current), not in ``avoid``, least in flight."""
        now = time.monotonic()
        up = [u for u in self.urls if self._down_until[u] <= now and u not in avoid]
        pool = self.versions.freshest(up) or self.versions.freshest([u for u in self.urls if u not in avoid]) \
            or self.versions.freshest(self.urls)
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

    async def _server_info(self, client: httpx.AsyncClient, url: str) -> dict | None:
        for path in ("/server_info", "/get_server_info"):  # 0.5.23 serves both; older ones the second
            try:
                r = await client.get(url + path, timeout=min(10.0, self.timeout_s), headers=self._headers)
            except httpx.HTTPError:
                return None
            if r.status_code == 200:
                try:
                    data = r.json()
                except ValueError:
                    return None
                return data if isinstance(data, dict) else None
        return None

    async def server_infos(self, urls: Sequence[str] | None = None) -> dict[str, dict | None]:
        urls = list(self.urls if urls is None else urls)
        async with httpx.AsyncClient() as client:
            infos = await asyncio.gather(*(self._server_info(client, u) for u in urls))
        return dict(zip(urls, infos))

    def check_determinism(self, urls: Sequence[str] | None = None) -> dict[str, bool | None]:
        """Read each server's ``enable_deterministic_inference`` (None: the server did not say) and
        log that sampling seeds are ignored where it is not on."""
        for url, info in asyncio.run(self.server_infos(urls)).items():
            flag = _find_key(info, "enable_deterministic_inference") if info else None
            self.deterministic[url] = None if flag is None else bool(flag)
            if not flag:
                how = "does not report" if flag is None else "runs without"
                log.warning("SGLang server %s %s --enable-deterministic-inference: it ignores sampling seeds, so "
                            "rollouts cannot be replayed (launch/sglang_server.sh: DETERMINISTIC=1)", url, how)
        return dict(self.deterministic)

    def wait_healthy(self, wait_s: float = 0.0, *, field: str = "urls", poll_s: float = 1.0) -> dict[str, bool]:
        """Poll ``GET /health`` of every server until one answers 200 or ``wait_s`` has passed.
        Raises SGLangError naming ``field`` and the unreachable URLs when none is healthy; servers
        still down are put on probation (requests go elsewhere until they recover). Then reads the
        healthy servers' determinism (:meth:`check_determinism`)."""
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
        self.check_determinism([u for u, ok in states.items() if ok])
        return states

    # -- generation -----------------------------------------------------------------------------
    def _rid(self, req: GenerationRequest, attempt: int) -> str:
        # A fresh rid per attempt: SGLang refuses a rid it still holds ("Duplicate request ID").
        return f"{req.request_id or 'req'}-a{attempt}-{uuid.uuid4().hex[:12]}"

    async def _one(self, client: httpx.AsyncClient, sem: asyncio.Semaphore, req: GenerationRequest) -> GenerationResult:
        try:
            base = request_body(req, image_pad=self.image_pad)
        except ValueError as exc:
            self.stats["failures"] += 1
            return GenerationResult([], [], "abort", error=f"bad request: {exc}")
        expected = [int(t) for t in req.prompt_ids] if req.images else None
        tried: set[str] = set()
        last, last_url, dropped = "", None, False
        async with sem:
            for attempt in range(self.retries + 1):
                url = self.pick_server(tuple(tried))
                if attempt:
                    self.stats["retries"] += 1
                    delay = self.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random() / 2)
                    if dropped and url == last_url:  # the dropped request may still run there until the poll
                        delay = max(delay, self.disconnect_poll_s)
                        self.stats["disconnect_waits"] += 1
                    await asyncio.sleep(delay)
                body = {**base, "rid": self._rid(req, attempt)}
                if url in self.adapters:
                    body["lora_path"] = self.adapters[url]
                self._inflight[url] += 1
                dropped = False
                try:
                    r = await client.post(url + "/generate", json=body, timeout=self.timeout_s, headers=self._headers)
                    if r.status_code == 200:
                        result = parse_response(r.json(), expected, self.image_pad)
                        self.stats["requests"] += 1
                        if result.error.startswith((IMAGE_MISMATCH, PROMPT_MISMATCH)):
                            self.stats["prompt_mismatches"] += 1
                        return result
                    try:
                        message = error_message(r.json())
                    except ValueError:
                        message = r.text[:300]
                    last = f"{url}/generate HTTP {r.status_code}: {message}"
                    if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                        break  # the request itself is bad: another server will not help
                except (httpx.HTTPError, SGLangError, ValueError) as exc:
                    last = f"{url}/generate: {type(exc).__name__}: {exc}"
                    dropped = isinstance(exc, httpx.HTTPError)
                    if dropped and not await self._healthy(client, url):
                        self._down_until[url] = time.monotonic() + self.probation_s
                finally:
                    self._inflight[url] -= 1
                last_url = url
                tried.add(url)
                if len(tried) == len(self.urls):
                    tried.clear()
        self.stats["failures"] += 1
        return GenerationResult([], [], "abort", error=last or "request failed")

    async def agenerate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        sem = asyncio.Semaphore(self.max_concurrency)
        async with httpx.AsyncClient() as client:
            return list(await asyncio.gather(*(self._one(client, sem, r) for r in requests)))

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return asyncio.run(self.agenerate(requests))

    # -- weights --------------------------------------------------------------------------------
    async def _reload_one(self, client: httpx.AsyncClient, url: str, path: str, step: int) -> str:
        """Reload ``path`` on ``url``, retried with backoff; "" when loaded, else the last error."""
        body = {"model_path": path, "weight_version": str(step)}  # flush_cache defaults to true
        return await self._post_retried(client, url, "/update_weights_from_disk", body)

    async def _post_retried(self, client: httpx.AsyncClient, url: str, route: str, body: dict) -> str:
        """POST ``body`` to ``url + route``, retried with backoff; "" on success, else the last error."""
        error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                r = await client.post(url + route, json=body, timeout=self.timeout_s, headers=self._headers)
                try:
                    data = r.json()
                except ValueError:
                    data = r.text[:300]
                if r.status_code == 200 and not (isinstance(data, dict) and data.get("success") is False):
                    return ""
                error = f"HTTP {r.status_code}: {error_message(data)}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
        return error or f"{route} failed"

    async def _reload_all(self, path: str, step: int) -> dict[str, str]:
        async with httpx.AsyncClient() as client:
            errors = await asyncio.gather(*(self._reload_one(client, u, path, step) for u in self.urls))
        return dict(zip(self.urls, errors))

    def update_weights(self, params, step: int) -> dict[str, float]:
        """Export ``params`` (the policy's nnx.State of nnx.Param, on this process) as
        ``<weights_dir>/weights_v<step>`` and :meth:`reload_weights` it. A multi-process trainer
        writes the export from every process instead (Collective.export_hf) and then reloads."""
        self._require_export()
        t0 = time.perf_counter()
        path = self.export.export(params, step)
        return {"time/weight_export_s": time.perf_counter() - t0, **self.reload_weights(path, step)}

    def reload_weights(self, path: str, step: int) -> dict[str, float]:
        """Reload the export at ``path`` on every server (weight_version = str(step)). A server
        whose reload still fails after the retries keeps its old weights and gets no rollouts until
        a later step's reload succeeds; raises WeightLagError (naming the server and steps) once it
        is more than ``max_weight_lag_steps`` behind. Older exports are deleted afterwards."""
        self._require_export()
        t1 = time.perf_counter()
        outcomes = asyncio.run(self._reload_all(path, step))
        t2 = time.perf_counter()
        for url, error in outcomes.items():
            if error:
                log.warning("SGLang server %s did not load the weights of step %d (%s); it gets no rollouts "
                            "until a reload succeeds", url, step, error)
        metrics = self.versions.record(step, outcomes)
        self.export.prune(path)
        return {"time/weight_reload_s": t2 - t1, **metrics}

    def check_adapters(self, lora) -> None:
        """Every server that reports its arguments (/server_info) must take the adapters a sync
        sends (peft_io ``one_rank`` folders): LoRA enabled, --max-lora-rank at least the largest
        rank, and lm_head among its --lora-target-modules when the head is adapted. Else an
        SGLangError naming the server and the launch/sglang_server.sh setting, before any sync (a
        load the server refuses would only show as a lagging server). A server that does not say
        is not judged."""
        problems = []
        for url, info in asyncio.run(self.server_infos()).items():
            if not info:
                continue
            enabled, max_rank = _find_key(info, "enable_lora"), _find_key(info, "max_lora_rank")
            modules = _find_key(info, "lora_target_modules")
            if enabled is False:
                problems.append(f"{url} runs without --enable-lora (LORA_RANK={lora.max_rank})")
            elif max_rank is not None and int(max_rank) < lora.max_rank:
                problems.append(f"{url} has --max-lora-rank {max_rank}, below the adapters' {lora.ranks} "
                                f"(LORA_RANK={lora.max_rank})")
            if (enabled is not False and HEAD_LORA_TARGET in lora.targets and isinstance(modules, (list, tuple))
                    and not {HEAD_LORA_TARGET, "all"} & set(modules)):
                problems.append(f"{url} does not adapt {HEAD_LORA_TARGET} (LORA_HEAD=1)")
        if problems:
            raise SGLangError("SGLang servers cannot load this run's LoRA adapters (model.lora): "
                              + "; ".join(problems))

    def load_adapter(self, path: str, step: int) -> dict[str, float]:
        """Load the PEFT folder ``path`` on every server as adapter ``policy_v<step>``
        (/load_lora_adapter). A server that loaded it names it in the lora_path of every later
        request and unloads the versions older than its last ``adapters_kept`` (a request of the
        kept ones may still be in flight under rl.max_staleness; the synchronous trainer keeps one,
        having no request in flight at a sync). One whose load failed keeps its versions and falls
        behind as after a failed reload: no rollouts while another server is current, WeightLagError
        past the allowed lag."""
        self._require_export()
        name = f"policy_v{int(step)}"
        t0 = time.perf_counter()
        outcomes = asyncio.run(self._all(lambda c, u: self._post_retried(
            c, u, "/load_lora_adapter", {"lora_name": name, "lora_path": path})))
        superseded: dict[str, list[str]] = {}
        for url, error in outcomes.items():
            if error:
                log.warning("SGLang server %s did not load the adapter of step %d (%s); it gets no rollouts "
                            "until a load succeeds", url, step, error)
                continue
            loaded = self.loaded_adapters.get(url) or ([self.adapters[url]] if url in self.adapters else [])
            loaded = [n for n in loaded if n != name] + [name]
            if len(loaded) > self.adapters_kept:
                superseded[url] = loaded[:-self.adapters_kept]
            self.loaded_adapters[url] = loaded[-self.adapters_kept:]
            self.adapters[url] = name

        async def unload(client, url):      # oldest first; the first refusal is the error reported
            errors = [await self._post_retried(client, url, "/unload_lora_adapter", {"lora_name": old})
                      for old in superseded[url]]
            return next((e for e in errors if e), "")

        unloaded = asyncio.run(self._all(unload, list(superseded)))
        for url, error in unloaded.items():
            if error:
                log.warning("SGLang server %s kept an adapter of %s (%s)", url, superseded[url], error)
        metrics = self.versions.record(step, outcomes)
        self.export.prune(path)
        return {"time/adapter_load_s": time.perf_counter() - t0, **metrics}

    async def _all(self, post, urls: Sequence[str] | None = None) -> dict[str, str]:
        """``post(client, url)`` on every server (or ``urls``) at once: {url: error or ""}."""
        urls = self.urls if urls is None else list(urls)
        async with httpx.AsyncClient() as client:
            errors = await asyncio.gather(*(post(client, u) for u in urls))
        return dict(zip(urls, errors))

    def _require_export(self) -> None:
        if self.export is None:
            raise ValueError("SGLangEngine has no weights_dir, so it cannot sync weights; build it with "
                             "SGLangEngine.from_config(rl.sglang, model_config=..., weights_dir=...)")
