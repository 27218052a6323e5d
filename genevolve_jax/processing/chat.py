"""Vision placeholders in Qwen3-VL prompts: building them, expanding them, checking them.

A chat turn shows an image as ``<|vision_start|><|image_pad|><|vision_end|>`` and a video as
``<|vision_start|><|video_pad|><|vision_end|>``. Before the model sees the prompt, each single pad
is expanded to as many pads as the vision tower will emit merged tokens:

- image with grid (t, h, w): t·h·w / merge² × ``<|image_pad|>``;
- video with grid (t, h, w): for each of its t temporal patches, the text ``<{seconds:.1f} seconds>``
  then ``<|vision_start|>``, h·w / merge² × ``<|video_pad|>``, ``<|vision_end|>``.

A video's whole chat-template placeholder, vision_start + pad + vision_end, is replaced by its
per-frame blocks, so no outer pair wraps them; a bare pad (no pair around it) is replaced alone.
That is the layout of Qwen3-VL's own processor (transformers 4.57 and up to 5.9, and again from
5.25); transformers 5.10–5.24 replaced only the pad and left an extra pair around every video.
The same expansion is offered on text and on token ids (the latter needs a text encoder for the
timestamps).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class VisionTokens:
    image_pad: str = "<|image_pad|>"
    video_pad: str = "<|video_pad|>"
    vision_start: str = "<|vision_start|>"
    vision_end: str = "<|vision_end|>"

    @property
    def image(self) -> str:
        """What the chat template writes for one image."""
        return self.vision_start + self.image_pad + self.vision_end

    @property
    def video(self) -> str:
        """What the chat template writes for one video."""
        return self.vision_start + self.video_pad + self.vision_end


TOKENS = VisionTokens()
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def _grids(grid_thw, name: str) -> np.ndarray:
    if grid_thw is None:
        return np.zeros((0, 3), np.int64)
    grid = np.asarray(grid_thw, dtype=np.int64)
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"{name} must have shape [n, 3], got {grid.shape}")
    return grid


def merged_tokens(grid_thw: Sequence[int], merge_size: int = 2) -> int:
    """Merged vision tokens for one grid (t, h, w): t·h·w / merge²."""
    t, h, w = (int(x) for x in grid_thw)
    if h % merge_size or w % merge_size:
        raise ValueError(f"grid {[t, h, w]}: h and w must be multiples of merge_size={merge_size}")
    return t * h * w // merge_size ** 2


def format_timestamp(seconds: float) -> str:
    return f"<{seconds:.1f} seconds>"


def image_expansion(grid_thw: Sequence[int], merge_size: int = 2, tokens: VisionTokens = TOKENS) -> str:
    return tokens.image_pad * merged_tokens(grid_thw, merge_size)


def video_expansion(grid_thw: Sequence[int], timestamps: Sequence[float], merge_size: int = 2,
                    tokens: VisionTokens = TOKENS) -> str:
    t, h, w = (int(x) for x in grid_thw)
    if len(timestamps) < t:
        raise ValueError(f"video grid {[t, h, w]} has {t} temporal patches but only {len(timestamps)} timestamps")
    per_frame = merged_tokens((1, h, w), merge_size)
    return "".join(format_timestamp(timestamps[i]) + tokens.vision_start + tokens.video_pad * per_frame
                   + tokens.vision_end for i in range(t))


def _video_timestamps(video_grid: np.ndarray, video_timestamps) -> list[Sequence[float]]:
    if len(video_grid) == 0:
        return []
    if video_timestamps is None:
        raise ValueError("videos need their per-temporal-patch timestamps (see processing.image.frame_timestamps)")
    if len(video_timestamps) != len(video_grid):
        raise ValueError(f"got {len(video_timestamps)} timestamp lists for {len(video_grid)} videos")
    return list(video_timestamps)


def expand_text(text: str | list[str], image_grid_thw=None, video_grid_thw=None, video_timestamps=None,
                merge_size: int = 2, tokens: VisionTokens = TOKENS) -> str | list[str]:
    """Replace the i-th image pad (video pad) across the batch with image (video) i's expansion."""
    texts = [text] if isinstance(text, str) else list(text)
    image_grid = _grids(image_grid_thw, "image_grid_thw")
    video_grid = _grids(video_grid_thw, "video_grid_thw")
    stamps = _video_timestamps(video_grid, video_timestamps)
    n_img = sum(t.count(tokens.image_pad) for t in texts)
    n_vid = sum(t.count(tokens.video_pad) for t in texts)
    if n_img != len(image_grid):
        raise ValueError(f"the text has {n_img} {tokens.image_pad} placeholders but {len(image_grid)} images were given")
    if n_vid != len(video_grid):
        raise ValueError(f"the text has {n_vid} {tokens.video_pad} placeholders but {len(video_grid)} videos were given")
    images = iter([image_expansion(g, merge_size, tokens) for g in image_grid])
    videos = iter([video_expansion(g, s, merge_size, tokens) for g, s in zip(video_grid, stamps)])
    # The wrapped video first, so that its pair goes with the pad; then a bare pad of either kind.
    pattern = re.compile("|".join(re.escape(x) for x in (tokens.video, tokens.image_pad, tokens.video_pad)))

    def replace(match: re.Match) -> str:
        return next(images) if match.group() == tokens.image_pad else next(videos)

    out = [pattern.sub(replace, t) for t in texts]
    return out[0] if isinstance(text, str) else out


@dataclasses.dataclass(frozen=True)
class VisionTokenIds:
    image_pad: int
    video_pad: int
    vision_start: int
    vision_end: int

    @classmethod
    def from_config(cls, config) -> "VisionTokenIds":
        """From a Qwen3VLConfig (image_token_id, video_token_id, vision_start/end_token_id)."""
        return cls(config.image_token_id, config.video_token_id, config.vision_start_token_id,
                   config.vision_end_token_id)


def expand_ids(ids: Sequence[int], ids_of: VisionTokenIds, image_grid_thw=None, video_grid_thw=None,
               video_timestamps=None, merge_size: int = 2,
               encode_text: Callable[[str], Sequence[int]] | None = None) -> np.ndarray:
    """Token-id version of :func:`expand_text` for one sequence; ``encode_text`` tokenises a
    timestamp (no special tokens added)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    image_grid = _grids(image_grid_thw, "image_grid_thw")
    video_grid = _grids(video_grid_thw, "video_grid_thw")
    stamps = _video_timestamps(video_grid, video_timestamps)
    n_img, n_vid = int((ids == ids_of.image_pad).sum()), int((ids == ids_of.video_pad).sum())
    if n_img != len(image_grid):
        raise ValueError(f"the token ids have {n_img} image_pad ({ids_of.image_pad}) placeholders but "
                         f"{len(image_grid)} images were given")
    if n_vid != len(video_grid):
        raise ValueError(f"the token ids have {n_vid} video_pad ({ids_of.video_pad}) placeholders but "
                         f"{len(video_grid)} videos were given")
    if n_vid and encode_text is None:
        raise ValueError("expanding a video needs encode_text to tokenise its timestamps")
    pieces: list[np.ndarray] = []
    start, i_img, i_vid = 0, 0, 0
    for pos in np.flatnonzero((ids == ids_of.image_pad) | (ids == ids_of.video_pad)):
        # A wrapped video pad takes its vision_start/vision_end pair with it (module docstring).
        wrapped = int(bool(ids[pos] == ids_of.video_pad and start < pos and ids[pos - 1] == ids_of.vision_start
                           and pos + 1 < len(ids) and ids[pos + 1] == ids_of.vision_end))
        pieces.append(ids[start:pos - wrapped])
        start = pos + 1 + wrapped
        if ids[pos] == ids_of.image_pad:
            pieces.append(np.full(merged_tokens(image_grid[i_img], merge_size), ids_of.image_pad, np.int64))
            i_img += 1
        else:
            t, h, w = (int(x) for x in video_grid[i_vid])
            if len(stamps[i_vid]) < t:
                raise ValueError(f"video {i_vid} has {t} temporal patches but {len(stamps[i_vid])} timestamps")
            frame = np.full(merged_tokens((1, h, w), merge_size), ids_of.video_pad, np.int64)
            for k in range(t):
                pieces.append(np.asarray(encode_text(format_timestamp(stamps[i_vid][k])), np.int64))
                pieces.append(np.array([ids_of.vision_start], np.int64))
                pieces.append(frame)
                pieces.append(np.array([ids_of.vision_end], np.int64))
            i_vid += 1
    pieces.append(ids[start:])
    return np.concatenate(pieces)


def mm_token_type_ids(ids, ids_of: VisionTokenIds) -> np.ndarray:
    """0 for text, 1 for image pads, 2 for video pads (transformers 5.x's ``mm_token_type_ids``)."""
    ids = np.asarray(ids)
    return np.where(ids == ids_of.image_pad, 1, np.where(ids == ids_of.video_pad, 2, 0)).astype(np.int32)


def check_placeholder_counts(ids, ids_of: VisionTokenIds, image_grid_thw=None, video_grid_thw=None,
                             merge_size: int = 2) -> None:
    """Fail before any compute when expanded token ids and the vision grids disagree.

    ``ids`` may be one sequence or a batch [B, L]; images/videos are numbered across the batch.
    """
    ids = np.asarray(ids)
    image_grid = _grids(image_grid_thw, "image_grid_thw")
    video_grid = _grids(video_grid_thw, "video_grid_thw")
    for name, token, grid in (("image", ids_of.image_pad, image_grid), ("video", ids_of.video_pad, video_grid)):
        have = int((ids == token).sum())
        want = sum(merged_tokens(g, merge_size) for g in grid)
        if have != want:
            raise ValueError(f"{have} {name} pad tokens in input_ids but {name}_grid_thw {grid.tolist()} gives "
                             f"{want} merged {name} tokens (t·h·w / merge²)")


# --- chat rendering -------------------------------------------------------------------------------
def content_to_text(content: str | Iterable[Mapping], tokens: VisionTokens = TOKENS) -> str:
    """A message's content (a string, or a list of {"type": "text"|"image"|"video", ...} parts) as
    prompt text with one placeholder per image/video, in order."""
    if isinstance(content, str):
        return content
    out = []
    for i, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            out.append(str(part.get("text", "")))
        elif kind == "image" or (kind is None and "image" in part):
            out.append(tokens.image)
        elif kind == "video" or (kind is None and "video" in part):
            out.append(tokens.video)
        else:
            raise ValueError(f"content part {i} has unknown type {kind!r}; expected text, image or video")
    return "".join(out)


def render_messages(messages: Sequence[Mapping], add_generation_prompt: bool = True,
                    tokens: VisionTokens = TOKENS) -> str:
    """ChatML as Qwen3-VL uses it: ``<|im_start|>role\\n…<|im_end|>\\n`` per message, with vision
    placeholders in place of image/video parts, then ``<|im_start|>assistant\\n`` if asked."""
    out = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message {i} has role {role!r}; expected system, user or assistant")
        out.append(f"{IM_START}{role}\n{content_to_text(message.get('content', ''), tokens)}{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)
