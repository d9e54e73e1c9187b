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
import math
import re
from pathlib import Path

import numpy as np
from PIL import Image

from lightvlm.models.processor import (
    GENERIC_PLACEHOLDERS,
    BaseProcessor,
    PromptError,
    image_processor_settings,
    rescale_and_normalize,
    to_rgb,
)
from lightvlm.models.qwen_vl.config import QwenVLConfig

MAX_ASPECT_RATIO = 200  # transformers refuses longer strips


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor` with the area in [min_pixels, max_pixels], the
    aspect ratio kept as closely as possible: transformers' smart_resize, step for step."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise PromptError(f"an image of {width}x{height} pixels is too long and thin: its aspect ratio must be at "
                          f"most {MAX_ASPECT_RATIO}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def pixel_bounds(pre: dict) -> tuple[int, int]:
    """(min_pixels, max_pixels) as transformers reads them: explicit keys win over `size`."""
    size = pre.get("size") or {}
    low = pre.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or 56 * 56
    high = pre.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or 28 * 28 * 1280
    return int(low), int(high)


class QwenVLProcessor(BaseProcessor):
    image_token = "<|image_pad|>"

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
