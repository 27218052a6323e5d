"""`genevolve sft` driver: the loss falls on a small SFT set, the vision tower stays frozen, a
stopped run resumes with the same losses as an uninterrupted one, the outputs (orbax model, HF
export) load back, and malformed rows fail early naming file and line."""
import json

import jax
import numpy as np
import pytest

from genevolve_jax.config_loader import load_config
from genevolve_jax.models.loading import load_model
from genevolve_jax.train.sft.trainer import SFTTrainer

WORDS = ["red", "blue", "circle", "square", "tower", "bridge", "search", "image", "draw", "sky"]


def write_rows(path, n=6, seed=0, bad_line=None):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            if bad_line is not None and i + 1 == bad_line:
                f.write('{"messages": "not a list"}\n')
                continue
            ask = " ".join(rng.choice(WORDS, 4))
            call = json.dumps({"name": "search", "arguments": {"queries": [ask]}})
            f.write(json.dumps({"messages": [
                {"role": "system", "content": "You plan pictures."},
                {"role": "user", "content": f"Draw {ask}."},
                {"role": "assistant", "content": f"<think>find {ask}</think>\n<tool_call>{call}</tool_call>"},
                {"role": "user", "content": "<tool_response>\n1. result\n</tool_response>"},
                {"role": "assistant", "content": '<answer>{"gen_prompt": "' + ask + '", "reference_images": []}</answer>'},
            ], "images": []}) + "\n")


def sft_config(tmp_path, data, *, epochs=6, save_every=100, max_steps=0):
    cfg = load_config("tiny_cpu")
    cfg.workdir = str(tmp_path / "run")
    cfg.data.sft.paths = [str(data)]
    cfg.data.sft.cutoff_len = 128
    cfg.data.sft.row_len = 128
    cfg.data.sft.rows_per_batch = 2
    cfg.data.sft.num_epochs = epochs
    cfg.data.sft.pack = True
    cfg.sft.optimizer.learning_rate = 1e-2
    cfg.loss.logprob.chunk_size = 512
    cfg.sft_run.max_steps = max_steps
    cfg.sft_run.export_dtype = "float32"
    cfg.checkpoint.save_every = save_every
    cfg.logging.progress = False
    cfg.logging.tensorboard = False
    return cfg


def host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def run_keeping_frozen(trainer, label: str) -> dict:
    """``trainer.run()`` (closed after), asserting that its frozen parameters (there are some) came
    out bit for bit as they went in; prints the losses under ``label``."""
    frozen_before = host(trainer.params["frozen"])
    assert jax.tree.leaves(frozen_before), "nothing is frozen"
    try:
        out = trainer.run()
    finally:
        trainer.close()
    print(label, np.round(out["losses"], 3).tolist())
    jax.tree.map(np.testing.assert_array_equal, host(trainer.params["frozen"]), frozen_before)
    return out


def test_sft_learns_keeps_vision_frozen_and_exports(tmp_path):
    data = tmp_path / "sft.jsonl"
    write_rows(data)
    trainer = SFTTrainer(sft_config(tmp_path, data), devices=jax.devices()[:1])
    out = run_keeping_frozen(trainer, "sft losses")     # the vision tower is frozen in SFT
    losses = out["losses"]
    assert out["steps"] == trainer.total_steps >= 6
    assert np.mean(losses[-2:]) < 0.6 * np.mean(losses[:2]), losses
    # The orbax model reloads with the trained weights; the HF export has its config and weights.
    model = load_model(out["model"])
    trained_embed = host(trainer.params["train"])["language_model"]["embed_tokens"]["embedding"]
    np.testing.assert_allclose(np.asarray(model.language_model.embed_tokens.embedding.get_value()),
                               np.asarray(getattr(trained_embed, "value", trained_embed)), rtol=0, atol=0)
    assert (tmp_path / "run" / "sft_hf_export" / "config.json").exists()
    assert (tmp_path / "run" / "sft_logs" / "metrics.jsonl").read_text().count("\n") == out["steps"]


@pytest.mark.slow
def test_sft_stop_and_resume_matches_uninterrupted(tmp_path):
    data = tmp_path / "sft.jsonl"
    write_rows(data, n=8, seed=1)
    straight = SFTTrainer(sft_config(tmp_path / "a", data, epochs=1), devices=jax.devices()[:1])
    try:
        while straight.train_one_step() is not None:
            pass
    finally:
        straight.close()
    first = SFTTrainer(sft_config(tmp_path / "b", data, epochs=1, save_every=2), devices=jax.devices()[:1])
    first.train_one_step()
    first.train_one_step()
    first.ckpt.wait()
    first.close()  # the run stops here (the SIGKILL variant is in test_checkpoint.py)
    resumed = SFTTrainer(sft_config(tmp_path / "b", data, epochs=1, save_every=2), devices=jax.devices()[:1])
    try:
        assert resumed.step == 2
        while resumed.train_one_step() is not None:
            pass
    finally:
        resumed.close()
    np.testing.assert_allclose(resumed.losses, straight.losses, rtol=1e-6)
    assert len(resumed.losses) == len(straight.losses) >= 3


def test_malformed_row_fails_early_or_is_skipped(tmp_path):
    data = tmp_path / "bad.jsonl"
    write_rows(data, n=4, bad_line=3)
    with pytest.raises(ValueError, match=r"bad\.jsonl:3"):
        SFTTrainer(sft_config(tmp_path, data, max_steps=1), devices=jax.devices()[:1])
    cfg = sft_config(tmp_path, data, max_steps=1)
    cfg.data.skip_malformed = True
    trainer = SFTTrainer(cfg, devices=jax.devices()[:1])
    try:
        assert trainer.pipeline.report.skipped == 1
    finally:
        trainer.close()
