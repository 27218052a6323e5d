"""The small synthetic data set of the embedded defaults (tiny_cpu): an RL prompt pool built from
the offline demo corpus, and SFT teacher trajectories in the GenEvolve-Data ``sft`` layout.

Each prompt asks for a picture of a corpus subject; its metadata names, as the required fact, a
detail of the subject that is in the corpus text but not in the request (``key_detail``), so the
offline rule judge rewards a program only when the agent searched and carried the fact into
gen_prompt. The teacher trajectories are the scripted heuristic demo policy (agent/demo_policy.py)
run through the real agent loop and tools, so they follow the protocol exactly. They may mix plans
(tiny_cpu: search then answer, and answer at once): the cold start teaches the format and both
behaviours, and GRPO has a better and a worse behaviour to choose between, which is what the
embedded run and the learning test measure.
"""
from __future__ import annotations

import asyncio
import json
import os

_STYLES = ("a detailed illustration of", "a photo-realistic picture of", "a poster showing", "a watercolour of")


def _corpus_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "demo_corpus")


_DETAIL_MIN_LETTERS = 7


def key_detail(fact: dict) -> str:
    """The first word of at least 7 letters in a fact's text that is not in its title: a detail the
    request does not give away (e.g. "wrought" for the Eiffel Tower)."""
    import re

    title = {w.lower() for w in re.findall(r"[A-Za-z]+", fact["title"])}
    for word in re.findall(r"[A-Za-z]+", fact["text"]):
        if len(word) >= _DETAIL_MIN_LETTERS and word.lower() not in title:
            return word
    raise ValueError(f"corpus fact {fact.get('id')!r} has no word of >= {_DETAIL_MIN_LETTERS} letters outside "
                     f"its title to use as a key detail")


def _subject(title: str) -> str:
    return title[4:] if title.startswith("The ") else title


def prompt_rows(n: int) -> list[dict]:
    """``n`` prompt-pool rows (id, question, gt_image, meta) over the demo corpus."""
    root = _corpus_dir()
    with open(os.path.join(root, "facts.jsonl"), encoding="utf-8") as f:
        facts = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(root, "images.jsonl"), encoding="utf-8") as f:
        images = [json.loads(line) for line in f if line.strip()]
    rows = []
    for i in range(n):
        fact = facts[i % len(facts)]
        style = _STYLES[(i // len(facts)) % len(_STYLES)]
        rows.append({"id": f"synthetic-{i:04d}", "question": f"Create {style} the {_subject(fact['title'])}.",
                     "gt_image": os.path.join(root, images[i % len(images)]["file"]),
                     "meta": {"required_facts": [key_detail(fact)], "primary_skills": []}})
    return rows


def trajectory_messages(traj, agent_cfg=None) -> list[dict]:
    """A finished agent trajectory as GenEvolve-Data ``sft`` messages (text only), with the system
    prompt the agent loop of ``agent_cfg`` shows (so SFT and rollouts see the same context)."""
    from genevolve_jax.agent.system_prompt import build_system_prompt

    if agent_cfg is None:
        system = build_system_prompt()
    else:
        system = build_system_prompt(agent_cfg.max_tool_calls, agent_cfg.program.max_references,
                                     agent_cfg.program.min_references, style=agent_cfg.get("system_prompt", "full"))
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": traj.request}]
    for turn in traj.turns:
        text = turn.text.replace("<|im_end|>", "").rstrip()
        msgs.append({"role": "assistant", "content": text})
        if turn.observation is not None:
            msgs.append({"role": "user", "content": turn.observation})
    return msgs


def parse_plans(plans) -> list[tuple[str, ...]]:
    """``["search,image_search", ""]`` → ``[("search", "image_search"), ()]`` (config form → plans)."""
    out = []
    for plan in plans:
        out.append(tuple(t.strip() for t in str(plan).split(",") if t.strip()))
    if not out:
        raise ValueError("synthetic.plans must name at least one plan (a comma-separated tool list; '' answers at once)")
    return out


def write_synthetic_data(out_dir: str, *, num_prompts: int = 16, num_sft: int = 16, agent_cfg=None,
                         plans=("query_knowledge,search,image_search",)) -> dict:
    """Write ``rl_prompts.jsonl`` and ``sft_trajectories.jsonl`` under ``out_dir``; returns paths.

    The SFT set covers ``num_sft // len(plans)`` subjects (at least one), each once per plan, so every
    subject is seen with every behaviour."""
    from genevolve_jax.agent.config import default_agent_config
    from genevolve_jax.agent.demo_policy import HeuristicDemoEngine
    from genevolve_jax.agent.loop import AgentLoop
    from genevolve_jax.agent.tools import make_backend
    from genevolve_jax.processing.tokenizer import default_tokenizer

    os.makedirs(out_dir, exist_ok=True)
    rl_path = os.path.join(out_dir, "rl_prompts.jsonl")
    with open(rl_path, "w", encoding="utf-8") as f:
        for row in prompt_rows(num_prompts):
            f.write(json.dumps(row) + "\n")
    cfg = (agent_cfg if agent_cfg is not None else default_agent_config()).copy_and_resolve_references()
    # The scripted teacher's turns are at most ~250 tokens; a run may cap the student's rounds far
    # lower (smoke tests cut them at a few tokens), which must not censor the teacher set.
    cfg.round_max_tokens = max(int(cfg.round_max_tokens), 512)
    cfg.response_max_tokens = max(int(cfg.response_max_tokens), int(cfg.round_max_tokens))
    tokenizer = default_tokenizer()
    backend = make_backend(cfg.tools)
    plan_list = parse_plans(plans)
    rows = prompt_rows(max(1, num_sft // len(plan_list)))
    trajs = []
    for n, plan in enumerate(plan_list):
        loop = AgentLoop(HeuristicDemoEngine(tokenizer, plan, top_k=cfg.tools.search_top_k), tokenizer, backend, cfg, seed=0)
        trajs += asyncio.run(loop.run_many([(f"{r['id']}-plan{n}", r["question"]) for r in rows]))
    sft_path = os.path.join(out_dir, "sft_trajectories.jsonl")
    kept = 0
    with open(sft_path, "w", encoding="utf-8") as f:
        for traj in trajs:
            if traj.termination != "answer" or traj.masked:
                continue
            f.write(json.dumps({"messages": trajectory_messages(traj, cfg), "images": []}, ensure_ascii=False) + "\n")
            kept += 1
    if not kept:
        raise RuntimeError("the demo policy finished no trajectory with an answer; no SFT data written")
    return {"rl": rl_path, "sft": sft_path, "sft_rows": kept}
