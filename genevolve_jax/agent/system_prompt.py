"""Our system prompt: the agent's job, the turn format, the rules, the program and the tools.

A decision guide (from experience distillation, METHOD.md §7) goes before the tool definitions;
the teacher context is the student's with that one block added, so everything else stays byte-equal.
"""
from __future__ import annotations

import json
from typing import Sequence

from genevolve_jax.agent.tools.schemas import TOOL_SCHEMAS

_ORDINALS = ("first", "second", "third", "fourth", "fifth")


def ordinal(n: int) -> str:
    """1 -> 'first'; the words a gen_prompt uses for reference images."""
    return _ORDINALS[n - 1] if 1 <= n <= len(_ORDINALS) else f"{n}th"


STYLES = ("full", "compact")


def build_system_prompt(max_tool_calls: int = 10, max_references: int = 2, min_references: int = 1,
                        tools: Sequence[dict] = TOOL_SCHEMAS, decision_guide: str | None = None,
                        style: str = "full") -> str:
    """The policy's system prompt. ``style="compact"`` is a short variant (about a tenth of the
    tokens: the same turn format and program, tools listed by name instead of their JSON schemas) for
    tiny models, whose whole context budget the full prompt would otherwise take."""
    if style == "compact":
        return _compact_system_prompt(max_tool_calls, max_references, min_references, tools, decision_guide)
    if style != "full":
        raise ValueError(f"agent.system_prompt must be one of {STYLES}, got {style!r}")
    refs = ", ".join(f"'the {ordinal(i)} reference image'" for i in range(1, max_references + 1))
    parts = [
        "You plan images for a text-to-image model that can also take reference images. Given a user's "
        "request, find the facts and pictures the model lacks, consult the drawing skills that apply, and "
        "write a self-contained program for the image model.",
        "",
        "# Turn format",
        "Every turn starts with your reasoning inside <think></think>. Then write exactly one of:",
        '- a tool call: <tool_call>{"name": "<tool>", "arguments": {...}}</tool_call>',
        "- the final answer: <answer>{program JSON}</answer>",
        "Write nothing outside these tags. A tool's result comes back inside <tool_response></tool_response>.",
        "",
        "# Rules",
        f"1. Use at most {max_tool_calls} tool calls in total.",
        "2. Call image_search at least once, and once per distinct subject that needs a reference picture.",
        "3. Never repeat a query you have already run.",
        "4. Search for facts you are unsure of (what something looks like, how it is written, counts, "
        "colours) before relying on them.",
        "5. Query a skill guide when the request involves that skill; do not query skills that do not apply.",
        "",
        "# The program",
        '{"gen_prompt": "<a complete description of the image to generate>", '
        '"reference_images": [{"img_id": "IMG_00k", "note": "<what to take from this image>"}]}',
        f"- Choose between {min_references} and {max_references} reference images, only from ids that a "
        "tool returned.",
        f"- In gen_prompt, refer to reference images only by order: {refs}, in the order of their ids.",
        "- Never write an image id (IMG_...) or a URL inside gen_prompt.",
        "- gen_prompt must stand alone: state the facts you found instead of naming where they came from.",
    ]
    if decision_guide:
        parts += ["", "# Decision guide from past experience", decision_guide.strip()]
    parts += ["", "# Tools", "<tools>"]
    parts += [json.dumps(schema, ensure_ascii=False) for schema in tools]
    parts += ["</tools>"]
    return "\n".join(parts)


def _compact_system_prompt(max_tool_calls: int, max_references: int, min_references: int,
                           tools: Sequence[dict], decision_guide: str | None) -> str:
    # Same block order as the full prompt (a guide goes right before "# Tools"), so that a
    # teacher prompt differs from the student's by the guide block alone.
    parts = [
        "Plan an image for a text-to-image model. Each turn: <think>reasoning</think>, then one "
        '<tool_call>{"name": ..., "arguments": {...}}</tool_call> or the final '
        '<answer>{"gen_prompt": ..., "reference_images": [{"img_id": ..., "note": ...}]}</answer>.',
        f"Put the facts you found into gen_prompt. Use {min_references} to {max_references} reference images "
        "that a tool returned, never their ids in gen_prompt.",
    ]
    if decision_guide:
        parts += ["", "# Decision guide from past experience", decision_guide.strip()]
    names = ", ".join(str(schema.get("name")) for schema in tools)
    parts += ["", "# Tools", f"{names}; at most {max_tool_calls} calls."]
    return "\n".join(parts)
