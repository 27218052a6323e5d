"""`genevolve demo` runs end to end on the embedded defaults and its comparisons hold."""
import json

from genevolve_jax import cli
from genevolve_jax.jobs import demo
from genevolve_jax.models import hf_io


def test_demo_runs_and_reports_agreement(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--repeats", "1"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["tokens_per_s"] > 0 and summary["compile_s"] > 0
    assert summary["reload_max_abs_diff"] == 0.0  # our reload of the export is bit-identical
    assert summary["transformers_max_abs_diff"] <= 1e-4  # transformers on the export agrees
    config = json.loads((out / "hf" / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl" and config["dtype"] == "float32"
    assert len(hf_io.SafetensorsReader(out / "hf")) > 0


def test_demo_inputs_match_the_image_grid():
    from genevolve_jax.models.qwen3_vl import config as qwen_config
    cfg = qwen_config.tiny()
    ids, mask, pixels, grid = demo.demo_inputs(cfg, seed=3)
    t, h, w = grid[0]
    assert int((ids == cfg.image_token_id).sum()) == t * h * w // 4
    assert pixels.shape == (t * h * w, cfg.vision.patch_dim) and pixels.std() > 0.1
    assert ids.max() < cfg.text.vocab_size and mask.all()
