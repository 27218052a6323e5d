"""Host bookkeeping of the JaxEngine's cache rows: what each row holds, prefix matching, eviction.

Every slot of the engine's KV cache is *empty*, *live* (a request is decoding in it) or *parked*
(a finished conversation whose keys/values are kept for a request that continues it). A row's
contents are described by the token ids whose keys/values it holds from slot 0 on, the images among
them (by content key) and the weight version they were computed under; its device write position
may run past those tokens (a finished request's last token and whatever a decode chunk sampled
after it), and is reset when the row is next used.

A new request is *placed* by longest common prefix with any row of the current weights:

- a parked row the request continues entirely (an agent's next round) is taken over in place (of
  rows that match as far, it is preferred: a copy would evict a row for the same keys/values);
- otherwise the matched prefix is copied from its row (live or parked) into a free row: the K
  rollouts of one prompt prefill it once and copy it K − 1 times;
- without a match the request gets a free row and a fresh prefill.

Free rows are empty ones first, then parked ones, least recently used first (an eviction). At least
one token is always left to prefill (the next token's logits come from it), and a match never ends
inside an image's placeholder run nor covers an image whose content differs.

Placements come in *waves* that run as one batch of prefills: within a wave no row is both read
(a source) and written (a destination), and a request whose best source is written in the same
wave waits for the next one (the K − 1 copies of a group follow its first prefill).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Sequence

import numpy as np

DEFER = "defer"  # placement answer: the best source is being written in this wave


@dataclasses.dataclass
class Row:
    tokens: np.ndarray     # int32 ids whose keys/values the row holds from slot 0
    images: tuple          # content keys of the images among them, in placeholder order
    version: int           # weight version the keys/values were computed under
    last_used: int         # placement counter, for least-recently-used eviction
    live: bool
    device_length: int = 0  # the row's write position on the device


@dataclasses.dataclass(frozen=True)
class Placement:
    slot: int     # the row the request occupies
    source: int   # the row its first ``reuse`` slots come from (== slot in place; −1 for none)
    reuse: int    # tokens of the prompt whose keys/values are reused
    evicted: bool  # a parked conversation was dropped to make room


def image_key(image: Any) -> tuple:
    """Content key of an image as requests pass them (file path or PIL image)."""
    if isinstance(image, (str, os.PathLike)):
        st = os.stat(image)
        return ("path", os.fspath(image), st.st_mtime_ns, st.st_size)
    data = np.asarray(image)
    return ("array", data.shape, str(data.dtype), hashlib.sha1(np.ascontiguousarray(data).tobytes()).hexdigest())


def image_runs(tokens: np.ndarray, image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) of each run of image placeholder tokens (one run per image)."""
    is_img = np.concatenate([[False], np.asarray(tokens) == image_token_id, [False]])
    edges = np.flatnonzero(is_img[1:] != is_img[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def check_request(req, config, max_seq_len: int, image_grid) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """A request's prompt as an int32 array and its images' grids (``image_grid(image)``); a
    ValueError names what is wrong (checked before any row is given to it)."""
    prompt = np.asarray([int(t) for t in req.prompt_ids], np.int64)
    n = len(prompt)
    if n == 0:
        raise ValueError("prompt_ids is empty")
    if n >= max_seq_len:
        raise ValueError(f"prompt of {n} tokens leaves no room under engine.max_seq_len={max_seq_len}")
    vocab = config.text.vocab_size
    if prompt.min() < 0 or prompt.max() >= vocab:
        raise ValueError(f"prompt_ids hold ids outside [0, vocab_size={vocab}): min {prompt.min()}, max {prompt.max()}")
    runs = image_runs(prompt, config.image_token_id)
    if len(runs) != len(req.images):
        raise ValueError(f"{len(runs)} runs of image placeholder tokens but {len(req.images)} images")
    grids = [tuple(image_grid(x)) for x in req.images]
    merge2 = config.vision.spatial_merge_size ** 2
    for (a, b), g in zip(runs, grids):
        if b - a != int(np.prod(g)) // merge2:
            raise ValueError(f"an image placeholder run at token {a} has {b - a} tokens; its image needs "
                             f"{int(np.prod(g)) // merge2}")
    return prompt.astype(np.int32), grids


def next_position(prefix: np.ndarray, grids: Sequence[tuple[int, int, int]], config) -> int:
    """The rope position of the token after ``prefix`` (whose images have ``grids``): its length
    for text; after images positions are no token counts (rope.get_rope_index)."""
    if not grids:
        return len(prefix)
    from genevolve_jax.models.qwen3_vl import rope
    _, delta = rope.get_rope_index(np.asarray(prefix)[None], None, np.asarray(grids), None, None,
                                   spatial_merge_size=config.vision.spatial_merge_size,
                                   image_token_id=config.image_token_id, video_token_id=config.video_token_id)
    return len(prefix) + int(delta[0])


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


class RowPool:
    """The slot table; not thread-safe (the engine calls it under its device lock). The engine
    changes it only through its methods: placement, the device write position after a prefill or a
    decode chunk, the end of a request, new weights."""

    def __init__(self, n_slots: int, image_token_id: int, reuse: bool = True, version: int = 0):
        self.rows: list[Row | None] = [None] * n_slots
        self.image_token_id = image_token_id
        self.reuse = reuse
        self.version = version  # weight version of the rows placed from now on
        self.evictions = 0
        self._tick = 0
        self._sources: set[int] = set()
        self._targets: set[int] = set()

    # -- counts ------------------------------------------------------------------------------------
    @property
    def num_live(self) -> int:
        return sum(r is not None and r.live for r in self.rows)

    @property
    def num_parked(self) -> int:
        return sum(r is not None and not r.live for r in self.rows)

    def has_room(self) -> bool:
        return any(r is None or not r.live for r in self.rows)

    # -- placement ---------------------------------------------------------------------------------
    def begin_wave(self) -> None:
        self._sources.clear()
        self._targets.clear()

    def usable_prefix(self, prompt: np.ndarray, images: Sequence[tuple], row: Row) -> int:
        """Tokens of ``prompt`` whose keys/values ``row`` holds (0 for none), with at least one
        prompt token left over and no image run cut or changed."""
        m = min(common_prefix(prompt, row.tokens), len(prompt) - 1)
        for i, (start, end) in enumerate(image_runs(prompt, self.image_token_id)):
            if start >= m:
                break
            runs_on = end < len(row.tokens) and row.tokens[end] == self.image_token_id  # the row's is longer
            if end > m or runs_on or i >= len(images) or i >= len(row.images) or images[i] != row.images[i]:
                return start
        return max(m, 0)

    def place(self, prompt: Sequence[int], images: Sequence[tuple]) -> Placement | str | None:
        """Where a request goes: a :class:`Placement`, ``DEFER`` (wait for the next wave) or None
        (every row is live or taken in this wave)."""
        prompt = np.asarray(prompt, np.int32)
        best, reuse, in_place = -1, 0, False
        if self.reuse:
            for slot, row in enumerate(self.rows):
                if row is None or row.version != self.version:
                    continue
                m = self.usable_prefix(prompt, images, row)
                continues = not row.live and m == len(row.tokens)
                if m > reuse or (m == reuse > 0 and continues and not in_place):
                    best, reuse, in_place = slot, m, continues
        if best >= 0 and best in self._targets:
            return DEFER
        slot, evicted = -1, False
        if best >= 0:
            row = self.rows[best]
            if in_place:
                slot = best  # the request continues this conversation: take its row over
            else:
                slot, evicted = self._free_row(exclude={best})
                if slot < 0 and not row.live:
                    slot = best  # no other room: keep the shared prefix in place
        else:
            slot, evicted = self._free_row(exclude=set())
        if slot < 0:
            return None
        if best >= 0:
            self._sources.add(best)
            self.rows[best].last_used = self._next_tick()
        self._targets.add(slot)
        self.evictions += int(evicted)
        self.rows[slot] = Row(prompt, tuple(images), self.version, self._next_tick(), live=True)
        return Placement(slot, best if reuse else -1, reuse, evicted)

    def _free_row(self, exclude: set[int]) -> tuple[int, bool]:
        blocked = exclude | self._sources | self._targets
        for slot, row in enumerate(self.rows):
            if row is None and slot not in blocked:
                return slot, False
        parked = [(r.last_used, s) for s, r in enumerate(self.rows)
                  if r is not None and not r.live and s not in blocked]
        if not parked:
            return -1, False
        return min(parked)[1], True

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    # -- on the device -------------------------------------------------------------------------------
    def mark_prefilled(self, slot: int, length: int) -> None:
        """The request in ``slot`` was prefilled: the row's device write position is its prompt length."""
        self.rows[slot].device_length = int(length)

    def mark_decoded(self, slot: int, steps: int) -> None:
        """A decode chunk of ``steps`` ran over the row (it writes every step, even past a stop)."""
        self.rows[slot].device_length += int(steps)

    def device_length(self, slot: int) -> int:
        return self.rows[slot].device_length

    # -- after a request -----------------------------------------------------------------------------
    def finish(self, slot: int, fed_back: Sequence[int] | None) -> None:
        """The request in ``slot`` ended. ``fed_back``: the sampled tokens whose keys/values the row
        now holds after the prompt (all but the last sampled one, which no step has run), so the row
        is parked with the prompt and them; None (an aborted request) empties it. Rows of older
        weights are never parked."""
        row = self.rows[slot]
        if fed_back is None or not self.reuse or row.version != self.version:
            self.rows[slot] = None
            return
        held = np.concatenate([row.tokens, np.asarray(fed_back, np.int32)])
        row.tokens, row.live, row.last_used = held, False, self._next_tick()

    def drop_parked(self) -> int:
        """Forget every parked conversation (new weights make their keys/values stale)."""
        n = 0
        for slot, row in enumerate(self.rows):
            if row is not None and not row.live:
                self.rows[slot] = None
                n += 1
        return n

    def new_version(self, version: int) -> None:
        self.version = version
        self.drop_parked()
