"""The experience stage of an evolve step (Visual Experience Distillation, METHOD.md §7).

After the step's rewards: best/worst pairs of each group → summariser → memory (≤ 8 inserts a
step), then retrieval for each request → the decision guide (None below the similarity threshold).
The trainer runs it on one process and broadcasts the guides and the memory (sharding/collective.py),
because a summariser that calls a model or an endpoint is not deterministic across hosts.
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Sequence


class Experience(abc.ABC):
    """What the trainer needs of an experience stage: learn from a step's groups, give a guide per
    request, and checkpoint its memory."""

    @abc.abstractmethod
    def update(self, groups: Sequence[Sequence[Any]], step: int) -> dict:
        """Learn from this step's groups of samples (``RolloutSample``s); returns metrics."""

    @abc.abstractmethod
    def guides(self, requests: Sequence[str]) -> tuple[list[str | None], dict]:
        """(a decision guide or None per request, metrics)."""

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """JSON-able state for checkpoints."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output."""


class ExperienceStage(Experience):
    """Pairs → summariser → memory, and retrieval → decision guides (experience section config)."""

    def __init__(self, exp_cfg, *, generate: Callable[[str], str] | None = None, summariser=None):
        from genevolve_jax.experience.config import validate
        from genevolve_jax.experience.embedder import make_embedder
        from genevolve_jax.experience.memory import ExperienceMemory
        from genevolve_jax.experience.retrieval import Retriever
        from genevolve_jax.experience.summariser import make_summariser

        validate(exp_cfg)
        self.cfg = exp_cfg
        self.memory = ExperienceMemory.from_config(exp_cfg.memory, make_embedder(exp_cfg.embedder))
        self.retriever = Retriever(self.memory, exp_cfg.retrieval.min_similarity)
        self.summariser = summariser or make_summariser(exp_cfg.summariser, generate=generate)

    def update(self, groups: Sequence[Sequence[Any]], step: int) -> dict:
        """Select pairs in this step's groups, summarise them, insert the bundles; returns metrics."""
        from genevolve_jax.experience.pairs import Candidate, protocol_failure, select_pairs

        cands = []
        for group in groups:
            row = []
            for s in group:
                traj = s.extra.get("trajectory")
                row.append(Candidate(s.sample_id, s.request, None if (s.reward is None or not s.valid) else s.reward,
                                     traj, protocol_failure(traj, s.extra.get("reward_reason", ""))))
            cands.append(row)
        pairs, pstats = select_pairs(cands, min_gap=self.cfg.pairs.min_gap,
                                     skip_protocol_failures=self.cfg.pairs.skip_protocol_failures)
        before = dict(self.summariser.stats.to_dict())
        bundles = [b for b in self.summariser.summarise_all(pairs) if b is not None] if pairs else []
        report = self.memory.add_step(bundles, step)
        after = self.summariser.stats.to_dict()
        out = {"experience/pairs": pstats.pairs, "experience/bundles": len(bundles),
               "experience/inserted": len(report.inserted), "experience/evicted": len(report.evicted),
               "experience/memory_size": len(self.memory),
               "experience/summary_dropped": after.get("dropped", 0) - before.get("dropped", 0)}
        for why, n in pstats.skipped.items():
            out[f"experience/pair_skipped/{why}"] = n
        return out

    def guides(self, requests: Sequence[str]) -> tuple[list[str | None], dict]:
        from genevolve_jax.experience.guide import render_guide

        found = self.retriever.retrieve(list(requests))
        guides = [render_guide(r.bundle) if r is not None else None for r in found]
        sims = [r.similarity for r in found if r is not None]
        return guides, {"experience/retrieved": len(sims),
                        "experience/similarity": sum(sims) / len(sims) if sims else 0.0}

    def state_dict(self) -> dict:
        return self.memory.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state)
