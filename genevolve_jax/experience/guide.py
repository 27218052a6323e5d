"""The decision guide: a retrieved bundle rendered as the text block of the teacher's system prompt.

The teacher's context is the student's with this block added to the system prompt, just before the
tool definitions (METHOD.md §7); ``agent.system_prompt.build_system_prompt(decision_guide=…)``
places it, so everything else stays byte-equal.
"""
from __future__ import annotations

from genevolve_jax.experience.bundle import Bundle

_TITLES = {
    "focus": "Focus", "tool_plan": "Tool plan", "search_queries": "Search queries",
    "skill_routing": "Skill routing", "reference_selection": "Reference selection",
    "prompt_program": "Prompt program", "failure_guards": "Avoid",
}


def render_guide(bundle: Bundle) -> str:
    """Short labelled bullet lists; empty fields are left out."""
    lines = [f"Applies to: {bundle.trigger}", f"A past request like this one: {bundle.request_summary}"]
    for field, title in _TITLES.items():
        bullets = bundle.guidance.get(field) or []
        if bullets:
            lines.append(f"{title}:")
            lines += [f"- {b}" for b in bullets]
    return "\n".join(lines)
