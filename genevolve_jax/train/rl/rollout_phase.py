"""The rollout half of an evolve step: P prompts × K rollouts → judged, grouped RolloutSamples.

A rollout phase has one method, ``collect(step, prompts) -> (samples, info)``: samples are
group-major (prompt i's K rollouts are samples[i·K:(i+1)·K]) with rewards set (None when masked),
and ``info`` holds metrics and the raw records for sample dumps. The trainer does the rest
(advantages, experience, teacher rows, the step), so any phase with this shape trains the same way:
:class:`AgentRolloutPhase` is the real one (agent loop → render → judge); tests use toy phases.
"""
from __future__ import annotations

import asyncio
import collections
import time
from typing import Callable, Sequence

from genevolve_jax.reward.scorer import RewardSample
from genevolve_jax.train.rl.pipeline import RolloutPhase
from genevolve_jax.train.rl.records import RolloutSample


def _skills(traj) -> list[str]:
    return [str((t.arguments or {}).get("skill_name")) for t in traj.turns
            if t.tool_name == "query_knowledge" and t.arguments]


class _Clock:
    """Per-sample readings of time.perf_counter() since the phase began: generation done, scoring
    started, render arrived, judge done; and the phase's critical path from them."""

    def __init__(self, n: int):
        self.t0 = time.perf_counter()
        self.marks: list[dict[str, float]] = [{} for _ in range(n)]

    def mark(self, n: int, name: str, rendered_at: float | None = None) -> None:
        self.marks[n][name] = time.perf_counter() - self.t0
        if rendered_at is not None:
            self.marks[n]["rendered"] = rendered_at - self.t0

    def of(self, n: int) -> dict[str, float]:
        """Sample ``n``'s timestamps (seconds since the phase began): generated_s, rendered_s, judged_s."""
        return {f"{name}_s": v for name, v in self.marks[n].items() if name != "scoring"}

    def critical_path(self) -> dict[str, float]:
        """``time/rollout_s``: the whole phase, its critical path: ``time/generation_s`` until the
        last trajectory ended, then ``time/render_wait_s`` until the last render arrived, then
        ``time/judge_wait_s`` until the last judge answered (``time/judge_s`` is the two together:
        what rewards added after generation); ``time/reward_overlap_s``: generation time during
        which rewards were already being scored."""
        def last(name, floor=0.0):
            return max([m[name] for m in self.marks if name in m], default=floor)
        gen = last("generated")
        rendered = max(gen, last("rendered", gen))
        judged = max(rendered, last("judged", rendered))
        first_scoring = min([m["scoring"] for m in self.marks if "scoring" in m], default=gen)
        return {"time/rollout_s": judged, "time/generation_s": gen, "time/render_wait_s": rendered - gen,
                "time/judge_wait_s": judged - rendered,
                "time/judge_s": judged - gen, "time/reward_overlap_s": max(0.0, gen - first_scoring)}


class AgentRolloutPhase(RolloutPhase):
    """Rollouts through the agent loop (any engine), rewards through the RewardScorer."""

    def __init__(self, loop, scorer, group_size: int, *, render_seed: int = 0, mask_truncated: bool = True,
                 mask_error: bool = True, stream_rewards: bool = True):
        self.loop, self.scorer, self.group_size, self.render_seed = loop, scorer, group_size, render_seed
        # rl.stream_rewards: a trajectory's render and judge start as soon as it has its program
        # (every group in flight at once, limited by the services' throttles); False waits for
        # every trajectory first. Records depend on their sample alone, so both give the same.
        self.stream_rewards = stream_rewards
        # loss.grpo.mask_truncated / mask_error: False trains such a rollout as a reward-0 sample
        # instead of dropping it (only when it has policy tokens to train on).
        self.keep = {"too_long": not mask_truncated, "error": not mask_error}

    def collect(self, step: int, prompts: Sequence[dict],
                group_ids: Sequence[int] | None = None) -> tuple[list[RolloutSample], dict]:
        """``group_ids``: the global index of each prompt (multi-host: this host's shard of the
        step), so that sample ids, seeds and groups do not depend on the number of hosts."""
        return asyncio.run(self._collect(step, prompts, group_ids))

    def teacher_prompt(self, sample: RolloutSample, guide: str) -> list[int]:
        """The loop's prompt for the sample's request with the guide in its system prompt."""
        return list(self.loop.prompt_ids(sample.request, guide))

    async def _collect(self, step: int, prompts: Sequence[dict], group_ids: Sequence[int] | None = None):
        k = self.group_size
        gids = list(range(len(prompts))) if group_ids is None else [int(g) for g in group_ids]
        items = [(f"s{step}-p{gids[i]}-k{j}", p["question"]) for i, p in enumerate(prompts) for j in range(k)]
        clock = _Clock(len(items))
        records: list = [None] * len(items)

        def reward_sample(n: int, traj):
            """What the scorer judges of trajectory ``n``, or None when it has no program to judge."""
            if traj.masked or traj.program is None:
                return None
            p = prompts[n // k]
            return RewardSample(traj.traj_id, traj.request, traj.program, p.get("gt_image"), task=p,
                                skills_queried=_skills(traj), seed=self.render_seed + n % k)

        async def score(n: int, rs) -> None:
            clock.mark(n, "scoring")
            records[n] = rec = await self.scorer.score_logged(rs)
            clock.mark(n, "judged", rendered_at=rec.render_done_at)

        async def finished(n: int, traj) -> None:
            clock.mark(n, "generated")
            if self.stream_rewards and (rs := reward_sample(n, traj)) is not None:
                await score(n, rs)   # now, while other trajectories still generate

        trajs = await self.loop.run_many(items, on_finished=finished)
        if not self.stream_rewards:   # the barrier: every trajectory first, then one group after another
            by_group = collections.defaultdict(list)
            for n, traj in enumerate(trajs):
                if (rs := reward_sample(n, traj)) is not None:
                    by_group[n // k].append((n, rs))
            for members in by_group.values():
                await asyncio.gather(*(score(n, rs) for n, rs in members))
        return self._samples(trajs, records, gids, clock)

    def _samples(self, trajs, records, gids, clock: _Clock) -> tuple[list[RolloutSample], dict]:
        """The trajectories as RolloutSamples with their rewards, and the phase's info."""
        k = self.group_size
        samples, masked = [], collections.Counter()
        for n, traj in enumerate(trajs):
            rec = records[n]
            if traj.masked and self.keep.get(traj.termination or "") and sum(traj.loss_mask()) > 0:
                reward, valid, reason = 0.0, True, f"zero_reward_{traj.termination}: {traj.mask_reason}"
            elif traj.masked:
                # Keyed by cause: the engine's own kind when it gave one (image_token_mismatch_server),
                # else the termination (too_long / error).
                reason = f"{traj.meta.get('mask_kind') or traj.termination or 'masked'}: {traj.mask_reason}"
                reward, valid = None, False
            elif rec is None:  # finished without a program (format error, out of rounds): reward 0
                reward, valid, reason = 0.0, True, f"no_program:{traj.termination}"
            elif rec.masked:
                reward, valid, reason = None, False, rec.reason
            else:
                reward, valid, reason = float(rec.reward), True, rec.reason
            if not valid:
                masked[reason.split(":")[0].strip() or "masked"] += 1
            samples.append(RolloutSample(
                traj.traj_id, gids[n // k], traj.token_ids(), traj.loss_mask(), traj.logprobs(), reward, valid, reason,
                prompt_length=traj.prompt_length, request=traj.request,
                stats={"tool_calls": traj.stats.get("tool_calls", 0), "rounds": traj.stats.get("rounds", 0),
                       "format_errors": traj.stats.get("format_errors", 0), "skills": _skills(traj),
                       "repeated_calls": traj.stats.get("repeated_calls", 0),
                       "termination": traj.termination, "response_tokens": traj.response_length,
                       "timing": clock.of(n)},
                extra={"trajectory": traj, "reward_record": rec, "reward_reason": rec.reason if rec else reason,
                       "image_path": getattr(rec, "image_path", None) if rec else None},
                images=traj.context_images()))
        info = {**clock.critical_path(), "masked_reasons": dict(masked)}
        dims = collections.defaultdict(list)
        for rec in records:
            if rec is None or rec.masked:
                continue
            for name in ("r_img", "r_text"):
                if getattr(rec, name) is not None:
                    dims[f"reward/{name}"].append(float(getattr(rec, name)))
            for key, value in (rec.details or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    dims[f"reward/{key}"].append(float(value))
        info["reward_dims"] = {key: sum(v) / len(v) for key, v in dims.items()}
        return samples, info


def policy_generate_fn(engine, tokenizer, max_new_tokens: int = 512, temperature: float = 0.3) -> Callable:
    """``generate_many(texts) -> texts`` for the summariser's "policy" backend: the policy itself,
    through the rollout engine, answering a single-turn chat."""
    from genevolve_jax.rollout.engine import GenerationRequest, SamplingParams

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def generate_many(texts: list[str]) -> list[str]:
        reqs = []
        for i, text in enumerate(texts):
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                   add_generation_prompt=True)
            ids = list(tokenizer.encode(prompt, add_special_tokens=False))
            reqs.append(GenerationRequest(ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                                              top_p=1.0, stop_token_ids=(im_end,), seed=i),
                                          request_id=f"summary-{i}"))
        results = engine.generate(reqs)
        return [tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in results]

    return generate_many
