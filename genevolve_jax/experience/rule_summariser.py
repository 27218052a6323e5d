"""An offline, scripted experience summariser: a PROXY for the model summariser, not a model.

It exists for the same reason as the offline rule judge: the embedded defaults (tiny_cpu) run
with no network and a tiny random policy, which cannot write a valid experience summary, so with
the "policy" backend every pair is dropped and Visual Experience Distillation never acts. This
backend writes a bundle from what is observable in the two transcripts (which tools each attempt
called, in what order, whether the better program carried text its tools returned, its references,
the weaker attempt's failure) and sends it through the same parser and named-entity filter as a
model's reply, so memory, retrieval, the teacher's decision guide and the SDL loss all run for real.

Its advice is only as good as these rules; real runs summarise with a model
(``experience.summariser.backend`` = "openai" or "policy").
"""
from __future__ import annotations

import json
import logging
import re
from typing import Any, Mapping, Sequence

from genevolve_jax.experience.bundle import Bundle
from genevolve_jax.experience.pairs import Pair, field_of
from genevolve_jax.experience.summariser import Summariser

PROXY_LABEL = "scripted rule summariser (offline proxy, not a model)"
log = logging.getLogger(__name__)

_WORD = re.compile(r"[a-z]{5,}")


def tool_sequence(trajectory: Any) -> list[str]:
    """Names of the tools a trajectory called, in order."""
    return [str(field_of(t, "tool_name")) for t in (field_of(trajectory, "turns", None) or [])
            if field_of(t, "kind") == "tool_call" and field_of(t, "tool_name")]


def skills_consulted(trajectory: Any) -> list[str]:
    out = []
    for t in field_of(trajectory, "turns", None) or []:
        if field_of(t, "kind") == "tool_call" and field_of(t, "tool_name") == "query_knowledge":
            name = (field_of(t, "arguments") or {}).get("skill_name")
            if isinstance(name, str) and name:
                out.append(name)
    return out


def carries_tool_text(trajectory: Any) -> bool:
    """Whether the final gen_prompt repeats a word of 5+ letters that a tool returned and the
    request did not contain: the program used what the tools found."""
    program = field_of(trajectory, "program") or {}
    prompt = str(program.get("gen_prompt", "")).lower() if isinstance(program, Mapping) else ""
    request = set(_WORD.findall(str(field_of(trajectory, "request", "")).lower()))
    found: set[str] = set()
    for t in field_of(trajectory, "turns", None) or []:
        if field_of(t, "kind") == "tool_call" and field_of(t, "observation"):
            found |= set(_WORD.findall(str(field_of(t, "observation")).lower()))
    return bool((found - request) & set(_WORD.findall(prompt)))


def reference_count(trajectory: Any) -> int:
    program = field_of(trajectory, "program") or {}
    refs = program.get("reference_images", []) if isinstance(program, Mapping) else []
    return len(refs) if isinstance(refs, list) else 0


def _plan_text(tools: Sequence[str]) -> str:
    return " then ".join(tools) if tools else "no tool"


def rule_bundle_reply(pair: Pair) -> str:
    """The JSON reply (summariser format, experience/bundle.py) the rules give for ``pair``."""
    best, worst = pair.best.trajectory, pair.worst.trajectory
    tools_b, tools_w = tool_sequence(best), tool_sequence(worst)
    missing = [t for t in dict.fromkeys(tools_b) if t not in tools_w]
    extra = [t for t in dict.fromkeys(tools_w) if t not in tools_b]
    copied_b, copied_w = carries_tool_text(best), carries_tool_text(worst)
    g: dict[str, list[str]] = {k: [] for k in ("focus", "tool_plan", "search_queries", "skill_routing",
                                               "reference_selection", "prompt_program", "failure_guards")}
    if missing:
        g["focus"].append(f"Gather what {', '.join(missing)} returns before writing the program.")
        g["tool_plan"].append(f"Call {_plan_text(tools_b)} before answering.")
        g["failure_guards"].append(f"Do not answer without calling {', '.join(missing)}.")
    else:
        g["tool_plan"].append(f"Keep the plan: {_plan_text(tools_b)}, then answer.")
    if extra:
        g["tool_plan"].append(f"Skip {', '.join(extra)} when it adds nothing to the program.")
    if "search" in tools_b:
        g["search_queries"].append("Search the subject by name with one short query.")
    for skill in dict.fromkeys(skills_consulted(best)):
        g["skill_routing"].append(f"Consult the {skill} guide for requests of this kind.")
    n_ref = reference_count(best)
    g["reference_selection"].append("Keep one reference image that shows the subject." if n_ref
                                    else "Use no reference image when none shows the subject.")
    if copied_b:
        g["prompt_program"].append("Carry the facts the tools returned into gen_prompt.")
        if not copied_w:
            g["failure_guards"].append("Do not leave the looked-up facts out of gen_prompt.")
    else:
        g["prompt_program"].append("Restate every detail of the request in gen_prompt.")
    if not g["focus"]:
        g["focus"].append("Specific details of the subject decide the score.")
    if not g["failure_guards"]:
        g["failure_guards"].append("Do not drop details the better attempt kept.")
    key = {"trigger": "a request to draw one specific named subject",
           "request_summary": "an image request naming a subject whose details must be looked up"
           if "search" in tools_b else "an image request naming a subject"}
    return json.dumps({"retrieval_key": key, "decision_guidance": g})


class RuleSummariser(Summariser):
    """:class:`Summariser` whose replies come from :func:`rule_bundle_reply` instead of a model;
    parsing, the entity filter and the statistics are the model path's."""

    label = PROXY_LABEL

    def __init__(self, *, max_bullets: int = 4, max_bullet_words: int = 30):
        super().__init__(lambda text: text, attempts=1, backoff_s=0.0, max_concurrency=1,
                         max_bullets=max_bullets, max_bullet_words=max_bullet_words)
        log.info("experience bundles come from the %s", PROXY_LABEL)

    def summarise_all(self, pairs: Sequence[Pair]) -> list[Bundle | None]:
        out: list[Bundle | None] = []
        self.stats.requested += len(pairs)
        for pair in pairs:
            try:
                bundle = self._finish(rule_bundle_reply(pair), pair)
            except Exception as exc:  # noqa: BLE001 - a pair the rules cannot describe is dropped and counted
                self.stats.errors[type(exc).__name__] += 1
                self.stats.dropped += 1
                out.append(None)
                continue
            self.stats.succeeded += 1
            out.append(bundle)
        return out
