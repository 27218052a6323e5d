"""RunLogger: metrics.jsonl, TensorBoard and Weights & Biases carry the same numbers; W&B (offline,
no network) also receives the sample tables with their images and the reward curve.

The W&B side is read back from the files an offline run leaves: wandb 0.31 has no public reader for
an offline run, so ``_wandb_records`` reads its transaction log (``run-<id>.wandb``: LevelDB's log
framing, 32 KiB blocks, each record a ``wandb_internal_pb2.Record``) and checks every chunk's CRC.
TensorBoard's event file is read the same way (TFRecord framing around tensorboardX's ``Event``).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import struct
import sys
import zlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from genevolve_jax.agent.trajectory import Segment, Trajectory
from genevolve_jax.train.runtime.observability import (SAMPLE_COLUMNS, RunLogger, WandbSettings,
                                                       default_logging_config, validate_logging)

try:   # in the test extra; the package itself imports it only when logging.wandb is on
    import wandb
    from wandb.proto import wandb_internal_pb2
except ImportError:
    wandb = None
needs_wandb = pytest.mark.skipif(wandb is None, reason="wandb is not installed: pip install 'genevolve_jax[wandb]'")


# -- readers of what the writers left -------------------------------------------------------------
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(run_dir: str) -> list:
    (path,) = glob.glob(os.path.join(run_dir, "*.wandb"))
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", data[:7]
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:          # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind == 0 and n == 0:
            continue
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"corrupt chunk at byte {pos}"
        buf = chunk if kind in (_FULL, _FIRST) else buf + chunk
        if kind in (_FULL, _LAST):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


def _items(items) -> dict:
    """History/summary items → {"reward/mean": 0.5, "samples": {"path": ..., ...}}."""
    out: dict = {}
    for it in items:
        keys = list(it.nested_key) or [it.key]
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = json.loads(it.value_json)
    return out


def _wandb_history(records) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = _items(r.history.item)
            rows.setdefault(row["_step"], {}).update(row)
    return rows


def _tensorboard_scalars(logdir: str) -> dict[int, dict[str, float]]:
    from tensorboardX.proto import event_pb2

    out: dict[int, dict[str, float]] = {}
    for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(event.step, {})[v.tag] = v.simple_value
    return out


# -- inputs ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Sample:
    """The fields of a rollout sample that a dump reads."""
    sample_id: str
    group: int
    request: str
    reward: float | None
    valid: bool = True
    mask_reason: str = ""
    stats: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)
    has_bundle: bool = False


def _samples(tmp_path, rng) -> tuple[list[_Sample], dict[str, np.ndarray]]:
    pixels = {}
    samples = []
    for i in range(3):
        sid = f"s{i}-{rng.integers(1 << 30)}"
        traj = Trajectory(traj_id=sid, request=f"draw {sid}",
                          segments=[Segment("prompt", [1, 2, 3]),
                                    Segment("policy", [4, 5], logprobs=[-0.5, -1.25])],
                          termination="answer")
        extra = {"trajectory": traj}
        if i < 2:  # the third has no image (rendering failed): its cell stays empty
            pixels[sid] = rng.integers(0, 256, size=(12 + i, 16, 3), dtype=np.uint8)
            extra["image_path"] = str(tmp_path / f"{sid}.png")
            Image.fromarray(pixels[sid]).save(extra["image_path"])
        masked = i == 1
        samples.append(_Sample(sid, group=i // 2, request=f"draw {sid}", reward=None if masked else float(rng.random()),
                               valid=not masked, mask_reason="render_failed" if masked else "", extra=extra))
    return samples, pixels


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """Every directory wandb writes to under tmp_path; no API key; offline."""
    root = tmp_path / "wandb_home"
    for var, sub in (("WANDB_DIR", "dir"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"),
                     ("WANDB_CONFIG_DIR", "config"), ("WANDB_ARTIFACT_DIR", "artifacts")):
        (root / sub).mkdir(parents=True)
        monkeypatch.setenv(var, str(root / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    wandb.teardown()   # wandb reads the environment once per process: start each test afresh
    yield root / "dir"
    wandb.teardown()


def _logging_cfg(run_name: str):
    cfg = default_logging_config()
    cfg.wandb = True
    cfg.wandb_mode = "offline"
    cfg.wandb_project = "genevolve-test"
    cfg.wandb_run_name = run_name
    cfg.sample_every = 2
    cfg.samples_per_dump = 8
    cfg.progress = False
    return validate_logging(cfg)


# -- tests ----------------------------------------------------------------------------------------
@needs_wandb
def test_offline_wandb_gets_the_scalars_tables_and_curve(tmp_path, offline_wandb):
    rng = np.random.default_rng()
    run_name = f"run-{rng.integers(1 << 30)}"
    workdir = tmp_path / "run"
    logger = RunLogger.from_config(workdir, _logging_cfg(run_name), total_steps=4, description="evolve",
                                   run_config={"seed": 7, "rl": {"group_size": 6}})
    samples, pixels = _samples(tmp_path, rng)
    for step in range(1, 5):
        logger.log(step, {"loss": rng.normal(), "reward": {"mean": rng.random(), "std": rng.random()},
                          "grpo": {"kl": rng.random() * 1e-3}, "time": {"rollout_s": 10 * rng.random()},
                          "skipped": "text", "bad": float("nan")})
        if logger.should_dump(step):
            logger.dump_samples(step, samples)
    curve = logger.reward_curve()
    logger.close()
    wandb.teardown()   # finish() may return before wandb's service has flushed the run's log

    (run_dir,) = glob.glob(str(offline_wandb / "wandb" / "offline-run-*"))
    records = _wandb_records(run_dir)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name, run.job_type) == ("genevolve-test", run_name, "evolve")
    assert open(workdir / "wandb_run_id.txt").read().strip() == run.run_id
    config = {it.key: json.loads(it.value_json) for it in run.config.update}
    assert config["seed"] == 7 and config["rl"] == {"group_size": 6}

    # The same scalars at the same steps in all three sinks (NaN and text dropped everywhere).
    jsonl = {int(row.pop("step")): row for row in map(json.loads, open(workdir / "metrics.jsonl"))}
    tb = _tensorboard_scalars(str(workdir / "tensorboard"))
    history = _wandb_history(records)
    assert sorted(jsonl) == [1, 2, 3, 4] and sorted(tb) == [1, 2, 3, 4]
    for step, row in jsonl.items():
        assert set(row) == {"loss", "reward/mean", "reward/std", "grpo/kl", "time/rollout_s"}
        scalars = {k: v for k, v in history[step].items() if not k.startswith("_") and isinstance(v, float)}
        assert scalars == pytest.approx(row, rel=1e-12, abs=0)   # wandb keeps float64
        assert tb[step] == pytest.approx(row, rel=1e-6)          # TensorBoard stores float32

    # Sample tables at steps 2 and 4: the rows as dumped, each image the very pixels rendered.
    tables = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"
              and r.artifact.type == "run_table"]
    assert [history[s]["samples"]["_type"] for s in (2, 4)] == ["table-file", "table-file"]
    assert len(tables) == 2
    for art in tables:
        files = {c.path: c.local_path for c in art.manifest.contents}
        table = json.load(open(files["samples.table.json"]))
        assert table["columns"] == list(SAMPLE_COLUMNS)
        rows = [dict(zip(table["columns"], row)) for row in table["data"]]
        assert [r["sample_id"] for r in rows] == [s.sample_id for s in samples]
        assert [r["reward"] for r in rows] == [s.reward for s in samples]
        assert [r["mask_reason"] for r in rows] == ["", "render_failed", ""]
        assert json.loads(rows[0]["trajectory"])["segments"][1]["logprobs"] == [-0.5, -1.25]
        assert rows[2]["image"] is None
        for r in rows[:2]:
            assert r["image"]["_type"] == "image-file"
            np.testing.assert_array_equal(np.asarray(Image.open(files[r["image"]["path"]])), pixels[r["sample_id"]])
        assert {r["step"] for r in rows} in ({2}, {4})

    # The reward curve, as the PNG written to the workdir, at the last step.
    logged = history[4]["reward_curve"]
    assert logged["_type"] == "image-file"
    assert logged["sha256"] == hashlib.sha256(open(curve, "rb").read()).hexdigest()
    assert os.path.exists(os.path.join(run_dir, "files", logged["path"]))


@needs_wandb
def test_a_resumed_workdir_continues_the_same_wandb_run(tmp_path, offline_wandb):
    workdir = tmp_path / "run"
    cfg = _logging_cfg("resumable")
    for steps in ((1, 2), (3, 4)):
        logger = RunLogger.from_config(workdir, cfg, total_steps=4, description="sft")
        for step in steps:
            logger.log(step, {"loss": float(step)})
        logger.close()
        wandb.teardown()
    runs = sorted(glob.glob(str(offline_wandb / "wandb" / "offline-run-*")))
    assert len(runs) == 2
    ids = {r.run.run_id for d in runs for r in _wandb_records(d) if r.WhichOneof("record_type") == "run"}
    assert len(ids) == 1
    assert sorted(_wandb_history(_wandb_records(runs[1]))) == [3, 4]


@needs_wandb
def test_two_loggers_open_at_once_are_two_runs(tmp_path, offline_wandb):
    """A process holding an SFT and an evolve logger (as `genevolve train` may) keeps them apart."""
    cfg = _logging_cfg("")
    sft = RunLogger.from_config(tmp_path / "run" / "sft_logs", cfg, total_steps=1, description="sft")
    evolve = RunLogger.from_config(tmp_path / "run", cfg, total_steps=1, description="evolve")
    sft.log(1, {"sft": {"loss": 2.5}})
    evolve.log(1, {"loss": 0.25})
    sft.close()
    evolve.close()
    wandb.teardown()
    seen = {}
    for d in glob.glob(str(offline_wandb / "wandb" / "offline-run-*")):
        records = _wandb_records(d)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        seen[run.job_type] = {k: v for k, v in _wandb_history(records)[1].items() if not k.startswith("_")}
    assert seen == {"sft": {"sft/loss": 2.5}, "evolve": {"loss": 0.25}}


@needs_wandb
def test_only_process_zero_talks_to_wandb(tmp_path, offline_wandb):
    """A process that is not the writer (the Collective's is_writer, as the driver passes it) keeps
    its history but writes no file and opens no W&B run."""
    workdir = tmp_path / "run"
    logger = RunLogger.from_config(workdir, _logging_cfg("worker"), total_steps=2, description="evolve",
                                   is_writer=False)
    assert not logger.writer_enabled and logger.tracker is None
    logger.log(1, {"loss": 1.0, "reward": {"mean": 0.5}})
    assert logger.dump_samples(2, _samples(tmp_path, np.random.default_rng())[0]) is None
    assert logger.reward_curve() is None
    logger.close()
    assert logger.history[0]["reward/mean"] == 0.5   # the history still goes into checkpoints
    assert not glob.glob(str(offline_wandb / "wandb" / "*run-*"))
    assert sorted(os.listdir(workdir)) == []


def test_wandb_requested_but_not_installed_names_the_field(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)   # makes `import wandb` fail as if absent
    cfg = default_logging_config()
    validate_logging(cfg)                              # off: wandb is never looked for
    cfg.wandb = True
    with pytest.raises(ImportError, match=r"logging\.wandb.*genevolve_jax\[wandb\]"):
        validate_logging(cfg)
    with pytest.raises(ImportError, match=r"logging\.wandb"):
        RunLogger(tmp_path, total_steps=1, progress=False, wandb=WandbSettings(project="p", mode="offline"))


@pytest.mark.parametrize("field,value", [("wandb_mode", "offlin"), ("wandb", 1), ("wandb_project", ""),
                                         ("wandb_run_name", None), ("wandb_entity", 3)])
def test_bad_wandb_settings_are_refused_by_name(field, value):
    # Built as a config file would build the section (ConfigDict's own type checks only guard
    # assignments to an existing field).
    cfg = ml_collections.ConfigDict({**default_logging_config().to_dict(), field: value})
    with pytest.raises(ValueError, match=rf"logging\.{field}\b"):
        validate_logging(cfg)
