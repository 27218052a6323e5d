"""Rewards for a GRPO group: render and judge calls run concurrently under bounded concurrency and
a requests-per-minute limit, results are cached by content hash, and a call that still fails after
its retries masks the sample with the reason. It never becomes a silent 0 that trains the policy.
A legitimate zero (empty program, reference count out of range) is a reward of 0 with its reason.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

from PIL import Image

from genevolve_jax.render.base import RenderError, RenderRequest
from genevolve_jax.render.factory import CachedRenderer
from genevolve_jax.render.remote import ContentCache, Throttle
from genevolve_jax.reward.judge_call import JudgeFailed
from genevolve_jax.reward.kscore import KScoreJudge, KScoreWeights
from genevolve_jax.reward.mix import RewardRecord, masked, mix_reward, program_violation
from genevolve_jax.reward.program_judge import ProgramJudge
from genevolve_jax.reward.rule_judge import OfflineRuleJudge

log = logging.getLogger(__name__)


@dataclass
class RewardSample:
    """One rollout's finalised program and what it is judged against."""
    sample_id: str
    request: str
    program: dict                       # {"gen_prompt", "reference_images": [{"img_id", "note", "path"}]}
    gt_image: str | None = None         # ground-truth image file (needed by the VLM judges)
    task: dict = field(default_factory=dict)        # the dataset row: meta, extra_info
    skills_queried: Sequence[str] = ()
    seed: int = 0


class RewardScorer:
    def __init__(self, alpha: float = 0.5, renderer: CachedRenderer | None = None,
                 kscore_judge: KScoreJudge | None = None, program_judge: ProgramJudge | None = None,
                 rule_judge: OfflineRuleJudge | None = None, min_references: int = 1, max_references: int = 5):
        if rule_judge is None and (kscore_judge is None or program_judge is None or renderer is None):
            raise ValueError("RewardScorer needs either a rule judge, or a renderer with both VLM judges")
        self.alpha = alpha
        self.renderer = renderer
        self.kscore_judge, self.program_judge, self.rule_judge = kscore_judge, program_judge, rule_judge
        self.min_references, self.max_references = min_references, max_references
        self.weights = kscore_judge.weights if kscore_judge else KScoreWeights()

    @classmethod
    def from_config(cls, reward_cfg, renderer=None, backend=None, render_throughput=None) -> "RewardScorer":
        """Build from the ``reward`` section. ``renderer`` is any Renderer (wrapped with the judge
        cache dir and ``render_throughput`` limits); ``backend`` overrides the configured endpoint."""
        from genevolve_jax.reward.config import validate

        validate(reward_cfg)
        cache = ContentCache(reward_cfg.cache_dir or None)
        cached_renderer = None
        if renderer is not None:
            t = render_throughput
            throttle = Throttle(t.max_concurrency, t.requests_per_minute) if t is not None else Throttle(8)
            cached_renderer = renderer if isinstance(renderer, CachedRenderer) else \
                CachedRenderer(renderer, cache, throttle)
        p = reward_cfg.program
        if reward_cfg.judge_kind == "rule":
            return cls(reward_cfg.alpha, cached_renderer, rule_judge=OfflineRuleJudge.from_config(reward_cfg),
                       min_references=p.min_references, max_references=p.max_references)
        e = reward_cfg.endpoint
        if backend is None and reward_cfg.judge_kind == "local":
            from genevolve_jax.reward.local_backend import from_checkpoint

            backend = from_checkpoint(reward_cfg.local.checkpoint, max_tokens=e.max_tokens, temperature=e.temperature)
        elif backend is None:
            from genevolve_jax.reward.backends import OpenAIChatBackend

            backend = OpenAIChatBackend(e.base_url, e.model, e.api_key_env, e.timeout_s, e.temperature, e.max_tokens)
        throttle = Throttle(e.max_concurrency, e.requests_per_minute)  # both judges share one endpoint
        common = dict(cache=cache, throttle=throttle, tries=e.max_retries, backoff_s=e.backoff_s)
        kj = KScoreJudge(backend, KScoreWeights.from_config(reward_cfg.kscore), list(reward_cfg.kscore.levels), **common)
        pj = ProgramJudge(backend, list(p.levels), **common)
        return cls(reward_cfg.alpha, cached_renderer, kj, pj, min_references=p.min_references,
                   max_references=p.max_references)

    @property
    def judge_name(self) -> str:
        return "rule (proxy)" if self.rule_judge is not None else "vlm"

    # --- one sample ----------------------------------------------------------------------------

    async def _render(self, s: RewardSample) -> tuple[Image.Image, dict, float]:
        """(image, its cache details, the perf_counter reading when it arrived)."""
        paths = []
        for i, ref in enumerate(s.program.get("reference_images") or []):
            path = ref.get("path") if isinstance(ref, dict) else None
            if not path:
                raise RenderError(f"reference {i + 1} has no local file (program not finalised?)")
            paths.append(path)
        assert self.renderer is not None
        out = await self.renderer.render(RenderRequest(s.program["gen_prompt"], tuple(paths), s.seed))
        return out.image, {"render_cached": out.cached, "render_key": out.key, "image_path": out.path}, \
            time.perf_counter()

    async def score_one(self, s: RewardSample) -> RewardRecord:
        proxy = self.rule_judge is not None
        why_zero = program_violation(s.program, self.min_references, self.max_references)
        if why_zero:
            return RewardRecord(s.sample_id, 0.0, reason=why_zero, judge=self.judge_name, proxy=proxy,
                                r_img=0.0, r_text=0.0)
        if proxy:
            return await self._score_rule(s)
        return await self._score_vlm(s)

    async def _score_rule(self, s: RewardSample) -> RewardRecord:
        assert self.rule_judge is not None
        try:
            v = self.rule_judge.judge(s.task, s.program, s.skills_queried, s.sample_id)
        except ValueError as e:  # a malformed task row: say which field, do not train on it
            return masked(s.sample_id, f"bad_task_row: {e}", self.judge_name, proxy=True)
        details: dict = {"checks": v.checks}
        image_path = rendered_at = None
        if self.renderer is not None:  # the image is not scored by the proxy, but is kept for logs
            try:
                _, info, rendered_at = await self._render(s)
            except Exception as e:
                return masked(s.sample_id, f"render_failed: {e}", self.judge_name, proxy=True)
            details.update(info)
            image_path = info["image_path"]
        return RewardRecord(s.sample_id, mix_reward(v.r_img, v.r_text, self.alpha), judge=self.judge_name,
                            proxy=True, r_img=v.r_img, r_text=v.r_text, details=details, image_path=image_path,
                            render_done_at=rendered_at)

    async def _score_vlm(self, s: RewardSample) -> RewardRecord:
        assert self.kscore_judge is not None and self.program_judge is not None
        if not s.gt_image:
            return masked(s.sample_id, "gt_image_missing: sample has no ground-truth image", "vlm")
        try:
            with Image.open(s.gt_image) as img:
                gt = img.convert("RGB")
        except (OSError, ValueError) as e:
            return masked(s.sample_id, f"gt_image_unreadable: {s.gt_image}: {e}", "vlm")
        # The program judge needs no rendered image: start it while the render runs.
        program_task = asyncio.create_task(self.program_judge.judge(s.request, gt, s.program))
        try:
            try:
                image, info, rendered_at = await self._render(s)
            except Exception as e:
                return masked(s.sample_id, f"render_failed: {e}", "vlm")
            try:
                kv, k_cached = await self.kscore_judge.judge(s.request, image, gt)
            except JudgeFailed as e:
                return _rendered_at(masked(s.sample_id, f"judge_failed: {e}", "vlm", failed_judge="kscore", **info),
                                    rendered_at)
            try:
                pv, p_cached = await program_task
            except JudgeFailed as e:
                return _rendered_at(masked(s.sample_id, f"judge_failed: {e}", "vlm", failed_judge="program", **info),
                                    rendered_at)
        finally:
            if not program_task.done():
                program_task.cancel()
                await asyncio.gather(program_task, return_exceptions=True)
        r_img = kv.kscore(self.weights)
        details = {**info, "kscore": kv.to_dict(), "program": {"score": pv.score, "rationale": pv.rationale},
                   "kscore_cached": k_cached, "program_cached": p_cached}
        return RewardRecord(s.sample_id, mix_reward(r_img, pv.score, self.alpha), judge="vlm", r_img=r_img,
                            r_text=pv.score, details=details, image_path=info.get("image_path"),
                            render_done_at=rendered_at)

    # --- a group -------------------------------------------------------------------------------

    async def score_group(self, samples: Sequence[RewardSample]) -> list[RewardRecord]:
        """Score every sample concurrently (limits are the throttles'); order is preserved.
        Nothing here is a group-level quantity: each record depends on its sample alone (group
        advantages are the trainer's), so scoring a group's samples one by one as they arrive
        (:meth:`score_logged`) gives the same records."""
        return list(await asyncio.gather(*(self.score_logged(s) for s in samples)))

    async def score_logged(self, s: RewardSample) -> RewardRecord:
        """:meth:`score_one`, with its log line."""
        record = await self.score_one(s)
        (log.warning if record.masked else log.info)("%s", record.log_line())
        return record


def _rendered_at(record: RewardRecord, at: float) -> RewardRecord:
    record.render_done_at = at
    return record


def summarize(records: Sequence[RewardRecord]) -> dict:
    """Group metrics: mean over unmasked rewards only, masked count and reasons (reason type only)."""
    live = [r.reward for r in records if not r.masked and r.reward is not None]
    reasons = collections.Counter(r.reason.split(":")[0] for r in records if r.masked)
    return {"count": len(records), "masked": sum(r.masked for r in records),
            "mean_reward": sum(live) / len(live) if live else None, "masked_reasons": dict(reasons),
            "proxy": any(r.proxy for r in records)}
