"""RL prompt pools (the GenEvolve-Data ``rl`` layout) as a grain pipeline of per-step prompt batches.

A row is ``{"question": str, "gt_image": path | {bytes, path}, "meta": {…} | JSON string, …}``; an
``id`` column is used when present (else the row's ``file:line``), and every other column (category,
difficulty, extra_info, …) is kept under ``extra``. Rows are validated when read: a malformed one
(bad JSON, no question, a missing GT image, meta that is not an object) is reported with its file and
line, then skipped and counted or fatal (``data.skip_malformed``).

Per host: shuffle (a fresh permutation every epoch from one seed, the same on every host) → repeat
(``num_epochs``, 0 = forever) → host shard → batches of ``prompts_per_step / shards`` prompt dicts.
The iterator's ``get_state``/``set_state`` resume exactly where a checkpoint left off.
"""
from __future__ import annotations

import abc
import dataclasses
import json
import os
from typing import Any, Sequence

import grain

from genevolve_jax.data.config import validate
from genevolve_jax.data.rows import MalformedReport, RowProblem, image_file, load_rows, per_host, shard, shard_options


@dataclasses.dataclass(frozen=True)
class PromptRow:
    id: str
    question: str
    gt_image: str | None
    meta: dict
    extra: dict
    source: str     # "file:line" of the row

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_prompt_row(row: dict, where: str, *, image_root: str = "", require_gt_image: bool = True,
                     image_cache_dir: str | None = None) -> PromptRow:
    question = row.get("question")
    if question is None:
        raise RowProblem("missing field: 'question'")
    if not isinstance(question, str) or not question.strip():
        raise RowProblem("bad field: 'question' must be a non-empty string")
    root = image_root or os.path.dirname(os.path.abspath(where.rsplit(":", 1)[0]))
    gt = row.get("gt_image")
    if gt in (None, "", {}):
        if require_gt_image:
            raise RowProblem("missing field: 'gt_image'")
        gt_path = None
    else:
        gt_path = image_file(gt, root, image_cache_dir)
    meta: Any = row.get("meta")
    if meta is None:
        meta = {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta) if meta.strip() else {}
        except json.JSONDecodeError as exc:
            raise RowProblem(f"bad field: 'meta' is a string but not JSON ({exc.msg})") from None
    if not isinstance(meta, dict):
        raise RowProblem(f"bad field: 'meta' must be an object, got {type(meta).__name__}")
    row_id = row.get("id")
    row_id = where if row_id is None or row_id == "" else str(row_id)
    extra = {k: v for k, v in row.items() if k not in ("id", "question", "gt_image", "meta")
             and not isinstance(v, (bytes, bytearray))}
    return PromptRow(row_id, question, gt_path, meta, extra, where)


def load_prompt_rows(paths: Sequence[str], *, fmt: str = "auto", image_root: str = "", require_gt_image: bool = True,
                     image_cache_dir: str | None = None, skip_malformed: bool = False,
                     report: MalformedReport | None = None) -> list[PromptRow]:
    def parse(row: dict, where: str) -> PromptRow:
        return parse_prompt_row(row, where, image_root=image_root, require_gt_image=require_gt_image,
                                image_cache_dir=image_cache_dir)

    return load_rows(paths, parse, fmt=fmt, skip_malformed=skip_malformed, report=report)


class PromptPool:
    """The prompt pool of one host. ``iterator()`` yields lists of ``prompts_per_host`` prompt dicts
    (PromptRow fields plus ``epoch``) and is checkpointable (``get_state()`` / ``set_state()``)."""

    def __init__(self, data_cfg):
        validate(data_cfg)
        r = data_cfg.rl
        if not r.paths:
            raise ValueError("data.rl.paths is empty: give the prompt-pool JSONL/parquet files")
        self.cfg = data_cfg
        self.report = MalformedReport()
        cache = r.image_cache_dir or os.path.join(os.path.dirname(os.path.abspath(r.paths[0])), ".gt_image_cache")
        self.rows = load_prompt_rows(list(r.paths), fmt=r.format, image_root=r.image_root,
                                     require_gt_image=r.require_gt_image, image_cache_dir=cache,
                                     skip_malformed=data_cfg.skip_malformed, report=self.report)
        self.shard_options = shard_options(data_cfg)
        self.prompts_per_host = per_host(r.prompts_per_step, self.shard_options, "data.rl.prompts_per_step")
        # Every host must be able to fill one batch from one epoch's share.
        if len(self.rows) // self.shard_options.shard_count < self.prompts_per_host:
            raise ValueError(f"the prompt pool has {len(self.rows)} usable rows ({self.report.skipped} skipped), "
                             f"too few for {self.prompts_per_host} prompts per step on each of "
                             f"{self.shard_options.shard_count} hosts")

    def _with_epoch(self, index_and_row: tuple[int, PromptRow]) -> dict:
        index, row = index_and_row
        return {**row.to_dict(), "epoch": index // len(self.rows)}

    def prompts(self) -> grain.MapDataset:
        """This host's prompts in sampling order (infinite when num_epochs is 0)."""
        r = self.cfg.rl
        epochs = r.num_epochs or None
        ordered = grain.MapDataset.source(self.rows).shuffle(seed=r.seed).repeat(epochs)
        # The global position tells the epoch: the shuffle's permutation changes with it.
        ds = grain.MapDataset.range(len(ordered)).map(lambda i: (i, ordered[i]))
        ds = shard(ds, self.shard_options, finite=epochs is not None)
        return ds.map(self._with_epoch)

    def dataset(self) -> grain.IterDataset:
        read = grain.ReadOptions(num_threads=self.cfg.read_threads, prefetch_buffer_size=self.cfg.prefetch_buffer_size)
        return self.prompts().to_iter_dataset(read).batch(self.prompts_per_host, drop_remainder=True, batch_fn=list)

    def iterator(self) -> grain.DatasetIterator:
        return iter(self.dataset())

    def summary(self) -> dict:
        return {"rows": len(self.rows), "malformed": self.report.to_dict(), "prompts_per_host": self.prompts_per_host}


class PromptSource(abc.ABC):
    """An endless, checkpointable iterator of a step's prompts (this host's share of them)."""

    @abc.abstractmethod
    def __next__(self) -> list[Any]:
        """This host's prompts of the next step."""

    def __iter__(self):
        return self

    @property
    @abc.abstractmethod
    def shard(self) -> tuple[int, int]:
        """(index, count) of this host's share: it reads global prompts index, index + count, …"""

    @abc.abstractmethod
    def get_state(self) -> dict:
        """JSON-able position, for checkpoints."""

    @abc.abstractmethod
    def set_state(self, state: dict) -> None:
        """Resume at :meth:`get_state`'s position."""


class PoolPrompts(PromptSource):
    """The trainer's prompt source over a :class:`PromptPool`: this host's shard (``data.sharding``)
    of each step's prompts, checkpointable through grain's iterator state."""

    def __init__(self, data_cfg):
        options = shard_options(data_cfg)
        self._shard = (int(options.shard_index), int(options.shard_count))
        self.iterator = PromptPool(data_cfg).iterator()

    def __next__(self) -> list:
        return next(self.iterator)

    @property
    def shard(self) -> tuple[int, int]:
        return self._shard

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, state: dict) -> None:
        self.iterator.set_state(state)
