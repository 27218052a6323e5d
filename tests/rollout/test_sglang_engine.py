"""SGLangEngine against a fake SGLang 0.5.23 server (tests/fixtures/sglang_fake.py): SGLang-form image
prompts and the check of the server's expansion, retries with fresh rids, weight sync that survives
refused reloads (lag metric, no rollouts for a server behind, a clear stop past the limit), a server
killed in the middle of a rollout phase, and the determinism check at start."""
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from genevolve_jax.rollout.engine import GenerationRequest, SamplingParams
from genevolve_jax.rollout.sglang_engine import (IMAGE_MISMATCH, PROMPT_MISMATCH,
                                                 SGLangEngine, SGLangError, WeightLagError, collapse_image_pads,
                                                 error_message, image_pad_runs, parse_response, request_body)
from tests.fixtures.servers import free_port
from tests.fixtures.sglang_fake import FakeBehaviour, running_fake_sglang
from tests.fixtures.sglang_responses import (duplicate_rid_error, finish_abort, finish_stop_token, generate_response,
                                             schema_error, validation_error)

PAD = 151655
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def image_prompt(rng, runs):
    """Random text ids with ``<|vision_start|> n×pad <|vision_end|>`` for each n in ``runs``."""
    ids = rng.integers(10, 5000, rng.integers(1, 6)).tolist()
    for n in runs:
        ids += [151652] + [PAD] * n + [151653] + rng.integers(10, 5000, rng.integers(0, 4)).tolist()
    return ids


# --- bodies and parsing ----------------------------------------------------------------------------
def test_image_prompts_go_out_with_one_pad_per_image(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "x.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    for _ in range(20):
        runs = rng.integers(1, 40, rng.integers(1, 4)).tolist()
        ids = image_prompt(rng, runs)
        images = [str(path)] + [Image.new("RGB", (4, 4))] * (len(runs) - 1)
        req = GenerationRequest(ids, SamplingParams(max_new_tokens=9, seed=11), images=images)
        body = request_body(req, image_pad=PAD, rid="t-1-a0")
        assert image_pad_runs(ids, PAD) == runs
        assert image_pad_runs(body["input_ids"], PAD) == [1] * len(runs)
        # Expanding each pad back by the trainer's counts restores the trainer's sequence exactly.
        counts = iter(runs)
        restored = [t for x in body["input_ids"] for t in ([x] * next(counts) if x == PAD else [x])]
        assert restored == ids and body["input_ids"] == collapse_image_pads(ids, PAD)
        assert body["return_prompt_token_ids"] is True and body["rid"] == "t-1-a0"
        assert body["image_data"][0] == str(path) and len(body["image_data"]) == len(runs)
        assert all(x.startswith("data:image/png;base64,") for x in body["image_data"][1:])
        assert body["sampling_params"]["sampling_seed"] == 11
    text = request_body(GenerationRequest([5, 6, 7]), image_pad=PAD)
    assert text == {"input_ids": [5, 6, 7], "sampling_params": SamplingParams().to_sglang(), "return_logprob": True,
                    "logprob_start_len": -1}
    with pytest.raises(ValueError, match="2 runs of image-pad tokens .* 1 images"):
        request_body(GenerationRequest([PAD, 3, PAD], images=[str(path)]), image_pad=PAD)


def test_parse_response_reads_ids_logprobs_finish_and_checks_the_server_expansion():
    ok = generate_response("r", [4, 9], [-0.5, -1.25], finish=finish_stop_token(9))
    res = parse_response(ok)
    assert (res.token_ids, res.logprobs, res.finish_reason) == ([4, 9], [-0.5, -1.25], "stop")
    assert parse_response([ok]).token_ids == [4, 9]
    aborted = generate_response("r", [], [], finish=finish_abort("oom"))
    assert (parse_response(aborted).finish_reason, parse_response(aborted).error) == ("abort", "oom")
    rng = np.random.default_rng(5)
    trainer = image_prompt(rng, [6, 3])
    served = generate_response("r", [4], [-0.5], prompt_ids=trainer)
    assert parse_response(served, trainer, PAD).token_ids == [4]
    for runs in ([6, 4], [6], [5, 3]):
        res = parse_response(served, image_prompt(rng, runs), PAD)
        assert res.finish_reason == "abort" and res.error.startswith(IMAGE_MISMATCH) and "[6, 3]" in res.error
    drifted = list(trainer)
    drifted[0] += 1  # same images, another text token (a server that re-tokenised the decoded prompt)
    res = parse_response(served, drifted, PAD)
    assert res.finish_reason == "abort" and res.error.startswith(PROMPT_MISMATCH) and "position 0" in res.error
    res = parse_response(generate_response("r", [4], [-0.5]), trainer, PAD)  # no prompt_token_ids returned
    assert res.finish_reason == "abort" and res.error.startswith(IMAGE_MISMATCH)
    bad = [({"text": "x"}, "meta_info"),
           ({"meta_info": {"finish_reason": {"type": "weird"}, "output_token_logprobs": []}}, "finish_reason"),
           ({"meta_info": {"finish_reason": {"type": "stop"}}}, "output_token_logprobs"),
           ({"output_ids": [1], "meta_info": {"finish_reason": {"type": "length"},
                                              "output_token_logprobs": [[-1.0, 2, None]]}}, "disagree"),
           ({"meta_info": {"finish_reason": {"type": "length"}, "output_token_logprobs": [["a"]]}}, "malformed")]
    for body, what in bad:
        with pytest.raises(SGLangError, match=what):
            parse_response(body)


def test_error_messages_are_read_from_every_sglang_error_shape():
    assert error_message(duplicate_rid_error("x-1")) == "Duplicate request ID detected: x-1"
    assert error_message(schema_error("unknown field `seed`")) == "unknown field `seed`"
    assert error_message(validation_error("bad input_ids")) == "bad input_ids"
    assert error_message({"error": {"message": "m", "type": "t", "param": "p", "code": "c"}}) == "m"  # OpenAI's
    assert error_message("plain") == "plain"


# --- generation against the fake server ------------------------------------------------------------
def test_image_rollout_masks_a_server_expansion_that_differs(tmp_path):
    with running_fake_sglang(FakeBehaviour(image_tokens=5)) as (url, log):
        eng = SGLangEngine([url], timeout_s=10, retries=0)
        img = Image.new("RGB", (8, 8))
        good = GenerationRequest([1, 151652] + [PAD] * 5 + [151653], SamplingParams(max_new_tokens=3), [img], "g")
        off = GenerationRequest([1, 151652] + [PAD] * 4 + [151653], SamplingParams(max_new_tokens=3), [img], "o")
        a, b = eng.generate([good, off])
        assert a.finish_reason == "length" and len(a.token_ids) == 3
        assert b.finish_reason == "abort" and b.error.startswith(IMAGE_MISMATCH) and "[5]" in b.error
        assert eng.stats["prompt_mismatches"] == 1
        assert all(image_pad_runs(body["input_ids"], PAD) == [1] for body in log.generate_bodies)


def test_retry_after_a_timeout_succeeds_on_the_same_server_with_a_new_rid():
    with running_fake_sglang(FakeBehaviour(slow_first=1, slow_s=8.0)) as (url, log):
        eng = SGLangEngine([url], timeout_s=1.5, retries=2, backoff_s=0.05)
        res = eng.generate([GenerationRequest([3, 4, 5], SamplingParams(max_new_tokens=4), request_id="traj-7")])[0]
        assert res.finish_reason == "length" and len(res.token_ids) == 4, res.error
        first, second = (b["rid"] for b in log.generate_bodies)
        assert first != second and first.startswith("traj-7-") and second.startswith("traj-7-")
        assert first in log.live_rids  # the timed-out request still runs there: reusing its rid would be refused
        # The retry went to the same server, held back to SGLang's disconnect poll.
        assert eng.stats["retries"] == 1 and eng.stats["disconnect_waits"] == 1


def test_a_server_killed_in_the_middle_of_a_rollout_phase_loses_no_request(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.fixtures.sglang_fake", "--port", str(port), "--delay-s", "1.5"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        doomed = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(doomed + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and proc.poll() is None, "the fake server did not start"
                time.sleep(0.2)
        with running_fake_sglang(FakeBehaviour(delay_s=1.5)) as (url, log):
            eng = SGLangEngine([doomed, url], timeout_s=20, retries=2, backoff_s=0.05, probation_s=60)
            assert eng.wait_healthy(5.0) == {doomed: True, url: True}
            killer = threading.Timer(0.7, lambda: os.kill(proc.pid, signal.SIGKILL))
            killer.start()
            reqs = [GenerationRequest([i, 2, 3], SamplingParams(max_new_tokens=2), request_id=f"t{i}") for i in range(8)]
            results = eng.generate(reqs)
            killer.join()
            assert proc.wait(timeout=10) == -signal.SIGKILL
            assert [r.finish_reason for r in results] == ["length"] * 8, [r.error for r in results]
            # Every request ended on the surviving server; some had first gone to the killed one.
            assert sorted({b["rid"].split("-")[0] for b in log.generate_bodies}) == sorted(f"t{i}" for i in range(8))
            assert eng.stats["retries"] >= 1 and len(log.generate_bodies) == 8
            assert eng.pick_server() == url  # the dead one is on probation
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_determinism_is_read_from_server_info_and_logged(caplog):
    caplog.set_level(logging.WARNING, logger="genevolve_jax.rollout.sglang_engine")
    with running_fake_sglang(FakeBehaviour(deterministic=True)) as (det, _), \
            running_fake_sglang(FakeBehaviour(deterministic=False, server_info_path="/get_server_info")) as (old, _), \
            running_fake_sglang(FakeBehaviour(server_info_path="")) as (silent, _):
        eng = SGLangEngine([det, old, silent], timeout_s=5)
        eng.wait_healthy(5.0)
        assert eng.deterministic == {det: True, old: False, silent: None}
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert det not in warned and f"{old} runs without" in warned and f"{silent} does not report" in warned
    assert "ignores sampling seeds" in warned


# --- weight sync -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_params():
    from flax import nnx

    from genevolve_jax.models.hf_io import model_from_state_dict, random_state_dict
    from genevolve_jax.models.qwen3_vl.config import tiny
    cfg = tiny()
    return cfg, nnx.state(model_from_state_dict(cfg, random_state_dict(cfg, seed=3)), nnx.Param)


def test_refused_reloads_lag_then_catch_up_and_the_server_behind_gets_no_rollouts(tmp_path, tiny_params):
    from genevolve_jax.models.hf_io import SafetensorsReader
    from genevolve_jax.models.qwen3_vl.keymap import hf_state_dict
    cfg, params = tiny_params
    refusing = FakeBehaviour()
    with running_fake_sglang() as (good, good_log), running_fake_sglang(refusing) as (bad, bad_log):
        eng = SGLangEngine([good, bad], timeout_s=10, retries=1, backoff_s=0.01, model_config=cfg,
                           weights_dir=str(tmp_path / "w"), export_dtype="float32", max_weight_lag_steps=2)
        assert eng.serves_every_host
        lags = [eng.update_weights(params, 0)["sglang/weight_version_lag"]]
        refusing.refuse_reloads = 2 * (eng.retries + 1)  # every attempt of the next two steps
        for step in (1, 2, 3):
            m = eng.update_weights(params, step)
            lags.append(m["sglang/weight_version_lag"])
            assert m["time/weight_export_s"] > 0 and m["time/weight_reload_s"] >= 0
            assert m["sglang/servers_behind"] == (1.0 if step < 3 else 0.0)
            if step == 2:  # behind: no rollouts for it
                before = len(bad_log.generate_bodies)
                eng.generate([GenerationRequest([i, 5], SamplingParams(max_new_tokens=2)) for i in range(6)])
                assert len(bad_log.generate_bodies) == before and len(good_log.generate_bodies) >= 6
        assert lags == [0.0, 1.0, 2.0, 0.0]
        # Caught up: it gets rollouts again (concurrent requests go to the server with fewer in flight).
        before = len(bad_log.generate_bodies)
        eng.generate([GenerationRequest([i, 5], SamplingParams(max_new_tokens=2)) for i in range(6)])
        assert len(bad_log.generate_bodies) > before
        # Each refused step was retried against the same export; nobody was asked to flush.
        paths = [b["model_path"] for b in bad_log.reload_bodies]
        assert paths[1:3] == [str(tmp_path / "w" / "weights_v1")] * 2 and paths[-1].endswith("weights_v3")
        assert [b["weight_version"] for b in good_log.reload_bodies] == ["0", "1", "2", "3"]
        assert good_log.flush_calls == bad_log.flush_calls == 0
        # Only the newest export is kept, complete, with the parameters' values.
        assert sorted(os.listdir(tmp_path / "w")) == ["weights_v3"]
        reader = SafetensorsReader(str(tmp_path / "w" / "weights_v3"))
        for name, value in hf_state_dict(params, cfg):
            np.testing.assert_array_equal(np.asarray(reader[name]), value)


def test_a_server_behind_for_too_long_stops_the_run_naming_it(tmp_path, tiny_params):
    cfg, params = tiny_params
    with running_fake_sglang() as (good, _), running_fake_sglang(FakeBehaviour(refuse_reloads=10**6)) as (bad, _):
        eng = SGLangEngine([good, bad], timeout_s=10, retries=0, model_config=cfg, weights_dir=str(tmp_path / "w"),
                           max_weight_lag_steps=1)
        assert eng.update_weights(params, 4)["sglang/weight_version_lag"] == 1.0
        with pytest.raises(WeightLagError, match=rf"max_weight_lag_steps = 1 .*{bad}.* from 4 to 5 \(2 steps behind\)"
                                                 r".*scripted refusal"):
            eng.update_weights(params, 5)


def test_another_process_adopts_the_version_table_and_avoids_the_server_behind():
    """What every non-writer process does after process 0's push: adopt its table, then pick only
    current servers and report the same lag; a table of other servers is refused naming the field."""
    urls = ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"]
    writer, other = SGLangEngine(urls, max_weight_lag_steps=5), SGLangEngine(urls, max_weight_lag_steps=5)
    rng = np.random.default_rng()
    behind = urls[int(rng.integers(0, 3))]
    for step in range(1, int(rng.integers(2, 5))):
        writer.versions.record(step, {u: "refused" if u == behind else "" for u in urls})
    other.adopt_weight_sync_state(writer.weight_sync_state())
    assert other.weight_sync_state() == writer.weight_sync_state()
    assert {u: other.versions.lag(u) for u in urls} == {u: writer.versions.lag(u) for u in urls}
    assert other.versions.lag(behind) > 0 and behind not in {other.pick_server() for _ in range(30)}
    with pytest.raises(ValueError, match="rl.sglang.urls: process 0 pushes to"):
        SGLangEngine(urls[:2]).adopt_weight_sync_state(writer.weight_sync_state())


def test_update_weights_without_a_weights_dir_says_how_to_build_the_engine(tiny_params):
    with pytest.raises(ValueError, match="from_config"):
        SGLangEngine(["http://127.0.0.1:1"]).update_weights(tiny_params[1], 1)
