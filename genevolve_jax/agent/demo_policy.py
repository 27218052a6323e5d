"""A heuristic demo policy behind the engine interface: NOT a model.

It exists so that ``genevolve generate`` can show the whole protocol end to end on the embedded
defaults before the JAX sampler lands (and on machines without weights). It reads the decoded
context and follows a fixed plan: consult the skill that keyword rules pick, search the request,
search images, then answer with a program whose gen_prompt restates the request with the top fact
and refers to the first (up to two) images by order. Its "log-probs" are 0.0 (it is deterministic).
Trajectories it makes are for demonstration, never for training.
"""
from __future__ import annotations

import re
from typing import Sequence

from genevolve_jax.agent.protocol import FINAL_STEP_INSTRUCTION, format_answer, format_tool_call
from genevolve_jax.agent.system_prompt import ordinal
from genevolve_jax.rollout.engine import GenerationRequest, GenerationResult, RolloutEngine

POLICY_LABEL = "heuristic demo policy (scripted rules, not a model)"

_SKILL_RULES = (
    ("text_rendering", r"\b(text|word|words|sign|label|logo|poster|title|reads|written|letters?)\b"),
    ("quantity_counting", r"\b(two|three|four|five|six|seven|eight|nine|ten|dozen|\d+)\b"),
    ("spatial_layout", r"\b(left|right|behind|above|below|between|next to|on top|under)\b"),
    ("anatomy_body_coherence", r"\b(hand|hands|person|people|dancer|body|animal|horse|cat|dog|panda)\b"),
    ("physical_material_consistency", r"\b(glass|water|reflection|mirror|metal|shadow|light|neon)\b"),
    ("attribute_binding", r"\b(red|blue|green|yellow|purple|orange|pink|white|black)\b.*\b(and)\b"),
    ("creative_drawing", r"\b(imagine|surreal|dream|fantasy|creative|whimsical)\b"),
)
_URL = re.compile(r"(https?://|file://|www\.)\S+")
_IMG = re.compile(r"\bIMG_\d+\b")


def pick_skill(request: str) -> str:
    text = request.lower()
    for skill, pattern in _SKILL_RULES:
        if re.search(pattern, text):
            return skill
    return "aesthetic_drawing"


def _keywords(request: str, limit: int = 8) -> str:
    words = re.findall(r"[A-Za-z0-9']+", request)
    stop = {"a", "an", "the", "of", "with", "and", "in", "on", "at", "to", "for", "me", "please", "draw",
            "generate", "image", "picture", "show", "make", "create"}
    return " ".join(w for w in words if w.lower() not in stop)[:200] or request[:200]


DEFAULT_PLAN = ("query_knowledge", "search", "image_search")
PLAN_TOOLS = frozenset(DEFAULT_PLAN)


class HeuristicDemoEngine(RolloutEngine):
    """Deterministic rule-based turns from the decoded context (see the module docstring).

    ``plan`` is the tool order before the answer; an empty plan answers at once from the request
    alone (the synthetic data of the embedded defaults mixes both, so that the rule judge, which
    wants facts only a search finds, has something to reward)."""

    def __init__(self, tokenizer, plan: Sequence[str] = DEFAULT_PLAN, top_k: int = 3):
        unknown = [t for t in plan if t not in PLAN_TOOLS]
        if unknown:
            raise ValueError(f"demo plan names unknown tools {unknown}; known: {sorted(PLAN_TOOLS)}")
        self.tokenizer = tokenizer
        self.plan = tuple(plan)
        self.top_k = int(top_k)
        self.stop_id = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def _tool_turn(self, tool: str, request: str) -> str:
        if tool == "query_knowledge":
            skill = pick_skill(request)
            return (f"<think>The request calls for the {skill} skill; read its guide first.</think>\n"
                    + format_tool_call("query_knowledge", {"skill_name": skill}))
        if tool == "search":
            return ("<think>Look up facts about the subject.</think>\n"
                    + format_tool_call("search", {"queries": [_keywords(request)], "top_k": self.top_k}))
        return ("<think>Find reference images of the subject.</think>\n"
                + format_tool_call("image_search", {"query": _keywords(request), "top_k": self.top_k}))

    def _turn(self, context: str) -> str:
        request = context.split("<|im_start|>user\n", 1)[-1].split("<|im_end|>", 1)[0].strip()
        round_no = context.count("<|im_start|>assistant")
        responses = re.findall(r"<tool_response>(.*?)</tool_response>", context, re.DOTALL)
        final = FINAL_STEP_INSTRUCTION in context
        if not final and round_no <= len(self.plan):
            return self._tool_turn(self.plan[round_no - 1], request)
        img_ids = list(dict.fromkeys(_IMG.findall(" ".join(responses))))
        fact = ""
        for block in responses:
            match = re.search(r"snippet: (.+)", block)
            if match:
                fact = _URL.sub("", match.group(1)).strip()
                break
        refs = img_ids[:2]
        prompt = request.rstrip(".") + "."
        if fact:
            prompt += f" Facts to respect: {fact}"
        for i, _ in enumerate(refs, 1):
            prompt += f" Take the composition and colours of the {ordinal(i)} reference image."
        program = {"gen_prompt": _IMG.sub("", prompt),
                   "reference_images": [{"img_id": r, "note": "subject appearance and colours"} for r in refs]}
        why = "I have what I need; write the program." if responses else \
            "The request is clear enough to answer directly."
        return f"<think>{why}</think>\n" + format_answer(program)

    def update_weights(self, params, step: int) -> dict[str, float]:
        """Rules have no weights: a scripted teacher ignores weight syncs."""
        return {}

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        out = []
        for req in requests:
            context = self.tokenizer.decode(req.prompt_ids, skip_special_tokens=False)
            ids = list(self.tokenizer.encode(self._turn(context), add_special_tokens=False)) + [self.stop_id]
            finish = "stop"
            if len(ids) > req.sampling.max_new_tokens:
                ids, finish = ids[: req.sampling.max_new_tokens], "length"
            out.append(GenerationResult(ids, [0.0] * len(ids), finish))
        return out
