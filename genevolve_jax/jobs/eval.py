"""`genevolve eval genevolve-bench|wise --data DIR ...`: run a benchmark end to end and report it.

    genevolve eval genevolve-bench --data DIR [--checkpoint CKPT] [--renderer tiny|diffusers|http|gemini]
                                  [--judge rule|vlm] [--program-source agent|raw_request|programs] ...
    genevolve eval wise --data DIR [...same...] [--categories cultural,time,...]

Output directory (``--out``): cases.jsonl (one record per finished case, appended as each ends;
rerunning the same command resumes), images/, results.json (every aggregate), report.md,
report.html and report_files/. ``--report-only`` re-aggregates and rewrites the report without
running anything. Baselines are one flag: ``--program-source raw_request`` (no agent: the raw
request is rendered) or ``--program-source programs --programs OLD_RUN/cases.jsonl`` (re-render the
programs of an earlier run, e.g. another checkpoint's, through this run's renderer).
Any config value can be set with ``--set eval.runner.max_concurrency=8``, ``--set render.http.urls=[...]``,
``--set agent.tools.backend=serper`` (sections: eval, render, reward, agent).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path

import ml_collections

BENCHMARKS = ("genevolve-bench", "wise")
# Settings that change scores: a resumed run must use the same ones, or its cases.jsonl would mix
# results of two different configurations.
FINGERPRINT_KEYS = ("benchmark", "program_source", "checkpoint", "programs_path", "renderer", "judge", "seed",
                    "judge_model")


class EvalSetupError(RuntimeError):
    """A run that cannot start (missing component, mismatched resume); the message says what to do."""


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="benchmark directory")
    p.add_argument("--out", default="", help="output directory (default: runs/eval/<benchmark>)")
    p.add_argument("--checkpoint", default=None, help="policy checkpoint directory (agent program source)")
    p.add_argument("--program-source", choices=("agent", "raw_request", "programs"), default=None,
                   help="agent (default), raw_request (the 'no agent' baseline) or programs (from --programs)")
    p.add_argument("--no-agent", action="store_true", help="shorthand for --program-source raw_request")
    p.add_argument("--programs", default=None, help="cases.jsonl of an earlier run whose programs to re-render")
    p.add_argument("--renderer", choices=("tiny", "diffusers", "http", "gemini"), default=None,
                   help="render backend (render.backend); tiny is the embedded offline default")
    p.add_argument("--render-url", action="append", default=None, help="render service URL (repeatable)")
    p.add_argument("--judge", choices=("rule", "vlm"), default=None,
                   help="rule: offline proxy judge (default); vlm: OpenAI-compatible VLM judge")
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible base URL of the VLM judge")
    p.add_argument("--judge-model", default=None, help="model name at the judge endpoint")
    p.add_argument("--judge-api-key-env", default=None, help="environment variable holding the judge's API key")
    p.add_argument("--concurrency", type=int, default=None, help="cases in flight at once")
    p.add_argument("--rpm", type=float, default=None, help="case starts per minute (0 = unlimited)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N cases")
    p.add_argument("--seed", type=int, default=None, help="render seed")
    p.add_argument("--no-retry-missing", action="store_true", help="on resume, keep missing cases as they are")
    p.add_argument("--report-only", action="store_true", help="re-aggregate cases.jsonl and rewrite the report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override, e.g. eval.runner.max_concurrency=8 or render.tiny.long_side=32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    bench = sub.add_parser("genevolve-bench", help="GenEvolve-Bench KScore (test.jsonl / test.parquet + images/)")
    _common_arguments(bench)
    bench.add_argument("--split-file", default=None, help="a specific .jsonl/.parquet file inside --data")
    wise = sub.add_parser("wise", help="WISE WiScore (the WISE prompt JSON files)")
    _common_arguments(wise)
    wise.add_argument("--categories", default="", help="comma-separated subset of "
                      "cultural,time,space,biology,physics,chemistry (default: all present)")


# --- config ------------------------------------------------------------------------------------------

def build_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """eval + render + reward + agent sections: defaults, then --set overrides, then the explicit flags."""
    from genevolve_jax.config_loader import apply_overrides
    from genevolve_jax.eval import config as eval_config
    from genevolve_jax.render import config as render_config
    from genevolve_jax.reward import config as reward_config

    from genevolve_jax.agent.config import default_agent_config, validate as validate_agent

    cfg = ml_collections.ConfigDict({"eval": eval_config.get_config(), "render": render_config.get_config(),
                                     "reward": reward_config.get_config(), "agent": default_agent_config()})
    apply_overrides(cfg, [o if o.startswith("--config.") else f"--config.{o}" for o in args.overrides])
    e = cfg.eval
    if args.no_agent:
        e.program_source = "raw_request"
    if args.program_source:
        e.program_source = args.program_source
    if args.programs:
        e.programs_path = args.programs
        if not args.program_source and not args.no_agent:
            e.program_source = "programs"
    for flag, key in ((args.checkpoint, "checkpoint"), (args.judge, "judge"), (args.seed, "seed")):
        if flag is not None:
            e[key] = flag
    for flag, key in ((args.concurrency, "max_concurrency"), (args.rpm, "requests_per_minute"), (args.limit, "limit")):
        if flag is not None:
            e.runner[key] = flag
    if args.no_retry_missing:
        e.runner.retry_missing = False
    if args.renderer:
        cfg.render.backend = args.renderer
    if args.render_url:
        cfg.render.http.urls = list(args.render_url)
    ep = cfg.reward.endpoint
    for flag, key in ((args.judge_url, "base_url"), (args.judge_model, "model"), (args.judge_api_key_env, "api_key_env")):
        if flag is not None:
            ep[key] = flag
    eval_config.validate(cfg.eval)
    render_config.validate(cfg.render)
    render_config.require_service(cfg.render)
    reward_config.validate(cfg.reward)
    validate_agent(cfg.agent)
    return cfg


def fingerprint(args: argparse.Namespace, cfg: ml_collections.ConfigDict) -> dict:
    e = cfg.eval
    return {"benchmark": args.benchmark, "program_source": e.program_source,
            "checkpoint": e.checkpoint if e.program_source == "agent" else "",
            "programs_path": os.path.abspath(e.programs_path) if e.program_source == "programs" else "",
            "renderer": cfg.render.backend, "judge": e.judge, "seed": int(e.seed),
            "judge_model": cfg.reward.endpoint.model if e.judge == "vlm" else ""}


def check_resume(out: Path, fp: dict) -> None:
    """Refuse to resume into an output directory made with different score-changing settings."""
    path = out / "run.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8")).get("fingerprint", {})
        except json.JSONDecodeError:
            old = {}
        diff = [k for k in FINGERPRINT_KEYS if k in old and old[k] != fp.get(k)]
        if diff:
            k = diff[0]
            raise EvalSetupError(f"{out} holds a run with {k}={old[k]!r}, this one has {k}={fp[k]!r}; "
                                 f"use another --out (differing: {diff})")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"fingerprint": fp}, indent=2), encoding="utf-8")


# --- components ----------------------------------------------------------------------------------------

def build_program_source(cfg: ml_collections.ConfigDict):
    from genevolve_jax.eval.pipeline import AgentProgramSource, RawRequestSource, RecordedProgramSource

    e = cfg.eval
    if e.program_source == "raw_request":
        return RawRequestSource()
    if e.program_source == "programs":
        return RecordedProgramSource(e.programs_path)
    return AgentProgramSource(build_agent(cfg), name=f"agent:{e.checkpoint or 'embedded'}")


def build_agent(cfg: ml_collections.ConfigDict):
    """The agent policy as an AgentRunner (eval/agent_source.py): the agent loop over the checkpoint's
    policy, or the heuristic demo policy on the embedded defaults."""
    from genevolve_jax.eval.agent_source import build_agent_runner

    try:
        return build_agent_runner(cfg)
    except RuntimeError as e:  # a component the checkpoint path needs is missing
        raise EvalSetupError(str(e)) from e


def build_renderer(cfg: ml_collections.ConfigDict, out: Path):
    from genevolve_jax.render.factory import CachedRenderer, build_renderer as build
    from genevolve_jax.render.remote import ContentCache

    # One content cache for renders and verdicts, as in training (reward.cache_dir).
    return CachedRenderer(build(cfg.render), ContentCache(cfg.reward.cache_dir or str(out / "cache")))


def build_judge(benchmark: str, cfg: ml_collections.ConfigDict, out: Path):
    from genevolve_jax.eval import judges
    from genevolve_jax.render.remote import ContentCache, Throttle

    if cfg.eval.judge == "rule":
        if benchmark == "wise":
            return judges.WiseProxyJudge()
        from genevolve_jax.reward.rule_judge import OfflineRuleJudge

        return judges.RuleBenchJudge(OfflineRuleJudge.from_config(cfg.reward))
    from genevolve_jax.reward.backends import OpenAIChatBackend

    ep = cfg.reward.endpoint
    backend = OpenAIChatBackend(ep.base_url, ep.model, ep.api_key_env, ep.timeout_s, ep.temperature, ep.max_tokens)
    cache = ContentCache(cfg.reward.cache_dir or str(out / "cache"))
    throttle = Throttle(int(ep.max_concurrency), float(ep.requests_per_minute))
    if benchmark == "wise":
        return judges.WiseVLMJudge(backend, cache, throttle, int(ep.max_retries), float(ep.backoff_s))
    from genevolve_jax.reward.kscore import KScoreJudge, KScoreWeights

    k = cfg.reward.kscore
    weights = KScoreWeights(k.w_faithfulness, k.w_visual_correctness, k.w_text_accuracy, k.w_aesthetics, k.text_na_value)
    return judges.KScoreBenchJudge(KScoreJudge(backend, weights, tuple(cfg.reward.kscore.levels), cache, throttle,
                                               int(ep.max_retries), float(ep.backoff_s)))


def normalizer(benchmark: str, cfg: ml_collections.ConfigDict):
    from genevolve_jax.eval.aggregates import normalize_kscore_output
    from genevolve_jax.eval.wise import normalize_wise_output

    if benchmark == "wise":
        w = cfg.eval.wise
        weights = (w.w_consistency, w.w_realism, w.w_aesthetics)
        return lambda obj: normalize_wise_output(obj, weights)
    k = cfg.reward.kscore
    weights = {"faithfulness": k.w_faithfulness, "visual_correctness": k.w_visual_correctness,
               "text_accuracy": k.w_text_accuracy, "aesthetics": k.w_aesthetics}
    return lambda obj: normalize_kscore_output(obj, weights, k.text_na_value)


def load_cases(args: argparse.Namespace, out: Path) -> list:
    if args.benchmark == "wise":
        from genevolve_jax.eval.wise import CATEGORIES, load_wise

        cats = tuple(c.strip() for c in (args.categories or "").split(",") if c.strip()) or None
        bad = [c for c in cats or () if c not in CATEGORIES]
        if bad:
            raise EvalSetupError(f"--categories: unknown {bad}; choose from {CATEGORIES}")
        return load_wise(args.data, cats)
    from genevolve_jax.eval.bench import load_bench

    return load_bench(args.data, getattr(args, "split_file", None), image_cache_dir=out / "gt_images")


def aggregate(benchmark: str, cases: list, records: dict, cfg: ml_collections.ConfigDict) -> dict:
    from genevolve_jax.eval.aggregates import bench_results, wise_results

    if benchmark == "wise":
        w = cfg.eval.wise
        cw = {c: float(w[f"w_{c}"]) for c in ("cultural", "time", "space", "biology", "physics", "chemistry")}
        return wise_results(cases, records, (w.w_consistency, w.w_realism, w.w_aesthetics), cw)
    k = cfg.reward.kscore
    weights = {"faithfulness": k.w_faithfulness, "visual_correctness": k.w_visual_correctness,
               "text_accuracy": k.w_text_accuracy, "aesthetics": k.w_aesthetics}
    return bench_results(cases, records, weights, k.text_na_value)


def policy_notes(cfg: ml_collections.ConfigDict) -> list[str]:
    e = cfg.eval
    if e.program_source == "raw_request":
        return ["Baseline without an agent: each request is rendered as written, with no references."]
    if e.program_source == "programs":
        return [f"Programs re-rendered from an earlier run: {e.programs_path}."]
    if not e.checkpoint:
        return ["Policy: the agent package's heuristic demo policy (scripted rules, not a model); "
                "these numbers describe the pipeline, not a trained agent."]
    return [f"Policy: checkpoint {e.checkpoint}."]


# --- run ---------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)  # soft wrap: paths in messages stay on one line
    try:
        return _run(args, console)
    except EvalSetupError as e:
        console.print(f"eval: {e}", style="red", markup=False)
        return 2
    except (ValueError, FileNotFoundError) as e:  # bad data rows, bad configs: named in the message
        console.print(f"eval: {type(e).__name__}: {e}", style="red", markup=False)
        return 2


def _run(args: argparse.Namespace, console) -> int:
    from genevolve_jax.eval.aggregates import final_records, fmt
    from genevolve_jax.eval.pipeline import EvalCaseRunner
    from genevolve_jax.eval.report import RunInfo, write_report
    from genevolve_jax.eval.runner import CaseStore, run_cases

    cfg = build_config(args)
    e = cfg.eval
    out = Path(args.out or os.path.join("runs", "eval", args.benchmark))
    out.mkdir(parents=True, exist_ok=True)
    cases = load_cases(args, out)
    if int(e.runner.limit):
        cases = cases[: int(e.runner.limit)]
    store = CaseStore(out / "cases.jsonl")
    fp = fingerprint(args, cfg)
    if not args.report_only:
        check_resume(out, fp)
        source = build_program_source(cfg)
        runner = EvalCaseRunner(source, build_renderer(cfg, out), build_judge(args.benchmark, cfg, out),
                                out / "images", normalizer(args.benchmark, cfg), seed=int(e.seed))
        stats = asyncio.run(run_cases(cases, runner, store, max_concurrency=int(e.runner.max_concurrency),
                                      requests_per_minute=float(e.runner.requests_per_minute),
                                      retry_missing=bool(e.runner.retry_missing), show_progress=not args.no_progress,
                                      description=args.benchmark))
        console.print(f"eval: {stats.ran} cases run ({stats.ok} ok, {stats.missing} missing), "
                      f"{stats.skipped} already finished, {stats.bad_lines} unreadable lines skipped, "
                      f"{stats.wall_s:.1f}s")
    records = store.load()
    results = aggregate(args.benchmark, cases, records, cfg)
    results["fingerprint"] = fp
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    proxy = e.judge == "rule"
    info = RunInfo(benchmark=args.benchmark, program_source=e.program_source, renderer=cfg.render.backend,
                   judge=("rule judge (reward package)" if args.benchmark == "genevolve-bench" else "WISE rule judge")
                   if proxy else f"VLM {cfg.reward.endpoint.model}", checkpoint=e.checkpoint, data=str(args.data),
                   proxy_judge=proxy, notes=policy_notes(cfg))
    paths = write_report(results, final_records(cases, records), out, info, int(e.report.n_best),
                         int(e.report.n_worst), int(e.report.thumb_px))
    a = results["all"]
    if args.benchmark == "wise":
        console.print(f"WISE overall WiScore {fmt(results['overall'])} (missing as zero "
                      f"{fmt(results['overall_missing_as_zero'])}); {a['n_scored']}/{a['n_cases']} scored"
                      + (" [proxy judge]" if proxy else ""))
    else:
        console.print(f"GenEvolve-Bench KScore {fmt(a['headline'])} (mean per-sample {fmt(a['mean_sample'])}, "
                      f"missing as zero {fmt(a['missing_as_zero'])}); {a['n_scored']}/{a['n_cases']} scored"
                      + (" [proxy judge]" if proxy else ""))
    console.print(f"report: {paths['markdown']} {paths['html']}")
    return 0 if a["n_scored"] or not a["n_cases"] else 3
