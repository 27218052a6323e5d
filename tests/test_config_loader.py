"""The shipped configs (configs/*.py) and the loader: every config loads; every field in them is read
by the package; linked fields stay one value through overrides; removed fields are refused; a bad
value fails naming its dotted field; the TPU config needs no GPU service or server."""
import ast
import pathlib

import ml_collections
import numpy as np
import pytest

import genevolve_jax
from genevolve_jax.config_checks import Checker
from genevolve_jax.config_loader import ConfigOverrideError, apply_overrides, load_config, shipped_configs

PACKAGE = pathlib.Path(genevolve_jax.__file__).parent
CONFIG_DIR = PACKAGE.parent / "configs"
SHIPPED = shipped_configs()
LINKED = [("agent.sampling.temperature", "loss.logprob.rl_temperature"),
          ("agent.program.min_references", "reward.program.min_references")]
# Functions that define or validate config sections: a field named there is not thereby "read".
DEFINING = ("get_config", "default_", "validate", "require_service")


def leaf_paths(cfg: ml_collections.ConfigDict, prefix: str = ""):
    for key, value in cfg.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from leaf_paths(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def get(cfg, path):
    for part in path.split("."):
        cfg = cfg[part]
    return cfg


def names_read_by_package() -> set[str]:
    """Every name the package reads as a config key, outside the functions that define and validate
    sections: ``x.name`` (load), ``x["name"]``, ``x.get("name")`` / ``x.get_ref("name")``, and string
    items of tuples/lists (keys read in a loop, e.g. the mesh axes of sharding/logical.py).

    This checks key *names*, not which section a read belongs to: a field whose name some other
    section also uses passes it. It catches a field nothing reads under any name."""
    names: set[str] = set()

    class Reads(ast.NodeVisitor):
        def visit_FunctionDef(self, node):
            if not node.name.startswith(DEFINING):
                self.generic_visit(node)

        visit_AsyncFunctionDef = visit_FunctionDef

        def visit_Attribute(self, node):
            if isinstance(node.ctx, ast.Load):
                names.add(node.attr)
            self.generic_visit(node)

        def visit_Subscript(self, node):
            if isinstance(node.ctx, ast.Load) and isinstance(node.slice, ast.Constant):
                names.add(str(node.slice.value))
            self.generic_visit(node)

        def visit_Call(self, node):
            if isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "get_ref") and node.args \
                    and isinstance(node.args[0], ast.Constant):
                names.add(str(node.args[0].value))
            self.generic_visit(node)

        def visit_Tuple(self, node):
            names.update(e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str))
            self.generic_visit(node)

        visit_List = visit_Tuple

    for path in PACKAGE.rglob("*.py"):
        if path.name in ("config_checks.py", "config_loader.py"):
            continue
        Reads().visit(ast.parse(path.read_text(), filename=str(path)))
    return names


def unread_fields(cfg, read: set[str]) -> list[str]:
    return [p for p in leaf_paths(cfg) if p.rsplit(".", 1)[-1] not in read]


# -- loading ----------------------------------------------------------------------------------------
def test_every_shipped_config_loads_and_is_a_delta_on_base():
    assert {"base", "tiny_cpu", "qwen3vl_2b_gpu", "qwen3vl_8b_gpu", "tpu_pod"} <= set(SHIPPED)
    base_fields = set(leaf_paths(load_config("base")))
    for name in SHIPPED:
        cfg = load_config(name)
        assert set(leaf_paths(cfg)) == base_fields, name      # same sections and fields, other values
        source = (CONFIG_DIR / f"{name}.py").read_text()
        assert "sys.path" not in source and "importlib" not in source, name
    from configs.qwen3vl_8b_gpu import get_config    # the configs package imports the ordinary way
    assert get_config().model.preset == "qwen3vl_8b"


def test_every_field_is_read_by_the_package():
    read = names_read_by_package()
    for name in SHIPPED:
        assert unread_fields(load_config(name), read) == [], name
    # The check can fail: a field nothing reads is reported.
    cfg = load_config("tiny_cpu")
    cfg.train.global_batch_size = 48
    assert unread_fields(cfg, read) == ["train.global_batch_size"]


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


def test_kscore_weights_are_the_rewards_in_eval():
    from genevolve_jax.eval.config import get_config as eval_config
    assert "kscore" not in eval_config()
    source = (PACKAGE / "jobs" / "eval.py").read_text()
    assert "cfg.eval.kscore" not in source and "cfg.reward.kscore" in source


def test_a_replaced_section_that_breaks_a_link_is_caught(monkeypatch):
    from genevolve_jax.train.run_config import validate_evolve_run
    cfg = load_config("tiny_cpu")
    cfg.agent.program = ml_collections.ConfigDict({**cfg.agent.program.to_dict(), "min_references": 1})
    with pytest.raises(ValueError, match="agent.program.min_references .* must equal reward.program.min_references"):
        validate_evolve_run(cfg, n_devices=1)


# -- the TPU config ---------------------------------------------------------------------------------
def test_tpu_pod_samples_in_process_and_reads_its_services_from_the_environment(monkeypatch):
    from genevolve_jax.train.run_config import validate_evolve_run
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


# -- errors name the field --------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("rl.group_size=1", "rl.group_size must be >= 2"),
    ("sft.grad_accum_steps=0", "sft.grad_accum_steps must be >= 1, got 0"),
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
    from genevolve_jax.train.run_setup import build_tokenizer, model_source

    cfg = load_config("tiny_cpu", ["--config.model.hidden_size=64"])
    tokenizer = build_tokenizer(cfg.model)
    model = model_source(cfg.model, tokenizer, remat="full")()
    assert model.config.remat == "full"
    save_model(tmp_path / "m", model)
    cfg.model.path = str(tmp_path / "m")
    assert model_source(cfg.model, tokenizer, remat="save_dots").config.remat == "save_dots"
    assert model_source(cfg.model, tokenizer).config.remat == "none"
