"""InternVL's processor: dynamic tiling and `<img>` + tiles x t `<IMG_CONTEXT>` + `</img>` spans.

An image is resized onto the grid of tiles (between min_patches and max_patches of them) whose aspect
ratio is closest to its own, cut into tiles, and, when there is more than one tile, followed by a
thumbnail of the whole image. Each tile becomes `tokens_per_tile` embedding rows.

Settings come from transformers' image processor files, or, in the original OpenGVLab layout, from
its config.json keys (`image_settings`). The original layout's chat templates take string contents:
image parts are written into the text as the image token, where InternVL's chat() puts `<image>`.

`INTERNVL_IMAGE_LENGTH` (env) sets tokens per tile; it must agree with the vision geometry.

A video is its frames, each one tile resized to the tile size (no tiling, no thumbnail), written
"Frame1: <img>...</img>\nFrame2: ..." where the chat template's `<video>` was: transformers' InternVL
video path.
"""

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from lightvlm.models.internvl.config import InternVLConfig
from lightvlm.models.processor import (
    BaseProcessor,
    find_image_processor_settings,
    read_json,
    rescale_and_normalize,
    to_rgb,
)
from lightvlm.models.video import (
    VideoLayout,
    VideoMeta,
    VideoPart,
    VideoRequestError,
    VideoSampling,
    check_frame_indices,
    read_frame_settings,
    torch_arange,
    video_processor_settings,
)

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """(columns, rows) grids with min_tiles <= columns*rows <= max_tiles, fewest tiles first."""
    grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
             if min_tiles <= c * r <= max_tiles]
    return sorted(grids, key=lambda g: g[0] * g[1])  # stable: ties keep the column-major order


@lru_cache(maxsize=1024)
def best_grid(width: int, height: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """The grid whose aspect ratio is closest to the image's. On a tie the grid with more tiles wins
    while the image's area is still more than half the grid's area."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for columns, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - columns / rows)
        if diff < best_diff:
            best, best_diff = (columns, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * columns * rows:
            best = (columns, rows)
    return best


def image_length_from_env(geometry_tokens: int) -> int:
    """Tokens per tile: INTERNVL_IMAGE_LENGTH if set (it must match the checkpoint), else the geometry."""
    value = os.environ.get("INTERNVL_IMAGE_LENGTH")
    if not value:
        return geometry_tokens
    try:
        tokens = int(value)
    except ValueError:
        raise ValueError(f"INTERNVL_IMAGE_LENGTH={value!r} is not an integer") from None
    if tokens != geometry_tokens:
        raise ValueError(f"INTERNVL_IMAGE_LENGTH={tokens} contradicts the checkpoint, whose vision tower gives "
                         f"{geometry_tokens} tokens per tile ((image_size / patch_size)^2 x downsample_ratio^2); "
                         f"unset it or set it to {geometry_tokens}")
    return tokens


@dataclass(frozen=True)
class ImageSettings:
    """How an image becomes tiles, and where that was read (for messages)."""

    tile_size: int
    min_tiles: int
    max_tiles: int
    use_thumbnail: bool
    dynamic: bool  # false: always one tile, the whole image resized
    resample: Image.Resampling
    rescale_factor: float
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    source: str


# InternVL's own preprocessing (the model card's load_image, internvl/train/constants.py): bicubic
# resize, /255, ImageNet mean and std. The original layout's code reads no processor file.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# What GotOcr2ImageProcessor (transformers' InternVL image processor) takes for keys its file leaves out
GOT_OCR2_DEFAULTS = {"min_patches": 1, "max_patches": 12, "resample": 3, "rescale_factor": 1 / 255,
                     "image_mean": (0.48145466, 0.4578275, 0.40821073),
                     "image_std": (0.26862954, 0.26130258, 0.27577711)}


def image_settings(model_dir: Path, config: InternVLConfig) -> ImageSettings:
    """From transformers' image processor files; for the original layout, from its config.json keys
    where the folder has no such files (its own CLIP-style preprocessor_config.json, which InternVL's
    code never reads, does not count). Never a silent default: none found is an error."""
    found = find_image_processor_settings(model_dir)
    if found and config.layout == "original" and "max_patches" not in found[0]:
        found = None
    if found:
        pre, source = found
        pre = {**GOT_OCR2_DEFAULTS, **pre}
        size = pre.get("size") or {}
        if not isinstance(size, dict) or not size.get("height") or size.get("height") != size.get("width"):
            raise ValueError(f"{source} in {model_dir}: InternVL tiles must be square, got size={size}")
        # transformers' InternVLProcessor always crops to tiles and adds the thumbnail, whatever
        # crop_to_patches says
        return ImageSettings(size["height"], pre["min_patches"], pre["max_patches"], True, True,
                             Image.Resampling(pre["resample"]), pre["rescale_factor"], tuple(pre["image_mean"]),
                             tuple(pre["image_std"]), source)
    if config.tiling is not None:
        t = config.tiling
        return ImageSettings(t.tile_size, t.min_tiles, t.max_tiles, t.use_thumbnail, t.dynamic,
                             Image.Resampling.BICUBIC, 1 / 255, IMAGENET_MEAN, IMAGENET_STD,
                             "config.json (force_image_size, min/max_dynamic_patch, use_thumbnail, "
                             "dynamic_image_size)")
    raise ValueError(f"{model_dir} has no image processor settings: looked for `image_processor` in "
                     "processor_config.json (transformers 5) and for preprocessor_config.json (transformers 4)")


def text_parts(message: dict, image_token: str, video_token: str) -> dict:
    """A message with content parts -> the same with one string, each image as `image_token` + newline
    (what transformers' InternVL template writes; the original layout's templates take strings only,
    and InternVL's chat() puts `<image>` + newline where each image goes), each video as `video_token`
    + newline (the model card's video prompt: "Frame1: <image>\n..." before the question)."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    tokens = {"image": image_token + "\n", "video": video_token + "\n"}
    text = "".join(tokens.get(part.get("type"), part.get("text", "")) for part in content)
    return {**message, "content": text}


class InternVLProcessor(BaseProcessor):
    image_token = "<IMG_CONTEXT>"
    video_token = "<video>"

    def __init__(self, model_dir: str | Path, config: InternVLConfig):
        """Checks the processor's settings against the model's: tile size vs the vision tower's
        image_size, tokens per tile vs image_seq_length and INTERNVL_IMAGE_LENGTH, the image token's id."""
        super().__init__(model_dir)
        self.layout = config.layout
        self.tiling = tiling = image_settings(self.model_dir, config)
        if tiling.tile_size != config.vision.image_size:
            raise ValueError(f"the processor's tile size is {tiling.tile_size} ({tiling.source}) but the vision "
                             f"tower's image_size is {config.vision.image_size} (config.json vision_config): "
                             "they must agree")
        self.tile_size = tiling.tile_size
        self.tokens_per_tile = image_length_from_env(config.tokens_per_tile)
        declared = read_json(self.model_dir / "processor_config.json").get("image_seq_length")
        if declared is not None and declared != self.tokens_per_tile:
            raise ValueError(f"processor_config.json says image_seq_length={declared} but the vision tower gives "
                             f"{self.tokens_per_tile} tokens per tile")
        if config.image_token_id is not None and config.image_token_id != self.image_token_id:
            raise ValueError(f"config.json says image_token_id={config.image_token_id} but the tokenizer's "
                             f"{self.image_token} is {self.image_token_id}")
        self.start_id, self.end_id = self.token_id("<img>"), self.token_id("</img>")
        self.video_refusal = self._read_video_settings()

    def _read_video_settings(self) -> str | None:
        """InternVLVideoProcessor's settings; a reason to refuse videos if its frames do not fit the tower."""
        if self.layout == "original":  # the model card's load_video: each frame one tile, preprocessed as images
            t = self.tiling
            pre, source = {"size": {"height": t.tile_size, "width": t.tile_size}, "resample": int(t.resample),
                           "rescale_factor": t.rescale_factor, "image_mean": t.image_mean,
                           "image_std": t.image_std}, "the image settings"
        else:
            pre, source = video_processor_settings(self.model_dir)
        size = pre.get("size") or {}
        if (size.get("height"), size.get("width")) != (self.tile_size, self.tile_size):
            return (f"this checkpoint takes no videos: its video processor ({source}) resizes frames to {size} but "
                    f"the vision tower takes {self.tile_size}x{self.tile_size} tiles")
        try:
            self.frame_settings = read_frame_settings(pre, CLIP_MEAN, CLIP_STD)
        except ValueError as e:
            return f"this checkpoint takes no videos: {e}"
        self.do_sample_frames = pre.get("do_sample_frames") is True
        self.default_fps, self.default_num_frames = pre.get("fps"), pre.get("num_frames")
        self.initial_shift = pre.get("initial_shift", True)
        return None

    @property
    def settings(self) -> str:
        t = self.tiling
        return (f"internvl tile={t.tile_size} tiles={t.min_tiles}-{t.max_tiles} thumbnail={t.use_thumbnail} "
                f"dynamic={t.dynamic} tokens={self.tokens_per_tile} resample={int(t.resample)} "
                f"scale={t.rescale_factor} mean={list(t.image_mean)} std={list(t.image_std)}")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None,
                            **template_kwargs) -> str:
        if self.layout == "original":
            messages = [text_parts(m, self.image_token, self.video_token) for m in messages]
        return super().apply_chat_template(messages, add_generation_prompt, tools, **template_kwargs)

    def image_grid(self, width: int, height: int) -> tuple[int, int]:
        """(tile columns, tile rows)."""
        t = self.tiling
        if not t.dynamic or t.max_tiles <= 1:
            return 1, 1
        return best_grid(width, height, t.tile_size, t.min_tiles, t.max_tiles)

    def num_tiles(self, grid: tuple[int, int]) -> int:
        columns, rows = grid
        has_thumbnail = self.tiling.use_thumbnail and columns * rows > 1
        return columns * rows + has_thumbnail

    def image_span(self, grid: tuple[int, int]) -> tuple[tuple[int, ...], int, int]:
        num_rows = self.num_tiles(grid) * self.tokens_per_tile
        return (self.start_id, *([self.image_token_id] * num_rows), self.end_id), 1, num_rows

    def preprocess(self, image: Image.Image, grid: tuple[int, int]) -> np.ndarray:
        """-> tiles [n, 3, S, S] float32, the thumbnail (if any) last."""
        image = to_rgb(image)
        columns, rows = grid
        s, t = self.tile_size, self.tiling
        resized = np.asarray(image.resize((s * columns, s * rows), resample=t.resample))  # [H, W, 3]
        tiles = [resized[r * s:(r + 1) * s, c * s:(c + 1) * s]
                 for r in range(rows) for c in range(columns)]
        if self.num_tiles(grid) > len(tiles):
            tiles.append(np.asarray(image.resize((s, s), resample=t.resample)))
        return rescale_and_normalize(np.stack(tiles), t.rescale_factor, t.image_mean, t.image_std)

    # -- videos: frames, each one tile -----------------------------------------------------------

    @property
    def video_settings(self) -> str:
        return f"internvl frames tile={self.tile_size} tokens={self.tokens_per_tile} {self.frame_settings.describe()}"

    def sample_frames(self, total_frames: int, fps: float | None, sampling: VideoSampling) -> tuple[int, ...]:
        """InternVLVideoProcessor.sample_frames: `num_frames` evenly spaced, from half a step in."""
        want_fps, num_frames = sampling.fps, sampling.num_frames
        if sampling.is_default:
            if not self.do_sample_frames:
                return tuple(range(total_frames))
            want_fps, num_frames = self.default_fps, self.default_num_frames
        if num_frames is None and want_fps is not None:
            if fps is None:
                raise VideoRequestError("sampling by fps needs the video's frame rate, which these frames do not say")
            num_frames = int(total_frames / fps * want_fps)
        if not num_frames:
            raise VideoRequestError(f"the sampling settings select no frame of this video of {total_frames} frames; "
                                    "ask for num_frames or a higher fps")
        if num_frames > total_frames:
            raise VideoRequestError(f"cannot sample {num_frames} frames from a video of {total_frames} frames; ask "
                                    "for fewer frames or a lower fps")
        shift = total_frames / num_frames / 2 if self.initial_shift is True else float(self.initial_shift or 0)
        return check_frame_indices(torch_arange(shift, total_frames, total_frames / num_frames), total_frames)

    def video_layout(self, video: VideoMeta) -> VideoLayout:
        parts = tuple(VideoPart((1, 1), (i,)) for i in range(video.num_frames))
        return VideoLayout("\n".join(f"Frame{i + 1}: {self.image_token}" for i in range(video.num_frames)), parts)

    def video_span(self, part: VideoPart) -> tuple[tuple[int, ...], int, int]:
        return self.image_span(part.grid)

    def frame_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        return self.tile_size, self.tile_size

    def patchify_frames(self, frames: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        """The frame is the tile: [1, 3, S, S]."""
        return np.ascontiguousarray(frames)
