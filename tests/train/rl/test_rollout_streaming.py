"""Streaming rewards (rl.stream_rewards): a rollout is rendered and judged as soon as it has its
program, while other rollouts still generate and with every group in flight at once; the barrier
(False) renders nothing before the last rollout ends and scores one group after another. Both must
give the same samples, rewards and advantages: a record depends on its own sample alone.

The policy is the scripted demo policy, with a plan drawn per rollout (search first, or answer at
once), so that rollouts of a group end in different rounds, out of input order, and earn different
rewards (1.0 and 0.25 under the rule judge): the advantages are not all zero."""
import asyncio
import hashlib
import random

import numpy as np
import pytest
from PIL import Image

from genevolve_jax.agent.demo_policy import HeuristicDemoEngine
from genevolve_jax.agent.loop import AgentLoop
from genevolve_jax.agent.tools import make_backend
from genevolve_jax.config_loader import load_config
from genevolve_jax.data.synthetic import prompt_rows
from genevolve_jax.processing.tokenizer import default_tokenizer
from genevolve_jax.reward.scorer import RewardScorer
from genevolve_jax.rollout.engine import RolloutEngine
from genevolve_jax.train.rl.pipeline import sample_advantages
from genevolve_jax.train.rl.rollout_phase import AgentRolloutPhase

GROUP = 3


class MixedPlans(RolloutEngine):
    """The demo policy, searching first on the rollouts a salted hash of the request id picks.
    Log-probs are a function of (request id, position), so samples differ in them too. Each batch
    is recorded in ``events``."""

    def __init__(self, tok, salt: int, events: list):
        self.search = HeuristicDemoEngine(tok, ("search",), top_k=1)
        self.direct = HeuristicDemoEngine(tok, (), top_k=1)
        self.salt, self.events = salt, events

    def _searches(self, request_id: str) -> bool:
        return hashlib.sha256(f"{self.salt}/{request_id}".encode()).digest()[0] % 2 == 0

    def generate(self, requests):
        self.events.append(("generate", tuple(r.request_id for r in requests)))
        out = []
        for r in requests:
            got = (self.search if self._searches(r.request_id) else self.direct).generate([r])[0]
            digest = hashlib.sha256(f"{self.salt}/{r.request_id}/{len(r.prompt_ids)}".encode()).digest()
            got.logprobs = [-(digest[i % 32] + 1) / 97.0 for i in range(len(got.token_ids))]
            out.append(got)
        return out

    def update_weights(self, params, step):
        return {}


class SlowRenderer:
    """A render service that takes a little while and records when each render starts, and the
    most groups (told apart by the request its gen_prompt restates) it had in flight at once."""
    renderer_id = "slow-test-renderer"

    def __init__(self, events: list, requests):
        self.events, self.requests, self.inflight = events, [q.rstrip(".") for q in requests], []
        self.max_groups_in_flight = 0

    async def render(self, request):
        group = next(i for i, q in enumerate(self.requests) if request.prompt.startswith(q))
        self.events.append(("render_start", group))
        self.inflight.append(group)
        self.max_groups_in_flight = max(self.max_groups_in_flight, len(set(self.inflight)))
        await asyncio.sleep(0.02)
        self.inflight.remove(group)
        return Image.new("RGB", (8, 8), (group, request.seed % 256, 0))


@pytest.fixture(scope="module")
def runs():
    """The same step collected with streaming and with the barrier, with a random salt."""
    cfg = load_config("tiny_cpu")
    salt = random.randrange(1 << 30)
    prompts = prompt_rows(3)
    out = {}
    for stream in (True, False):
        events: list = []
        tok = default_tokenizer()
        renderer = SlowRenderer(events, [p["question"] for p in prompts])
        loop = AgentLoop(MixedPlans(tok, salt, events), tok, make_backend(cfg.agent.tools), cfg.agent, seed=0)
        scorer = RewardScorer.from_config(cfg.reward, renderer=renderer, render_throughput=cfg.render.throughput)
        phase = AgentRolloutPhase(loop, scorer, GROUP, stream_rewards=stream)
        samples, info = phase.collect(4, prompts)
        out[stream] = samples, info, events, renderer
    out["cfg"] = cfg
    return out


def _view(s):
    stats = {k: v for k, v in s.stats.items() if k != "timing"}
    rec = s.extra["reward_record"]
    rec = None if rec is None else {k: v for k, v in rec.to_dict().items() if k != "render_done_at"}
    return (s.sample_id, s.group, list(s.token_ids), list(s.loss_mask), list(s.logprobs), s.reward, s.valid,
            s.mask_reason, s.prompt_length, s.request, stats, rec)


def test_streaming_gives_the_barriers_samples_rewards_and_advantages(runs):
    streamed, barrier = runs[True][0], runs[False][0]
    assert [_view(s) for s in streamed] == [_view(s) for s in barrier]
    rewards = [s.reward for s in streamed]
    assert set(rewards) == {1.0, 0.25}, rewards           # both plans drawn: non-trivial advantages
    loss_cfg = runs["cfg"].loss
    a_stream = sample_advantages(streamed, 3, GROUP, loss_cfg)
    a_barrier = sample_advantages(barrier, 3, GROUP, loss_cfg)
    assert a_stream.tobytes() == a_barrier.tobytes() and np.abs(a_stream).max() > 0
    assert runs[True][1]["reward_dims"] == runs[False][1]["reward_dims"]


def test_streaming_renders_while_rollouts_still_generate(runs):
    _, info, events, renderer = runs[True]
    kinds = [e[0] for e in events]
    last_generate = max(i for i, k in enumerate(kinds) if k == "generate")
    assert kinds.index("render_start") < last_generate     # a render began before the last batch generated
    assert info["time/reward_overlap_s"] > 0.0
    assert renderer.max_groups_in_flight > 1                # several groups rendering at once
    for s in runs[True][0]:                                 # per-sample timestamps, in causal order
        t = s.stats["timing"]
        assert 0 < t["generated_s"] <= t["rendered_s"] <= t["judged_s"]
        assert t["generated_s"] <= info["time/generation_s"] and t["judged_s"] <= info["time/rollout_s"]
    assert info["time/rollout_s"] == pytest.approx(info["time/generation_s"] + info["time/judge_s"])


def test_the_barrier_renders_after_every_rollout_and_one_group_at_a_time(runs):
    _, info, events, renderer = runs[False]
    kinds = [e[0] for e in events]
    last_generate = max(i for i, k in enumerate(kinds) if k == "generate")
    assert kinds.index("render_start") > last_generate
    assert info["time/reward_overlap_s"] == 0.0
    assert renderer.max_groups_in_flight == 1
    waits = info["time/render_wait_s"] + info["time/judge_wait_s"]
    assert info["time/judge_s"] == pytest.approx(waits) and info["time/render_wait_s"] > 0
