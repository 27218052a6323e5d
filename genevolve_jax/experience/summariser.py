"""Summarise a best/worst pair into one experience bundle (METHOD.md §7), through any text model.

The summariser sees the request, both rollouts as compact transcripts (tool calls, trimmed tool
responses, the final program) with their rewards, and our instructions; it answers with one JSON
bundle (see experience/bundle.py for the form and the slot mapping). The reply is parsed tolerantly,
the pair's named entities are stripped, and a reply that still fails is retried with a note on
what was wrong; after ``attempts`` tries the pair is dropped and counted, never stored half-parsed.

Backends are plain ``generate(text) -> text`` callables: :class:`OpenAICompatibleGenerate` for an
OpenAI-compatible ``/v1/chat/completions`` endpoint, or whatever the trainer passes (its policy via
the JaxEngine). ``generate_many(texts) -> texts`` may be given instead to batch one attempt round.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import httpx

from genevolve_jax.experience.bundle import (GUIDANCE_FIELDS, Bundle, BundleParseError, enforce_no_entities,
                                             parse_bundle_reply)
from genevolve_jax.experience.pairs import Pair, field_of

log = logging.getLogger(__name__)

INSTRUCTIONS = """\
You study two attempts by the same image-planning agent on one request and distil what made the
better attempt better, as reusable advice for future requests of the same kind.

The agent works in rounds. It may call `search` (web text), `image_search` (candidate reference
pictures with ids like IMG_001) and `query_knowledge` (a drawing-skill guide), then it answers with
a program: a self-contained `gen_prompt` for an image model plus the reference images to pass it.
A judge compared the rendered image with the intended one and gave each attempt a reward in [0, 1].

Write advice about the decisions that changed the outcome, grouped as:
- focus: what matters most for requests of this kind;
- tool_plan: which tools to call, in what order, how many times;
- search_queries: how to phrase searches and which facts to look up;
- skill_routing: which skill guides to consult, or skip, and when;
- reference_selection: which reference pictures to keep and what to take from each;
- prompt_program: how to write gen_prompt and the reference notes;
- failure_guards: the mistakes of the weaker attempt, stated as things to avoid.
Where the two attempts made the same choice on a point, record the better attempt's choice as
the standard to keep.

Rules:
- Each bullet is one short imperative sentence (at most 20 words), 1 to 3 bullets per group.
- Generalise: no names of people, places, brands, titles or other proper nouns, no quotes from
  the request, no image ids, no URLs. Say "the landmark", "the product", "the person" instead.
- The trigger says in a few words when this advice applies (the kind of request, not this one).
- request_summary describes the request in general terms, without its named entities.

Reply with one JSON object and nothing else, in this shape:
{"retrieval_key": {"trigger": "...", "request_summary": "..."},
 "decision_guidance": {"focus": ["..."], "tool_plan": ["..."], "search_queries": ["..."],
  "skill_routing": ["..."], "reference_selection": ["..."], "prompt_program": ["..."],
  "failure_guards": ["..."]}}
"""


def _trim(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit].rstrip() + " …"


def render_transcript(trajectory: Any, max_observation_chars: int = 400) -> str:
    """An agent Trajectory (or its dict) as numbered rounds: what was called, what came back, and
    the final program; a trajectory without turns shows only its program."""
    if trajectory is None:
        return "(no transcript)"
    lines = []
    for turn in field_of(trajectory, "turns", None) or []:
        r, kind = field_of(turn, "round", "?"), field_of(turn, "kind", "?")
        if kind == "tool_call":
            args = json.dumps(field_of(turn, "arguments") or {}, ensure_ascii=False, sort_keys=True)
            lines.append(f"round {r}: call {field_of(turn, 'tool_name')} {args}")
            obs = field_of(turn, "observation")
            if obs and max_observation_chars:
                lines.append(f"  result: {_trim(obs, max_observation_chars)}")
            if field_of(turn, "error"):
                lines.append(f"  error: {_trim(field_of(turn, 'error'), 200)}")
        elif kind == "answer":
            lines.append(f"round {r}: final answer")
        else:
            detail = field_of(turn, "error") or field_of(turn, "detail") or ""
            lines.append(f"round {r}: {kind}{': ' + _trim(detail, 200) if detail else ''}")
    program = field_of(trajectory, "program")
    lines.append("program: " + (json.dumps(program, ensure_ascii=False) if program is not None else "(none)"))
    term = field_of(trajectory, "termination")
    if term:
        lines.append(f"ended by: {term}")
    return "\n".join(lines)


def build_prompt(pair: Pair, max_observation_chars: int = 400, note: str = "") -> str:
    parts = [INSTRUCTIONS, "## Request", pair.request.strip(),
             f"## Better attempt (reward {pair.best.reward:.2f})",
             render_transcript(pair.best.trajectory, max_observation_chars),
             f"## Weaker attempt (reward {pair.worst.reward:.2f})",
             render_transcript(pair.worst.trajectory, max_observation_chars)]
    if note:
        parts += ["## Note", note]
    return "\n\n".join(parts)


# --- backends -------------------------------------------------------------------------------------
class SummariserCallError(RuntimeError):
    """A call to the summariser model failed (transport, HTTP status, empty answer)."""


class OpenAICompatibleGenerate:
    """``generate(text) -> text`` over ``{base_url}/v1/chat/completions``; the key, if any, comes
    from the environment variable ``api_key_env`` and is never shown."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "", timeout_s: float = 120.0,
                 temperature: float = 0.3, max_tokens: int = 1024, transport: httpx.BaseTransport | None = None):
        base = base_url.rstrip("/")
        self.url = f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions"
        self.model, self.temperature, self.max_tokens, self.timeout_s = model, temperature, max_tokens, timeout_s
        self._api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        if api_key_env and not self._api_key:
            raise ValueError(f"the summariser endpoint needs an API key in the environment variable {api_key_env}")
        self._client = httpx.Client(timeout=timeout_s, transport=transport)

    def __repr__(self) -> str:  # never show the key
        return f"OpenAICompatibleGenerate(url={self.url!r}, model={self.model!r})"

    def __call__(self, text: str) -> str:
        payload = {"model": self.model, "messages": [{"role": "user", "content": text}],
                   "temperature": self.temperature, "max_tokens": self.max_tokens}
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        try:
            resp = self._client.post(self.url, json=payload, headers=headers)
        except httpx.HTTPError as exc:
            raise SummariserCallError(f"{type(exc).__name__} calling {self.url}") from None
        if resp.status_code != 200:
            raise SummariserCallError(f"HTTP {resp.status_code} from {self.url}: {resp.text[:200]}")
        try:
            content = resp.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise SummariserCallError(f"unexpected response shape from {self.url}: {resp.text[:200]}") from None
        if not isinstance(content, str) or not content.strip():
            raise SummariserCallError(f"empty answer from {self.url}")
        return content

    def close(self) -> None:
        self._client.close()


# --- the summariser -------------------------------------------------------------------------------
@dataclasses.dataclass
class SummaryStats:
    requested: int = 0
    succeeded: int = 0
    dropped: int = 0
    retries: int = 0
    entity_strips: int = 0
    errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def to_dict(self) -> dict:
        return {"requested": self.requested, "succeeded": self.succeeded, "dropped": self.dropped,
                "retries": self.retries, "entity_strips": self.entity_strips,
                **{f"error_{k}": v for k, v in self.errors.items()}}


class Summariser:
    def __init__(self, generate: Callable[[str], str] | None = None, *,
                 generate_many: Callable[[list[str]], list[str]] | None = None, attempts: int = 3,
                 backoff_s: float = 1.0, max_concurrency: int = 4, max_observation_chars: int = 400,
                 max_bullets: int = 4, max_bullet_words: int = 30, sleep: Callable[[float], None] = time.sleep):
        if generate is None and generate_many is None:
            raise ValueError("Summariser needs generate(text) -> text or generate_many(texts) -> texts")
        self.generate, self.generate_many = generate, generate_many
        self.attempts, self.backoff_s, self.max_concurrency = attempts, backoff_s, max_concurrency
        self.max_observation_chars, self.max_bullets, self.max_bullet_words = (
            max_observation_chars, max_bullets, max_bullet_words)
        self.sleep = sleep
        self.stats = SummaryStats()

    def _call_all(self, texts: list[str]) -> list[str | Exception]:
        if self.generate_many is not None:
            try:
                replies = list(self.generate_many(texts))
            except Exception as exc:  # noqa: BLE001 - one failed batch call fails this round only
                return [exc] * len(texts)
            if len(replies) != len(texts):
                err = SummariserCallError(f"generate_many returned {len(replies)} replies for {len(texts)} prompts")
                return [err] * len(texts)
            return replies

        def one(text: str) -> str | Exception:
            try:
                return self.generate(text)
            except Exception as exc:  # noqa: BLE001 - counted, retried, then the pair is dropped
                return exc

        if self.max_concurrency <= 1 or len(texts) <= 1:
            return [one(t) for t in texts]
        with concurrent.futures.ThreadPoolExecutor(min(self.max_concurrency, len(texts))) as pool:
            return list(pool.map(one, texts))

    def _finish(self, reply: str, pair: Pair) -> Bundle:
        bundle = parse_bundle_reply(reply, max_bullets=self.max_bullets, max_words=self.max_bullet_words)
        bundle = enforce_no_entities(bundle, [pair.best.request, pair.worst.request])
        if not bundle.trigger or not bundle.request_summary or bundle.num_bullets() < 2:
            raise BundleParseError("bundle is empty after removing named entities")
        bundle.source_request, bundle.gap = pair.request, pair.gap
        return bundle

    def summarise_all(self, pairs: Sequence[Pair]) -> list[Bundle | None]:
        """One bundle (or None, dropped and counted) per pair, in order. Each attempt round sends
        every pair still unsummarised; a retry carries a note on what went wrong."""
        out: list[Bundle | None] = [None] * len(pairs)
        notes = [""] * len(pairs)
        pending = list(range(len(pairs)))
        self.stats.requested += len(pairs)
        for attempt in range(self.attempts):
            if not pending:
                break
            if attempt:
                self.stats.retries += len(pending)
                if self.backoff_s:
                    self.sleep(self.backoff_s * 2 ** (attempt - 1))
            texts = [build_prompt(pairs[i], self.max_observation_chars, notes[i]) for i in pending]
            replies = self._call_all(texts)
            still = []
            for i, reply in zip(pending, replies):
                try:
                    if isinstance(reply, Exception):
                        raise reply
                    out[i] = self._finish(reply, pairs[i])
                    self.stats.succeeded += 1
                    self.stats.entity_strips += sum(f.startswith("stripped_entities") for f in out[i].flags)
                except BundleParseError as exc:
                    self.stats.errors["parse"] += 1
                    notes[i] = (f"Your previous reply could not be used ({exc}). Reply with only the JSON "
                                f"object in the shape given above, with fields {', '.join(GUIDANCE_FIELDS)}.")
                    still.append(i)
                except Exception as exc:  # noqa: BLE001 - transport or backend failure: retry, then drop
                    self.stats.errors[type(exc).__name__] += 1
                    log.warning("summariser call failed for group %s: %s", pairs[i].group_id, exc)
                    still.append(i)
            pending = still
        for i in pending:
            self.stats.dropped += 1
            log.warning("dropping pair of group %s after %d summariser attempts", pairs[i].group_id, self.attempts)
        return out

    def summarise(self, pair: Pair) -> Bundle | None:
        return self.summarise_all([pair])[0]


def make_summariser(summariser_cfg, generate: Callable[[str], str] | None = None,
                    generate_many: Callable[[list[str]], list[str]] | None = None,
                    transport: httpx.BaseTransport | None = None) -> Summariser:
    """From the ``experience.summariser`` section. Backend "policy" uses the callable the trainer
    passes (its policy through the JaxEngine); "openai" builds an OpenAI-compatible client; "rule"
    is the scripted offline proxy (experience/rule_summariser.py)."""
    s = summariser_cfg
    if s.backend == "rule":
        from genevolve_jax.experience.rule_summariser import RuleSummariser
        return RuleSummariser(max_bullets=s.max_bullets, max_bullet_words=s.max_bullet_words)
    if s.backend == "openai":
        generate = OpenAICompatibleGenerate(s.base_url, s.model, api_key_env=s.api_key_env, timeout_s=s.timeout_s,
                                            temperature=s.temperature, max_tokens=s.max_tokens, transport=transport)
        generate_many = None
    elif generate is None and generate_many is None:
        raise ValueError("experience.summariser.backend is 'policy': pass the policy's generate function "
                         "(or set experience.summariser.backend='openai' with a base_url)")
    return Summariser(generate, generate_many=generate_many, attempts=s.attempts, backoff_s=s.backoff_s,
                      max_concurrency=s.max_concurrency, max_observation_chars=s.max_observation_chars,
                      max_bullets=s.max_bullets, max_bullet_words=s.max_bullet_words)
