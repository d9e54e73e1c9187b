"""The Qwen-VL processor: dynamic resolution and `<|vision_start|>` + N `<|image_pad|>` + `<|vision_end|>`.

An image is resized (bicubic) to the multiple of patch_size x merge_size nearest its own size whose
area lies between min_pixels and max_pixels (transformers' `smart_resize`), cut into patch x patch
squares, and each square repeated temporal_patch_size times (a still image is a video of identical
frames). Its grid is (t, h, w) = (1, height / patch, width / patch) patches; every merge x merge block
of patches is one embedding row, so N = h * w / merge^2.

The resolution bounds are the checkpoint's, or the server's (`with_pixel_bounds`), and a request may
lower them for its images (`check_pixel_bounds`). The pixels depend only on the grid, so the image's
cache key (which hashes the grid) covers whatever bounds chose it.
"""

import copy
import re
from pathlib import Path

import numpy as np
from PIL import Image

from lightvlm.models.processor import (
    GENERIC_PLACEHOLDERS,
    GENERIC_VIDEO_PLACEHOLDER,
    BaseProcessor,
    PromptError,
    image_processor_settings,
    rescale_and_normalize,
    to_rgb,
)
from lightvlm.models.qwen_vl.config import QwenVLConfig
from lightvlm.models.qwen_vl.video import QwenVideoSettings, smart_resize, timestamps
from lightvlm.models.video import (
    VideoLayout,
    VideoMeta,
    VideoPart,
    VideoRequestError,
    VideoSampling,
    check_frame_indices,
    padded,
    video_processor_settings,
)


def pixel_bounds(pre: dict) -> tuple[int, int]:
    """(min_pixels, max_pixels) as transformers reads them: explicit keys win over `size`."""
    size = pre.get("size") or {}
    low = pre.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or 56 * 56
    high = pre.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or 28 * 28 * 1280
    return int(low), int(high)


class QwenVLProcessor(BaseProcessor):
    image_token = "<|image_pad|>"
    video_token = "<|video_pad|>"

    def __init__(self, model_dir: str | Path, config: QwenVLConfig):
        """Checks the image processor's patch, merge and temporal sizes against the vision tower's."""
        super().__init__(model_dir)
        pre, source = image_processor_settings(self.model_dir)
        vision = config.vision
        self.patch_size = pre.get("patch_size", 14)
        self.merge_size = pre.get("merge_size", 2)
        self.temporal_patch_size = pre.get("temporal_patch_size", 2)
        ours = (self.patch_size, self.merge_size, self.temporal_patch_size)
        theirs = (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
        if ours != theirs:
            raise ValueError(f"the image processor ({source}) has patch_size, merge_size, temporal_patch_size = "
                             f"{ours} but the vision tower (config.json vision_config) has {theirs}: they must agree")
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if pre.get(flag) is False:
                raise ValueError(f"{source} sets {flag}=false, which lightvlm does not support for Qwen-VL")
        self.min_pixels, self.max_pixels = pixel_bounds(pre)
        self.resample = Image.Resampling(pre.get("resample", Image.Resampling.BICUBIC))
        self.rescale_factor = pre.get("rescale_factor", 1 / 255)
        self.image_mean = pre.get("image_mean", [0.48145466, 0.4578275, 0.40821073])
        self.image_std = pre.get("image_std", [0.26862954, 0.26130258, 0.27577711])
        self.start_token, self.end_token = "<|vision_start|>", "<|vision_end|>"
        self.start_id, self.end_id = self.token_id(self.start_token), self.token_id(self.end_token)
        # a raw prompt may write the whole wrapping, the pad alone, or a generic placeholder
        tags = "|".join(re.escape(t) for t in (self.image_token, *GENERIC_PLACEHOLDERS))
        start, end = re.escape(self.start_token), re.escape(self.end_token)
        self.placeholder_re = re.compile(f"(?:{start})?(?:{tags})(?:{end})?")
        videos = "|".join(re.escape(t) for t in (self.video_token, GENERIC_VIDEO_PLACEHOLDER))
        self.video_placeholder_re = re.compile(f"(?:{start})?(?:{videos})(?:{end})?")
        self.variant = config.vision.variant
        self.video_refusal = self._read_video_settings(config)

    def _read_video_settings(self, config: QwenVLConfig) -> str | None:
        """The video processor's settings, checked against the vision tower; a reason to refuse videos if
        they do not fit (images are still served)."""
        pre, source = video_processor_settings(self.model_dir)
        try:
            self.video = QwenVideoSettings.read(self.variant, pre)
            self.video_pad_id = self.token_id(self.video_token)
        except ValueError as e:
            return f"this checkpoint takes no videos: {e}"
        vision = config.vision
        ours = (self.video.patch_size, self.video.merge_size, self.video.temporal_patch_size)
        theirs = (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
        if ours != theirs:
            return (f"this checkpoint takes no videos: its video processor ({source}) has patch_size, merge_size, "
                    f"temporal_patch_size = {ours} but the vision tower has {theirs}")
        self.frame_settings = self.video.frames
        return None

    @property
    def raw_image_marker(self) -> str:
        return self.start_token + self.image_token + self.end_token

    @property
    def settings(self) -> str:
        return (f"qwen_vl patch={self.patch_size} merge={self.merge_size} temporal={self.temporal_patch_size} "
                f"resample={int(self.resample)} scale={self.rescale_factor} mean={self.image_mean} "
                f"std={self.image_std}")

    # -- resolution bounds ---------------------------------------------------------------------

    def with_pixel_bounds(self, min_pixels: int | None = None, max_pixels: int | None = None) -> "QwenVLProcessor":
        low = self.min_pixels if min_pixels is None else min_pixels
        high = self.max_pixels if max_pixels is None else max_pixels
        if low < 1 or high < 1 or low > high:
            raise ValueError(f"the resolution bounds must satisfy 1 <= min_pixels <= max_pixels, got min_pixels={low} "
                             f"and max_pixels={high} (the checkpoint's are {self.min_pixels} and {self.max_pixels})")
        bounded = copy.copy(self)
        bounded.min_pixels, bounded.max_pixels = low, high
        return bounded

    def check_pixel_bounds(self, min_pixels: int | None = None, max_pixels: int | None = None) -> dict:
        """A request may only lower the server's bounds, and min_pixels may not exceed max_pixels."""
        for name, value, bound in (("min_pixels", min_pixels, self.min_pixels),
                                   ("max_pixels", max_pixels, self.max_pixels)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PromptError(f"{name} must be a positive integer, got {value!r}")
            if value > bound:
                raise PromptError(f"{name}={value} is above this server's bound of {bound}; a request may only "
                                  f"lower it (the server's bound is set by --{name} or the checkpoint)")
        low = self.min_pixels if min_pixels is None else min_pixels
        high = self.max_pixels if max_pixels is None else max_pixels
        if low > high:
            raise PromptError(f"min_pixels ({low}) is above max_pixels ({high}); lower min_pixels too")
        return {"min_pixels": low, "max_pixels": high} if (min_pixels, max_pixels) != (None, None) else {}

    # -- images --------------------------------------------------------------------------------

    def image_grid(self, width: int, height: int, min_pixels: int | None = None,
                   max_pixels: int | None = None) -> tuple[int, int, int]:
        """(t, h, w) patches of the resized image: (1, height / patch, width / patch)."""
        factor = self.patch_size * self.merge_size
        h_bar, w_bar = smart_resize(height, width, factor, min_pixels or self.min_pixels, max_pixels or self.max_pixels)
        return 1, h_bar // self.patch_size, w_bar // self.patch_size

    def num_rows(self, grid: tuple[int, int, int]) -> int:
        t, h, w = grid
        return t * h * w // self.merge_size**2

    def image_span(self, grid: tuple[int, int, int]) -> tuple[tuple[int, ...], int, int]:
        """The pads only: the chat template (or raw_image_marker) writes the start and end tags around them."""
        num_rows = self.num_rows(grid)
        return (self.image_token_id,) * num_rows, 0, num_rows

    def preprocess(self, image: Image.Image, grid: tuple[int, int, int]) -> np.ndarray:
        """-> patches [h * w, C * temporal * patch * patch] float32, each merge x merge block of patches
        consecutive (row-major within the block), as transformers' patchify lays them out."""
        _, gh, gw = grid
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        resized = np.asarray(to_rgb(image).resize((gw * p, gh * p), resample=self.resample))
        x = rescale_and_normalize(resized, self.rescale_factor, self.image_mean, self.image_std)  # [C, H, W]
        c = x.shape[0]
        x = x.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, p, p]
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))  # the still frame, t times
        return np.ascontiguousarray(x.reshape(gh * gw, c * t * p * p))

    # -- videos --------------------------------------------------------------------------------

    @property
    def video_settings(self) -> str:
        return self.video.describe()

    def sample_frames(self, total_frames: int, fps: float | None, sampling: VideoSampling) -> tuple[int, ...]:
        indices = self.video.sample(total_frames, fps, sampling)
        return tuple(range(total_frames)) if indices is None else check_frame_indices(indices, total_frames)

    def wrap_raw_video(self, text: str) -> str:
        return self.start_token + text + self.end_token

    def video_layout(self, video: VideoMeta) -> VideoLayout:
        """Qwen2-VL, Qwen2.5-VL: one part of t temporal patches (the pads where the template's video tag was).
        Qwen3-VL: for each temporal patch its time ("<1.5 seconds>") and its own start, pads, end tags."""
        settings, tps = self.video, self.video.temporal_patch_size
        height, width = settings.frame_size(video.num_frames, video.height, video.width)
        gh, gw = height // settings.patch_size, width // settings.patch_size
        frames = padded(list(range(video.num_frames)), tps)
        t = len(frames) // tps
        if settings.style == "qwen2":
            part = VideoPart((t, gh, gw), frames, seconds_per_step=tps / video.sampled_fps)
            return VideoLayout(self.image_token, (part,))
        seconds = timestamps(video.frame_indices, 24.0 if video.fps is None else video.fps, tps)
        parts = tuple(VideoPart((1, gh, gw), frames[i * tps:(i + 1) * tps]) for i in range(t))
        text = "".join(f"<{s:.1f} seconds>{self.start_token}{self.image_token}{self.end_token}" for s in seconds)
        return VideoLayout(text, parts)

    def video_span(self, part: VideoPart) -> tuple[tuple[int, ...], int, int]:
        num_rows = self.num_rows(part.grid)
        return (self.video_pad_id,) * num_rows, 0, num_rows

    def frame_size(self, grid: tuple[int, int, int]) -> tuple[int, int]:
        return grid[1] * self.video.patch_size, grid[2] * self.video.patch_size

    def patchify_frames(self, frames: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
        """[t * temporal, C, H, W] -> patches [t * h * w, C * temporal * patch * patch], each merge x merge
        block of patches consecutive, the frames of a temporal patch inside each patch (transformers' layout)."""
        t, gh, gw = grid
        p, m, tps = self.video.patch_size, self.video.merge_size, self.video.temporal_patch_size
        c = frames.shape[1]
        if frames.shape != (t * tps, c, gh * p, gw * p):
            raise VideoRequestError(f"frames of shape {frames.shape} do not fit the grid {grid}")
        x = frames.reshape(t, tps, c, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return np.ascontiguousarray(x.reshape(t * gh * gw, c * tps * p * p))
