"""`genevolve import-hf` → orbax → `genevolve export-hf` round trips, through the real CLI entry point."""
import json
import os

import ml_dtypes
import numpy as np
import pytest

from genevolve_jax import cli
from genevolve_jax.models import hf_io
from genevolve_jax.models import loading as checkpoint_io
from genevolve_jax.models.qwen3_vl import config as qwen_config
from tests.fixtures import hf_qwen3_vl


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A transformers-saved tiny untied Qwen3-VL, sharded, with a tokenizer-side file next to it."""
    cfg = qwen_config.tiny(tie_word_embeddings=False)
    model = hf_qwen3_vl.random_hf_model(cfg, seed=7)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path, max_shard_size="100KB")
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 123}))
    return path, hf_qwen3_vl.state_dict_numpy(model)


def _read_all(path):
    reader = hf_io.SafetensorsReader(path)
    return {k: reader[k] for k in reader}


def test_import_then_export_round_trips_every_tensor(hf_dir, tmp_path):
    src, reference = hf_dir
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert cli.main(["import-hf", str(src), str(ckpt)]) == 0
    assert (ckpt / checkpoint_io.CONFIG_FILE).exists() and (ckpt / checkpoint_io.PARAMS_DIR).is_dir()
    assert cli.main(["export-hf", str(ckpt), str(out), "--dtype", "float32", "--max-shard-size", "60KB"]) == 0
    exported = _read_all(out)
    assert set(exported) == set(reference)
    for k, v in reference.items():
        assert exported[k].dtype == np.float32
        np.testing.assert_array_equal(exported[k], v, err_msg=k)
    index = json.loads((out / hf_io.SAFE_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1
    # Side files ride along: the tokenizer config and the model's own generation config, verbatim.
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"model_max_length": 123}
    assert json.loads((out / "generation_config.json").read_text()) == \
        json.loads((src / "generation_config.json").read_text())
    assert qwen_config.Qwen3VLConfig.from_pretrained(out) == qwen_config.Qwen3VLConfig.from_pretrained(src)

    # bf16 export: each tensor is the fp32 value rounded to bf16, bit for bit.
    out16 = tmp_path / "out16"
    assert cli.main(["export-hf", str(ckpt), str(out16)]) == 0
    exported16 = _read_all(out16)
    assert json.loads((out16 / "config.json").read_text())["dtype"] == "bfloat16"
    for k, v in reference.items():
        assert exported16[k].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(exported16[k].view(np.uint16), v.astype(ml_dtypes.bfloat16).view(np.uint16))


def test_bf16_import_stores_bf16_and_exports_the_rounded_values(hf_dir, tmp_path):
    src, reference = hf_dir
    ckpt, out = tmp_path / "ckpt16", tmp_path / "out"
    assert cli.main(["import-hf", str(src), str(ckpt), "--dtype", "bfloat16"]) == 0
    assert checkpoint_io.load_model_config(ckpt).param_dtype == "bfloat16"
    assert cli.main(["export-hf", str(ckpt), str(out), "--dtype", "float32"]) == 0
    exported = _read_all(out)
    for k in ("model.language_model.layers.1.self_attn.q_proj.weight", "lm_head.weight",
              "model.visual.blocks.0.attn.qkv.bias"):
        np.testing.assert_array_equal(exported[k], reference[k].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_cli_errors_name_the_file_and_do_not_overwrite(hf_dir, tmp_path, capsys):
    src, _ = hf_dir
    assert cli.main(["export-hf", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    assert checkpoint_io.CONFIG_FILE in capsys.readouterr().err
    ckpt = tmp_path / "ckpt"
    assert cli.main(["import-hf", str(src), str(ckpt)]) == 0
    assert cli.main(["import-hf", str(src), str(ckpt)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["export-hf", str(ckpt), str(tmp_path / "o"), "--max-shard-size", "lots"]) == 2
    assert "lots" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(src):
        (broken / name).write_bytes((src / name).read_bytes())
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "qwen2_5_vl"
    (broken / "config.json").write_text(json.dumps(cfg))
    assert cli.main(["import-hf", str(broken), str(tmp_path / "c2")]) == 2
    err = capsys.readouterr().err
    assert "model_type" in err and "config.json" in err
    assert not (tmp_path / "c2").exists()
