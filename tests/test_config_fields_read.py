"""Every field of the shipped configs is read by the package: recorded, not guessed from names.

What counts as a read is recorded on the config itself (tests/fixtures/config_reads.py): a locked
ConfigDict that logs the dotted path of every leaf value the code takes from it, except the reads
of the validators (a field that is only checked is the field nobody uses), of whole-config dumps
(``to_dict()`` of the run config for W&B, printing) and of values the code overwrote first.

Where the reads are recorded (tests/fixtures/config_read_runs.py), and why these are enough:

- the README run, ``genevolve train --config tiny_cpu --sft``, through the CLI, shortened by
  values only (one SFT and one GRPO step, small batches, a checkpoint and a sample dump on that
  step): the same stages as the full run, so the same reads;
- ``genevolve plan`` of each shipped config, through the CLI. A plan for the config's GPUs or TPU
  chips compiles for minutes; its reads happen while the phases are traced (``build_plan``), never
  in the compile (which gets traced functions and compiler options), so the plan runs with a
  1-byte device (``--device-memory 1B``: every phase is traced, none compiled), on 8 CPU devices
  standing for a node's GPUs or a pod's chips (tiny_cpu: its default target), with the decoder
  and the vision tower cut to one layer (``model.num_layers`` / ``vision_depth`` are read either
  way; more layers add no reads). The target changes the reads only in ``plan.mem_fraction`` (a
  GPU target reads ``rl.engine`` and ``rl.sglang.urls``), which is called for each config's real
  target;
- what only a run on the GPU configs' hardware reaches: ``qwen3vl_8b_gpu``'s trainer built from
  the tiny run's SFT model (``--config.model.path``, as the README starts it), with a stand-in
  SGLang server (tests/fixtures/sglang_fake.py) as its policy server, its render-service and judge
  clients, its policy summariser, and its first weight push (the step itself reads nothing that
  depends on these services: the tiny run's step records its reads);
- the choices that no shipped config makes but one field selects (the diffusers and Gemini
  renderers, the local judge, Serper search, the OpenAI summariser, an HF embedder, W&B, explicit
  data shards, an explicit multi-host plan), each built by the factory the run calls, from the
  section of a loaded config; and
  two paths that depend on the run rather than the config: an outage (the policy waits for the
  services and recollects) and an image search shown to the policy as pixels.

A field none of these reads is reported by name: wire it or remove it.
"""
import json

import pytest
from safetensors import safe_open

from genevolve_jax.config_loader import load_config, shipped_configs
from tests.fixtures import config_read_runs as runs
from tests.fixtures.config_reads import ReadLog, leaf_paths, recording, validator_functions



# -- the recorder ---------------------------------------------------------------------------------
@pytest.fixture
def cfg_and_log():
    log = ReadLog()
    return recording(load_config("tiny_cpu"), log), log


def test_a_leaf_read_is_recorded_by_its_dotted_path(cfg_and_log):
    cfg, log = cfg_and_log
    assert cfg.rl.group_size == 8 and cfg["agent"]["sampling"]["top_p"] == 1.0
    assert cfg.reward.get("alpha") == load_config("tiny_cpu").reward.alpha
    assert cfg.get("no_such_field", 3) == 3
    assert log.paths == {"rl.group_size", "agent.sampling.top_p", "reward.alpha"}
    # A section consumed whole is read whole; presence and names are not reads.
    assert "tensor" in cfg.engine.mesh and sorted(cfg.engine.mesh.keys()) == ["data", "fsdp", "sequence", "tensor"]
    assert len(cfg.engine.mesh) == 4 and not any(p.startswith("engine.") for p in log.paths)
    assert dict(cfg.engine.mesh) == {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1}
    assert {f"engine.mesh.{a}" for a in ("data", "fsdp", "tensor", "sequence")} <= log.paths
    before = set(log.paths)
    assert [k for k, _ in cfg.checkpoint.items()] == sorted(cfg.checkpoint.keys())
    assert log.paths - before == {f"checkpoint.{k}" for k in cfg.checkpoint.keys()}


def test_dumps_validators_and_overwritten_values_are_not_reads(cfg_and_log):
    from genevolve_jax.agent.config import validate as validate_agent
    from genevolve_jax.train.rl.config import validate_evolve_run

    cfg, log = cfg_and_log
    assert cfg.to_dict()["rl"]["group_size"] == 8 and "group_size" in str(cfg) + repr(cfg)
    assert cfg.rl != cfg.train
    validate_agent(cfg.agent)
    validate_evolve_run(cfg, n_devices=1)     # a cross-section check reads half the config
    assert log.paths == set()
    copy = cfg.train.copy_and_resolve_references()
    copy.schedule.warmup_ratio = 0.5          # the code sets a value, then reads its own
    assert copy.schedule.warmup_ratio == 0.5 and copy.schedule.kind == "cosine"
    assert log.paths == {"train.schedule.kind"}   # a copy reads at the original's paths


def test_linked_fields_are_read_by_the_name_the_code_uses():
    log = ReadLog()
    cfg = recording(load_config("tiny_cpu", ["--config.loss.logprob.rl_temperature=0.5"]), log)
    assert cfg.agent.sampling.temperature == 0.5     # linked (configs/base.py): one value, two fields
    assert log.paths == {"agent.sampling.temperature"}
    resolved = cfg.copy_and_resolve_references()
    assert resolved.loss.logprob.rl_temperature == 0.5
    assert log.paths == {"agent.sampling.temperature", "loss.logprob.rl_temperature"}
    # Code that sets one of the two has set the other: neither is the config's value any more.
    log.paths.clear()
    cfg.agent.sampling.temperature = 1.0
    assert cfg.loss.logprob.rl_temperature == 1.0
    assert cfg.copy_and_resolve_references().loss.logprob.rl_temperature == 1.0
    assert log.paths == set()


def test_the_recording_config_stays_locked(cfg_and_log):
    cfg, _ = cfg_and_log
    with pytest.raises(AttributeError, match="group_sise"):
        assert cfg.rl.group_sise is None
    with pytest.raises(KeyError, match="cannot be added"):
        cfg.rl["group_sise"] = 4
    with pytest.raises(TypeError):
        cfg.rl.group_size = "eight"


def test_the_validators_named_exist():
    assert len(validator_functions()) >= 20
    assert ReadLog().validator_codes                  # each resolves to a function


# -- the recorded runs ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The short README run, recorded (both tests below read it: one run serves both)."""
    workdir = tmp_path_factory.mktemp("tiny")
    with pytest.MonkeyPatch.context() as monkeypatch:
        log, printed = runs.tiny_cpu_run(monkeypatch, str(workdir))
    return workdir, log, printed


@pytest.mark.slow  # ~1 min on 2 CPU cores: four traced plans, one trainer built, the other choices
def test_every_field_of_every_shipped_config_is_read(tiny_run, tmp_path, monkeypatch):
    workdir, tiny_log, _ = tiny_run
    tiny = str(workdir)
    logs = {"tiny_cpu run": tiny_log}
    for name in runs.PLAN_TARGETS:
        logs[f"plan {name}"] = runs.plan(monkeypatch, name)
    rl_data = runs.rl_prompts(tiny)
    logs["qwen3vl_8b_gpu services"] = runs.gpu_services(str(tmp_path / "gpu"), f"{tiny}/model", rl_data)
    logs.update(runs.other_choices(monkeypatch, f"{tiny}/model", rl_data, str(tmp_path)))
    read = set().union(*(log.paths for log in logs.values()))

    fields = set(leaf_paths(load_config("base")))
    assert read <= fields, sorted(read - fields)      # paths the recorder made up
    for name in shipped_configs():
        assert set(leaf_paths(load_config(name))) == fields, name
    unread = sorted(fields - read)
    assert unread == [], f"read by nothing recorded: {unread}"
    # Each recorded piece but the plans adds reads (a plan reads what the runs read, and the
    # schedule's length); none of them could be dropped without losing fields.
    for piece, log in logs.items():
        others = set().union(*(other.paths for key, other in logs.items() if key != piece))
        assert log.paths - others or (piece.startswith("plan ") and log.paths), piece


@pytest.mark.slow
def test_the_readme_run_writes_every_output(tiny_run):
    """`genevolve train --sft` on the embedded defaults: synthetic data, SFT, the agent loop through
    the JaxEngine with offline tools, tiny renderer and rule judge, checkpoints, HF export, curve.
    The trainers scan their layers (``model.scan_layers``, tpu_pod's layout): the SFT model is saved
    stacked, the engine samples with the layer list it converts to, and the export is per layer."""
    work, _, printed = tiny_run
    assert '"checkpoints"' in printed and "mean reward" in printed
    lines = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1.0, 2.0]
    for m in lines:
        assert m["samples/total"] == 2 and "time/rollout_s" in m and "time/train_step_s" in m
        assert m["samples/masked"] == sum(v for k, v in m.items() if k.startswith("masked/"))
    assert sorted(p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    assert (work / "hf_export" / "config.json").exists() and (work / "hf_export" / "model.safetensors").exists()
    assert (work / "reward_curve.png").stat().st_size > 0
    assert (work / "samples" / "step_000001" / "samples.jsonl").exists()
    # The SFT output the loop started from, saved stacked; the export holds every layer by name.
    assert json.loads((work / "model" / "model_config.json").read_text())["scan_layers"] is True
    with safe_open(str(work / "hf_export" / "model.safetensors"), "np") as f:
        names = set(f.keys())
    assert {"model.language_model.layers.0.mlp.up_proj.weight",
            "model.language_model.layers.1.mlp.up_proj.weight"} <= names
