"""What a training run shows and leaves behind.

- a rich progress bar with ETA, the last loss and the mean reward;
- TensorBoard scalars (tensorboardX): every numeric metric of a step, under its slash-separated
  name (reward/…, grpo/kl, sdl/loss, grpo/clip_frac, grpo/entropy, agent/tool_calls, skills/…,
  masked/<reason>, time/<stage>_s);
- ``metrics.jsonl``: one JSON object per step (the same numbers);
- sample dumps every N steps: ``samples/step_000010/`` with the trajectories (JSONL) and the
  rendered images;
- ``reward_curve.png`` at the end (mean reward per step, with a moving average);
- optionally Weights & Biases (``logging.wandb``): the same scalars at the same steps, each sample
  dump as a table ``samples`` (one row a trajectory, its image as a W&B image) and the reward curve
  as the image ``reward_curve``. wandb is an optional extra (``pip install 'genevolve_jax[wandb]'``)
  imported only when asked for; ``logging.wandb_mode="offline"`` needs no network and keeps the run
  under ``<workdir>/wandb/`` (or ``$WANDB_DIR``) for a later ``wandb sync``. The W&B run id is kept
  in ``<workdir>/wandb_run_id.txt``, so a resumed run continues the same W&B run.

Writers are opened lazily and closed by :meth:`RunLogger.close`; process 0 writes (metrics.jsonl,
TensorBoard, sample dumps, the curve, W&B), the others only keep the history (it goes into
checkpoints) and show progress. In a multi-host run, samples rendered on another host carry their image as
``extra["image_bytes"]`` on dump steps (sharding/multihost.py), since process 0 cannot read its path.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import time
from typing import Any, Mapping, Sequence

import ml_collections

from genevolve_jax.agent.trajectory import Trajectory
from genevolve_jax.config_checks import Checker

WANDB_MISSING = ("logging.wandb=True needs the wandb package, which is not installed: "
                 "pip install 'genevolve_jax[wandb]' (or pip install wandb), or set logging.wandb=False")
# The columns of the W&B sample table, in order (one row a dumped sample).
SAMPLE_COLUMNS = ("step", "sample_id", "group", "reward", "valid", "mask_reason", "request", "image",
                  "trajectory")

WANDB_MODES = ("online", "offline", "disabled")


def default_logging_config() -> ml_collections.ConfigDict:
    """The ``logging`` section (all ours). wandb: also log to Weights & Biases (optional extra);
    wandb_mode is one of WANDB_MODES ("offline": no network, `wandb sync` later); "" names take
    W&B's defaults."""
    return ml_collections.ConfigDict({"tensorboard": True, "sample_every": 10, "samples_per_dump": 8,
                                      "progress": True, "wandb": False, "wandb_project": "genevolve_jax",
                                      "wandb_entity": "", "wandb_mode": "online", "wandb_run_name": ""})


def validate_logging(cfg) -> ml_collections.ConfigDict:
    check = Checker("logging")
    check.integer(cfg.sample_every, "sample_every", 0, ">= 0 (0 = never)")
    check.integer(cfg.samples_per_dump, "samples_per_dump", 1, ">= 1")
    for name in ("tensorboard", "progress", "wandb"):
        check.boolean(cfg[name], name)
    check.one_of(cfg.wandb_mode, "wandb_mode", WANDB_MODES)
    check(isinstance(cfg.wandb_project, str) and cfg.wandb_project.strip() != "", "wandb_project",
          "a non-empty string", cfg.wandb_project)
    for name in ("wandb_entity", "wandb_run_name"):
        check(isinstance(cfg[name], str), name, "a string ('' = W&B's default)", cfg[name])
    if cfg.wandb:   # fail before anything is built, not at the first logged step
        check_wandb_installed()
    return cfg


def _scalar(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested dicts → {"a/b": float}; non-numeric and non-finite values are dropped."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_metrics(v, name + "/"))
            continue
        f = _scalar(v)
        if f is not None:
            out[name] = f
    return out


def check_wandb_installed() -> None:
    """Raise ImportError naming ``logging.wandb`` when wandb cannot be imported (no import done)."""
    if importlib.util.find_spec("wandb") is None:
        raise ImportError(WANDB_MISSING)


def _import_wandb():
    try:
        import wandb
    except ImportError as e:
        raise ImportError(WANDB_MISSING) from e
    return wandb


@dataclasses.dataclass(frozen=True)
class WandbSettings:
    """Where a run goes on Weights & Biases (the ``logging.wandb_*`` fields)."""
    project: str
    mode: str = "online"        # one of WANDB_MODES
    run_name: str = ""          # "" = W&B picks one
    entity: str = ""            # "" = the default entity of the API key

    @classmethod
    def from_config(cls, logging_cfg) -> "WandbSettings | None":
        """None when ``logging.wandb`` is off."""
        if not logging_cfg.wandb:
            return None
        return cls(project=logging_cfg.wandb_project, mode=logging_cfg.wandb_mode,
                   run_name=logging_cfg.wandb_run_name, entity=logging_cfg.wandb_entity)


class WandbTracker:
    """One W&B run, resumed across restarts of the same workdir (the id is kept in a file)."""

    def __init__(self, settings: WandbSettings, workdir: str, *, job_type: str,
                 run_config: Mapping[str, Any] | None = None):
        self._wandb = _import_wandb()
        id_file = os.path.join(workdir, "wandb_run_id.txt")
        run_id = None   # a new run: W&B picks the id
        if os.path.exists(id_file):
            with open(id_file, encoding="utf-8") as f:
                run_id = f.read().strip() or None
        self.run = self._wandb.init(
            project=settings.project, entity=settings.entity or None, name=settings.run_name or None,
            mode=settings.mode, id=run_id, resume="allow", job_type=job_type,
            reinit="create_new",   # two loggers open in one process (SFT, then evolve) are two runs
            dir=None if os.environ.get("WANDB_DIR") else workdir,   # $WANDB_DIR wins when set
            config=dict(run_config) if run_config is not None else None)
        if run_id is None:
            with open(id_file, "w", encoding="utf-8") as f:
                f.write(f"{self.run.id}\n")

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log(dict(scalars), step=step)

    def log_samples(self, step: int, rows: Sequence[Mapping[str, Any]], image_dir: str) -> None:
        """``rows``: the records of a sample dump; their images are files in ``image_dir``."""
        table = self._wandb.Table(columns=list(SAMPLE_COLUMNS))
        for r in rows:
            image = self._wandb.Image(os.path.join(image_dir, r["image"])) if r["image"] else None
            table.add_data(step, r["sample_id"], r["group"], r["reward"], r["valid"], r["mask_reason"],
                           r["request"], image, json.dumps(r["trajectory"], default=str, ensure_ascii=False))
        self.run.log({"samples": table}, step=step)

    def log_image(self, step: int, key: str, path: str) -> None:
        self.run.log({key: self._wandb.Image(path)}, step=step)

    def finish(self) -> None:
        self.run.finish()


class RunLogger:
    def __init__(self, workdir: str | os.PathLike, *, total_steps: int, tensorboard: bool = True,
                 sample_every: int = 0, progress: bool = True, description: str = "train",
                 samples_per_dump: int = 8, wandb: WandbSettings | None = None,
                 run_config: Mapping[str, Any] | None = None, is_writer: bool = True):
        self.workdir = os.fspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.total_steps = total_steps
        self.sample_every = sample_every
        self.samples_per_dump = samples_per_dump
        # Only the writing process (the Collective's process 0) keeps files and trackers.
        self.writer_enabled = bool(is_writer)
        self.tensorboard = tensorboard and self.writer_enabled
        if wandb is not None:
            check_wandb_installed()   # on every process: a missing package fails the run everywhere, now
        # Only the writer opens a W&B run; ``run_config`` becomes the run's config there.
        self.tracker = WandbTracker(wandb, self.workdir, job_type=description, run_config=run_config) \
            if wandb is not None and self.writer_enabled else None
        self._tb = None
        self._jsonl = open(os.path.join(self.workdir, "metrics.jsonl"), "a", encoding="utf-8") \
            if self.writer_enabled else None
        self.history: list[dict[str, float]] = []
        self._progress = None
        self._task = None
        self._description = description
        self._show_progress = progress
        self._t0 = time.perf_counter()

    @classmethod
    def from_config(cls, workdir: str | os.PathLike, logging_cfg, *, total_steps: int, description: str,
                    progress: bool | None = None, run_config=None, is_writer: bool = True) -> "RunLogger":
        """A logger as the ``logging`` config section asks (``progress`` overrides logging.progress;
        ``run_config``, e.g. the whole ConfigDict, is recorded as the W&B run's config;
        ``is_writer``: this process writes the run's files, the Collective's ``is_writer``)."""
        config = run_config.to_dict() if isinstance(run_config, ml_collections.ConfigDict) else run_config
        return cls(workdir, total_steps=total_steps, tensorboard=logging_cfg.tensorboard,
                   sample_every=logging_cfg.sample_every, samples_per_dump=logging_cfg.samples_per_dump,
                   progress=logging_cfg.progress if progress is None else progress, description=description,
                   wandb=WandbSettings.from_config(logging_cfg), run_config=config, is_writer=is_writer)

    # -- progress ----------------------------------------------------------------------------------
    def start(self, first_step: int = 0) -> None:
        if not self._show_progress:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                  TextColumn("{task.fields[status]}"))
        self._progress.start()
        self._task = self._progress.add_task(self._description, total=self.total_steps, completed=first_step,
                                             status="")

    def _status(self, m: Mapping[str, float]) -> str:
        parts = []
        for key, label in (("loss", "loss"), ("reward/mean", "reward"), ("sdl/loss", "sdl"), ("grpo/kl", "kl")):
            if key in m:
                parts.append(f"{label} {m[key]:.4f}")
        return "  ".join(parts)

    # -- per step ----------------------------------------------------------------------------------
    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        flat = flatten_metrics(metrics)
        flat["step"] = float(step)
        self.history.append(flat)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(flat, sort_keys=True) + "\n")
            self._jsonl.flush()
        if self.tensorboard:
            if self._tb is None:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"))
            for k, v in flat.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self.tracker is not None:
            self.tracker.log_scalars(step, {k: v for k, v in flat.items() if k != "step"})
        if self._progress is not None:
            self._progress.update(self._task, completed=step, status=self._status(flat))
        return flat

    def should_dump(self, step: int) -> bool:
        return self.sample_every > 0 and step % self.sample_every == 0

    def dump_samples(self, step: int, samples: Sequence[Any], limit: int | None = None) -> str | None:
        """Write up to ``limit`` (default: samples_per_dump) samples (trajectory records + rewards),
        copy their images, and log them as a W&B table when W&B is on."""
        if not self.writer_enabled:
            return None
        limit = self.samples_per_dump if limit is None else limit
        out = os.path.join(self.workdir, "samples", f"step_{step:06d}")
        os.makedirs(out, exist_ok=True)
        records = []
        with open(os.path.join(out, "samples.jsonl"), "w", encoding="utf-8") as f:
            for s in list(samples)[:limit]:
                traj = s.extra.get("trajectory")
                image = s.extra.get("image_path")
                copied = None
                if image and os.path.exists(image):
                    copied = f"{s.sample_id}{os.path.splitext(image)[1] or '.png'}"
                    shutil.copyfile(image, os.path.join(out, copied))
                elif s.extra.get("image_bytes"):  # rendered on another host (sharding/multihost.py)
                    ext, data = s.extra["image_bytes"]
                    copied = f"{s.sample_id}{ext}"
                    with open(os.path.join(out, copied), "wb") as img:
                        img.write(data)
                record = {"sample_id": s.sample_id, "group": s.group, "request": s.request, "reward": s.reward,
                          "valid": s.valid, "mask_reason": s.mask_reason, "has_bundle": s.has_bundle,
                          "stats": s.stats, "image": copied,
                          "trajectory": traj.to_dict() if isinstance(traj, Trajectory) else None}
                records.append(record)
                f.write(json.dumps(record, default=str, ensure_ascii=False) + "\n")
        if self.tracker is not None:
            self.tracker.log_samples(step, records, out)
        return out

    # -- the end -----------------------------------------------------------------------------------
    def reward_curve(self, path: str | None = None, key: str = "reward/mean") -> str | None:
        """PNG of ``key`` per step with a moving average; None if no step logged it."""
        points = [(h["step"], h[key]) for h in self.history if key in h]
        if not points or not self.writer_enabled:
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = path or os.path.join(self.workdir, "reward_curve.png")
        xs, ys = zip(*points)
        # A quarter of a short run (3 of 12 steps), at most 20 steps on long ones.
        window = max(1, min(20, len(ys) // 4))
        smooth = [sum(ys[max(0, i - window + 1):i + 1]) / len(ys[max(0, i - window + 1):i + 1]) for i in range(len(ys))]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(xs, ys, alpha=0.4, label=key)
        ax.plot(xs, smooth, label=f"moving average ({window})")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        if self.tracker is not None:   # at the last logged step: W&B drops rows below its current step
            self.tracker.log_image(int(xs[-1]), "reward_curve", path)
        return path

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None
