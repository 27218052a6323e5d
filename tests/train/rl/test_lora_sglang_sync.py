"""`genevolve train` with LoRA and rl.engine="sglang", against a stand-in SGLang server: the base is
pushed once at the start (a full export with the adapters off), then every step sends only its
adapters (a PEFT folder loaded as policy_v<step>, the previous one unloaded), and rollouts name
the version the server holds in their lora_path. (The stand-in's canned tokens are no policy's: the
run's losses are not looked at, only what crosses the wire.)"""
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from genevolve_jax.models import peft_io
from genevolve_jax.models.qwen3_vl.config import LoRAConfig
from tests.fixtures.sglang_fake import FakeBehaviour, running_fake_sglang
from tests.fixtures.toy_task import toy_model, toy_trainer
from tests.fixtures.lora import HEADED_LORA, with_random_b
from tests.train.rl.test_trainer_sglang import sglang_config


def test_lora_run_syncs_adapters_not_models(tmp_path):
    with running_fake_sglang(FakeBehaviour(image_tokens=1)) as (url, log):
        cfg = sglang_config(tmp_path / "run", [url])
        model = with_random_b(toy_model(lora=HEADED_LORA))   # adapters with non-zero deltas to send
        trainer = toy_trainer(cfg, model=model)
        try:
            weights_dir = trainer.engine.weight_export.weights_dir
            steps = [trainer.train_one_step() for _ in range(2)]
            # One full push, of the base: the adapters off.
            assert [b["weight_version"] for b in log.reload_bodies] == ["0"]
            assert [b["lora_name"] for b in log.adapter_loads] == ["policy_v0", "policy_v1", "policy_v2"]
            assert log.adapter_unloads == ["policy_v0", "policy_v1"] and log.adapters == {"policy_v2"}
            named = [b.get("lora_path") for b in log.generate_bodies]
            rows = cfg.data.rl.prompts_per_step * cfg.rl.group_size
            assert named == ["policy_v0"] * rows + ["policy_v1"] * rows
            assert all(m["time/adapter_export_s"] > 0 and m["sglang/servers_behind"] == 0 for m in steps)
            assert sorted(os.listdir(weights_dir)) == ["adapter_v2"]
            # One rank for SGLang: the decoder's rank-4 adapters padded with zeros to the head's 8,
            # at the common scale; the deltas are the trainer's.
            sent = load_file(os.path.join(weights_dir, "adapter_v2", peft_io.ADAPTER_WEIGHTS))
            one_rank = LoRAConfig(8, HEADED_LORA.scale * 8, HEADED_LORA.targets)
            assert peft_io.read_adapter_config(os.path.join(weights_dir, "adapter_v2")) == one_rank
            policy = trainer.setup.merge(trainer.params)
            assert peft_io.adapter_tensors(policy, one_rank=True).keys() == sent.keys()
            for name, tensor in peft_io.adapter_tensors(policy, one_rank=True).items():
                np.testing.assert_array_equal(sent[name], tensor.astype(sent[name].dtype))
            q_a = [v for k, v in sent.items() if k.endswith("q_proj.lora_A.weight")][0]
            assert np.any(q_a[:4]) and not np.any(q_a[4:])
            # Independently of peft_io: the folder's scale · B·A, as SGLang forms it, is the
            # trainer's s·A·B for the head and a padded decoder projection.
            scale = one_rank.alpha / one_rank.rank
            down = policy.language_model.layers[1].mlp.down_proj
            for module, dense in (("lm_head", policy.lm_head), ("model.language_model.layers.1.mlp.down_proj", down)):
                a, b = (np.asarray(jax.device_get(v.get_value()), np.float64) for v in (dense.lora_a, dense.lora_b))
                want = HEADED_LORA.scale * (a @ b).T                       # HF's (out, in)
                got = scale * (np.asarray(sent[f"{peft_io.PEFT_PREFIX}{module}.lora_B.weight"], np.float64)
                               @ np.asarray(sent[f"{peft_io.PEFT_PREFIX}{module}.lora_A.weight"], np.float64))
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9, err_msg=module)   # float32 export
                assert np.abs(want).max() > 0, module
            trained = sum(x.size for x in jax.tree.leaves(trainer.params["train"]))
            assert sum(v.size for v in sent.values()) > trained     # the padding
        finally:
            trainer.close()


def test_a_server_whose_lora_rank_is_too_small_stops_the_run_before_any_sync(tmp_path):
    """The head's rank 8 is the rank every synced adapter is padded to: a server started with
    LORA_RANK=4 (the decoder's rank) is refused when the trainer is built, not after a failed load."""
    from genevolve_jax.rollout.sglang_engine import SGLangError
    args = {"enable_lora": True, "max_lora_rank": HEADED_LORA.rank, "lora_target_modules": ["all"]}
    with running_fake_sglang(FakeBehaviour(image_tokens=1, server_args=args)) as (url, log):
        with pytest.raises(SGLangError, match=f"LORA_RANK={HEADED_LORA.max_rank}"):
            toy_trainer(sglang_config(tmp_path / "run", [url]), model=toy_model(lora=HEADED_LORA))
        assert log.adapter_loads == [] and log.reload_bodies == []
