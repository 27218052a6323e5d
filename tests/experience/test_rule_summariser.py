"""The scripted offline summariser: bundles from what the two transcripts show, through the same
parser and named-entity filter as a model's reply, with drops counted."""
from __future__ import annotations

import random

import pytest

from genevolve_jax.agent.trajectory import Trajectory, Turn
from genevolve_jax.experience import rule_summariser
from genevolve_jax.experience.config import get_config, validate
from genevolve_jax.experience.guide import render_guide
from genevolve_jax.experience.pairs import Candidate, select_pairs
from genevolve_jax.experience.summariser import make_summariser

SUBJECTS = [("Eiffel Tower", "The Eiffel Tower in Paris is a wrought-iron lattice tower completed in 1889."),
            ("Golden Gate Bridge", "The Golden Gate Bridge in San Francisco is a suspension bridge opened in 1937."),
            ("Red panda", "The red panda is a small mammal of the eastern Himalayas with reddish-brown fur.")]


def _turn(i, kind, tool=None, args=None, obs=None):
    return Turn(round=i, text="", kind=kind, finish_reason="stop", num_tokens=10, gen_seconds=0.0,
                tool_name=tool, arguments=args, observation=obs)


def searched(request, fact, skill=None, refs=0):
    turns = []
    if skill:
        turns.append(_turn(len(turns) + 1, "tool_call", "query_knowledge", {"skill_name": skill}, "guide text"))
    turns.append(_turn(len(turns) + 1, "tool_call", "search", {"queries": [request]}, f"snippet: {fact}"))
    turns.append(_turn(len(turns) + 1, "answer"))
    program = {"gen_prompt": f"{request} Facts to respect: {fact}",
               "reference_images": [{"img_id": f"IMG_00{i}", "note": "shape"} for i in range(refs)]}
    return Trajectory("b", request, turns=turns, termination="answer", program=program)


def direct(request):
    return Trajectory("w", request, turns=[_turn(1, "answer")], termination="answer",
                      program={"gen_prompt": request, "reference_images": []})


def pair_of(best, worst, rb=1.0, rw=0.25):
    pairs, _ = select_pairs([[Candidate("a", best.request, rb, best), Candidate("b", worst.request, rw, worst)]])
    assert len(pairs) == 1
    return pairs[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_beats_answering_at_once(seed):
    rng = random.Random(seed)
    name, fact = rng.choice(SUBJECTS)
    request = f"Create a {rng.choice(['poster', 'watercolour', 'photo'])} of the {name}."
    skill = rng.choice([None, "text_rendering"])
    refs = rng.randint(0, 2)
    summ = make_summariser(_cfg("rule"))
    bundle = summ.summarise_all([pair_of(searched(request, fact, skill, refs), direct(request))])[0]
    assert bundle is not None and summ.stats.succeeded == 1 and summ.stats.dropped == 0
    g = bundle.guidance
    assert any("search" in b for b in g["tool_plan"]) and any("search" in b for b in g["failure_guards"])
    assert g["prompt_program"] == ["Carry the facts the tools returned into gen_prompt."]
    assert ("Keep one reference" in g["reference_selection"][0]) == bool(refs)
    assert bool(g.get("skill_routing")) == bool(skill)
    # No named entity of the request survives into what the teacher will read.
    text = " ".join([bundle.trigger, bundle.request_summary, *(b for v in g.values() for b in v)])
    for word in name.split():
        assert word not in text, text
    assert bundle.gap == pytest.approx(0.75) and bundle.source_request == request
    assert "search" in render_guide(bundle)


def _cfg(backend):
    cfg = get_config()
    cfg.summariser.backend = backend
    validate(cfg)
    return cfg.summariser


def test_same_plan_keeps_it_and_extra_tools_are_flagged():
    name, fact = SUBJECTS[1]
    request = f"Create a poster of the {name}."
    best = searched(request, fact)
    worst = searched(request, fact, skill="aesthetic_drawing")
    worst.program = {"gen_prompt": request, "reference_images": []}       # its program dropped the fact
    summ = rule_summariser.RuleSummariser()
    bundle = summ.summarise_all([pair_of(best, worst, 1.0, 0.25)])[0]
    g = bundle.guidance
    assert g["tool_plan"][0] == "Keep the plan: search, then answer."
    assert any("query_knowledge" in b for b in g["tool_plan"][1:])
    assert g["failure_guards"] == ["Do not leave the looked-up facts out of gen_prompt."]


def test_tool_text_detection():
    request = "Create a poster of the Red panda."
    t = searched(request, SUBJECTS[2][1])
    assert rule_summariser.carries_tool_text(t) and rule_summariser.tool_sequence(t) == ["search"]
    t.program = {"gen_prompt": request + " Colourful and bright.", "reference_images": []}
    assert not rule_summariser.carries_tool_text(t)
    assert not rule_summariser.carries_tool_text(direct(request))
    assert rule_summariser.reference_count(direct(request)) == 0


def test_a_pair_the_rules_cannot_describe_is_dropped_and_counted(monkeypatch):
    monkeypatch.setattr(rule_summariser, "rule_bundle_reply", lambda pair: "not json")
    summ = rule_summariser.RuleSummariser()
    request = "Create a poster of the Red panda."
    out = summ.summarise_all([pair_of(searched(request, SUBJECTS[2][1]), direct(request))])
    assert out == [None] and summ.stats.dropped == 1 and summ.stats.succeeded == 0


def test_config_accepts_rule_and_rejects_unknown():
    assert isinstance(make_summariser(_cfg("rule")), rule_summariser.RuleSummariser)
    cfg = get_config()
    cfg.summariser.backend = "scripted"
    with pytest.raises(ValueError, match="summariser.backend"):
        validate(cfg)
