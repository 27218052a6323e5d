"""The experience bundle: its form, a tolerant parser for a summariser's reply, and the
named-entity guard.

Form (METHOD.md §7): a retrieval key {trigger, request summary} and decision guidance {focus, tool
plan, search-query guidance, skill routing, reference selection, prompt-program guidance, failure
guards}, each a few short imperative bullets. The five slots S1–S5 are views of the guidance:

  S1 search strategy       ← tool_plan + search_queries
  S2 knowledge activation  ← skill_routing
  S3 reference selection   ← reference_selection
  S4 prompt construction   ← prompt_program
  S5 failure avoidance     ← failure_guards

Bundles must generalise, so they carry no named entities: the capitalised, proper-noun-like phrases
of the pair's request are stripped from every field (and counted), and other proper-noun-like
words in the reply are flagged.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping

from genevolve_jax.reward.parsing import json_objects_in

GUIDANCE_FIELDS = ("focus", "tool_plan", "search_queries", "skill_routing", "reference_selection",
                   "prompt_program", "failure_guards")
SLOTS = {
    "S1_search_strategy": ("tool_plan", "search_queries"),
    "S2_knowledge_activation": ("skill_routing",),
    "S3_reference_selection": ("reference_selection",),
    "S4_prompt_construction": ("prompt_program",),
    "S5_failure_avoidance": ("failure_guards",),
}
# Reply keys we accept for each field (after lower-casing and turning spaces/dashes into "_").
_ALIASES = {
    "focus": ("focus", "key_focus"),
    "tool_plan": ("tool_plan", "recommended_tool_plan", "tools", "s1", "s1_search_strategy", "search_strategy"),
    "search_queries": ("search_queries", "search_query_guidance", "query_guidance", "queries"),
    "skill_routing": ("skill_routing", "skills", "s2", "s2_knowledge_activation", "knowledge_activation"),
    "reference_selection": ("reference_selection", "references", "s3", "s3_reference_selection"),
    "prompt_program": ("prompt_program", "prompt_program_guidance", "prompt_construction", "program",
                       "s4", "s4_prompt_construction"),
    "failure_guards": ("failure_guards", "failure_avoidance", "guards", "s5", "s5_failure_avoidance"),
}
_KEY_ALIASES = ("retrieval_key", "key", "retrieval")
_GUIDANCE_ALIASES = ("decision_guidance", "guidance", "decision_guide")


class BundleParseError(ValueError):
    """The summariser's reply holds no usable bundle; the message says what was wrong."""


@dataclasses.dataclass
class Bundle:
    trigger: str
    request_summary: str
    guidance: dict[str, list[str]]
    source_request: str = ""    # the pair's request: what retrieval compares new requests with
    gap: float = 0.0            # R(τ+) − R(τ−) of the pair it came from
    flags: list[str] = dataclasses.field(default_factory=list)

    def slots(self) -> dict[str, list[str]]:
        return {slot: [b for f in fields for b in self.guidance.get(f, [])] for slot, fields in SLOTS.items()}

    def num_bullets(self) -> int:
        return sum(len(v) for v in self.guidance.values())

    def to_dict(self) -> dict:
        return {"trigger": self.trigger, "request_summary": self.request_summary,
                "guidance": {f: list(self.guidance.get(f, [])) for f in GUIDANCE_FIELDS},
                "source_request": self.source_request, "gap": float(self.gap), "flags": list(self.flags)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Bundle":
        missing = [k for k in ("trigger", "request_summary", "guidance") if k not in d]
        if missing:
            raise ValueError(f"bundle record lacks key(s) {missing}")
        guidance = {f: [str(b) for b in d["guidance"].get(f, [])] for f in GUIDANCE_FIELDS}
        return cls(str(d["trigger"]), str(d["request_summary"]), guidance, str(d.get("source_request", "")),
                   float(d.get("gap", 0.0)), list(d.get("flags", [])))


# --- finding the JSON -----------------------------------------------------------------------------
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```[a-zA-Z]*\s*(.*?)```", re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_LINE_COMMENT = re.compile(r"(?m)^\s*//.*$")


def _fix_literals(s: str) -> str:
    s = s.replace("\u201c", '"').replace("\u201d", '"').replace("\u2019", "'").replace("\u2018", "'")
    s = _LINE_COMMENT.sub("", s)
    s = _TRAILING_COMMA.sub(r"\1", s)
    s = re.sub(r"\bTrue\b", "true", re.sub(r"\bFalse\b", "false", re.sub(r"\bNone\b", "null", s)))
    if '"' not in s:
        s = s.replace("'", '"')
    return s


def _close(s: str) -> str:
    """Close what a cut-off reply left open: a string, then brackets in order; a dangling comma or
    key is dropped first."""
    stack, in_str, esc = [], False, False
    for ch in s:
        if in_str:
            esc, in_str = (False, True) if esc else (ch == "\\", ch != '"')
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]" and stack:
            stack.pop()
    if in_str:
        s += '"'
    s = re.sub(r'(,\s*"[^"]*"\s*:\s*|,\s*|:\s*)$', "", s.rstrip())
    return s + "".join(reversed(stack))


def _repairs(text: str) -> list[str]:
    """Common slips of language models writing JSON (smart quotes, trailing commas, // comments,
    Python literals, single quotes), tried on the span up to the last '}' and, for a reply that was
    cut off, on everything after the first '{' with the open brackets closed."""
    start = text.find("{")
    if start < 0:
        return []
    end = text.rfind("}")
    out = [_fix_literals(text[start:end + 1])] if end > start else []
    out.append(_close(_fix_literals(text[start:])))
    return out


def _norm_key(k: Any) -> str:
    return re.sub(r"[\s\-]+", "_", str(k).strip().lower())


def _lower_keys(d: Mapping) -> dict:
    return {_norm_key(k): v for k, v in d.items()}


def _is_bundle(d: dict) -> bool:
    """Holds both halves: a retrieval key (or a bare trigger) and some guidance."""
    keys = set(_lower_keys(d))
    has_key = bool(keys & set(_KEY_ALIASES + ("trigger",)))
    guidance_keys = {a for aliases in _ALIASES.values() for a in aliases}
    has_guidance = bool(keys & set(_GUIDANCE_ALIASES)) or bool(keys & guidance_keys)
    return has_key and has_guidance


def extract_reply_object(text: str) -> dict:
    """The bundle object in a reply: fenced blocks first, then bare objects, then repaired
    attempts; among candidates, the last one holding both a key and guidance wins (an inner
    object such as the retrieval key alone never does)."""
    if not isinstance(text, str) or not text.strip():
        raise BundleParseError("empty reply")
    body = _THINK.sub(" ", text)
    if "</think>" in body:          # an unopened think block: keep what follows it
        body = body.split("</think>", 1)[1]
    blocks = _FENCE.findall(body)
    for source in (*blocks, body, *(r for b in (*blocks, body) for r in _repairs(b))):
        found = [o for o in json_objects_in(source) if _is_bundle(o)]
        if found:
            return found[-1]
    raise BundleParseError(f"no bundle JSON object (retrieval key + guidance) in reply: {text[:160]!r}")


# --- cleaning -------------------------------------------------------------------------------------
_BULLET_MARK = re.compile(r"^\s*(?:[-*•·]+|\d+[.)]|[a-z][.)])\s+")


def _bullets(value: Any, max_bullets: int, max_words: int) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        items: Iterable[Any] = [p for p in re.split(r"\n+", value) if p.strip()]
    elif isinstance(value, Mapping):
        items = [f"{k}: {v}" for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        items = [str(value)]
    out = []
    for item in items:
        if isinstance(item, Mapping):
            item = "; ".join(f"{k}: {v}" for k, v in item.items())
        text = _BULLET_MARK.sub("", " ".join(str(item).split())).strip()
        if not text:
            continue
        words = text.split()
        if len(words) > max_words:
            text = " ".join(words[:max_words]).rstrip(",;:") + "…"
        out.append(text)
        if len(out) == max_bullets:
            break
    return out


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = "; ".join(str(v) for v in value)
    return " ".join(str(value or "").split())


def bundle_from_object(obj: Mapping, *, max_bullets: int = 4, max_words: int = 30) -> Bundle:
    d = _lower_keys(obj)
    key = next((_lower_keys(d[k]) for k in _KEY_ALIASES if isinstance(d.get(k), Mapping)), d)
    guid = next((_lower_keys(d[k]) for k in _GUIDANCE_ALIASES if isinstance(d.get(k), Mapping)), d)
    trigger = _text(key.get("trigger") or key.get("when"))
    summary = _text(key.get("request_summary") or key.get("summary") or key.get("request"))
    if not trigger:
        raise BundleParseError("bundle lacks retrieval_key.trigger")
    if not summary:
        raise BundleParseError("bundle lacks retrieval_key.request_summary")
    guidance: dict[str, list[str]] = {}
    for field in GUIDANCE_FIELDS:
        value = next((guid[a] for a in _ALIASES[field] if a in guid), None)
        guidance[field] = _bullets(value, max_bullets, max_words)
    if sum(len(v) for v in guidance.values()) < 2:
        raise BundleParseError("bundle has fewer than 2 guidance bullets")
    return Bundle(trigger, summary, guidance)


def parse_bundle_reply(text: str, *, max_bullets: int = 4, max_words: int = 30) -> Bundle:
    return bundle_from_object(extract_reply_object(text), max_bullets=max_bullets, max_words=max_words)


# --- named entities -------------------------------------------------------------------------------
# Capitalised words that start sentences or name our own protocol, not entities.
_COMMON = frozenset("""a an the this that these those it its i in on at of for with from to by into
and or but if when while where which who what how why each every all any some no not do does use
draw create generate make show render design illustrate paint depict imagine picture image photo
please produce give add include keep place put write search query find call check avoid prefer
choose pick select state describe refer plan then first second third next last before after
only never always one two three json img url id ids s1 s2 s3 s4 s5 ok""".split())
_WORD = re.compile(r"[A-Za-z][\w'’\-]*|\d[\w\-]*")


def _base(word: str) -> str:
    """The word without a possessive ending or edge punctuation: "Tower's" → "Tower"."""
    return re.sub(r"['’]s$", "", word).strip("'’-")


def _is_proper(word: str, sentence_start: bool) -> bool:
    bare = _base(word)
    if not bare or not bare[0].isupper():
        # camelCase brand-like tokens (iPhone) count too.
        return bool(re.match(r"^[a-z]+[A-Z]", bare))
    if bare.lower() in _COMMON:
        return False
    if sentence_start:
        # A capital at a sentence start is grammar, unless the word is an acronym or mixed case.
        return bare.isupper() and len(bare) > 1 or bool(re.search(r"[a-z][A-Z]", bare))
    return True


def named_entities(text: str) -> list[str]:
    """Proper-noun-like phrases of a request: runs of capitalised words that do not start a
    sentence (and acronyms/mixed-case words anywhere), e.g. "Eiffel Tower", "NASA", "iPhone"."""
    phrases, run = [], []
    prev_end, sentence_start = 0, True
    for m in _WORD.finditer(text or ""):
        gap = text[prev_end:m.start()]
        if re.search(r"[.!?:\n]", gap):
            sentence_start = True
        contiguous = run and re.fullmatch(r"[ \t]*", gap) is not None
        if _is_proper(m.group(), sentence_start):
            if run and not contiguous:
                phrases.append(" ".join(run))
                run = []
            run.append(_base(m.group()))
        elif run:
            phrases.append(" ".join(run))
            run = []
        sentence_start = False
        prev_end = m.end()
    if run:
        phrases.append(" ".join(run))
    seen, out = set(), []
    for p in phrases:
        if p.lower() not in seen:
            seen.add(p.lower())
            out.append(p)
    return out


def _strip(text: str, entities: list[str]) -> tuple[str, int]:
    n = 0
    for e in sorted(entities, key=len, reverse=True):
        text, k = re.subn(rf"(?i)(?<![\w]){re.escape(e)}(?:['’]s)?(?![\w])", "", text)
        n += k
    text = re.sub(r"\s+([,.;:!?)])", r"\1", " ".join(text.split()))
    return text.strip(" ,;:"), n


def enforce_no_entities(bundle: Bundle, requests: Iterable[str]) -> Bundle:
    """Strip the requests' named entities from every field; flag other proper-noun-like words.
    Bullets left with fewer than two words are dropped."""
    entities = [e for r in requests for e in named_entities(r)]
    removed = 0
    bundle.trigger, k = _strip(bundle.trigger, entities)
    removed += k
    bundle.request_summary, k = _strip(bundle.request_summary, entities)
    removed += k
    for field, bullets in bundle.guidance.items():
        kept = []
        for b in bullets:
            b, k = _strip(b, entities)
            removed += k
            if len(b.split()) >= 2:
                kept.append(b)
        bundle.guidance[field] = kept
    if removed:
        bundle.flags.append(f"stripped_entities:{removed}")
    texts = [bundle.trigger, bundle.request_summary, *(b for v in bundle.guidance.values() for b in v)]
    other = sorted({e for t in texts for e in named_entities(t)})
    if other:
        bundle.flags.append("proper_nouns:" + ",".join(other[:10]))
    return bundle
