"""LLaVA's and LLaVA-NeXT's processors: CLIP-style pixels, and runs of `<image>` tokens.

LLaVA: the image (padded to a square in the mean colour first when `do_pad`) is resized by its
shortest edge and center-cropped to the vision tower's size; it becomes one crop's rows.

LLaVA-NeXT: the image is letterboxed into the best `image_grid_pinpoints` resolution and cut into
crops, after a base crop of the whole image squashed to the tower's size (see anyres.py); it
becomes the base crop's rows, then the unpadded feature map with an `image_newline` row end.

Every step is transformers' PIL image processor's (LlavaImageProcessorPil, LlavaNextImageProcessorPil)
in the same order, so the pixel values are equal. No torch here.
"""

import math
from pathlib import Path

import numpy as np
from PIL import Image

from lightvlm.models.llava.anyres import AnyresLayout, anyres_layout, fit_size
from lightvlm.models.llava.config import LlavaConfig, LlavaNextConfig
from lightvlm.models.processor import (
    BaseProcessor,
    image_processor_settings,
    read_json,
    rescale_and_normalize,
    to_rgb,
)

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def size_dict(value, default_to_square: bool) -> dict:
    """An image processor's `size` / `crop_size` as transformers reads it (old configs hold an int)."""
    if isinstance(value, int):
        return {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)):
        return {"height": value[0], "width": value[1]}
    return dict(value)


def resized_size(height: int, width: int, size: dict) -> tuple[int, int]:
    """(height, width) after transformers' resize to `size` (shortest_edge keeps the aspect ratio)."""
    if size.get("shortest_edge") and not size.get("longest_edge"):
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    if size.get("height") and size.get("width"):
        return size["height"], size["width"]
    raise ValueError(f"unsupported image processor size {size}; expected shortest_edge, or height and width")


def resize(pixels: np.ndarray, height: int, width: int, resample: Image.Resampling) -> np.ndarray:
    """uint8 [H, W, 3] -> [height, width, 3] through PIL, as transformers' PIL backend resizes."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).resize((width, height), resample=resample))


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' center_crop: the middle `height` x `width`, zero-padded where the image is smaller."""
    h, w = pixels.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return pixels[top:top + height, left:left + width]
    new_h, new_w = max(height, h), max(width, w)
    canvas = np.zeros((new_h, new_w, pixels.shape[2]), dtype=pixels.dtype)
    top_pad, left_pad = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    canvas[top_pad:top_pad + h, left_pad:left_pad + w] = pixels
    top, left = top + top_pad, left + left_pad
    return canvas[max(0, top):min(new_h, top + height), max(0, left):min(new_w, left + width)]


def pad_to_square(pixels: np.ndarray, color: tuple[int, ...]) -> np.ndarray:
    """The image centered on a square of `color` as wide as its longest side."""
    h, w = pixels.shape[:2]
    if h == w:
        return pixels
    side = max(h, w)
    canvas = np.empty((side, side, pixels.shape[2]), dtype=pixels.dtype)
    canvas[:] = np.asarray(color, dtype=pixels.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = pixels
    return canvas


class LlavaProcessor(BaseProcessor):
    image_token = "<image>"

    def __init__(self, model_dir: str | Path, config: LlavaConfig):
        """Checks the processor's settings against the model's: the crop it makes vs the vision tower's
        image_size, and the tokens per image transformers' processor would count vs the tower's rows."""
        declared = read_json(Path(model_dir) / "processor_config.json")
        self.image_token = declared.get("image_token", self.image_token)
        super().__init__(model_dir)
        self.image_settings, self.settings_source = image_processor_settings(self.model_dir)
        pre = self.image_settings
        if not (pre.get("do_rescale", True) and pre.get("do_normalize", True)):
            raise ValueError(f"{self.settings_source}: images that are not rescaled and normalized are not supported")
        self.resample = Image.Resampling(pre.get("resample", Image.Resampling.BICUBIC))
        self.do_resize = pre.get("do_resize", True)
        self.size = size_dict(pre.get("size", {"shortest_edge": 224}), default_to_square=False)
        self.do_center_crop = pre.get("do_center_crop", True)
        crop = size_dict(pre.get("crop_size", {"height": 224, "width": 224}), default_to_square=True)
        self.crop_size = crop["height"], crop["width"]
        self.do_pad = pre.get("do_pad", False)
        self.rescale_factor = pre.get("rescale_factor", 1 / 255)
        self.image_mean = pre.get("image_mean", OPENAI_CLIP_MEAN)
        self.image_std = pre.get("image_std", OPENAI_CLIP_STD)
        self.crop = config.vision.image_size
        self.patches_per_side = config.vision.patches_per_side
        self.tokens_per_crop = config.tokens_per_crop
        if self.do_resize:
            resized_size(self.crop, self.crop, self.size)  # raises on a size this processor cannot follow
        self.check_crop()
        self.check_declared(declared, config)

    def check_crop(self) -> None:
        """Whatever the image's size, its pixels must come out at the tower's size."""
        fixed = self.crop_size if self.do_center_crop else (
            (self.size["height"], self.size["width"]) if self.do_resize and "height" in self.size else None)
        if fixed != (self.crop, self.crop):
            raise ValueError(f"{self.settings_source} in {self.model_dir} makes images of "
                             f"{'varying size' if fixed is None else fixed} but the vision tower takes "
                             f"{self.crop} x {self.crop} (config.json vision_config.image_size)")

    def check_declared(self, declared: dict, config: LlavaConfig) -> None:
        """processor_config.json's patch_size, num_additional_image_tokens and strategy are what
        transformers' processor counts image tokens with; they must give the tower's rows per crop."""
        strategy = declared.get("vision_feature_select_strategy")
        if strategy is not None and strategy != config.select_strategy:
            raise ValueError(f"processor_config.json says vision_feature_select_strategy={strategy!r} but "
                             f"config.json says {config.select_strategy!r}")
        patch = declared.get("patch_size")
        if patch is None:
            return
        if patch != self.crop // self.patches_per_side:
            raise ValueError(f"processor_config.json says patch_size={patch} but the vision tower's patch_size is "
                             f"{self.crop // self.patches_per_side} (config.json vision_config)")
        extra = declared.get("num_additional_image_tokens", 0)
        counted = self.patches_per_side**2 + extra - (strategy == "default")
        if counted != self.tokens_per_crop:
            raise ValueError(f"processor_config.json (num_additional_image_tokens={extra}) counts {counted} image "
                             f"tokens per crop but the vision tower gives {self.tokens_per_crop}, and transformers "
                             f"would fail on it too; set num_additional_image_tokens to "
                             f"{extra + self.tokens_per_crop - counted} (the CLS token)")

    @property
    def settings(self) -> str:
        return (f"{type(self).__name__} crop={self.crop} size={self.size} center_crop={self.do_center_crop} "
                f"pad={self.do_pad} resample={int(self.resample)} scale={self.rescale_factor} "
                f"mean={self.image_mean} std={self.image_std} tokens={self.tokens_per_crop}")

    def image_grid(self, width: int, height: int) -> tuple[int, ...]:
        return (1, 1)  # one crop, whatever the size

    def image_span(self, grid: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
        return (self.image_token_id,) * self.tokens_per_crop, 0, self.tokens_per_crop

    def finish(self, pixels: np.ndarray) -> np.ndarray:
        """One uint8 [H, W, 3] piece -> resized, center-cropped, rescaled and normalized: [3, S, S] float32."""
        if self.do_resize:
            pixels = resize(pixels, *resized_size(*pixels.shape[:2], self.size), self.resample)
        if self.do_center_crop:
            pixels = center_crop(pixels, *self.crop_size)
        return rescale_and_normalize(pixels, self.rescale_factor, self.image_mean, self.image_std)

    def preprocess(self, image: Image.Image, grid: tuple[int, ...]) -> np.ndarray:
        """-> [1, 3, S, S] float32"""
        pixels = np.asarray(to_rgb(image))
        if self.do_pad:
            pixels = pad_to_square(pixels, tuple(int(m * 255) for m in self.image_mean))
        return self.finish(pixels)[None]


class LlavaNextProcessor(LlavaProcessor):
    def __init__(self, model_dir: str | Path, config: LlavaNextConfig):
        super().__init__(model_dir, config)
        pinpoints = tuple(tuple(p) for p in self.image_settings.get("image_grid_pinpoints") or config.grid_pinpoints)
        if pinpoints != config.grid_pinpoints:
            raise ValueError(f"{self.settings_source} has image_grid_pinpoints {[list(p) for p in pinpoints]} but "
                             f"config.json has {[list(p) for p in config.grid_pinpoints]}: they must agree")
        self.grid_pinpoints = pinpoints
        # the base crop: the whole image squashed to `size` (a square of the shortest edge)
        self.base_size = ((self.size["height"], self.size["width"]) if self.size.get("height")
                          else (self.size["shortest_edge"],) * 2)

    def check_crop(self) -> None:
        """Every piece is a square crop of the tower's size, or the base crop; both must come out at it."""
        def out(height: int, width: int) -> tuple[int, int]:
            if self.do_resize:
                height, width = resized_size(height, width, self.size)
            return self.crop_size if self.do_center_crop else (height, width)

        if self.crop_size != (self.crop, self.crop) or out(self.crop, self.crop) != self.crop_size:
            raise ValueError(f"{self.settings_source} in {self.model_dir}: LLaVA-NeXT crops of crop_size "
                             f"{self.crop_size} must come out at the vision tower's {self.crop} x {self.crop}")

    @property
    def settings(self) -> str:
        return f"{super().settings} pinpoints={self.grid_pinpoints}"

    def layout(self, width: int, height: int) -> AnyresLayout:
        return anyres_layout(width, height, self.grid_pinpoints, self.crop, self.patches_per_side)

    def image_grid(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(crop rows, crop columns, feature rows, feature columns after unpadding)"""
        return self.layout(width, height).grid

    def image_span(self, grid: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
        num_rows = self.tokens_per_crop + AnyresLayout(*grid).num_rows
        return (self.image_token_id,) * num_rows, 0, num_rows

    def preprocess(self, image: Image.Image, grid: tuple[int, ...]) -> np.ndarray:
        """-> [1 + rows * columns, 3, S, S] float32: the base crop, then the crops row by row."""
        pixels = np.asarray(to_rgb(image))
        rows, columns = grid[:2]
        best_height, best_width = rows * self.crop, columns * self.crop
        new_height, new_width = fit_size(*pixels.shape[:2], best_height, best_width)
        fitted = resize(pixels, new_height, new_width, self.resample)
        top, left = (best_height - new_height) // 2, (best_width - new_width) // 2
        canvas = np.zeros((best_height, best_width, 3), dtype=np.uint8)  # letterbox in black
        canvas[top:top + new_height, left:left + new_width] = fitted
        s = self.crop
        pieces = [resize(pixels, *self.base_size, self.resample)]
        pieces += [canvas[r * s:(r + 1) * s, c * s:(c + 1) * s] for r in range(rows) for c in range(columns)]
        return np.stack([self.finish(piece) for piece in pieces])
