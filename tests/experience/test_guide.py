"""Decision guide: rendering, the teacher's system prompt differing from the student's by the guide
block alone, right before the tool definitions; the experience config."""
from __future__ import annotations

import pytest

from genevolve_jax.agent.system_prompt import build_system_prompt
from genevolve_jax.experience.bundle import GUIDANCE_FIELDS, Bundle
from genevolve_jax.experience.config import get_config, validate
from genevolve_jax.experience.guide import render_guide


def _bundle() -> Bundle:
    g = {f: [] for f in GUIDANCE_FIELDS}
    g["tool_plan"] = ["Search the structure first", "Run one image search per subject"]
    g["failure_guards"] = ["Never pass a cropped reference"]
    return Bundle("a landmark drawn at night", "a famous tower lit at night", g)


def test_render_lists_only_filled_fields():
    text = render_guide(_bundle())
    assert text.splitlines() == ["Applies to: a landmark drawn at night",
                                 "A past request like this one: a famous tower lit at night",
                                 "Tool plan:", "- Search the structure first", "- Run one image search per subject",
                                 "Avoid:", "- Never pass a cropped reference"]


@pytest.mark.parametrize("kwargs", [{}, {"max_tool_calls": 6, "max_references": 3}, {"style": "compact"}])
def test_teacher_prompt_is_the_student_prompt_plus_the_guide_block(kwargs):
    guide = render_guide(_bundle())
    student = build_system_prompt(**kwargs)
    teacher = build_system_prompt(decision_guide=guide, **kwargs)
    k = student.index("\n\n# Tools\n")
    assert teacher == student[:k] + "\n\n# Decision guide from past experience\n" + guide + student[k:]


def test_config_defaults_are_the_papers_and_validate_names_fields():
    cfg = get_config()
    validate(cfg)
    assert (cfg.pairs.min_gap, cfg.memory.capacity, cfg.memory.max_inserts_per_step,
            cfg.retrieval.min_similarity) == (0.2, 500, 8, 0.84)
    for field, value, msg in (("memory.eviction_window", 501, r"experience\.memory\.eviction_window"),
                              ("pairs.min_gap", -0.1, r"experience\.pairs\.min_gap must be in \[0, 1\]"),
                              ("summariser.attempts", 0, r"experience\.summariser\.attempts"),
                              ("embedder.kind", "bert", r"experience\.embedder\.kind")):
        bad = get_config()
        section, name = field.split(".")
        setattr(bad[section], name, value)
        with pytest.raises(ValueError, match=msg):
            validate(bad)
    bad = get_config()
    bad.embedder.kind = "hf"
    with pytest.raises(ValueError, match=r"experience\.embedder\.model_dir"):
        validate(bad)
    bad = get_config()
    bad.summariser.backend, bad.summariser.base_url = "openai", "localhost:8000"
    with pytest.raises(ValueError, match=r"experience\.summariser\.base_url"):
        validate(bad)
