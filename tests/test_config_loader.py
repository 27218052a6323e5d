"""The shipped configs (configs/*.py) and the loader: every config loads; linked fields stay one
value through overrides; removed fields are refused; a bad value fails naming its dotted field; the
TPU config needs no GPU service or server. (That every field is read: test_config_fields_read.py.)"""
import pathlib

import ml_collections
import numpy as np
import pytest

import genevolve_jax
from genevolve_jax.config_checks import Checker
from genevolve_jax.config_loader import ConfigOverrideError, apply_overrides, load_config, shipped_configs
from tests.fixtures.config_reads import leaf_paths

PACKAGE = pathlib.Path(genevolve_jax.__file__).parent
CONFIG_DIR = PACKAGE.parent / "configs"
SHIPPED = shipped_configs()
LINKED = [("agent.sampling.temperature", "loss.logprob.rl_temperature"),
          ("agent.program.min_references", "reward.program.min_references")]


def get(cfg, path):
    for part in path.split("."):
        cfg = cfg[part]
    return cfg


# -- loading ----------------------------------------------------------------------------------------
def test_every_shipped_config_loads_and_is_a_delta_on_base():
    assert {"base", "tiny_cpu", "qwen3vl_2b_gpu", "qwen3vl_8b_gpu", "qwen3vl_8b_lora_gpu", "tpu_pod"} <= set(SHIPPED)
    # Every shipped run config is planned by tests/test_config_fields_read.py (its reads recorded).
    from tests.fixtures.config_read_runs import PLAN_TARGETS
    assert set(SHIPPED) - {"base"} == set(PLAN_TARGETS)
    base_fields = set(leaf_paths(load_config("base")))
    for name in SHIPPED:
        cfg = load_config(name)
        assert set(leaf_paths(cfg)) == base_fields, name      # same sections and fields, other values
        source = (CONFIG_DIR / f"{name}.py").read_text()
        assert "sys.path" not in source and "importlib" not in source, name
    from configs.qwen3vl_8b_gpu import get_config    # the configs package imports the ordinary way
    assert get_config().model.preset == "qwen3vl_8b"


@pytest.mark.parametrize("removed", ["train.global_batch_size=48", "sft.global_batch_size=32",
                                     "train.logprob_chunk_size=1024", "train.max_tokens=32768",
                                     "train.param_dtype='float32'"])
def test_removed_fields_are_refused_by_name(removed):
    with pytest.raises(ConfigOverrideError, match=f"unknown config key '{removed.split('=')[0].rsplit('.', 1)[0]}"):
        load_config("tiny_cpu", [f"--config.{removed}"])


def test_simple_engine_is_gone():
    with pytest.raises(ValueError, match=r"rl.engine must be one of \('jax', 'sglang'\)"):
        load_config("tiny_cpu", ["--config.rl.engine=simple"])


# -- one definition per value -----------------------------------------------------------------------
@pytest.mark.parametrize("name", SHIPPED)
def test_linked_fields_are_one_value_through_overrides(name):
    rng = np.random.default_rng()
    for a, b in LINKED:
        cfg = load_config(name)
        assert get(cfg, a) == get(cfg, b)
        for field in (a, b):
            value = round(float(rng.uniform(0.3, 1.2)), 3) if "temperature" in field else int(rng.integers(0, 3))
            cfg = load_config(name, [f"--config.{field}={value}"])
            assert get(cfg, a) == get(cfg, b) == value, (field, value)
            apply_overrides(cfg, [f"--config.{a}={value}"])     # and on a loaded config
            assert get(cfg, b) == value


def test_the_eval_job_scores_kscore_with_the_reward_sections_weights(tmp_path):
    """`genevolve eval genevolve-bench` has no KScore weights of its own: a case's KScore is
    reward.kscore's weighted sum, text-not-applicable counted as reward.kscore.text_na_value."""
    import argparse

    from genevolve_jax.eval.config import get_config as eval_config
    from genevolve_jax.jobs import eval as eval_job

    assert "kscore" not in eval_config()
    rng = np.random.default_rng()
    eighths = 1 + np.bincount(rng.integers(0, 4, size=4), minlength=4)      # four weights >= 1/8 summing to 1
    weights = dict(zip(("faithfulness", "visual_correctness", "text_accuracy", "aesthetics"), eighths / 8))
    na_value = float(rng.choice([0.0, 0.25, 0.75, 1.0]))
    parser = argparse.ArgumentParser()
    eval_job.add_arguments(parser)
    args = parser.parse_args(["genevolve-bench", "--data", str(tmp_path),
                              *(f"--set=reward.kscore.w_{k}={w}" for k, w in weights.items()),
                              f"--set=reward.kscore.text_na_value={na_value}"])
    score = eval_job.normalizer("genevolve-bench", eval_job.build_config(args))
    for dim in weights:     # a verdict of 1 on one dimension scores that dimension's weight
        assert score({k: float(k == dim) for k in weights})["kscore"] == pytest.approx(weights[dim])
    verdict = {k: float(rng.choice([0.0, 0.5, 1.0])) for k in weights}
    assert score(verdict)["kscore"] == pytest.approx(sum(weights[k] * verdict[k] for k in weights))
    no_text = score({**{k: 0.0 for k in weights}, "text_accuracy_na": True})
    assert no_text["kscore"] == pytest.approx(weights["text_accuracy"] * na_value)


def test_a_replaced_section_that_breaks_a_link_is_caught(monkeypatch):
    from genevolve_jax.train.rl.config import validate_evolve_run
    cfg = load_config("tiny_cpu")
    cfg.agent.program = ml_collections.ConfigDict({**cfg.agent.program.to_dict(), "min_references": 1})
    with pytest.raises(ValueError, match="agent.program.min_references .* must equal reward.program.min_references"):
        validate_evolve_run(cfg, n_devices=1)


# -- the TPU config ---------------------------------------------------------------------------------
def test_tpu_pod_samples_in_process_and_reads_its_services_from_the_environment(monkeypatch):
    from genevolve_jax.train.rl.config import validate_evolve_run
    monkeypatch.delenv("GENEVOLVE_RENDER_URLS", raising=False)
    monkeypatch.delenv("GENEVOLVE_JUDGE_URL", raising=False)
    cfg = load_config("tpu_pod")
    assert cfg.rl.engine == "jax" and list(cfg.rl.sglang.urls) == []
    assert cfg.rl.old_logprobs in ("auto", "sampler")
    assert cfg.engine.mesh.to_dict() == {"data": 1, "fsdp": 1, "tensor": 4, "sequence": 1}   # one host
    services = [*cfg.render.http.urls, cfg.reward.endpoint.base_url, *cfg.rl.sglang.urls]
    assert services == [""]                        # nothing inherited from the GPU config's localhost
    with pytest.raises(ValueError, match="render.http.urls must be a non-empty list .*GENEVOLVE_RENDER_URLS"):
        validate_evolve_run(cfg, n_devices=32)
    monkeypatch.setenv("GENEVOLVE_RENDER_URLS", "http://10.1.0.5:8100, http://10.1.0.6:8100")
    cfg = load_config("tpu_pod")
    assert list(cfg.render.http.urls) == ["http://10.1.0.5:8100", "http://10.1.0.6:8100"]
    with pytest.raises(ValueError, match="reward.endpoint.base_url must be set .*GENEVOLVE_JUDGE_URL"):
        validate_evolve_run(cfg, n_devices=32)
    monkeypatch.setenv("GENEVOLVE_JUDGE_URL", "http://10.1.0.7:30000")
    cfg = load_config("tpu_pod")
    assert cfg.reward.endpoint.base_url == "http://10.1.0.7:30000"
    validate_evolve_run(cfg, n_devices=32)         # 32 prompts × 6 rollouts over 32 fsdp chips
    monkeypatch.setenv("GENEVOLVE_JUDGE_URL", "10.1.0.7:30000")       # no scheme: refused at load
    with pytest.raises(ValueError, match="reward.endpoint.base_url must be an http"):
        load_config("tpu_pod")


# -- meshes and micro-batches from the device count --------------------------------------------------
# (config, devices): the mesh, SFT and RL micro-batches, and the RL batch's rows at worst (every
# rollout in its own packed row) by hand: one packed row per batch shard (fsdp) per micro-batch.
# On 8 GPUs and on v5p-64 these are the values the configs had set by hand before.
DEVICE_COUNTS = [
    ("qwen3vl_8b_gpu", 8, {"fsdp": 8}, 4, 6, 48),
    ("qwen3vl_8b_gpu", 16, {"fsdp": 16}, 2, 3, 48),
    ("qwen3vl_8b_gpu", 32, {"fsdp": 32}, 1, 2, 64),        # 48 rollouts in 2 × 32 rows
    ("qwen3vl_2b_gpu", 8, {"fsdp": 4, "tensor": 2}, 8, 12, 48),
    ("qwen3vl_2b_gpu", 16, {"fsdp": 8, "tensor": 2}, 4, 6, 48),
    ("qwen3vl_2b_gpu", 32, {"fsdp": 16, "tensor": 2}, 2, 3, 48),
    ("tpu_pod", 32, {"fsdp": 4, "tensor": 8}, 8, 48, 192),
]


@pytest.mark.parametrize("name, devices, mesh, sft, rl, rl_rows", DEVICE_COUNTS)
def test_multi_node_configs_take_mesh_and_micro_batches_from_the_device_count(name, devices, mesh, sft, rl, rl_rows):
    from genevolve_jax.sharding.mesh import resolve_axis_sizes
    from genevolve_jax.train.rl.batch_assembly import bucket_rows
    from genevolve_jax.train.rl.config import rollouts_per_step
    from genevolve_jax.train.runtime.model_setup import check_mesh
    from genevolve_jax.train.runtime.step_config import micro_batches

    cfg = load_config(name)
    assert resolve_axis_sizes(dict(cfg.sharding.mesh), devices) == {"data": 1, "tensor": 1, "sequence": 1, **mesh}
    shards = check_mesh(cfg.sharding, n_devices=devices)
    assert micro_batches(cfg.sft.grad_accum_steps, cfg.data.sft.rows_per_batch, shards) == sft
    assert micro_batches(cfg.train.grad_accum_steps, rollouts_per_step(cfg), shards) == rl
    # The trainer's row count for a step whose rollouts each fill a row: rl micro-batches of one row a shard.
    assert bucket_rows(rollouts_per_step(cfg), rl * shards) == rl_rows == rl * shards


def test_a_device_count_the_mesh_cannot_use_fails_naming_the_field():
    from genevolve_jax.sharding.mesh import MeshError
    from genevolve_jax.train.rl.config import validate_evolve_run

    with pytest.raises(MeshError, match=r"^sharding.mesh on 7 devices: .*'fsdp'"):
        validate_evolve_run(load_config("qwen3vl_2b_gpu"), n_devices=7)       # tensor 2 leaves 3.5
    with pytest.raises(MeshError, match=r"^sharding.mesh on 16 devices: .* multiply to 8 devices"):
        validate_evolve_run(load_config("qwen3vl_8b_gpu", ["--config.sharding.mesh.fsdp=8"]), n_devices=16)
    # A count set by hand is kept, and checked: 48 rollouts in 6 micro-batches do not cover 16 devices.
    cfg = load_config("qwen3vl_8b_gpu", ["--config.train.grad_accum_steps=6"])
    with pytest.raises(MeshError, match="train.grad_accum_steps = 8 does not divide over the batch mesh axes"):
        validate_evolve_run(cfg, n_devices=16)
    assert validate_evolve_run(cfg, n_devices=8) == 8


# -- errors name the field --------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("rl.group_size=1", "rl.group_size must be >= 2"),
    ("rl.sampler_correction='is'", r"rl.sampler_correction must be one of \('none', 'tis'\)"),
    ("rl.tis_cap=0.5", "rl.tis_cap must be a finite number >= 1"),
    ("sft.grad_accum_steps=0", r"sft.grad_accum_steps must be >= 1, or -1 \(one packed row per batch shard .*, got 0"),
    ("train.optimizer.b1=1.5", r"train.optimizer.b1 must be in \[0, 1\)"),
    ("train.remat='some'", "train.remat must be one of"),
    ("engine.max_slots=0", "engine.max_slots must be a positive integer"),
    ("data.rl.prompts_per_step=0", "data.rl.prompts_per_step must be an int >= 1"),
    ("experience.memory.capacity=0", "experience.memory.capacity must be an int >= 1"),
    ("render.sampling.long_side=1000", "render.sampling.long_side must be a positive multiple"),
    ("reward.alpha=2.0", r"reward.alpha must be in \[0, 1\]"),
    ("agent.max_rounds=1", "agent.max_rounds must be >= 2"),
    ("loss.sdl.topk_frac=0.0", r"loss.sdl.topk_frac must be in \(0, 1\]"),
    ("sharding.mesh.tensor=0", "sharding.mesh.tensor must be a positive int or -1"),
    ("model.num_layers=-1", "model.num_layers must be an int >= 0"),
    ("checkpoint.keep=0", "checkpoint.keep must be >= 1"),
    ("sft_run.max_steps=-1", "sft_run.max_steps must be >= 0"),
    ("logging.sample_every=-1", "logging.sample_every must be >= 0"),
])
def test_a_bad_value_fails_naming_its_dotted_field(override, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        load_config("tiny_cpu", [f"--config.{override}"])


def test_checker_names_fields_and_never_echoes_secrets():
    check = Checker("rl.sglang")
    with pytest.raises(ValueError, match=r"^rl.sglang.retries must be an int >= 0, got -1$"):
        check.integer(-1, "retries", 0)
    with pytest.raises(ValueError, match=r"^rl.sglang.timeout_s must be > 0, got 0$"):
        check.number(0, "timeout_s", low=0, low_open=True)
    with pytest.raises(ValueError, match="must be a finite number"):
        check.number(float("nan"), "x")
    with pytest.raises(ValueError, match="a bool"):
        check.boolean(1, "sync_at_start")
    with pytest.raises(ValueError) as err:
        check.secret(False, "api_key_env", "the name of an environment variable")
    assert "rl.sglang.api_key_env" in str(err.value) and "got" in str(err.value)
    check.integer(True is False or 3, "n", 1)       # ints pass; bools never count as ints:
    with pytest.raises(ValueError):
        check.integer(True, "n")


# -- the override parser ----------------------------------------------------------------------------
def test_overrides_keep_each_fields_type():
    cfg = load_config("tiny_cpu", ["--config.render.http.urls=http://h:1", "--config.data.sft.pack=false",
                                   "--config.rl.num_steps=7", "--config.reward.alpha=1",
                                   "--config.workdir=runs/x y", "--config.synthetic.plans=['a', 'b']"])
    assert list(cfg.render.http.urls) == ["http://h:1"] and cfg.data.sft.pack is False
    assert cfg.rl.num_steps == 7 and cfg.reward.alpha == 1.0 and isinstance(cfg.reward.alpha, float)
    assert cfg.workdir == "runs/x y" and list(cfg.synthetic.plans) == ["a", "b"]
    # A text field keeps the text, though it reads as None, a bool or a number.
    cfg = load_config("tiny_cpu", ["--config.sharding.distributed.mode=none", "--config.train.remat=none",
                                   "--config.workdir=8", "--config.model.tokenizer=true"])
    assert (cfg.sharding.distributed.mode, cfg.train.remat, cfg.workdir, cfg.model.tokenizer) == ("none", "none", "8", "true")
    with pytest.raises(ConfigOverrideError, match="'workdir': cannot set"):
        load_config("tiny_cpu", ["--config.workdir=['a']"])
    with pytest.raises(ConfigOverrideError, match="unknown config key 'rl.group_sise'"):
        load_config("tiny_cpu", ["--config.rl.group_sise=4"])
    with pytest.raises(ConfigOverrideError, match="'rl.num_steps': cannot set"):
        load_config("tiny_cpu", ["--config.rl.num_steps=many"])
    with pytest.raises(ConfigOverrideError, match="not of the form"):
        load_config("tiny_cpu", ["--rl.num_steps=3"])


def test_the_train_sections_remat_reaches_the_model(tmp_path):
    """``sft.remat`` / ``train.remat`` is the activation-checkpoint policy of the model a driver
    builds: random init and restored checkpoint alike (model_source(remat=...))."""
    from genevolve_jax.models.loading import save_model
    from genevolve_jax.train.runtime.model_setup import build_tokenizer, model_source

    cfg = load_config("tiny_cpu", ["--config.model.hidden_size=64"])
    tokenizer = build_tokenizer(cfg.model)
    model = model_source(cfg.model, tokenizer, remat="full")()
    assert model.config.remat == "full"
    save_model(tmp_path / "m", model)
    cfg.model.path = str(tmp_path / "m")
    assert model_source(cfg.model, tokenizer, remat="save_dots").config.remat == "save_dots"
    assert model_source(cfg.model, tokenizer).config.remat == "none"
