"""Videos on the processor's side, shared by the families: what a request asks for (sampling), what the
decoded video is (metadata), how a family lays it out in the prompt (parts), and the frame settings
read from the checkpoint. No torch here (the httpserver lays videos out); the pixels are made from
the sampled frames where the vision encoder runs (models/frames.py).

A family lays a video out as one or more parts, each an embedding-row span of its own in the prompt
(an ImageItem, like an image): Qwen2-VL and Qwen2.5-VL as one part of t temporal patches, Qwen3-VL as
one part per temporal patch with its timestamp in the text between, InternVL as one part per frame.
The frame arithmetic follows transformers' video processors, which run it in torch and torchvision;
the few torch operations whose rounding matters are replicated here step for step (see
`torch_arange`).
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lightvlm.common.errors import PromptError

# What a family's frames are resized with (PIL resample codes, as the processor configs write them) ->
# the torch interpolation mode torchvision uses for it.
FRAME_RESAMPLES = {2: "bilinear", 3: "bicubic"}


class VideoRequestError(PromptError):
    """A video request that cannot be served as asked; the message says why (a 400)."""


@dataclass(frozen=True)
class VideoSampling:
    """How a request asks for a video's frames: `fps` frames per second, or `num_frames` in all (not
    both, as in transformers); neither: the checkpoint's default."""

    fps: float | None = None
    num_frames: int | None = None

    def __post_init__(self):
        if self.fps is not None and (isinstance(self.fps, bool) or not isinstance(self.fps, (int, float))
                                     or not 0 < self.fps <= 1000):
            raise VideoRequestError(f"fps must be a number in (0, 1000], got {self.fps!r}")
        if self.num_frames is not None and (isinstance(self.num_frames, bool) or not isinstance(self.num_frames, int)
                                            or self.num_frames < 1):
            raise VideoRequestError(f"num_frames must be a positive integer, got {self.num_frames!r}")
        if self.fps is not None and self.num_frames is not None:
            raise VideoRequestError("give a video's fps or its num_frames, not both")

    @property
    def is_default(self) -> bool:
        return self.fps is None and self.num_frames is None


@dataclass(frozen=True)
class VideoSource:
    """A video part of a message: a URL (http(s) or data:), a path or bytes to decode, or frames already
    sampled (PIL images; `sampling.fps` then says at what rate they were taken)."""

    source: object
    sampling: VideoSampling = VideoSampling()

    @property
    def is_frames(self) -> bool:
        return isinstance(self.source, (list, tuple))


VIDEO_URL_KEYS = {"url", "fps", "num_frames"}


def video_part(part: dict) -> VideoSource:
    """A `video_url` part ({"url", "fps", "num_frames"} or a URL string) or a `video` part ("video" | "url" |
    "path" and "fps", "num_frames"), checked: a misspelt field is an error, not a default."""
    if part["type"] == "video_url":
        spec = part.get("video_url")
        spec = {"url": spec} if isinstance(spec, str) else spec
        if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
            raise VideoRequestError("each video_url part needs a 'url' string (http(s) or a data: URL)")
        unknown = set(spec) - VIDEO_URL_KEYS
        source = spec["url"]
    else:
        spec = part
        unknown = set(spec) - {"type", "video", "url", "path", "fps", "num_frames"}
        source = next((spec[k] for k in ("video", "url", "path") if spec.get(k) is not None), None)
        if source is None:
            raise VideoRequestError("each video part needs the video: frames ('video'), a 'url' or a 'path'")
    if unknown:
        raise VideoRequestError(f"unknown field(s) {sorted(unknown)} in a video part; it takes "
                                f"{sorted(VIDEO_URL_KEYS)}")
    video = VideoSource(source, VideoSampling(spec.get("fps"), spec.get("num_frames")))
    if video.is_frames and video.sampling.num_frames is not None:
        raise VideoRequestError("num_frames is for video files; frames given as images are taken as they are "
                                "(fps may say at what rate they were sampled)")
    return video


@dataclass(frozen=True)
class VideoMeta:
    """A decoded video as a processor lays it out: how many frames it has, at which rate, their size,
    and which of them were sampled (indices into the video, in order, possibly repeated)."""

    total_frames: int
    fps: float | None  # the video's frame rate; None: unknown (frames given without it)
    width: int
    height: int
    frame_indices: tuple[int, ...]

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)

    @property
    def sampled_fps(self) -> float:
        """Frames per second of the sampled frames (transformers' VideoMetadata.sampled_fps, 24 if unknown)."""
        if self.fps is None:
            return 24.0
        return self.num_frames / self.total_frames * self.fps


@dataclass(frozen=True)
class VideoPart:
    """One span of a laid-out video: its grid, which of the sampled frames it is made of (positions in
    `VideoMeta.frame_indices`; a repeated last frame pads a temporal patch), and the seconds between
    its temporal patches (the M-RoPE of Qwen2.5-VL spaces them by time)."""

    grid: tuple[int, ...]
    frames: tuple[int, ...]
    seconds_per_step: float | None = None


@dataclass(frozen=True)
class VideoLayout:
    """What replaces a video's placeholder: `text` with one `marker` (the family's image token) where each
    part's rows go, in the order of `parts`."""

    text: str
    parts: tuple[VideoPart, ...]


@dataclass(frozen=True)
class FrameSettings:
    """How frames become pixels (transformers' video processor settings): the resize filter, rescale
    and normalization."""

    resample: int  # a key of FRAME_RESAMPLES
    rescale_factor: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def mode(self) -> str:
        return FRAME_RESAMPLES[self.resample]

    def describe(self) -> str:
        return f"resample={self.resample} scale={self.rescale_factor} mean={list(self.mean)} std={list(self.std)}"


def read_frame_settings(pre: dict, mean, std) -> FrameSettings:
    """The settings of a video processor config; `mean` and `std` are the family's defaults."""
    resample = int(pre.get("resample", 3))
    if resample not in FRAME_RESAMPLES:
        raise VideoRequestError(f"the checkpoint's video processor resizes frames with resample={resample}; "
                                f"lightvlm supports {sorted(FRAME_RESAMPLES)} (bilinear, bicubic)")
    for flag in ("do_resize", "do_rescale", "do_normalize"):
        if pre.get(flag) is False:
            raise VideoRequestError(f"the checkpoint's video processor sets {flag}=false, which lightvlm does not "
                                    "support")
    return FrameSettings(resample, float(pre.get("rescale_factor", 1 / 255)),
                         tuple(pre.get("image_mean") or mean), tuple(pre.get("image_std") or std))


def video_processor_settings(model_dir: Path) -> tuple[dict, str]:
    """The video processor's settings, from where transformers looks for them, in its order: the
    `video_processor` of processor_config.json, video_preprocessor_config.json, preprocessor_config.json
    (a legacy checkpoint's image settings serve its videos). A checkpoint with none of these but a
    nested `image_processor` (what transformers 5 writes without a video processor) gets those, with
    the family's defaults for the rest. Returns (settings, where they came from)."""

    def load(name: str) -> dict:
        path = model_dir / name
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

    processor = load("processor_config.json")
    for settings, source in ((processor.get("video_processor"), "processor_config.json video_processor"),
                             (load("video_preprocessor_config.json"), "video_preprocessor_config.json"),
                             (load("preprocessor_config.json"), "preprocessor_config.json"),
                             (processor.get("image_processor"), "processor_config.json image_processor")):
        if settings:
            return settings, source
    return {}, "the family's defaults"


def torch_arange(start: float, end: float, step: float) -> np.ndarray:
    """`torch.arange(start, end, step).int()` for a float step: the length and every value computed in
    double, each value then stored as float32 and truncated (as torch does on the CPU), so the frames
    sampled are transformers' to the last index."""
    size = max(0, math.ceil((end - start) / step))
    return (start + np.arange(size, dtype=np.float64) * step).astype(np.float32).astype(np.int64)


def check_frame_indices(indices, total_frames: int) -> tuple[int, ...]:
    indices = tuple(int(i) for i in indices)
    if not indices:
        raise VideoRequestError("the sampling settings select no frame of this video; ask for more frames")
    if min(indices) < 0 or max(indices) >= total_frames:
        raise VideoRequestError(f"the sampling settings select frame {max(indices)} of a video of "
                                f"{total_frames} frames")
    return indices


def padded(frames: list[int], multiple: int) -> tuple[int, ...]:
    """Frame positions padded to a multiple by repeating the last (transformers pads temporal patches so)."""
    return tuple(frames + frames[-1:] * (-len(frames) % multiple))

