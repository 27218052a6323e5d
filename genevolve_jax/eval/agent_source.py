"""The agent policy as an evaluation program source: one case -> the agent loop -> its program.

A checkpoint's policy runs through the agent loop (genevolve_jax/agent/loop.py) with the configured
tools. Without a checkpoint (the embedded offline defaults) the policy is the agent package's
heuristic demo policy: scripted rules, not a model, and every record and report says so.

A trajectory that ends without an answer is an ``agent`` failure (its termination and mask reason
are the reason); an answer whose program finalisation rejected it (empty prompt, raw ids in the
prompt, too few usable references, ...) is a ``program`` failure listing the rejection codes. Both
are counted as missing, as the paper's evaluator counts a sample without an image.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from genevolve_jax.eval.pipeline import ProgramOutput
from genevolve_jax.eval.runner import CaseFailure


class LoopAgentRunner:
    """AgentRunner over an AgentLoop. All cases share the loop, and so the engine batcher."""

    def __init__(self, loop: Any, policy_label: str):
        self.loop = loop
        self.policy_label = policy_label

    async def run(self, request: str, *, case_id: str) -> ProgramOutput:
        self.loop.share_engine_batcher()   # concurrent cases batch their engine calls together
        traj = await self.loop.run(request, traj_id=str(case_id))
        traj.meta["policy"] = self.policy_label
        record = traj.to_dict()
        if traj.termination != "answer" or not traj.program:
            why = traj.termination or "unknown"
            raise CaseFailure("agent", why + (f" ({traj.mask_reason})" if traj.mask_reason else ""),
                              {"trajectory": record})
        program = dict(traj.program)
        if not program.get("valid", True):
            codes = sorted({r["code"] for r in program.get("rejections", []) if r.get("fatal")})
            raise CaseFailure("program", f"program rejected: {', '.join(codes) or 'invalid'}",
                              {"trajectory": record, "program": program})
        return ProgramOutput(program=program, trajectory=record)


def build_agent_runner(cfg: ml_collections.ConfigDict) -> LoopAgentRunner:
    """The runner for ``cfg.eval.checkpoint`` (empty = the heuristic demo policy) with ``cfg.agent``."""
    from genevolve_jax.agent.config import validate
    from genevolve_jax.agent.loop import AgentLoop
    from genevolve_jax.agent.tools import make_backend

    agent_cfg = validate(cfg.agent)
    checkpoint = cfg.eval.checkpoint
    if checkpoint:
        from genevolve_jax.rollout import jax_engine

        engine, tokenizer = jax_engine.from_checkpoint(checkpoint)
        label = f"checkpoint {checkpoint}"
    else:
        from genevolve_jax.agent.demo_policy import POLICY_LABEL, HeuristicDemoEngine
        from genevolve_jax.processing.tokenizer import default_tokenizer

        tokenizer = default_tokenizer()
        engine, label = HeuristicDemoEngine(tokenizer), POLICY_LABEL
    loop = AgentLoop(engine, tokenizer, make_backend(agent_cfg.tools), agent_cfg, seed=int(cfg.eval.seed))
    return LoopAgentRunner(loop, label)
