"""The experience stage: best/worst pairs → summariser → memory → retrieval, and its state
through a checkpoint's JSON."""
import json
import types

from genevolve_jax.config_loader import load_config
from genevolve_jax.experience.stage import ExperienceStage
from genevolve_jax.experience.summariser import Summariser
from genevolve_jax.train.rl.records import RolloutSample

BUNDLE_REPLY = json.dumps({
    "retrieval_key": {"trigger": "a request for a famous landmark picture", "request_summary": "draw a landmark"},
    "decision_guidance": {"focus": ["verify the structure before drawing"],
                          "tool_plan": ["search the landmark first, then search images"],
                          "prompt_program": ["state colour and material facts in the prompt"],
                          "failure_guards": ["never answer before one image search"]}})


def _sample(sid, group, request, reward, termination="answer"):
    traj = types.SimpleNamespace(termination=termination, program={"gen_prompt": "x"}, turns=[], masked=False)
    return RolloutSample(sid, group, [1, 2, 3], [0, 1, 1], [0.0, -1.0, -1.0], reward, True, prompt_length=1,
                         request=request, extra={"trajectory": traj, "reward_reason": ""})


def test_experience_stage_pairs_memory_retrieval_and_state():

    cfg = load_config("tiny_cpu").experience
    calls = []
    stage = ExperienceStage(cfg, summariser=Summariser(lambda text: calls.append(text) or BUNDLE_REPLY, attempts=1,
                                                       backoff_s=0.0, max_concurrency=1))
    req_a, req_b = "Create a poster showing the Golden Gate Bridge.", "Create a watercolour of a snowman."
    groups = [[_sample("a0", 0, req_a, 0.9), _sample("a1", 0, req_a, 0.3)],      # gap 0.6: a pair
              [_sample("b0", 1, req_b, 0.5), _sample("b1", 1, req_b, 0.4)]]      # gap 0.1: below 0.2
    m = stage.update(groups, step=1)
    assert m["experience/pairs"] == 1 and m["experience/inserted"] == 1 and len(calls) == 1
    assert m["experience/pair_skipped/gap_below_min"] == 1
    guides, info = stage.guides([req_a, req_b])
    assert guides[0] is not None and "landmark" in guides[0] and guides[1] is None
    assert info["experience/retrieved"] == 1 and info["experience/similarity"] > 0.84
    again = ExperienceStage(cfg, summariser=Summariser(lambda text: BUNDLE_REPLY, attempts=1))
    again.load_state_dict(json.loads(json.dumps(stage.state_dict())))      # through the checkpoint's JSON
    assert again.guides([req_a])[0][0] == guides[0]
