"""Our PEFT adapter folder read by the released sglang 0.5.23's own LoRA code, on CPU: its LoRAConfig
reads adapter_config.json, its target-name normalisation maps our separate projections onto the
fused modules its Qwen3-VL applies LoRA to (qkv_proj, gate_up_proj, o_proj, down_proj: the
model's ``_lora_pattern``, read from the wheel's source), and its LoRAAdapter stacks our q/k/v and
gate/up tensors so that every fused slice gives our W + s·A·B delta of that projection; the head's
adapter (``lm_head``), at a rank of its own, lands where its LoRA manager reads the head's: the
folder a sync writes has one rank, the head's, the decoder's adapters zero-padded to it."""
import dataclasses
import importlib.util
import os
import re
import types

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from genevolve_jax.models import hf_io, peft_io
from genevolve_jax.models.layers import LoRAParam
from genevolve_jax.models.lora import kernel_delta
from genevolve_jax.models.qwen3_vl.config import HEAD_LORA_TARGET, TEXT_LORA_TARGETS, LoRAConfig, tiny
from tests.fixtures.sglang_cpu import load_lora

torch = pytest.importorskip("torch")
RANK, ALPHA, HEAD_RANK = 4, 8.0, 8


def sglang_lora_pattern() -> re.Pattern:
    """The module-name pattern sglang's Qwen3-VL applies LoRA to, as its source defines it."""
    spec = importlib.util.find_spec("sglang")
    source = open(os.path.join(os.path.dirname(spec.origin), "srt", "models", "qwen3_vl.py")).read()
    return re.compile(re.search(r'_lora_pattern = re\.compile\(\s*r"([^"]+)"', source).group(1))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    cfg = tiny()
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=2),
                      vision=dataclasses.replace(cfg.vision, depth=1, deepstack_visual_indexes=(0,)),
                      lora=LoRAConfig(RANK, ALPHA, TEXT_LORA_TARGETS + (HEAD_LORA_TARGET,), head_rank=HEAD_RANK))
    model = hf_io.model_from_state_dict(cfg, hf_io.random_state_dict(cfg.replace(lora=None), seed=4))
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    rng = np.random.default_rng(6)
    for key, var in flat.items():
        if isinstance(var, LoRAParam) and key[-1] == "lora_b":
            flat[key] = var.replace(rng.normal(0, 0.05, var.get_value().shape).astype(np.float32))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    path = tmp_path_factory.mktemp("sglang_lora") / "v1"
    peft_io.save_adapter(model, path, one_rank=True)     # as Trainer.sync_adapters writes it
    return model, path


def test_sglang_reads_our_adapter_and_fuses_it_as_its_qwen3_vl_expects(adapter):
    model, path = adapter
    sgl = load_lora()
    config = sgl.lora_config.LoRAConfig(str(path))
    assert (config.r, config.lora_alpha) == (HEAD_RANK, ALPHA / RANK * HEAD_RANK)   # one rank, one scale
    fused = sgl.utils.get_normalized_target_modules(config.target_modules)
    assert fused == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"}
    pattern = sglang_lora_pattern()
    assert all(pattern.match(f"model.layers.0.{'self_attn' if m in ('qkv_proj', 'o_proj') else 'mlp'}.{m}")
               for m in fused - {"lm_head"})
    t = model.config.text
    loaded = sgl.lora.LoRAAdapter("v1", config, types.SimpleNamespace(num_hidden_layers=t.num_hidden_layers),
                                  None, None)
    loaded.initialize_weights_from_tensors({k: torch.from_numpy(v) for k, v in
                                            load_file(path / peft_io.ADAPTER_WEIGHTS).items()})
    assert loaded.scaling == ALPHA / RANK
    assert model.lm_head.lora_a.get_value().shape[-1] == HEAD_RANK
    assert model.language_model.layers[0].self_attn.q_proj.lora_a.get_value().shape[-1] == RANK
    # The head's adapter: outside the layers, in the embedding-layer tensors its LoRA manager gives
    # the lm_head module (wrapped before the model's should_apply_lora gate).
    head = {k: v.numpy() for k, v in loaded.embedding_layers.items()}
    assert set(head) == {f"{peft_io.PEFT_PREFIX}lm_head.lora_{ab}.weight" for ab in "AB"}
    want = np.asarray(kernel_delta(model.lm_head.lora_a.get_value(), model.lm_head.lora_b.get_value(), 2,
                                   model.lm_head.lora.scale)).T                                   # HF (vocab, hidden)
    got = loaded.scaling * head[f"{peft_io.PEFT_PREFIX}lm_head.lora_B.weight"] @ head[
        f"{peft_io.PEFT_PREFIX}lm_head.lora_A.weight"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.abs(want).max() > 1e-3
    slices = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp.gate_up_proj": ("gate_proj", "up_proj"),
              "self_attn.o_proj": ("o_proj",), "mlp.down_proj": ("down_proj",)}
    for i, layer in enumerate(loaded.layers):
        weights = {k: v.numpy() for k, v in layer.weights.items()}
        prefix = f"{peft_io.PEFT_PREFIX}model.language_model.layers.{i}."
        assert set(weights) == {f"{prefix}{m}.lora_{ab}.weight" for m in slices for ab in "AB"}
        ours = model.language_model.layers[i]
        for module, parts in slices.items():
            a = weights[f"{prefix}{module}.lora_A.weight"]     # [n·r, in]: one A per slice, stacked
            b = weights[f"{prefix}{module}.lora_B.weight"]     # [Σ out, r]
            assert get_module_name_ok(sgl, module)
            row = 0
            for j, name in enumerate(parts):
                dense = getattr(ours.self_attn if module.startswith("self_attn") else ours.mlp, name)
                out = int(np.prod(dense.out_shape))
                a_j = a[j * HEAD_RANK:(j + 1) * HEAD_RANK] if a.shape[0] == len(parts) * HEAD_RANK else a
                delta = loaded.scaling * b[row:row + out] @ a_j                     # HF (out, in)
                want = np.asarray(kernel_delta(dense.lora_a.get_value(), dense.lora_b.get_value(),
                                               dense.kernel.get_value().ndim, dense.lora.scale))
                want = want.reshape(int(np.prod(dense.in_shape)), out).T
                np.testing.assert_allclose(delta, want, rtol=0, atol=1e-6, err_msg=f"layer {i} {name}")
                assert np.abs(want).max() > 1e-3
                row += out
            assert row == b.shape[0]


def test_the_launch_scripts_lora_targets_are_sglangs_and_ours():
    """launch/sglang_server.sh's --lora-target-modules: names the wheel's server accepts, and our
    default adapters' targets (what an export names in adapter_config.json)."""
    script = open(os.path.join(os.path.dirname(__file__), "..", "..", "launch", "sglang_server.sh")).read()
    targets = re.search(r"LORA_TARGETS=\(([^)]*)\)", script).group(1).split()
    head = re.search(r"LORA_TARGETS\+=\(([^)]*)\)", script).group(1).split()     # LORA_HEAD=1
    assert set(targets + head) <= set(load_lora().common.SUPPORTED_LORA_TARGET_MODULES)
    assert targets == peft_io.adapter_config(LoRAConfig(RANK, ALPHA))["target_modules"]
    assert targets + head == peft_io.adapter_config(
        LoRAConfig(RANK, ALPHA, TEXT_LORA_TARGETS + (HEAD_LORA_TARGET,)))["target_modules"]


def test_adapter_sync_bodies_are_sglangs(tmp_path):
    """What SGLangEngine.load_adapter sends (recorded by the stand-in server) builds the wheel's
    Load/UnloadLoRAAdapterReqInput, and a /generate body naming the adapter passes its schema gate."""
    from genevolve_jax.rollout.engine import GenerationRequest, SamplingParams
    from genevolve_jax.rollout.sglang_engine import SGLangEngine
    from tests.fixtures.sglang_cpu import load
    from tests.fixtures.sglang_fake import running_fake_sglang
    sgl = load()
    with running_fake_sglang() as (url, log):
        engine = SGLangEngine([url], weights_dir=str(tmp_path))
        for step in (1, 2):
            path = engine.export.adapter_path(step)
            os.makedirs(path)
            open(os.path.join(path, peft_io.ADAPTER_CONFIG), "w").write("{}")
            engine.load_adapter(path, step)
        engine.generate([GenerationRequest([1, 2, 3], SamplingParams(max_new_tokens=2, temperature=1.0, seed=1))])
    for body in log.adapter_loads:
        assert sgl.io_struct.LoadLoRAAdapterReqInput(**body).lora_name == body["lora_name"]
    assert sgl.io_struct.UnloadLoRAAdapterReqInput(lora_name=log.adapter_unloads[0]).lora_name == "policy_v1"
    body = log.generate_bodies[0]
    assert body["lora_path"] == "policy_v2"
    assert sgl.contract.generate_contract_error(body) is None
    assert sgl.io_struct.GenerateReqInput(**body).lora_path == "policy_v2"


def get_module_name_ok(sgl, module: str) -> bool:
    """sglang resolves the module's name to one of its fused targets."""
    fused = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    return sgl.utils.get_target_module_name(f"model.layers.0.{module}", fused) == module.split(".")[-1]


def test_servers_that_cannot_load_the_adapters_are_named_before_any_sync(tmp_path):
    """SGLangEngine.check_adapters reads each server's arguments as sglang 0.5.23's /server_info
    reports them (ServerArgs field names, launch/sglang_server.sh's flags) and refuses a server
    without LoRA, with a --max-lora-rank below the adapters' largest rank (the head's, which a sync
    pads every adapter to) or without lm_head among its targets when the head is adapted."""
    from genevolve_jax.rollout.sglang_engine import SGLangEngine, SGLangError
    from tests.fixtures.lora import HEADED_LORA
    from tests.fixtures.sglang_fake import FakeBehaviour, running_fake_sglang
    fields = set(load_lora().server_args.ServerArgs.__struct_fields__)
    assert {"enable_lora", "max_lora_rank", "lora_target_modules"} <= fields
    launched = {"enable_lora": True, "max_lora_rank": HEADED_LORA.max_rank,
                "lora_target_modules": list(TEXT_LORA_TARGETS) + [HEAD_LORA_TARGET]}
    cases = [({}, None), (launched, None), ({**launched, "lora_target_modules": ["all"]}, None),
             ({**launched, "enable_lora": False}, "without --enable-lora"),
             ({**launched, "max_lora_rank": HEADED_LORA.rank}, "--max-lora-rank 4.*LORA_RANK=8"),
             ({**launched, "lora_target_modules": list(TEXT_LORA_TARGETS)}, "LORA_HEAD=1")]
    for server_args, error in cases:
        with running_fake_sglang(FakeBehaviour(server_args=server_args)) as (url, _):
            engine = SGLangEngine([url], weights_dir=str(tmp_path))
            if error is None:
                engine.check_adapters(HEADED_LORA)
                engine.check_adapters(LoRAConfig(RANK, ALPHA))       # no head: its targets do not matter
            else:
                with pytest.raises(SGLangError, match=error):
                    engine.check_adapters(HEADED_LORA)
