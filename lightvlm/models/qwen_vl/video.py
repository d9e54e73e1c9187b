"""Qwen-VL video arithmetic: which frames to take, the size they are resized to, the timestamps Qwen3-VL
writes, as transformers' video processors compute them (Qwen2VLVideoProcessor serves Qwen2-VL and
Qwen2.5-VL, Qwen3VLVideoProcessor Qwen3-VL). No torch (the httpserver lays videos out).

The two styles differ in how they sample (Qwen2: every total / n frames from the first; Qwen3: n frames
spread evenly from the first to the last, at least `min_frames`), in how they bound a frame's pixels
(Qwen2: each frame within [min_pixels, max_pixels]; Qwen3: all frames together within max_pixels) and
in the prompt (Qwen2: one span of t temporal patches; Qwen3: one span per temporal patch, each after
its timestamp).
"""

import math
from dataclasses import dataclass

import numpy as np

from lightvlm.models.video import (
    FrameSettings,
    VideoRequestError,
    VideoSampling,
    read_frame_settings,
    torch_arange,
)

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class StyleDefaults:
    """transformers' class defaults of the style's video processor."""

    min_pixels: int
    max_pixels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    do_sample_frames: bool
    fps: float | None
    max_video_tokens: int


STYLES = {
    "qwen2": StyleDefaults(128 * 28 * 28, 28 * 28 * 768, CLIP_MEAN, CLIP_STD, False, None, 128000),
    "qwen3": StyleDefaults(128 * 32 * 32, 32 * 32 * 768, HALF, HALF, True, 2, 768),
}
STYLE_OF = {"qwen2_vl": "qwen2", "qwen2_5_vl": "qwen2", "qwen3_vl": "qwen3"}


@dataclass(frozen=True)
class QwenVideoSettings:
    style: str  # a key of STYLES
    min_pixels: int
    max_pixels: int
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_frames: int
    max_frames: int
    do_sample_frames: bool
    fps: float | None  # the default sampling (when do_sample_frames)
    num_frames: int | None
    cap_pixels_per_frame: bool
    max_video_tokens: int
    frames: FrameSettings

    @classmethod
    def read(cls, variant: str, pre: dict) -> "QwenVideoSettings":
        style = STYLE_OF[variant]
        defaults = STYLES[style]
        size = pre.get("size") or {}
        low, high = size.get("shortest_edge") or defaults.min_pixels, size.get("longest_edge") or defaults.max_pixels
        if style == "qwen2":  # Qwen2VLVideoProcessor lets min_pixels / max_pixels override the size
            low, high = pre.get("min_pixels") or low, pre.get("max_pixels") or high
        return cls(style=style, min_pixels=int(low), max_pixels=int(high), patch_size=pre.get("patch_size") or (
            16 if style == "qwen3" else 14), merge_size=pre.get("merge_size") or 2,
            temporal_patch_size=pre.get("temporal_patch_size") or 2, min_frames=pre.get("min_frames") or 4,
            max_frames=pre.get("max_frames") or 768,
            do_sample_frames=pre.get("do_sample_frames", defaults.do_sample_frames) is True,
            fps=pre.get("fps", defaults.fps), num_frames=pre.get("num_frames"),
            cap_pixels_per_frame=pre.get("cap_pixels_per_frame") is True,
            max_video_tokens=pre.get("max_video_tokens") or defaults.max_video_tokens,
            frames=read_frame_settings(pre, defaults.mean, defaults.std))

    def describe(self) -> str:
        return (f"qwen_vl video {self.style} pixels={self.min_pixels}-{self.max_pixels} patch={self.patch_size} "
                f"merge={self.merge_size} temporal={self.temporal_patch_size} cap={self.cap_pixels_per_frame} "
                f"tokens={self.max_video_tokens} {self.frames.describe()}")

    # -- which frames ----------------------------------------------------------------------------

    def sample(self, total: int, video_fps: float | None, sampling: VideoSampling) -> np.ndarray | None:
        """Frame indices to take, or None for all of them (transformers without do_sample_frames)."""
        fps, num_frames = sampling.fps, sampling.num_frames
        if sampling.is_default:
            if not self.do_sample_frames:
                return None
            fps, num_frames = (None, self.num_frames) if self.num_frames is not None else (self.fps, None)
        return (self._sample_qwen3 if self.style == "qwen3" else self._sample_qwen2)(total, video_fps, fps, num_frames)

    def _sample_qwen2(self, total: int, video_fps: float | None, fps, num_frames) -> np.ndarray | None:
        tps = self.temporal_patch_size
        if num_frames is not None:
            num_frames = round(num_frames / tps) * tps
        elif fps is not None:
            if video_fps is None:
                raise VideoRequestError("sampling by fps needs the video's frame rate, which these frames do not say")
            max_frames = math.floor(min(self.max_frames, total) / tps) * tps
            num_frames = min(max(total / video_fps * fps, self.min_frames), max_frames, total)
            num_frames = math.floor(num_frames / tps) * tps
        if num_frames is None:
            return None
        if num_frames > total:
            raise VideoRequestError(f"cannot sample {num_frames} frames from a video of {total} frames; ask for "
                                    "fewer frames or a lower fps")
        if num_frames == 0:
            raise VideoRequestError(f"the sampling settings select no frame of this video of {total} frames; ask for "
                                    "more frames or a higher fps")
        return torch_arange(0, total, total / num_frames)

    def _sample_qwen3(self, total: int, video_fps: float | None, fps, num_frames) -> np.ndarray:
        if num_frames is None and fps is not None:
            video_fps = 24 if video_fps is None else video_fps  # transformers' assumption for frames without a rate
            num_frames = int(total / video_fps * fps)
            num_frames = min(max(num_frames, self.min_frames), self.max_frames, total)
        if num_frames is None:
            num_frames = min(max(total, self.min_frames), self.max_frames)
        return np.linspace(0, total - 1, num_frames).round().astype(int)

    # -- their size ------------------------------------------------------------------------------

    def frame_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        """(height, width) every frame is resized to (the video processors' smart_resize)."""
        factor = self.patch_size * self.merge_size
        if self.style == "qwen3":
            return self._size_qwen3(num_frames, height, width, factor)
        max_pixels = self.max_pixels
        if self.cap_pixels_per_frame:  # an even share of the whole video's budget
            total = int(self.max_video_tokens * factor * factor * 0.9)
            max_pixels = max(min(max_pixels, total * self.temporal_patch_size // num_frames),
                             int(self.min_pixels * 1.05))
        return smart_resize(height, width, factor, self.min_pixels, max_pixels)

    def _size_qwen3(self, num_frames: int, height: int, width: int, factor: int) -> tuple[int, int]:
        tps = self.temporal_patch_size
        max_pixels = self.max_pixels
        if self.cap_pixels_per_frame:
            per_frame = max(min(self.max_video_tokens * factor * factor, self.max_pixels // num_frames),
                            int(self.min_pixels * 1.05))
            max_pixels = per_frame * num_frames
        if num_frames < tps:
            raise VideoRequestError(f"Qwen3-VL takes videos of at least {tps} frames; this one gives {num_frames}")
        if height < factor or width < factor:
            scale = max(factor / height, factor / width)
            height, width = int(height * scale), int(width * scale)
        check_aspect(height, width)
        h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
        t_bar = round(num_frames / tps) * tps
        if t_bar * h_bar * w_bar > max_pixels:
            beta = math.sqrt((num_frames * height * width) / max_pixels)
            h_bar = max(factor, math.floor(height / beta / factor) * factor)
            w_bar = max(factor, math.floor(width / beta / factor) * factor)
        elif t_bar * h_bar * w_bar < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (num_frames * height * width))
            h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
        return h_bar, w_bar


MAX_ASPECT_RATIO = 200  # transformers refuses longer strips


def check_aspect(height: int, width: int) -> None:
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise VideoRequestError(f"an image or frame of {width}x{height} pixels is too long and thin: its aspect ratio "
                                f"must be at most {MAX_ASPECT_RATIO}")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor` with the area in [min_pixels, max_pixels], the
    aspect ratio kept as closely as possible: transformers' smart_resize, step for step."""
    check_aspect(height, width)
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def timestamps(frame_indices: tuple[int, ...], fps: float, merge: int) -> list[float]:
    """Seconds of each temporal patch: the mean time of its first and last frame (Qwen3VLProcessor's
    `_calculate_timestamps`, the indices padded by the last one)."""
    indices = list(frame_indices)
    indices += indices[-1:] * (-len(indices) % merge)
    seconds = [i / fps for i in indices]
    return [(seconds[i] + seconds[i + merge - 1]) / 2 for i in range(0, len(seconds), merge)]
