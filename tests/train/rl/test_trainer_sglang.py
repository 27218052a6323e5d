"""`genevolve train` with rl.engine="sglang": rollouts over HTTP from a `genevolve serve` app (the same
native API as SGLang) on 127.0.0.1, weight sync by HF export + /update_weights_from_disk after every
step, π_old from the step's own forward with truncated importance sampling against the server's
log-probs (the GPU configs' route), the sampler-vs-trainer mismatch as a metric, a server that
refuses reloads, image rollouts in SGLang's prompt form, and the config checks."""
import socket

import jax
import jax.numpy as jnp

import httpx
import numpy as np
import pytest
from flax import nnx

from genevolve_jax.config_loader import load_config
from genevolve_jax.models.qwen3_vl.keymap import hf_state_dict
from genevolve_jax.rollout.config import default_engine_config
from genevolve_jax.rollout.jax_engine import JaxEngine
from genevolve_jax.rollout.sglang_engine import SGLangError
from genevolve_jax.serving.policy_server import create_app
from genevolve_jax.train.losses.step_losses import logprob_mismatch
from genevolve_jax.train.rl.config import default_rl_config, tis_cap_of, validate_rl
from tests.fixtures.servers import LoopbackServer
from tests.fixtures.toy_task import toy_model, toy_run_config, toy_trainer
from tests.fixtures.engines import two_layer_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def toy_server():
    """The toy model (vocab 64, other weights than the trainer's: seed 1) behind `genevolve serve`'s
    app, tokenizer-free (the client sends token ids); counts the generations it runs."""
    ecfg = default_engine_config()
    ecfg.max_slots, ecfg.max_seq_len, ecfg.steps_per_sync, ecfg.min_prefill_bucket = 16, 16, 4, 8
    engine = JaxEngine(toy_model(seed=1), None, ecfg)
    served = []
    submit = engine.submit
    engine.submit = lambda req: (served.append(req.request_id), submit(req))[1]
    with LoopbackServer(create_app(engine, None, model_name="toy")).running() as url:
        yield url, engine, served
    engine.close()


def sglang_config(workdir, urls, **rl):
    cfg = toy_run_config(str(workdir), steps=2, group=4, prompts_per_step=2)
    cfg.rl.engine = "sglang"
    cfg.rl.sglang.urls = list(urls)
    cfg.rl.sglang.export_dtype = "float32"   # the toy trains in float32: the servers get its exact weights
    cfg.rl.sglang.timeout_s = 60.0
    cfg.rl.sglang.retries = 1
    cfg.rl.sglang.backoff_s = 0.01
    cfg.rl.sglang.health_wait_s = 5.0
    cfg.rl.old_logprobs = "auto"             # as the GPU configs: π_old from the step's own forward,
    cfg.rl.sampler_correction = "tis"        # and the server's tokens reweighted by min(π_old / π_sampler, 2)
    for k, v in rl.items():
        cfg.rl[k] = v
    return cfg


def hf_weights(model) -> dict[str, np.ndarray]:
    return dict(hf_state_dict(model))


def server_weights(engine, like) -> dict[str, np.ndarray]:
    """The served engine's weights, as HF tensors (``like``: a model of the same shapes)."""
    nnx.update(like, engine.params)
    return hf_weights(like)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.slow  # ~40 s on 2 CPU cores: the server's and the trainer's first compiles
def test_two_steps_roll_out_over_http_and_the_server_follows_the_trainer(toy_server, tmp_path):
    url, engine, served = toy_server
    served.clear()
    cfg = sglang_config(tmp_path / "run", [url], tis_cap=1.25)
    trainer = toy_trainer(cfg)
    try:
        start = hf_weights(trainer.setup.merge(trainer.params))
        shell = toy_model(seed=2)
        before = server_weights(engine, shell)
        assert any(not np.array_equal(before[k], start[k]) for k in start)  # the push at start is needed

        m1 = trainer.train_one_step()
        trained1 = hf_weights(trainer.setup.merge(trainer.params))
        assert_same_weights(server_weights(engine, shell), trained1)
        assert any(not np.array_equal(trained1[k], start[k]) for k in start)  # the step changed the policy
        # Rolled out by the server on the pushed starting weights: its log-probs are the trainer's, so
        # every truncated importance weight is 1, and π_old cost no forward of its own.
        assert m1["rollout/logprob_mismatch"] < 1e-5 and m1["rollout/logprob_mismatch_max"] < 1e-4
        assert m1["rollout/old_logprobs_forward"] == 0.0
        assert abs(m1["tis/weight_mean"] - 1) < 1e-5 and abs(m1["tis/weight_max"] - 1) < 1e-4
        assert m1["tis/truncated_frac"] == 0.0
        assert m1["time/weight_export_s"] > 0 and m1["time/weight_reload_s"] > 0

        m2 = trainer.train_one_step()
        assert_same_weights(server_weights(engine, shell), hf_weights(trainer.setup.merge(trainer.params)))
        # Sampled after the sync of step 1: the server ran the step-1 weights.
        assert m2["rollout/logprob_mismatch"] < 1e-5
        rows = 2 * cfg.data.rl.prompts_per_step * cfg.rl.group_size
        assert trainer.engine.stats["requests"] == rows and len(served) == rows
        # One rid per attempt: the request id, then "-a<attempt>-<nonce>" (a retry never reuses a rid).
        assert sorted(r.split("-a")[0] for r in served)[:2] == ["s1-p0-k0", "s1-p0-k1"]
        assert httpx.get(url + "/get_model_info").json()["weight_version"] == "2"
        weights_dir = tmp_path / "run" / "sglang_weights"
        assert sorted(p.name for p in weights_dir.iterdir()) == ["weights_v2"]  # older versions removed
        assert (weights_dir / "weights_v2" / "config.json").exists()

        # The server moved to other weights behind the trainer's back: its tokens come from another
        # policy. The mismatch shows it, and the correction weighs them by π_old / π_sampler, truncated
        # at C where the server favoured a token more than the trainer does (measured: the largest
        # ratio 1.73, so the cap is 1.25 here for truncation to occur; the weights' mean 0.99).
        engine.update_weights(nnx.state(toy_model(seed=3), nnx.Param), 99)
        m3 = trainer.train_one_step()
        tis = {k: v for k, v in m3.items() if k.startswith("tis/")}
        assert m3["rollout/logprob_mismatch"] > 0.05
        assert m3["tis/weight_max"] > cfg.rl.tis_cap and 0 < m3["tis/truncated_frac"] < 1, tis
        assert 0 < m3["tis/weight_mean"] < cfg.rl.tis_cap and abs(m3["tis/weight_mean"] - 1) > 1e-3, tis
    finally:
        trainer.close()


def test_a_dead_url_fails_at_construction_naming_the_field(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = sglang_config(tmp_path / "run", [dead])
    cfg.rl.sglang.health_wait_s = 0.0
    with pytest.raises(SGLangError, match=r"rl\.sglang\.urls.*" + dead.replace(".", r"\.")):
        toy_trainer(cfg)


def test_one_dead_url_among_healthy_ones_is_put_on_probation(toy_server):
    from genevolve_jax.rollout.sglang_engine import SGLangEngine
    url, _, _ = toy_server
    dead = f"http://127.0.0.1:{free_port()}"
    client = SGLangEngine([dead, url], timeout_s=5)
    states = client.wait_healthy(0.0, field="rl.sglang.urls")
    assert states == {dead: False, url: True}
    from genevolve_jax.rollout.engine import GenerationRequest, SamplingParams
    results = client.generate([GenerationRequest([1, 2, 3, 4], SamplingParams(max_new_tokens=2, temperature=1.0,
                                                                              top_p=1.0, seed=i),
                                                 request_id=f"probation-{i}") for i in range(4)])
    assert all(r.finish_reason != "abort" for r in results), [r.error for r in results]
    assert client.stats["failures"] == 0       # no request went to the server on probation


# --- config -------------------------------------------------------------------------------------------
def rl(**kw):
    cfg = default_rl_config()
    cfg.engine = "sglang"
    cfg.sglang.urls = ["http://127.0.0.1:30010"]
    for key, value in kw.items():
        section, _, name = key.rpartition("__")
        (cfg.sglang if section == "sglang" else cfg)[name] = value
    return cfg


@pytest.mark.parametrize("change, field", [
    (dict(sglang__urls=[]), "rl.sglang.urls"),
    (dict(sglang__urls=["127.0.0.1:30010"]), r"rl.sglang.urls\[0\]"),
    (dict(sglang__urls=["http://127.0.0.1"]), r"rl.sglang.urls\[0\]"),
    (dict(sglang__urls=["http://127.0.0.1:30010", "ftp://h:1"]), r"rl.sglang.urls\[1\]"),
    (dict(sglang__urls=["http://127.0.0.1:30010/generate"]), r"rl.sglang.urls\[0\]"),
    (dict(sglang__urls=["http://a:1", "http://a:1/"]), "rl.sglang.urls"),
    (dict(sglang__timeout_s=0.0), "rl.sglang.timeout_s"),
    (dict(sglang__retries=-1), "rl.sglang.retries"),
    (dict(sglang__max_concurrency=0), "rl.sglang.max_concurrency"),
    (dict(sglang__health_wait_s=-1.0), "rl.sglang.health_wait_s"),
    (dict(sglang__export_dtype="float16"), "rl.sglang.export_dtype"),
    (dict(old_logprobs="trainer"), "rl.old_logprobs"),
    (dict(sampler_correction="is"), "rl.sampler_correction"),
    (dict(sampler_correction="tis", old_logprobs="sampler"), "rl.sampler_correction"),
    (dict(tis_cap=0.5), "rl.tis_cap"),
    (dict(tis_cap=float("inf")), "rl.tis_cap"),
    (dict(engine="vllm"), "rl.engine"),
])
def test_bad_sglang_settings_fail_naming_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        validate_rl(rl(**change))


def test_a_key_pasted_into_api_key_env_is_rejected_without_echoing_it():
    with pytest.raises(ValueError, match="rl.sglang.api_key_env") as err:
        validate_rl(rl(sglang__api_key_env="sk-live-123456"))
    assert "sk-live" not in str(err.value)
    validate_rl(rl(sglang__api_key_env="POLICY_API_KEY", sglang__urls=["https://h.example:443"]))


def test_other_engines_need_no_urls():
    cfg = default_rl_config()
    assert cfg.engine == "jax" and cfg.old_logprobs == "auto" and list(cfg.sglang.urls) == []
    # The paper's objective by default: no correction (the JaxEngine records the trainer's log-probs).
    assert cfg.sampler_correction == "none" and tis_cap_of(cfg) is None and cfg.tis_cap == 2.0
    validate_rl(cfg)


@pytest.mark.parametrize("name", ["qwen3vl_8b_gpu", "qwen3vl_2b_gpu"])
def test_gpu_configs_roll_out_on_sglang_on_their_own_ports(name):
    from urllib.parse import urlsplit

    from genevolve_jax.plan.phases import logprob_forwards_per_step, old_logprob_route
    cfg = load_config(name)
    assert cfg.rl.engine == "sglang" and cfg.rl.sampler_correction == "tis" and tis_cap_of(cfg.rl) == 2.0
    # π_old without a forward of its own: the plan's one reference forward a step is the KL reference's.
    assert old_logprob_route(cfg) == "on_policy" and logprob_forwards_per_step(cfg) == 1
    validate_rl(cfg.rl)
    policy = {urlsplit(u).port for u in cfg.rl.sglang.urls}
    others = {urlsplit(cfg.reward.endpoint.base_url).port} | {urlsplit(u).port for u in cfg.render.http.urls}
    assert policy and not policy & others, (cfg.rl.sglang.urls, cfg.reward.endpoint.base_url, cfg.render.http.urls)
    assert cfg.agent.sampling.temperature == cfg.loss.logprob.rl_temperature


def test_logprob_mismatch_counts_policy_tokens_of_valid_rows_only():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 7)).astype(np.float32), rng.normal(size=(3, 7)).astype(np.float32)
    mask = rng.random((3, 7)) < 0.5
    mask[0, 0] = True
    mask[1] = False                                        # row 1 does not train
    weight = mask / mask.sum()                              # 1/N on the step's trained policy tokens
    out = logprob_mismatch(jnp.asarray(a), jnp.asarray(b), jnp.asarray(weight, jnp.float32))
    diffs = [abs(float(a[r, c]) - float(b[r, c])) for r in range(3) for c in range(7) if mask[r, c]]
    assert float(out["rollout/logprob_mismatch"]) == pytest.approx(sum(diffs) / len(diffs), rel=1e-5)
    assert float(out["rollout/logprob_mismatch_max"]) == pytest.approx(max(diffs), rel=1e-6)
    none = logprob_mismatch(jnp.asarray(a), jnp.asarray(b), jnp.zeros((3, 7)))
    assert float(none["rollout/logprob_mismatch"]) == 0.0


# --- a server that refuses reloads, through the trainer ----------------------------------------------
class RefuseReloads:
    """ASGI middleware: the first ``n`` /update_weights_from_disk calls get SGLang's refusal (400,
    success false), as a server whose reload fails does; everything else passes through."""

    def __init__(self, app, n: int):
        self.app, self.left = app, n

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/update_weights_from_disk" and self.left > 0:
            self.left -= 1
            from starlette.responses import JSONResponse
            return await JSONResponse({"success": False, "message": "scripted refusal"}, status_code=400)(
                scope, receive, send)
        return await self.app(scope, receive, send)


@pytest.mark.slow
def test_a_server_that_refuses_reloads_lags_then_catches_up_while_training_goes_on(tmp_path):
    """Two policy servers; B refuses its first four reloads: the push at start and the sync after
    step 1, each tried twice (rl.sglang.retries = 1). Training goes on, B gets no rollouts while it is behind, the lag metric shows it, and
    once B accepts it serves the trainer's weights again."""
    ecfg = default_engine_config()
    ecfg.max_slots, ecfg.max_seq_len, ecfg.steps_per_sync, ecfg.min_prefill_bucket = 16, 16, 4, 8
    engines = [JaxEngine(toy_model(seed=1), None, ecfg), JaxEngine(toy_model(seed=1), None, ecfg)]
    served = [[], []]
    for i, e in enumerate(engines):
        submit = e.submit
        e.submit = lambda req, i=i, submit=submit: (served[i].append(req.request_id), submit(req))[1]
    apps = [create_app(engines[0], None, model_name="toy"), RefuseReloads(create_app(engines[1], None,
                                                                                     model_name="toy"), 4)]
    with LoopbackServer(apps[0]).running() as url_a, LoopbackServer(apps[1]).running() as url_b:
        cfg = sglang_config(tmp_path / "run", [url_a, url_b], num_steps=3)
        cfg.rl.sglang.max_weight_lag_steps = 3
        trainer = toy_trainer(cfg)
        try:
            history = []
            for _ in range(3):
                before = [len(s) for s in served]
                history.append(trainer.train_one_step())
                history[-1]["served_b"] = len(served[1]) - before[1]
        finally:
            trainer.close()
            for e in engines:
                e.close()
    # B refused the push at start (version 0) and the sync after step 1: 2 steps behind after step 1;
    # it took the step-2 export: 0 after step 2.
    assert [h["sglang/weight_version_lag"] for h in history] == [2.0, 0.0, 0.0]
    assert [h["sglang/servers_behind"] for h in history] == [1.0, 0.0, 0.0]
    assert all(np.isfinite(h["loss"]) for h in history)     # training went on meanwhile
    # Behind, B got no rollouts; once it held the trainer's weights it served again.
    assert [h["served_b"] > 0 for h in history] == [False, False, True]
    assert all(h["rollout/logprob_mismatch"] < 1e-5 for h in history)   # nobody sampled on stale weights


# --- image rollouts in SGLang's prompt form ----------------------------------------------------------
def test_image_rollouts_over_sglang_form_prompts_give_the_trainers_logprobs(tmp_path):
    """Prompts with images expanded as the trainer holds them go out in SGLang's form (one pad per
    image, images in image_data); `genevolve serve` expands them with its processor and returns the
    prompt it built; the trainer's forward over the assembled batch (per-row image blocks, MRoPE)
    gives the sampler's log-probs (the existing tolerance, 1e-4 at T = 0.7)."""
    from PIL import Image

    from genevolve_jax.models.hf_io import model_from_state_dict, random_state_dict
    from genevolve_jax.processing.image import ImageProcessorConfig
    from genevolve_jax.processing.tokenizer import default_tokenizer
    from genevolve_jax.rollout.engine import GenerationRequest, SamplingParams
    from genevolve_jax.rollout.sglang_engine import SGLangEngine
    from genevolve_jax.train.losses.config import default_loss_config
    from genevolve_jax.train.losses.step_losses import policy_logprobs
    from genevolve_jax.train.rl.batch_assembly import assemble_evolve_batch
    from genevolve_jax.train.rl.records import RolloutSample
    from genevolve_jax.train.rl.sample_images import ImageBatchSpec

    tok = default_tokenizer()
    cfg = two_layer_config(tok)
    model = model_from_state_dict(cfg, random_state_dict(cfg, seed=5))
    processor = ImageProcessorConfig(min_pixels=32 * 32, max_pixels=96 * 96)
    ecfg = default_engine_config()
    ecfg.max_slots, ecfg.max_seq_len, ecfg.steps_per_sync, ecfg.min_prefill_bucket = 4, 160, 4, 32
    engine = JaxEngine(model, tok, ecfg, image_processor=processor)
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(70, 90), (100, 45), (64, 64)]):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])

    def prompt(images):        # as the agent loop holds it: each image expanded to its token count
        text = "draw this" + "".join(f" IMG_{i:03d}: <|vision_start|><|image_pad|><|vision_end|>"
                                     for i in range(len(images)))
        ids = tok.encode(text, add_special_tokens=False)
        counts = iter(engine.num_image_tokens(p) for p in images)
        return [t for i in ids for t in ([i] * next(counts) if i == cfg.image_token_id else [i])]

    image_sets = [[paths[0]], [paths[1], paths[2]], []]
    requests = [GenerationRequest(prompt(imgs), SamplingParams(max_new_tokens=6, temperature=0.7, top_p=1.0, seed=i),
                                  images=list(imgs), request_id=f"img-{i}") for i, imgs in enumerate(image_sets)]
    try:
        with LoopbackServer(create_app(engine, tok, model_name="tiny")).running() as url:
            client = SGLangEngine([url], timeout_s=120, retries=0, model_config=cfg)
            results = client.generate(requests)
            client.close()
    finally:
        engine.close()
    assert all(r.finish_reason in ("stop", "length") for r in results), [r.error for r in results]
    samples = [RolloutSample(r.request_id, 0, list(r.prompt_ids) + list(res.token_ids),
                             [0] * len(r.prompt_ids) + [1] * len(res.token_ids),
                             [0.0] * len(r.prompt_ids) + list(res.logprobs), 0.5, prompt_length=len(r.prompt_ids),
                             images=list(r.images)) for r, res in zip(requests, results)]
    loss_cfg = default_loss_config()
    loss_cfg.logprob.rl_temperature, loss_cfg.logprob.chunk_size = 0.7, 512
    batch = assemble_evolve_batch(samples, [0.0] * 3, seq_len=256, loss_cfg=loss_cfg,
                                  image_spec=ImageBatchSpec.for_model(cfg, processor, patch_multiple=32))
    assert "row_pixel_values" in batch
    lp = np.asarray(jax.jit(lambda b: policy_logprobs(model, b, loss_cfg))({k: jnp.asarray(v) for k,
                                                                            v in batch.items()}))
    m = batch["loss_mask"] > 0
    assert m.sum() == sum(len(res.token_ids) for res in results)
    delta = np.abs(lp[m] - batch["sampler_logprobs"][m])
    assert delta.max() <= 1e-4, delta.max()
