"""The ``rl`` section (GRPO + experience distillation runs, with its ``rl.sglang`` servers) and the
cross-section checks a `genevolve train` config must pass before anything compiles.

Defaults are the paper's (METHOD.md §6–7): 8 prompts × 6 rollouts, about 200 GRPO steps. Values the
paper does not give are marked (ours).

Rollouts per optimiser step: ``data.rl.prompts_per_step × rl.group_size`` (8 × 6 = 48 in the
paper), split into ``train.grad_accum_steps`` micro-batches (-1: one packed row per batch shard each,
derived from the mesh). There is no separate batch-size field to keep equal to that product; the
product is checked against the mesh in validate_evolve_run.

Old log-probs (``rl.old_logprobs``). The GRPO ratio and the SDL weight need π_old at the training
temperature (``loss.logprob.rl_temperature``) over the whole vocabulary, which is what the trainer's
fused op computes. "sampler" takes the log-probs the rollout engine recorded; "recompute" replaces
them by a jitted forward of the pre-update params over the assembled batch (one extra forward per
step). The trainer logs ``rollout/logprob_mismatch`` (mean |sampler − recomputed| over policy
tokens) in both modes: it is the health check of a sampler and of its weight sync.

- JaxEngine records log_softmax(logits / T) over the whole vocabulary in float32
  (rollout/sampling.py), the trainer's quantity, from its weights in the trainer's compute dtype
  and logits accumulated in float32 as the fused op forms them. In fp32 "sampler" is the trainer's
  to 1e-5. In bf16 the model's roundings are the same in both programs (ops/precision.py), and what
  differs is a float32 value computed by another kernel tipping a bf16 rounding now and then: mean
  |Δ| 8.3e-4 (p99 2.3e-2) on a random tiny model with LM-like logits on the CPU, where either side's
  error against f32 is 1.5e-2 (tests/rollout/test_engine_bf16_logprobs.py). On GPU and TPU the
  trainer's packed rows attend through cuDNN or splash and the engine through XLA: not measured.
  Not exact: "sampler" is then an off-policy estimate of that size.
- SGLang (read in sgl-project/sglang, python/sglang/srt/layers/sampler.py and
  layers/logits_processor.py): logits are the lm_head matmul in the model dtype (bf16) cast to
  float32 (``_get_logits``). When a batch samples, the returned ``output_token_logprobs`` are
  log(softmax(logits / T)) in float32, clamped at the float32 minimum: temperature-scaled. But
  (a) a batch in which every request is greedy returns log_softmax(logits), T = 1; (b) with the
  environment variable SGLANG_RETURN_ORIGINAL_LOGPROB=1 they are log_softmax(logits), T = 1,
  always; (c) with ``--rl-on-policy-target`` they are log_softmax of bf16(logits / T); (d) mid-2025
  releases (e.g. commit 584f55d) returned the log of the top-p *renormalised* probabilities when
  top_p < 1 (``top_p_normalize_probs_torch``), i.e. not the full-vocabulary distribution our ratio
  uses. The meaning thus depends on the release, a server flag and the batch, and the server runs
  bf16 kernels other than ours: π_old never comes from SGLang ("auto" or "recompute"), and the
  mismatch metric shows what the servers return.

Sampler correction (``rl.sampler_correction``). π_old is the trainer's, but the tokens were drawn by
the engine: where its kernels differ from the trainer's (SGLang in bf16, any engine after an
in-flight weight update), its distribution π_sampler is not π_old. "tis" weights each token's
policy-gradient term by min(π_old / π_sampler, ``rl.tis_cap``) (truncated importance sampling as
verl ships it, train/losses/grpo.py) and logs ``tis/weight_mean``, ``tis/weight_max`` and
``tis/truncated_frac``. With "auto" π_old and one update per batch, π_old is the stop-gradient of
the step's own forward: the pre-update policy, the very log-probs a recompute forward gives (at
1e-6, tests/train/rl/test_pipeline.py), so the correction costs no forward. It needs π_old from the
trainer: with ``rl.old_logprobs = "sampler"`` the weight would be 1 on every token, and that
combination is refused. The correction trusts π_sampler to be the engine's log-prob of the token at
the training temperature over the whole vocabulary: an SGLang release or flag that returns T = 1 or
top-p-renormalised log-probs (above) shows as a large ``rollout/logprob_mismatch`` and
``tis/truncated_frac``. Default "none" (the paper's objective, METHOD.md §6: r = π/π_old alone; the
default JaxEngine records the trainer's own quantity); the SGLang configs set "tis".
"""
from __future__ import annotations

import ml_collections

from genevolve_jax.config_checks import Checker, is_env_name, is_int, is_number, is_url
from genevolve_jax.train.rl.outage import default_outage_config, validate_outage
from genevolve_jax.train.runtime.checkpoint import EXPORT_DTYPES
from genevolve_jax.train.runtime.step_config import PER_SHARD

ENGINES = ("jax", "sglang")
OLD_LOGPROBS = ("auto", "sampler", "recompute")
SAMPLER_CORRECTIONS = ("none", "tis")

# Fields are named in full ("rl.group_size"): these sections are checked from several places.
_require = Checker()


def default_sglang_config() -> ml_collections.ConfigDict:
    """``rl.sglang``: the SGLang policy servers of ``rl.engine = "sglang"`` (all ours)."""
    return ml_collections.ConfigDict({
        "urls": [],                 # policy servers, http(s)://host:port; load-balanced
        "timeout_s": 600.0,         # per /generate or reload call
        "retries": 3,               # per request, on another server when there is one
        "backoff_s": 1.0,           # base of the exponential backoff between retries
        "max_concurrency": 256,     # requests in flight from the trainer
        "api_key_env": "",          # NAME of an env var holding a bearer key (never the key)
        "weights_dir": "",          # a directory every server can read; empty = <workdir>/sglang_weights
        "export_dtype": "bfloat16",  # of the HF export the servers reload
        "sync_at_start": True,      # push the trainer's starting weights before the first rollout
        "health_wait_s": 60.0,      # at start, wait this long for at least one server's /health
        "max_weight_lag_steps": 3,  # a server whose reloads keep failing gets no rollouts; the run
                                    # stops once it is more than this many steps behind
    })


def default_rl_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "group_size": 6,            # K rollouts per prompt (paper)
        "num_steps": 200,           # GRPO steps (paper: about 200)
        "engine": "jax",            # jax: rollout.jax_engine.JaxEngine in this process (the engine section);
                                    # sglang: rollout.sglang_engine.SGLangEngine on rl.sglang.urls
        "old_logprobs": "auto",     # auto | sampler | recompute: where π_old comes from (train/rl/logprob_forward.py)
        "updates_per_batch": 1,     # optimiser steps per rollout batch; > 1 makes the clip bite (π_old recomputed)
        "sampler_correction": "none",  # none | tis: weight each token's policy-gradient term by
                                    # min(π_old / π_sampler, tis_cap) (module docstring; none: the paper's)
        "tis_cap": 2.0,             # C of "tis" (verl's default rollout_is_threshold)
        "sglang": default_sglang_config(),
        "outage": default_outage_config(),  # services down past their retries (train/rl/outage.py)
        "max_tokens_per_row": 32768,  # (ours) rollouts are packed into rows of this many tokens; a longer
                                    # one is masked ("too_long_for_batch"). Memory per device is bounded
                                    # by it × the rows of a micro-batch (train/rl/batch_assembly.py)
        "row_length_buckets": 1,    # (ours) n > 1: a step's rows are k/n of max_tokens_per_row long, the
                                    # least k that holds its longest rollout (one compile per length met;
                                    # 1: always the maximum)
        "patch_multiple": 1024,     # (ours) per-row image patch budget rounded up to this (image batches)
        "render_seed": 0,
        "max_staleness": 0,         # 0: the paper's synchronous step. N >= 1: the rollouts of the next N steps
                                    # are generated while this one trains, with a policy at most N steps
                                    # behind (train/rl/async_rollouts.py; README "Asynchronous steps")
        "stream_rewards": True,     # (ours) each rollout is rendered and judged as soon as it has its program,
                                    # every group at once (bounded by render.throughput and the judge's
                                    # limits); False: today's barrier (all rollouts, then group by group).
                                    # The same samples and rewards either way (train/rl/rollout_phase.py)
        "export_hf": True,          # HF export of the final policy
        "export_dtype": "bfloat16",
        "sync_bucket_bytes": 1 << 30,  # (ours) weights leave the trainer's layout this many bytes at a time
                                    # (in the dtype they travel in): a weight sync, an HF export or the
                                    # engine's construction holds the resident state plus one such bucket
                                    # (sharding/weight_stream.py); also the SFT run's export
    })


def validate_rl(cfg) -> ml_collections.ConfigDict:
    _require(is_int(cfg.group_size) and cfg.group_size >= 2, "rl.group_size",
             ">= 2 (GRPO compares rollouts within a group)", cfg.group_size)
    _require(is_int(cfg.num_steps) and cfg.num_steps >= 1, "rl.num_steps", ">= 1", cfg.num_steps)
    _require(cfg.engine in ENGINES, "rl.engine", f"one of {ENGINES}", cfg.engine)
    _require(is_int(cfg.max_tokens_per_row) and cfg.max_tokens_per_row >= 16, "rl.max_tokens_per_row", "an int >= 16",
             cfg.max_tokens_per_row)
    _require(is_int(cfg.row_length_buckets) and 1 <= cfg.row_length_buckets <= cfg.max_tokens_per_row // 16,
             "rl.row_length_buckets", "an int in [1, rl.max_tokens_per_row // 16]", cfg.row_length_buckets)
    _require(is_int(cfg.patch_multiple) and cfg.patch_multiple >= 1, "rl.patch_multiple", "an int >= 1",
             cfg.patch_multiple)
    _require(cfg.export_dtype in EXPORT_DTYPES, "rl.export_dtype", "float32 or bfloat16", cfg.export_dtype)
    _require(isinstance(cfg.stream_rewards, bool), "rl.stream_rewards", "a bool", cfg.stream_rewards)
    _require(is_int(cfg.max_staleness) and cfg.max_staleness >= 0, "rl.max_staleness",
             "an int >= 0 (0: synchronous steps)", cfg.max_staleness)
    _require(cfg.max_staleness == 0 or cfg.old_logprobs != "recompute" or cfg.sampler_correction == "tis",
             "rl.old_logprobs", "'auto' or 'sampler' when rl.max_staleness >= 1 without rl.sampler_correction "
             "'tis' (π_old of a stale rollout must be the policy that sampled it)", cfg.old_logprobs)
    _require(is_int(cfg.sync_bucket_bytes) and cfg.sync_bucket_bytes >= 1, "rl.sync_bucket_bytes",
             "a positive byte count", cfg.sync_bucket_bytes)
    _require(cfg.old_logprobs in OLD_LOGPROBS, "rl.old_logprobs", f"one of {OLD_LOGPROBS}", cfg.old_logprobs)
    _require(is_int(cfg.updates_per_batch) and cfg.updates_per_batch >= 1, "rl.updates_per_batch", ">= 1",
             cfg.updates_per_batch)
    _require(cfg.sampler_correction in SAMPLER_CORRECTIONS, "rl.sampler_correction",
             f"one of {SAMPLER_CORRECTIONS}", cfg.sampler_correction)
    _require(is_number(cfg.tis_cap) and cfg.tis_cap >= 1, "rl.tis_cap",
             "a finite number >= 1 (the largest weight π_old / π_sampler a token gets)", cfg.tis_cap)
    _require(not (cfg.sampler_correction == "tis" and cfg.old_logprobs == "sampler"), "rl.sampler_correction",
             "'none' when rl.old_logprobs is 'sampler' (π_old would be π_sampler: every weight 1; use 'auto' or "
             "'recompute')", cfg.sampler_correction)
    if cfg.engine == "sglang":
        validate_sglang(cfg.sglang)
    validate_outage(cfg.outage)
    return cfg


def tis_cap_of(cfg) -> float | None:
    """The cap C that the evolve loss weights tokens with (``EvolveLoss(tis_cap=...)``), None when
    ``rl.sampler_correction`` is "none". ``cfg`` is the ``rl`` section; the trainer and the plan
    both build their loss from this."""
    correction, cap = cfg.sampler_correction, float(cfg.tis_cap)
    return cap if correction == "tis" else None


def validate_sglang(cfg, prefix: str = "rl.sglang") -> ml_collections.ConfigDict:
    urls = cfg.urls
    _require(isinstance(urls, (list, tuple)) and len(urls) >= 1, f"{prefix}.urls",
             "a non-empty list of server URLs when rl.engine is 'sglang'", urls)
    for i, url in enumerate(urls):
        _require(is_url(url, needs_port=True), f"{prefix}.urls[{i}]", "http(s)://host:port", url)
    _require(len(set(u.rstrip("/") for u in urls)) == len(urls), f"{prefix}.urls", "free of duplicates", urls)
    _require(is_number(cfg.timeout_s) and cfg.timeout_s > 0, f"{prefix}.timeout_s", "> 0", cfg.timeout_s)
    _require(is_number(cfg.health_wait_s) and cfg.health_wait_s >= 0, f"{prefix}.health_wait_s", ">= 0",
             cfg.health_wait_s)
    _require(is_int(cfg.retries) and cfg.retries >= 0, f"{prefix}.retries", ">= 0", cfg.retries)
    _require(is_number(cfg.backoff_s) and cfg.backoff_s >= 0, f"{prefix}.backoff_s", ">= 0", cfg.backoff_s)
    _require(is_int(cfg.max_concurrency) and cfg.max_concurrency >= 1, f"{prefix}.max_concurrency", ">= 1",
             cfg.max_concurrency)
    # Never echo the value: it may be the key itself, pasted by mistake.
    _require.secret(is_env_name(cfg.api_key_env), f"{prefix}.api_key_env",
                    "the name of an environment variable holding the key (letters, digits, _), or empty")
    _require(isinstance(cfg.weights_dir, str), f"{prefix}.weights_dir", "a path (empty = <workdir>/sglang_weights)",
             cfg.weights_dir)
    _require(cfg.export_dtype in EXPORT_DTYPES, f"{prefix}.export_dtype", "float32 or bfloat16", cfg.export_dtype)
    _require(isinstance(cfg.sync_at_start, bool), f"{prefix}.sync_at_start", "a bool", cfg.sync_at_start)
    _require(is_int(cfg.max_weight_lag_steps) and cfg.max_weight_lag_steps >= 0, f"{prefix}.max_weight_lag_steps",
             "an int >= 0 (0: stop at the first step a server fails to reload)", cfg.max_weight_lag_steps)
    return cfg


def validate_evolve_run(cfg, n_devices: int | None = None) -> int:
    """Cross-section checks of a `genevolve train` config (each section validates itself in
    config_loader; these need two sections at once). Runs before any model is built. Returns the
    batch shards of the mesh on ``n_devices`` (default: every device), which derive
    ``train.grad_accum_steps = -1`` (train/runtime/step_config.micro_batches)."""
    from genevolve_jax.train.runtime.model_setup import check_mesh

    from genevolve_jax.render.config import require_service as require_render
    from genevolve_jax.reward.config import require_service as require_judge

    validate_rl(cfg.rl)
    require_render(cfg.render)
    require_judge(cfg.reward)
    # configs/base.py links these pairs (one FieldReference each), so setting either field sets
    # both; a config that replaces a whole section breaks the link, and these checks catch it.
    sampler_t = float(cfg.agent.sampling.temperature)
    train_t = float(cfg.loss.logprob.rl_temperature)
    if abs(sampler_t - train_t) > 1e-9:
        raise ValueError(f"loss.logprob.rl_temperature ({train_t}) must equal agent.sampling.temperature "
                         f"({sampler_t}): the importance ratio compares the sampler's log-probs with the "
                         f"trainer's at the same temperature")
    agent_min, reward_min = int(cfg.agent.program.min_references), int(cfg.reward.program.min_references)
    if agent_min != reward_min:
        raise ValueError(f"agent.program.min_references ({agent_min}) must equal reward.program.min_references "
                         f"({reward_min}): the policy is told the reference range that the reward enforces")
    rows = rollouts_per_step(cfg)
    accum = int(cfg.train.grad_accum_steps)
    if accum == PER_SHARD:      # ceil(rows / shards) micro-batches of one row per shard: any mesh
        return check_mesh(cfg.sharding, None, n_devices=n_devices)
    if rows % accum:
        raise ValueError(f"data.rl.prompts_per_step × rl.group_size = {rows} rows must be divisible by "
                         f"train.grad_accum_steps {accum}")
    return check_mesh(cfg.sharding, rows // accum,
                      "data.rl.prompts_per_step × rl.group_size / train.grad_accum_steps", n_devices)


def rollouts_per_step(cfg) -> int:
    """Rollouts per optimiser step (the RL batch's rows at worst: one packed row each)."""
    return int(cfg.data.rl.prompts_per_step) * int(cfg.rl.group_size)
