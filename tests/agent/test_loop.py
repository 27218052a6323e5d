"""The agent loop with a scripted engine: every termination code, token bookkeeping, replay, batching."""
import json

import pytest

from genevolve_jax.agent.config import default_agent_config
from genevolve_jax.agent.loop import AgentLoop
from genevolve_jax.agent.protocol import FINAL_STEP_INSTRUCTION, format_answer, format_tool_call
from genevolve_jax.agent.tools import ToolBackendError
from genevolve_jax.agent.tools.backends import OfflineCorpus
from genevolve_jax.agent.trajectory import TERMINATIONS, Trajectory
from genevolve_jax.processing.chat import render_messages
from genevolve_jax.processing.tokenizer import default_tokenizer
from genevolve_jax.rollout.engine import RolloutEngine
from tests.fixtures.engines import ABORT, ScriptedEngine


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.fixture(scope="module")
def corpus():
    return OfflineCorpus()


def cfg_small(**kw):
    cfg = default_agent_config()
    cfg.max_rounds = 3
    cfg.round_max_tokens = 300
    cfg.response_max_tokens = 3000
    cfg.loop.batch_wait_ms = 20.0
    for key, value in kw.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return cfg


def call(name, **args):
    return f"<think>call {name}</think>\n" + format_tool_call(name, args)


IMG_CALL = call("image_search", query="snowman night", top_k=1)
ANSWER = "<think>done</think>" + format_answer(
    {"gen_prompt": "A snowman like the first reference image.",
     "reference_images": [{"img_id": "IMG_001", "note": "the snowman"}]})
LONG = "<think>" + "ramble " * 400 + "</think>"


class RaisingEngine(RolloutEngine):
    def update_weights(self, params, step):
        return {}

    def generate(self, requests):
        raise RuntimeError("device lost")


class DownBackend:
    name = "down"

    async def search(self, query, top_k):
        raise ToolBackendError("search failed after 4 attempt(s): timeout")

    async def image_search(self, query, top_k):
        raise ToolBackendError("image search failed after 4 attempt(s): timeout")

    async def aclose(self):
        return None


def test_every_termination_code(tok, corpus):
    scripts = {
        "answer": [IMG_CALL, ANSWER],
        "max_rounds": [call("query_knowledge", skill_name="spatial_layout"), IMG_CALL,
                       call("search", queries=["snowman"])],
        "format_error_streak": ["no tags at all", "<think>x", "still nothing"],
        "format_error_last": [IMG_CALL, call("query_knowledge", skill_name="text_rendering"), "plain text"],
        "too_long_turn": [LONG],
        "error_abort": [IMG_CALL, ABORT],
    }
    engine = ScriptedEngine(scripts, tok)
    loop = AgentLoop(engine, tok, corpus, cfg_small(**{"max_consecutive_format_errors": 3}))
    trajs = {t.traj_id: t for t in loop.run_sync([(k, "a snowman on a snowy night") for k in scripts])}
    want = {"answer": "answer", "max_rounds": "max_rounds", "format_error_streak": "format_error",
            "format_error_last": "format_error", "too_long_turn": "too_long", "error_abort": "error"}
    assert {k: t.termination for k, t in trajs.items()} == want
    assert set(want.values()) == set(TERMINATIONS)
    assert trajs["answer"].program["valid"] and not trajs["answer"].masked
    assert trajs["answer"].program["reference_images"][0]["img_id"] == "IMG_001"
    assert trajs["too_long_turn"].masked and "cut off" in trajs["too_long_turn"].mask_reason
    assert trajs["error_abort"].masked and "aborted" in trajs["error_abort"].mask_reason
    assert not trajs["max_rounds"].masked and trajs["max_rounds"].program is None
    assert [t.error for t in trajs["format_error_streak"].turns] == ["no_action", "unclosed_tag", "no_action"]
    # the final-step instruction comes with the observation before the last round only
    obs = [t.observation for t in trajs["max_rounds"].turns]
    assert FINAL_STEP_INSTRUCTION not in obs[0] and obs[1].endswith(FINAL_STEP_INSTRUCTION) and obs[2] is None
    # trajectories waiting at the same time were sampled in one engine batch
    assert max(len(b) for b in engine.calls) == len(scripts)


def test_caps_prompt_and_response(tok, corpus):
    engine = ScriptedEngine([IMG_CALL, ANSWER], tok)
    traj = AgentLoop(engine, tok, corpus, cfg_small(prompt_max_tokens=50)).run_sync(["x"])[0]
    assert traj.termination == "too_long" and "prompt" in traj.mask_reason and not traj.turns
    engine = ScriptedEngine([call("query_knowledge", skill_name="aesthetic_drawing"), ANSWER], tok)
    traj = AgentLoop(engine, tok, corpus, cfg_small(response_max_tokens=300, round_max_tokens=100)).run_sync(["x"])[0]
    assert traj.termination == "too_long" and "response" in traj.mask_reason
    # the per-round budget shrinks to what the response cap leaves
    asked = []

    class Spy(ScriptedEngine):
        def generate(self, requests):
            asked.extend(r.sampling.max_new_tokens for r in requests)
            return super().generate(requests)

    engine = Spy([IMG_CALL, ANSWER], tok)
    traj = AgentLoop(engine, tok, corpus, cfg_small(response_max_tokens=400, round_max_tokens=300)).run_sync(["x"])[0]
    first_turn_and_obs = sum(len(s.token_ids) for s in traj.segments[1:3])
    assert asked == [300, 400 - first_turn_and_obs] and 0 < asked[1] < 300
    assert traj.termination == "answer"


def test_tool_failures_and_engine_failures_mask_the_sample(tok, corpus):
    traj = AgentLoop(ScriptedEngine([IMG_CALL, ANSWER], tok), tok, DownBackend(), cfg_small()).run_sync(["x"])[0]
    assert traj.termination == "error" and traj.masked and "image_search failed" in traj.mask_reason
    traj = AgentLoop(RaisingEngine(), tok, corpus, cfg_small()).run_sync(["x"])[0]
    assert traj.termination == "error" and "device lost" in traj.mask_reason


def test_bad_arguments_and_budget_become_observations(tok, corpus):
    script = [call("query_knowledge", skill_name="juggling"), IMG_CALL, IMG_CALL, ANSWER]
    traj = AgentLoop(ScriptedEngine(script, tok), tok, corpus,
                     cfg_small(max_rounds=4, max_tool_calls=1)).run_sync(["x"])[0]
    assert [t.error for t in traj.turns] == ["bad_arguments", None, "budget_exceeded", None]
    assert "juggling" in traj.turns[0].observation and "[budget_exceeded]" in traj.turns[2].observation
    assert traj.termination == "answer" and traj.stats["format_errors"] == 2


def test_token_bookkeeping_matches_chatml_and_sampler(tok, corpus):
    engine = ScriptedEngine([call("search", queries=["stop sign"], top_k=1), IMG_CALL, ANSWER], tok)
    cfg = cfg_small(max_rounds=4)
    traj = AgentLoop(engine, tok, corpus, cfg).run_sync(["a stop sign at dusk"])[0]
    ids, mask, lps = traj.token_ids(), traj.loss_mask(), traj.logprobs()
    assert len(ids) == len(mask) == len(lps) == traj.prompt_length + traj.response_length
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    policy = [t for t, m in zip(ids, mask) if m]
    assert policy == [t for s in traj.replay_turns() for t in s]
    assert [lp for lp, m in zip(lps, mask) if not m] == [0.0] * (len(ids) - sum(mask))
    assert [lp for lp, m in zip(lps, mask) if m] == [lp for s in traj.segments if s.kind == "policy"
                                                      for lp in s.logprobs]
    for seg in traj.segments:
        if seg.kind == "policy":
            assert seg.token_ids[-1] == im_end
            assert seg.logprobs == [engine.logprob_fn(t, p) for p, t in enumerate(seg.token_ids)]
    # the whole context is exactly the ChatML rendering of the conversation
    from genevolve_jax.agent.system_prompt import build_system_prompt
    messages = [{"role": "system", "content": build_system_prompt()},
                {"role": "user", "content": "a stop sign at dusk"}]
    for turn in traj.turns:
        messages.append({"role": "assistant", "content": turn.text.replace("<|im_end|>", "")})
        if turn.observation is not None:
            messages.append({"role": "user", "content": turn.observation})
    assert tok.decode(ids, skip_special_tokens=False) + "\n" == render_messages(messages, add_generation_prompt=False)


def test_json_line_roundtrip_and_replay(tok, corpus, tmp_path):
    scripts = {"a": [call("search", queries=["torii gate"]), IMG_CALL, ANSWER], "b": ["oops", IMG_CALL, ANSWER]}
    cfg = cfg_small(max_rounds=4)
    first = AgentLoop(ScriptedEngine(scripts, tok), tok, corpus, cfg).run_sync(list(scripts.items()))
    path = tmp_path / "trajs.jsonl"                  # one line per trajectory, as `genevolve generate --out` writes
    path.write_text("".join(t.to_json() + "\n" for t in first), encoding="utf-8")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    loaded = [Trajectory.from_json(line) for line in lines]
    assert [t.to_dict() for t in loaded] == [json.loads(t.to_json()) for t in first]
    replay = ScriptedEngine({t.traj_id: t.replay_turns() for t in loaded}, tok)
    second = AgentLoop(replay, tok, corpus, cfg).run_sync([(t.traj_id, t.request) for t in loaded])
    for a, b in zip(first, second):
        assert a.token_ids() == b.token_ids() and a.loss_mask() == b.loss_mask()
        assert a.termination == b.termination and a.program == b.program and a.images == b.images
    bad = json.dumps({"traj_id": "x", "request": "r", "segments": [], "turns": [], "termination": "exploded"})
    with pytest.raises(ValueError, match=r"trajectory x: termination must be one of .*'exploded'"):
        Trajectory.from_json(bad)
    with pytest.raises(ValueError, match=r"lacks key\(s\) \['termination'\]"):
        Trajectory.from_json(json.dumps({"traj_id": "x", "request": "r", "segments": [], "turns": []}))


def test_pixels_in_observations(tok, corpus):
    seen = []

    class Spy(ScriptedEngine):
        def generate(self, requests):
            seen.extend(requests)
            return super().generate(requests)

    script = [call("image_search", query="snowman night", top_k=2), call("image_search", query="snowman"), ANSWER]
    engine = Spy(script, tok)
    traj = AgentLoop(engine, tok, corpus, cfg_small(observation_pixels=True, max_rounds=4,
                                                    response_max_tokens=5000)).run_sync(["x"])[0]
    assert traj.termination == "answer"
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    files = traj.context_images()
    assert len(files) == len(set(files)) >= 2  # an image already shown is not sent twice
    assert files[:2] == [traj.images[0]["local_path"], traj.images[1]["local_path"]]
    per_image = engine.num_image_tokens(files[0])
    assert per_image == 70  # 128x96 -> smart_resize 256x... -> (1, 14, 20) / 4
    assert traj.token_ids().count(pad) == sum(engine.num_image_tokens(f) for f in files)
    assert seen[-1].images == files and seen[-1].prompt_ids.count(pad) == traj.token_ids().count(pad)
    text_only = AgentLoop(ScriptedEngine(script, tok), tok, corpus, cfg_small(max_rounds=4)).run_sync(["x"])[0]
    assert pad not in text_only.token_ids() and text_only.context_images() == []


def test_many_trajectories_run_concurrently(tok, corpus):
    n = 12
    engine = ScriptedEngine([IMG_CALL, ANSWER], tok)
    cfg = cfg_small(**{"loop.engine_batch_size": 5})
    trajs = AgentLoop(engine, tok, corpus, cfg).run_sync([f"request {i}" for i in range(n)], progress=True)
    assert [t.traj_id for t in trajs] == [f"traj-{i}" for i in range(n)]
    assert all(t.termination == "answer" for t in trajs)
    assert max(len(b) for b in engine.calls) == 5 and len(engine.calls) < 2 * n


def test_teacher_context_swaps_only_the_prompt(tok, corpus):
    loop = AgentLoop(ScriptedEngine([IMG_CALL, ANSWER], tok), tok, corpus, cfg_small())
    traj = loop.run_sync(["a snowman"])[0]
    teacher_prompt = loop.prompt_ids("a snowman", decision_guide="- search the subject before styling it")
    ids, mask = traj.with_prompt(teacher_prompt)
    n = traj.prompt_length
    assert ids[len(teacher_prompt):] == traj.token_ids()[n:] and mask[len(teacher_prompt):] == traj.loss_mask()[n:]
    assert len(teacher_prompt) > n and "search the subject" in tok.decode(ids[:len(teacher_prompt)])
