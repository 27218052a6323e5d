"""A toy task for checking that the evolve loop learns, in seconds on a CPU.

The policy continues a short prompt of token ids; the reward of a rollout is the fraction of its
sampled tokens that fall in a target set (think "pick the right skill token"). Everything but the
agent protocol is real: rollouts through a rollout engine (the trainer's sampler, weight-synced
each step), GRPO advantages over groups, teacher rows built from a "guide" prefix, the jitted
GRPO + λ·SDL step through the fused log-prob op, checkpoints with the prompt source's state.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

from genevolve_jax.rollout.engine import GenerationRequest, SamplingParams
from genevolve_jax.train.batch_assembly import RolloutSample


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little") & 0x7FFFFFFF


class CyclingPrompts:
    """An endless, checkpointable source of prompt batches: lists of ``per_step`` prompts.

    With ``shard_count`` > 1 (one shard per process of a multi-host run) shard ``shard_index``
    yields its ``per_step / shard_count`` prompts of each global batch, strided like the prompt
    pool's host shard: local prompt g is global prompt ``g·shard_count + shard_index``. The state
    (the global position) is the same on every shard."""

    def __init__(self, prompts: Sequence[Sequence[int]], per_step: int, *, shard_index: int = 0,
                 shard_count: int = 1):
        if not prompts or per_step < 1:
            raise ValueError("CyclingPrompts needs prompts and per_step >= 1")
        if shard_count < 1 or not 0 <= shard_index < shard_count or per_step % shard_count:
            raise ValueError(f"CyclingPrompts: shard {shard_index} of {shard_count} does not split "
                             f"per_step={per_step} prompts evenly")
        self.prompts = [list(p) for p in prompts]
        self.per_step = per_step
        self.shard_index, self.shard_count = shard_index, shard_count
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self) -> list[list[int]]:
        n, i = self.shard_count, self.shard_index
        out = [self.prompts[(self.position + g * n + i) % len(self.prompts)] for g in range(self.per_step // n)]
        self.position += self.per_step
        return out

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])


class TokenChoicePhase:
    """Rollouts of ``new_tokens`` tokens; reward = fraction of them in ``targets``."""

    def __init__(self, engine, group_size: int, targets: Sequence[int], *, new_tokens: int = 4,
                 temperature: float = 1.0, guide_ids: Sequence[int] = (), seed: int = 0):
        self.engine, self.group_size, self.targets = engine, group_size, set(int(t) for t in targets)
        self.new_tokens, self.temperature, self.seed = new_tokens, temperature, seed
        self.guide_ids = list(guide_ids)

    def collect(self, step: int, prompts: Sequence[Sequence[int]], group_ids: Sequence[int] | None = None):
        """``group_ids``: the global index of each prompt in the step (multi-host; default 0..P-1);
        sample ids, seeds and groups follow it, so they do not depend on the number of hosts."""
        gids = list(range(len(prompts))) if group_ids is None else [int(g) for g in group_ids]
        reqs = [GenerationRequest(list(p), SamplingParams(max_new_tokens=self.new_tokens, temperature=self.temperature,
                                                          top_p=1.0, seed=_seed(self.seed, step, gids[i], j)),
                                  request_id=f"s{step}-p{gids[i]}-k{j}")
                for i, p in enumerate(prompts) for j in range(self.group_size)]
        results = self.engine.generate(reqs)
        samples = []
        for n, (req, res) in enumerate(zip(reqs, results)):
            toks = list(res.token_ids)
            reward = sum(t in self.targets for t in toks) / max(1, self.new_tokens)
            p = req.prompt_ids
            samples.append(RolloutSample(req.request_id, gids[n // self.group_size], p + toks,
                                         [0] * len(p) + [1] * len(toks),
                                         [0.0] * len(p) + list(res.logprobs), reward, True, prompt_length=len(p),
                                         request=" ".join(map(str, p)), stats={"response_tokens": len(toks)}))
        return samples, {}

    def teacher_prompt(self, sample: RolloutSample, guide: str) -> list[int]:
        """The student's prompt after the guide's token ids (``guide`` names nothing here)."""
        return self.guide_ids + sample.token_ids[:sample.prompt_length]


class FixedGuideExperience:
    """An experience stage that retrieves the same guide for every request (for SDL checks)."""

    def __init__(self, guide: str = "guide"):
        self.guide = guide
        self.updates = 0

    def update(self, groups, step: int) -> dict:
        self.updates += 1
        return {"experience/updates": self.updates}

    def guides(self, requests: Sequence[str]):
        return [self.guide] * len(requests), {"experience/retrieved": len(requests)}

    def state_dict(self) -> dict:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])


# --- a complete toy run (tests, the kill-and-resume subprocess) -------------------------------------
TOY_VOCAB = 64
TOY_TARGETS = tuple(range(8, 16))        # 8 of 64 tokens: a random policy scores ~1/8
TOY_PROMPTS = ([1, 2, 3, 4], [5, 6, 7, 4], [9, 3, 2, 4], [7, 7, 1, 4])
TOY_GUIDE = (20, 21, 22, 23, 24, 25)


def toy_model(seed: int = 0, vocab: int = TOY_VOCAB):
    """A 2-layer tiny Qwen3-VL with a 1-block vision tower, initialised in one compiled call."""
    import dataclasses

    import jax
    from flax import nnx

    from genevolve_jax.models.qwen3_vl.config import tiny
    from genevolve_jax.models.qwen3_vl.model import Qwen3VLForConditionalGeneration

    cfg = tiny(vocab_size=vocab)
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=2),
                      vision=dataclasses.replace(cfg.vision, depth=1, deepstack_visual_indexes=(0,)))
    make = lambda: Qwen3VLForConditionalGeneration(cfg, rngs=nnx.Rngs(seed))  # noqa: E731
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    state = jax.jit(lambda: nnx.split(make())[1], compiler_options={"xla_backend_optimization_level": 0})()
    return nnx.merge(graphdef, state)


def toy_run_config(workdir: str, *, lr: float = 1e-2, sdl: float = 0.0, kl: float = 0.0, steps: int = 10,
                   group: int = 8, prompts_per_step: int = 2, save_every: int = 100, mesh: dict | None = None):
    """tiny_cpu with the toy task's sizes: one device, the simple sampler, short rows."""
    from genevolve_jax.config_loader import load_config

    cfg = load_config("tiny_cpu")
    cfg.workdir = str(workdir)
    for axis, size in (mesh or {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1}).items():
        cfg.sharding.mesh[axis] = size
    cfg.train.optimizer.learning_rate = lr
    cfg.train.optimizer.eps = 1e-6
    cfg.train.schedule.kind = "constant"
    cfg.train.schedule.total_steps = steps
    cfg.rl.engine = "simple"
    cfg.train.grad_accum_steps = 1           # the toy's batches are a few short rows
    cfg.rl.group_size = group
    cfg.rl.num_steps = steps
    cfg.rl.length_multiple = 16
    cfg.rl.export_hf = False
    cfg.data.rl.prompts_per_step = prompts_per_step
    cfg.agent.loop.engine_batch_size = 16
    cfg.loss.grpo.kl_coef = kl
    cfg.loss.sdl.coef = sdl
    cfg.loss.logprob.chunk_size = 32
    # Plain softmax sampling: the toy's rewarded tokens start rare (~8 %), and temperature 1 keeps
    # them reachable (tiny_cpu samples at the paper's 0.7).
    cfg.agent.sampling.temperature = cfg.loss.logprob.rl_temperature = 1.0
    cfg.checkpoint.save_every = save_every
    cfg.logging.sample_every = 0
    cfg.logging.progress = False
    return cfg


def toy_trainer(cfg, *, model=None, experience=None, seed: int = 0, devices=None):
    """An EvolveTrainer on the token-choice task (``devices`` default: the first device)."""
    import types

    import jax

    from genevolve_jax.train.evolve import EvolveTrainer

    return EvolveTrainer(
        cfg, model=model if model is not None else toy_model(), tokenizer=types.SimpleNamespace(pad_token_id=0),
        rollout_phase=lambda t: TokenChoicePhase(t.engine, cfg.rl.group_size, TOY_TARGETS, guide_ids=TOY_GUIDE,
                                                 seed=seed),
        prompt_source=CyclingPrompts(TOY_PROMPTS, cfg.data.rl.prompts_per_step), experience=experience,
        progress=False, devices=devices if devices is not None else jax.devices()[:1])
