"""Qwen3-VL image and video preprocessing in numpy (+ PIL for the resize).

Images follow transformers' PIL image processor for Qwen3-VL bit for bit: RGB conversion (alpha
composited onto white), smart_resize to multiples of patch·merge = 32 within [min_pixels,
max_pixels], PIL BICUBIC on uint8, rescale by 1/255 in float64 then float32, normalise with
mean = std = 0.5 in float32, and patchify in merge-block order. An image is one temporal patch: its
frame is repeated temporal_patch_size times, so grid_thw = (1, h, w).

Videos are lists of frames of one size. Frames are resized with the video processor's smart_resize
(the pixel budget counts every frame), padded in time by repeating the last frame up to a multiple
of temporal_patch_size, normalised with the video processor's fused arithmetic ((x − 127.5) / 127.5
in float32) and patchified to [t·h·w, C·T·P·P] with grid_thw = (t, h, w). transformers resizes video
frames with torchvision; we resize with PIL's BICUBIC like the image path (torchvision is not
installable beside our CPU torch), so video pixels can differ from transformers' by the two
libraries' bicubic rounding, not in layout or arithmetic.
"""
from __future__ import annotations

import dataclasses
import io
import math
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

# The values shipped in Qwen3-VL checkpoints (preprocessor_config.json / video_preprocessor_config.json).
IMAGE_MIN_PIXELS = 65536          # 256 × 256
IMAGE_MAX_PIXELS = 16777216       # 4096 × 4096
VIDEO_MIN_PIXELS = 4096
VIDEO_MAX_PIXELS = 25165824       # summed over the frames of one video
MAX_ASPECT_RATIO = 200


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = IMAGE_MIN_PIXELS
    max_pixels: int = IMAGE_MAX_PIXELS
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    def __post_init__(self):
        validate(self)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


@dataclasses.dataclass(frozen=True)
class VideoProcessorConfig(ImageProcessorConfig):
    min_pixels: int = VIDEO_MIN_PIXELS
    max_pixels: int = VIDEO_MAX_PIXELS
    fps: float = 2.0                  # frames sampled per second of video
    min_frames: int = 4
    max_frames: int = 768
    # qwen-vl-utils' per-frame pixel cap; transformers 5.x still defaults to off.
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 768

    def __post_init__(self):
        validate(self)


def validate(cfg: ImageProcessorConfig) -> None:
    """Reject impossible settings with an error naming the field."""
    for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
        value = getattr(cfg, name)
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{type(cfg).__name__}.{name} must be a positive integer, got {value!r}")
    if cfg.min_pixels > cfg.max_pixels:
        raise ValueError(f"{type(cfg).__name__}.min_pixels ({cfg.min_pixels}) must be <= max_pixels "
                         f"({cfg.max_pixels})")
    for name in ("image_mean", "image_std"):
        if len(getattr(cfg, name)) != 3:
            raise ValueError(f"{type(cfg).__name__}.{name} must have 3 entries (RGB), got {getattr(cfg, name)!r}")
    if any(s == 0 for s in cfg.image_std):
        raise ValueError(f"{type(cfg).__name__}.image_std must be non-zero, got {cfg.image_std!r}")
    if not cfg.rescale_factor > 0:
        raise ValueError(f"{type(cfg).__name__}.rescale_factor must be > 0, got {cfg.rescale_factor!r}")
    if isinstance(cfg, VideoProcessorConfig):
        if not cfg.fps > 0:
            raise ValueError(f"VideoProcessorConfig.fps must be > 0, got {cfg.fps!r}")
        if not 1 <= cfg.min_frames <= cfg.max_frames:
            raise ValueError(f"VideoProcessorConfig.min_frames ({cfg.min_frames}) must be in [1, max_frames="
                             f"{cfg.max_frames}]")
        if cfg.max_video_tokens < 1:
            raise ValueError(f"VideoProcessorConfig.max_video_tokens must be >= 1, got {cfg.max_video_tokens}")


class ProcessedImages(NamedTuple):
    pixel_values: np.ndarray     # float32 [Σ h·w, C·T·P·P]
    image_grid_thw: np.ndarray   # int64 [n_images, 3]


class ProcessedVideos(NamedTuple):
    pixel_values_videos: np.ndarray  # float32 [Σ t·h·w, C·T·P·P]
    video_grid_thw: np.ndarray       # int64 [n_videos, 3]


# --- sizes ----------------------------------------------------------------------------------------
def _check_aspect(height: int, width: int) -> None:
    if min(height, width) < 1:
        raise ValueError(f"image size {height}x{width} has an empty side")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image {height}x{width}: aspect ratio must be at most {MAX_ASPECT_RATIO}, got "
                         f"{max(height, width) / min(height, width):.1f}")


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = IMAGE_MIN_PIXELS,
                 max_pixels: int = IMAGE_MAX_PIXELS) -> tuple[int, int]:
    """The (height, width) an image is resized to: multiples of ``factor``, the aspect ratio kept as
    well as rounding allows, and h·w inside [min_pixels, max_pixels] (shrunk or grown by √ratio)."""
    _check_aspect(height, width)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_video(num_frames: int, height: int, width: int, temporal_factor: int = 2, factor: int = 32,
                       min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = VIDEO_MAX_PIXELS) -> tuple[int, int]:
    """The frame size of a video: like :func:`smart_resize`, but the budget counts all frames and a
    side shorter than ``factor`` is first scaled up to it."""
    if num_frames < temporal_factor:
        raise ValueError(f"a video needs at least temporal_patch_size={temporal_factor} frames, got {num_frames}")
    if min(height, width) < 1:
        raise ValueError(f"video frame size {height}x{width} has an empty side")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    _check_aspect(height, width)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# --- decoding ---------------------------------------------------------------------------------------
def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` in mode RGB as transformers' image processors convert it (``convert_to_rgb``): an
    image with an alpha band or a ``transparency`` entry (RGBA, LA, PA, a palette or grayscale image
    with a transparent colour) is composited onto white; any other mode (P, L, I;16, I, F, 1, CMYK,
    YCbCr, …) goes through PIL's ``convert("RGB")``."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(source) -> Image.Image:
    """The one image decoder of a run: a file path, encoded bytes or a PIL image → a loaded RGB PIL
    image (:func:`to_rgb`). The engine's prefill, batch assembly and the multi-host exchange all
    decode through it, so that a rollout's image is the same pixels when it is sampled and when it is
    trained on (``Image.open(...).convert("RGB")`` in the engine once dropped alpha that the trainer
    composited onto white). No EXIF rotation, as transformers' processor applies none to an image it
    is given. Raises OSError (unreadable, truncated) or ValueError like PIL."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    with Image.open(source) as image:
        image.load()
        rgb = to_rgb(image)
        return rgb.copy() if rgb is image else rgb   # not the file's own object: the file closes here


# --- pixels ---------------------------------------------------------------------------------------
def to_rgb_array(image) -> np.ndarray:
    """A PIL image or a uint8 array ([H, W], [H, W, 1|3|4]) as uint8 [H, W, 3]; transparency is
    composited onto white, as transformers does (:func:`to_rgb`)."""
    if isinstance(image, Image.Image):
        return np.array(to_rgb(image))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 [H, W, C] in 0..255, got dtype {array.dtype}; "
                         "convert float images explicitly so their range is not guessed")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image arrays must have shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {array.shape}")
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        alpha = array[..., 3:4] / 255
        return np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return array


def resize_bicubic(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] → uint8 [height, width, 3] with PIL's BICUBIC filter."""
    return np.array(Image.fromarray(rgb).resize((width, height), resample=Image.Resampling.BICUBIC))


def normalize_image(rgb: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    """uint8 [H, W, 3] → float32 [3, H, W]: rescale in float64, cast, then (x − mean) / std in float32."""
    x = (rgb.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.asarray(cfg.image_mean, np.float32)
    std = np.asarray(cfg.image_std, np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1))


def normalize_video(frames: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    """uint8 [T, H, W, 3] → float32 [T, 3, H, W] with the video processor's fused rescale+normalise:
    (x − mean/scale) / (std/scale) in float32."""
    mean = (np.asarray(cfg.image_mean, np.float32) * np.float32(1.0 / cfg.rescale_factor)).astype(np.float32)
    std = (np.asarray(cfg.image_std, np.float32) * np.float32(1.0 / cfg.rescale_factor)).astype(np.float32)
    x = (frames.astype(np.float32) - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def patchify(frames: np.ndarray, cfg: ImageProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """float [T, C, H, W] (T a multiple of temporal_patch_size) → ([t·h·w, C·T·P·P], (t, h, w)).

    Rows are ordered frame-major, then merge block (row-major over blocks), then the merge² patches
    inside a block; each row is laid out (C, T, P, P) like the Conv3d weight it meets.
    """
    n_frames, channels, height, width = frames.shape
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    if n_frames % tp or height % (p * m) or width % (p * m):
        raise ValueError(f"patchify needs frames % {tp} == 0 and H, W multiples of {p * m}; got {frames.shape}")
    t, h, w = n_frames // tp, height // p, width // p
    x = frames.reshape(t, tp, channels, h // m, m, p, w // m, m, p)
    # → (t, h/m, w/m, m_row, m_col, C, T, P_row, P_col)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(t * h * w, channels * tp * p * p)), (t, h, w)


# --- images ---------------------------------------------------------------------------------------
def preprocess_image(image, cfg: ImageProcessorConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One image → (pixel_values [h·w, C·T·P·P] float32, grid_thw [3] int64 = (1, h, w))."""
    cfg = cfg or ImageProcessorConfig()
    rgb = to_rgb_array(image)
    height, width = smart_resize(rgb.shape[0], rgb.shape[1], cfg.factor, cfg.min_pixels, cfg.max_pixels)
    chw = normalize_image(resize_bicubic(rgb, height, width), cfg)
    # An image fills a whole temporal patch: the same frame temporal_patch_size times.
    frames = np.broadcast_to(chw[None], (cfg.temporal_patch_size, *chw.shape))
    patches, grid = patchify(frames, cfg)
    return patches, np.asarray(grid, np.int64)


def preprocess_images(images: Sequence, cfg: ImageProcessorConfig | None = None) -> ProcessedImages:
    """Several images, concatenated in order (the layout the vision tower and the chat expect)."""
    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    return ProcessedImages(*_concatenated(images, preprocess_image, cfg, "image"))


def _concatenated(items: Sequence, one, cfg, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(patches of every item concatenated, grids stacked); an error names the item that failed."""
    if len(items) == 0:
        raise ValueError(f"preprocess_{kind}s got no {kind}s")
    patches, grids = [], []
    for i, item in enumerate(items):
        try:
            p, g = one(item, cfg)
        except ValueError as e:
            raise ValueError(f"{kind} {i}: {e}") from None
        patches.append(p)
        grids.append(g)
    return np.concatenate(patches), np.stack(grids)


def image_grid(height: int, width: int, cfg: ImageProcessorConfig | None = None) -> tuple[int, int, int]:
    """The grid_thw an image of this size will get, without touching pixels."""
    cfg = cfg or ImageProcessorConfig()
    h, w = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return 1, h // cfg.patch_size, w // cfg.patch_size


# --- videos ---------------------------------------------------------------------------------------
def _frames_array(frames) -> np.ndarray:
    if isinstance(frames, np.ndarray) and frames.ndim == 4:
        frames = list(frames)
    if len(frames) == 0:
        raise ValueError("a video needs at least one frame, got none")
    arrays = [to_rgb_array(f) for f in frames]
    for i, a in enumerate(arrays):
        if a.shape != arrays[0].shape:
            raise ValueError(f"video frame {i} has size {a.shape[:2]}, frame 0 has {arrays[0].shape[:2]}; "
                             "all frames of a video must have one size")
    return np.stack(arrays)


def video_frame_size(num_frames: int, height: int, width: int, cfg: VideoProcessorConfig) -> tuple[int, int]:
    max_pixels = cfg.max_pixels
    if cfg.cap_pixels_per_frame:
        # qwen-vl-utils: each frame gets at most max_video_tokens patches or its share of the budget.
        per_frame = max(min(cfg.max_video_tokens * cfg.factor ** 2, cfg.max_pixels // num_frames),
                        int(cfg.min_pixels * 1.05))
        max_pixels = per_frame * num_frames
    return smart_resize_video(num_frames, height, width, cfg.temporal_patch_size, cfg.factor,
                              cfg.min_pixels, max_pixels)


def preprocess_video(frames, cfg: VideoProcessorConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One video (a sequence of same-size frames) → (pixel_values [t·h·w, C·T·P·P], grid_thw (t, h, w))."""
    cfg = cfg or VideoProcessorConfig()
    video = _frames_array(frames)
    n, height, width = video.shape[:3]
    new_h, new_w = video_frame_size(n, height, width, cfg)
    resized = np.stack([resize_bicubic(f, new_h, new_w) for f in video])
    x = normalize_video(resized, cfg)
    if pad := -n % cfg.temporal_patch_size:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    patches, grid = patchify(x, cfg)
    return patches, np.asarray(grid, np.int64)


def preprocess_videos(videos: Sequence, cfg: VideoProcessorConfig | None = None) -> ProcessedVideos:
    return ProcessedVideos(*_concatenated(videos, preprocess_video, cfg, "video"))


def sample_frame_indices(total_frames: int, video_fps: float | None, cfg: VideoProcessorConfig | None = None,
                         num_frames: int | None = None) -> np.ndarray:
    """Which frames of a decoded video to keep: cfg.fps per second (or exactly ``num_frames``),
    clamped to [min_frames, max_frames] and to the video's length, spread uniformly."""
    cfg = cfg or VideoProcessorConfig()
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if num_frames is None:
        fps = 24.0 if video_fps is None else float(video_fps)
        num_frames = int(total_frames / fps * cfg.fps)
        num_frames = min(max(num_frames, cfg.min_frames), cfg.max_frames, total_frames)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return np.linspace(0, total_frames - 1, num_frames).round().astype(int)


def frame_timestamps(frame_indices: Sequence[int], video_fps: float,
                     temporal_patch_size: int = 2) -> list[float]:
    """Seconds of each temporal patch: the mean of its first and last frame's time (the last frame
    repeated as padding, like the pixels)."""
    if not video_fps > 0:
        raise ValueError(f"video_fps must be > 0, got {video_fps}")
    idx = [int(i) for i in frame_indices]
    if not idx:
        raise ValueError("frame_timestamps got no frame indices")
    idx += [idx[-1]] * (-len(idx) % temporal_patch_size)
    times = [i / video_fps for i in idx]
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]
