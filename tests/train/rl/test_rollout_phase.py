"""The agent rollout phase on the embedded task: real agent loop, offline tools and the rule judge,
driven by the scripted demo policy (deterministic, no model) so that rewards can be checked by hand.
The rule judge must reward searching for the fact over answering at once, and the mask switches
(loss.grpo.mask_truncated / mask_error) decide whether a cut-off rollout is dropped or trained as 0."""
import pytest

from genevolve_jax.agent.demo_policy import HeuristicDemoEngine
from genevolve_jax.agent.loop import AgentLoop
from genevolve_jax.agent.tools import make_backend
from genevolve_jax.config_loader import load_config
from genevolve_jax.data.synthetic import key_detail, prompt_rows
from genevolve_jax.processing.tokenizer import default_tokenizer
from genevolve_jax.reward.scorer import RewardScorer
from genevolve_jax.train.rl.rollout_phase import AgentRolloutPhase


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny_cpu")


def phase(cfg, plan, *, group=2, **kw):
    tok = default_tokenizer()
    loop = AgentLoop(HeuristicDemoEngine(tok, plan, top_k=cfg.agent.tools.search_top_k), tok,
                     make_backend(cfg.agent.tools), cfg.agent, seed=0)
    return AgentRolloutPhase(loop, RewardScorer.from_config(cfg.reward), group, **kw)


def test_key_detail_is_a_fact_the_request_does_not_give_away():
    rows = prompt_rows(8)
    assert len({r["question"] for r in rows}) == 8
    for row in rows:
        (detail,) = row["meta"]["required_facts"]
        assert len(detail) >= 7 and detail.lower() not in row["question"].lower()
    assert key_detail({"id": "x", "title": "Eiffel Tower", "text": "The Eiffel Tower is wrought-iron."}) == "wrought"
    with pytest.raises(ValueError, match="'x'"):
        key_detail({"id": "x", "title": "A", "text": "tiny words only"})


def test_rule_judge_rewards_searching_for_the_fact(cfg):
    prompts = prompt_rows(3)
    searched, info = phase(cfg, ("search",)).collect(1, prompts)
    direct, _ = phase(cfg, ()).collect(1, prompts)
    assert [s.group for s in searched] == [0, 0, 1, 1, 2, 2]
    assert all(s.valid and s.stats["tool_calls"] == 1 for s in searched)
    assert all(s.valid and s.stats["tool_calls"] == 0 for s in direct)
    # searched: fact, hygiene and the program's text score all pass -> 1.0; at once: the fact
    # is missing -> R_img 0.5 (hygiene only), R_text 0 -> 0.25 with alpha 0.5.
    assert [s.reward for s in searched] == pytest.approx([1.0] * 6)
    assert [s.reward for s in direct] == pytest.approx([0.25] * 6)
    assert info["reward_dims"]["reward/r_img"] == pytest.approx(1.0) and not info["masked_reasons"]
    # The trainer's view of a sample: policy tokens under the mask, sampler log-probs aligned.
    s = searched[0]
    assert len(s.token_ids) == len(s.loss_mask) == len(s.logprobs) and s.prompt_length > 0
    assert sum(s.loss_mask) == sum(t.num_tokens for t in s.extra["trajectory"].turns)


@pytest.mark.parametrize("mask_truncated", [True, False])
def test_cut_off_rollouts_follow_the_mask_switch(cfg, mask_truncated):
    c = cfg.copy_and_resolve_references()
    c.agent.round_max_tokens = 8          # every first turn is cut off: termination too_long
    samples, info = phase(c, ("search",), mask_truncated=mask_truncated).collect(1, prompt_rows(2))
    assert all(s.stats["termination"] == "too_long" for s in samples)
    if mask_truncated:
        assert all(not s.valid and s.reward is None for s in samples)
        assert info["masked_reasons"] == {"too_long": 4}
    else:
        assert all(s.valid and s.reward == 0.0 and s.mask_reason.startswith("zero_reward_too_long")
                   for s in samples)
        assert not info["masked_reasons"]


def test_an_engine_refusal_with_its_own_kind_is_counted_under_it(cfg):
    """A server whose image expansion differs from the trainer's aborts with mask_kind
    image_token_mismatch_server: the trajectory is masked and counted under that reason, not as a
    plain engine error."""
    from genevolve_jax.rollout.engine import GenerationResult

    class Refusing(HeuristicDemoEngine):
        def generate(self, requests):
            refused = GenerationResult([], [], "abort", error="image_token_mismatch_server: 12 vs 16",
                                       mask_kind="image_token_mismatch_server")
            return [refused if r.request_id.startswith("s1-p0-k1") else got
                    for r, got in zip(requests, super().generate(requests))]

    tok = default_tokenizer()
    loop = AgentLoop(Refusing(tok, ("search",), top_k=1), tok, make_backend(cfg.agent.tools), cfg.agent, seed=0)
    samples, info = AgentRolloutPhase(loop, RewardScorer.from_config(cfg.reward), 2).collect(1, prompt_rows(1))
    refused = [s for s in samples if not s.valid]
    assert [s.sample_id for s in refused] == ["s1-p0-k1"] and refused[0].mask_reason.startswith("image_token_mismatch_server: ")
    assert info["masked_reasons"] == {"image_token_mismatch_server": 1}


def test_policy_summariser_backend_asks_the_engine_a_single_turn_chat():
    """The "policy" summariser backend: one chat-formatted request per pair, sampled with the
    summariser's temperature, stopped at <|im_end|>, each with its own seed; the decoded replies
    go through the summariser's parser."""
    import json

    from genevolve_jax.experience.summariser import Summariser
    from genevolve_jax.rollout.engine import GenerationResult
    from genevolve_jax.train.rl.rollout_phase import policy_generate_fn

    tok = default_tokenizer()
    reply = json.dumps({"retrieval_key": {"trigger": "a named subject", "request_summary": "a picture of a subject"},
                        "decision_guidance": {"tool_plan": ["Search before answering."],
                                              "failure_guards": ["Do not skip the search."]}})

    class Recorder:
        def __init__(self):
            self.requests = []

        def generate(self, requests):
            self.requests += requests
            ids = list(tok.encode(reply, add_special_tokens=False))
            return [GenerationResult(ids, [0.0] * len(ids), "stop") for _ in requests]

    engine = Recorder()
    generate_many = policy_generate_fn(engine, tok, max_new_tokens=77, temperature=0.4)
    texts = ["first pair transcript", "second pair transcript"]
    assert generate_many(texts) == [reply, reply]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for i, (req, text) in enumerate(zip(engine.requests, texts)):
        decoded = tok.decode(req.prompt_ids, skip_special_tokens=False)
        assert decoded.startswith("<|im_start|>user\n" + text) and decoded.endswith("<|im_start|>assistant\n")
        s = req.sampling
        assert (s.max_new_tokens, s.temperature, s.top_p, s.seed) == (77, 0.4, 1.0, i) and im_end in s.stop_token_ids
    bundles = Summariser(generate_many=generate_many, attempts=1, backoff_s=0.0).summarise_all([_pair("Red panda")])
    assert bundles[0].guidance["tool_plan"] == ["Search before answering."]


def _pair(subject):
    from genevolve_jax.experience.pairs import Candidate, Pair

    request = f"Create a poster of the {subject}."
    return Pair("0", Candidate("a", request, 1.0), Candidate("b", request, 0.25))
