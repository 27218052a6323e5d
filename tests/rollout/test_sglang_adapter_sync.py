"""SGLangEngine's LoRA adapter sync against two stand-in servers: each version is loaded under its
own name and named in the lora_path of the requests of the servers that loaded it, the previous
version is unloaded, a server whose load failed keeps its version and gets no rollouts while
another is current, the lag limit of the full-weight path applies, and old adapter folders go."""
import json
import os

import pytest

from genevolve_jax.rollout.engine import GenerationRequest, SamplingParams
from genevolve_jax.rollout.sglang_engine import SGLangEngine
from genevolve_jax.rollout.sglang_weights import WeightLagError
from tests.fixtures.sglang_fake import FakeBehaviour, running_fake_sglang


def adapter_folder(engine, step):
    path = engine.export.adapter_path(step)
    os.makedirs(path)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8}, f)
    return path


def requests(n=4):
    return [GenerationRequest([1, 2, 3, i], SamplingParams(max_new_tokens=2, temperature=1.0, seed=i))
            for i in range(n)]


def test_adapter_versions_only_loaded_are_named_and_a_failed_load_lags(tmp_path):
    flaky = FakeBehaviour()
    with running_fake_sglang() as (good_url, good), running_fake_sglang(flaky) as (flaky_url, bad):
        engine = SGLangEngine([good_url, flaky_url], weights_dir=str(tmp_path), max_weight_lag_steps=1,
                              retries=0, backoff_s=0.0)
        assert engine.adapter_sync
        first = adapter_folder(engine, 1)
        metrics = engine.load_adapter(first, 1)
        assert metrics["sglang/servers_behind"] == 0
        assert good.adapter_loads == bad.adapter_loads == [{"lora_name": "policy_v1", "lora_path": first}]
        assert all(r.error == "" for r in engine.generate(requests()))
        sent = good.generate_bodies + bad.generate_bodies
        assert len(sent) == 4 and {b["lora_path"] for b in sent} == {"policy_v1"}

        flaky.refuse_adapter_loads = 1
        second = adapter_folder(engine, 2)
        metrics = engine.load_adapter(second, 2)
        assert metrics["sglang/servers_behind"] == 1 and metrics["sglang/weight_version_lag"] == 1
        assert good.adapter_unloads == ["policy_v1"] and bad.adapter_unloads == []
        assert good.adapters == {"policy_v2"} and bad.adapters == {"policy_v1"}
        assert engine.adapters == {good_url: "policy_v2", flaky_url: "policy_v1"}
        before = len(bad.generate_bodies)
        assert all(r.error == "" for r in engine.generate(requests()))
        # The server behind gets nothing; the version it failed to load is never named anywhere.
        assert len(bad.generate_bodies) == before
        assert {b["lora_path"] for b in good.generate_bodies[-4:]} == {"policy_v2"}
        assert not any(b.get("lora_path") == "policy_v2" for b in bad.generate_bodies)
        assert sorted(os.listdir(tmp_path)) == ["adapter_v2"]

        # Another processes' view: the adapter table travels with the lag table.
        other = SGLangEngine([good_url, flaky_url], weights_dir=str(tmp_path), max_weight_lag_steps=1)
        other.adopt_weight_sync_state(engine.weight_sync_state())
        assert other.adapters == engine.adapters

        flaky.refuse_adapter_loads = 1
        with pytest.raises(WeightLagError, match="max_weight_lag_steps = 1 exceeded"):
            engine.load_adapter(adapter_folder(engine, 3), 3)


def test_under_staleness_the_versions_requests_may_still_use_stay_loaded(tmp_path):
    """rl.max_staleness = 1 keeps two versions per server: a request of the version before the
    newest may still be in flight when the newest loads, so only the one before that is unloaded."""
    with running_fake_sglang() as (url, server):
        engine = SGLangEngine([url], weights_dir=str(tmp_path), retries=0, backoff_s=0.0, adapters_kept=2)
        for step in (1, 2):
            engine.load_adapter(adapter_folder(engine, step), step)
        assert server.adapter_unloads == [] and server.adapters == {"policy_v1", "policy_v2"}
        engine.load_adapter(adapter_folder(engine, 3), 3)
        assert server.adapter_unloads == ["policy_v1"] and server.adapters == {"policy_v2", "policy_v3"}
        assert engine.adapters == {url: "policy_v3"}
        assert all(r.error == "" for r in engine.generate(requests(2)))
        assert {b["lora_path"] for b in server.generate_bodies} == {"policy_v3"}
        # Another process adopts the loaded window with the table, and unloads what the writer would.
        other = SGLangEngine([url], weights_dir=str(tmp_path), adapters_kept=2)
        other.adopt_weight_sync_state(engine.weight_sync_state())
        assert other.loaded_adapters == {url: ["policy_v2", "policy_v3"]}
        with pytest.raises(ValueError, match="adapters_kept"):
            SGLangEngine([url], adapters_kept=0)
