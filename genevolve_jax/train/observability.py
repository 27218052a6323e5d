"""What a training run shows and leaves behind.

- a rich progress bar with ETA, the last loss and the mean reward;
- TensorBoard scalars (tensorboardX): every numeric metric of a step, under its slash-separated
  name (reward/…, grpo/kl, sdl/loss, grpo/clip_frac, grpo/entropy, agent/tool_calls, skills/…,
  masked/<reason>, time/<stage>_s);
- ``metrics.jsonl``: one JSON object per step (the same numbers);
- sample dumps every N steps: ``samples/step_000010/`` with the trajectories (JSONL) and the
  rendered images;
- ``reward_curve.png`` at the end (mean reward per step, with a moving average).

Writers are opened lazily and closed by :meth:`RunLogger.close`; process 0 writes (metrics.jsonl,
TensorBoard, sample dumps, the curve), the others only keep the history (it goes into checkpoints)
and show progress. In a multi-host run, samples rendered on another host carry their image as
``extra["image_bytes"]`` on dump steps (train/multihost.py), since process 0 cannot read its path.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from typing import Any, Mapping, Sequence

import jax


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


class RunLogger:
    def __init__(self, workdir: str | os.PathLike, *, total_steps: int, tensorboard: bool = True,
                 sample_every: int = 0, progress: bool = True, description: str = "train"):
        self.workdir = os.fspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.total_steps = total_steps
        self.sample_every = sample_every
        self.writer_enabled = jax.process_index() == 0
        self.tensorboard = tensorboard and self.writer_enabled
        self._tb = None
        self._jsonl = open(os.path.join(self.workdir, "metrics.jsonl"), "a", encoding="utf-8") \
            if self.writer_enabled else None
        self.history: list[dict[str, float]] = []
        self._progress = None
        self._task = None
        self._description = description
        self._show_progress = progress
        self._t0 = time.perf_counter()

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
        if self._progress is not None:
            self._progress.update(self._task, completed=step, status=self._status(flat))
        return flat

    def should_dump(self, step: int) -> bool:
        return self.sample_every > 0 and step % self.sample_every == 0

    def dump_samples(self, step: int, samples: Sequence[Any], limit: int = 8) -> str | None:
        """Write up to ``limit`` samples (trajectory records + rewards) and copy their images."""
        if not self.writer_enabled:
            return None
        out = os.path.join(self.workdir, "samples", f"step_{step:06d}")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "samples.jsonl"), "w", encoding="utf-8") as f:
            for s in list(samples)[:limit]:
                traj = s.extra.get("trajectory")
                image = s.extra.get("image_path")
                copied = None
                if image and os.path.exists(image):
                    copied = f"{s.sample_id}{os.path.splitext(image)[1] or '.png'}"
                    shutil.copyfile(image, os.path.join(out, copied))
                elif s.extra.get("image_bytes"):  # rendered on another host (train/multihost.py)
                    ext, data = s.extra["image_bytes"]
                    copied = f"{s.sample_id}{ext}"
                    with open(os.path.join(out, copied), "wb") as img:
                        img.write(data)
                record = {"sample_id": s.sample_id, "group": s.group, "request": s.request, "reward": s.reward,
                          "valid": s.valid, "mask_reason": s.mask_reason, "has_bundle": s.has_bundle,
                          "stats": s.stats, "image": copied,
                          "trajectory": traj.to_dict() if hasattr(traj, "to_dict") else None}
                f.write(json.dumps(record, default=str, ensure_ascii=False) + "\n")
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
