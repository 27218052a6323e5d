"""The whole rollout phase of a tiny_cpu GRPO step, with the JaxEngine's KV reuse on and off.

    python bench/rollout_phase.py                      # 4 prompts × 8 rollouts, up to 11 rounds
    python bench/rollout_phase.py --modes on --prompts 2

configs/tiny_cpu.py's task (the synthetic prompt pool, offline search tools, the rule judge,
``AgentRolloutPhase`` and ``AgentLoop`` as the trainer builds them) with the agent's default 11
rounds. The policy is tiny_cpu's random model (not an SFT one: there is no checkpoint in the repo),
with one change so that turns end the way a trained policy's do: the end-of-turn token
``<|im_end|>`` gets a logit bias (through a constant feature of every embedding, see
:func:`bias_end_of_turn`) that ends a turn after ~``--turn-tokens`` tokens. A random turn is a
format error, so the observation each round is the loop's format-error message; the trajectory
goes on (``agent.max_consecutive_format_errors`` = rounds) and every round resends the whole
context, as a real one does. No turn parses, so the judge is never called.

Each mode runs the phase twice on one engine: the first run compiles, the second (same seeds, the
cache flushed in between) is timed. Reported: rollout wall time, prefill tokens (run through the
model), tokens reused, decode tokens, as the engine's public counters count them. With both modes,
the rollouts' tokens are compared one by one, and their sampler log-probs (the largest absolute and
relative difference); tests/rollout/test_jax_engine_reuse.py asserts the same on a small phase.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def bias_end_of_turn(model, token_id: int, bias: float, never: list[int]) -> None:
    """Raise ``token_id``'s logit: every token embedding gets the same value in feature 0, which
    the final hidden state then carries, and the output projection of ``token_id`` reads that
    feature with weight ``bias`` (calibrated by measuring turn lengths, ``--bias``), those of
    ``never`` (the vision placeholders, which a request must pair with images) with −100."""
    import jax.numpy as jnp
    emb = model.language_model.embed_tokens.embedding
    table = np.array(emb.get_value())
    level = 1.0  # dominates feature 0 of the residual stream, so the final hidden state keeps its sign
    table[:, 0] = level
    if model.lm_head is None:  # tied: the table is the output projection too
        table[token_id, 0] = level + bias
        table[never, 0] = -100.0
    else:
        kernel = np.array(model.lm_head.kernel.get_value())
        kernel[0, token_id] = bias
        kernel[0, never] = -100.0
        model.lm_head.kernel.set_value(jnp.asarray(kernel))
    emb.set_value(jnp.asarray(table))


def build(args):
    import configs.tiny_cpu as tiny_cpu
    from flax import nnx
    from genevolve_jax.models.qwen3_vl.model import Qwen3VLForConditionalGeneration
    from genevolve_jax.processing.tokenizer import default_tokenizer
    from genevolve_jax.train.runtime.model_setup import random_model_config

    cfg = tiny_cpu.get_config()
    cfg.agent.max_rounds = args.rounds
    cfg.agent.max_consecutive_format_errors = args.rounds
    cfg.agent.response_max_tokens = args.rounds * cfg.agent.round_max_tokens
    cfg.engine.max_seq_len = args.max_seq_len
    tok = default_tokenizer()
    model = Qwen3VLForConditionalGeneration(random_model_config(cfg.model, tok), rngs=nnx.Rngs(int(cfg.model.seed)))
    c = model.config
    bias_end_of_turn(model, tok.convert_tokens_to_ids("<|im_end|>"), args.bias,
                     [c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id])
    return cfg, tok, model


def run_mode(cfg, tok, model, reuse: bool, prompts, group_size: int) -> tuple[dict, list]:
    """The mode's figures, and each rollout's (token ids, log-probs, policy-token mask) from the timed run."""
    from genevolve_jax.agent.loop import AgentLoop
    from genevolve_jax.agent.tools.toolbox import make_backend
    from genevolve_jax.render.factory import build_renderer
    from genevolve_jax.reward.scorer import RewardScorer
    from genevolve_jax.rollout.jax_engine import JaxEngine
    from genevolve_jax.train.rl.rollout_phase import AgentRolloutPhase

    ecfg = cfg.engine.copy_and_resolve_references()
    ecfg.kv_reuse = reuse
    engine = JaxEngine(model, tok, ecfg)
    loop = AgentLoop(engine, tok, make_backend(cfg.agent.tools), cfg.agent, seed=int(cfg.seed))
    scorer = RewardScorer.from_config(cfg.reward.copy_and_resolve_references(), renderer=build_renderer(cfg.render))
    phase = AgentRolloutPhase(loop, scorer, group_size)
    try:
        t0 = time.perf_counter()
        phase.collect(1, prompts)
        first = time.perf_counter() - t0
        engine.flush_cache()
        before = engine.stats
        t0 = time.perf_counter()
        samples, info = phase.collect(1, prompts)
        wall = time.perf_counter() - t0
        after = engine.stats
    finally:
        engine.close()
    rounds = [s.stats["rounds"] for s in samples]
    out = {k: after[k] - before[k] for k in ("prefill_tokens", "reused_tokens", "decode_tokens", "requests",
                                             "prefill_batches", "decode_chunks", "evictions")}
    out.update(reuse=reuse, wall_s=round(wall, 2), rollout_s=round(info["time/rollout_s"], 2),
               first_run_s=round(first, 2), rollouts=len(samples), mean_rounds=float(np.mean(rounds)),
               terminations=dict(__import__("collections").Counter(s.stats["termination"] for s in samples)),
               response_tokens=int(sum(s.stats["response_tokens"] for s in samples)))
    return out, [(list(s.token_ids), np.asarray(s.logprobs, np.float64), np.asarray(s.loss_mask, bool))
                 for s in samples]


def compare_rollouts(off: list, on: list) -> dict:
    """Rollouts whose tokens differ, and the largest log-prob differences among the others."""
    differ, worst_abs, worst_rel = 0, 0.0, 0.0
    for (tokens_a, lp_a, sampled), (tokens_b, lp_b, _) in zip(off, on, strict=True):
        if tokens_a != tokens_b:
            differ += 1
            continue
        gap = np.abs(lp_a - lp_b)[sampled]
        worst_abs = max(worst_abs, float(gap.max(initial=0.0)))
        worst_rel = max(worst_rel, float((gap / np.maximum(np.abs(lp_a[sampled]), 1e-30)).max(initial=0.0)))
    return {"rollouts": len(off), "token_mismatches": differ, "max_abs_logprob_diff": worst_abs,
            "max_rel_logprob_diff": worst_rel}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", choices=["off", "on"], default=["off", "on"])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--bias", type=float, default=0.3, help="end-of-turn logit bias (turn length)")
    args = ap.parse_args()

    from genevolve_jax.data.synthetic import prompt_rows

    cfg, tok, model = build(args)
    prompts = prompt_rows(args.prompts)
    rows, rollouts = {}, {}
    for mode in args.modes:
        rows[mode], rollouts[mode] = run_mode(cfg, tok, model, mode == "on", prompts, args.group_size)
        print(json.dumps(rows[mode]), flush=True)
    if {"on", "off"} <= rows.keys():
        on, off = rows["on"], rows["off"]
        print(f"prefill tokens off/on: {off['prefill_tokens'] / max(on['prefill_tokens'], 1):.2f}x; "
              f"rollout wall on/off: {on['wall_s'] / off['wall_s']:.2f}")
        print(json.dumps(compare_rollouts(rollouts["off"], rollouts["on"])), flush=True)


if __name__ == "__main__":
    main()
