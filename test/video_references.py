"""transformers as the reference for videos, without torchvision.

transformers' video processors need torchvision (lightvlm does not depend on it, and it is not installed
here), so their classes cannot be built. `ReferenceVideoProcessor` stands in for them inside
transformers' own processors (Qwen2VLProcessor, Qwen2_5_VLProcessor, Qwen3VLProcessor,
InternVLProcessor), which then do everything else as they always do: the placeholder expansion,
Qwen3-VL's timestamps, Qwen2.5-VL's second_per_grid_ts, InternVL's "Frame{i}:" prompt, and the
models' get_rope_index.

Inside, it runs transformers' code where that imports without torchvision: `read_video_pyav` (through
`load_video`), `make_batched_videos`/`make_batched_metadata`, Qwen3VLVideoProcessor's `sample_frames`
and `patchify` (Qwen2VLVideoProcessor's patchify is the same code), both `smart_resize`s. Where it
cannot, it does the same arithmetic, step for step, and says where it comes from:
Qwen2VLVideoProcessor.sample_frames and InternVLVideoProcessor.sample_frames (torch.arange as they
call it), TorchvisionBackend.rescale_and_normalize (its fused mean and std), and torchvision's resize,
which on the CPU hands a uint8 tensor to torch's own interpolate (bicubic; antialias on).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from transformers.feature_extraction_utils import BatchFeature
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as qwen2_smart_resize
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as qwen3_smart_resize
from transformers.video_utils import VideoMetadata, load_video, make_batched_metadata, make_batched_videos

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

# The class defaults of each video processor (transformers' class attributes), by style.
DEFAULTS = {
    "qwen2": dict(size={"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}, image_mean=CLIP_MEAN,
                  image_std=CLIP_STD, patch_size=14, temporal_patch_size=2, merge_size=2, min_frames=4,
                  max_frames=768, do_sample_frames=False, fps=None, num_frames=None, cap_pixels_per_frame=False,
                  max_video_tokens=128000, resample=3, rescale_factor=1 / 255),
    "qwen3": dict(size={"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768}, image_mean=[0.5] * 3,
                  image_std=[0.5] * 3, patch_size=16, temporal_patch_size=2, merge_size=2, min_frames=4,
                  max_frames=768, do_sample_frames=True, fps=2, num_frames=None, cap_pixels_per_frame=False,
                  max_video_tokens=768, resample=3, rescale_factor=1 / 255),
    "internvl": dict(size={"height": 384, "width": 384}, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                     do_sample_frames=False, fps=None, num_frames=None, initial_shift=True, resample=3,
                     rescale_factor=1 / 255),
}
TORCH_MODES = {2: "bilinear", 3: "bicubic"}


def tv_resize(video: torch.Tensor, size: tuple[int, int], resample: int) -> torch.Tensor:
    """torchvision.transforms.v2.functional.resize on a CPU uint8 tensor, antialias on: torch's interpolate
    on the uint8 tensor itself (bicubic, and bilinear on AVX2 CPUs), nothing when the size is already right."""
    if tuple(video.shape[-2:]) == tuple(size):
        return video
    shape = video.shape
    flat = video.reshape(-1, *shape[-3:])
    out = F.interpolate(flat, size=list(size), mode=TORCH_MODES[resample], align_corners=False, antialias=True)
    return out.reshape(*shape[:-2], *size)


def rescale_and_normalize(video: torch.Tensor, rescale_factor: float, mean, std) -> torch.Tensor:
    """TorchvisionBackend.rescale_and_normalize with both on: mean and std scaled by 1 / rescale_factor, then
    tvF.normalize on the float32 frames."""
    mean = torch.tensor(mean) * (1.0 / rescale_factor)
    std = torch.tensor(std) * (1.0 / rescale_factor)
    return (video.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)


class ReferenceVideoProcessor:
    """A transformers video processor of `style` with `settings` (what the checkpoint's config says)."""

    def __init__(self, style: str, settings: dict):
        self.style = style
        values = {**DEFAULTS[style], **{k: v for k, v in settings.items() if k in DEFAULTS[style]}}
        if style == "qwen2":  # Qwen2VLVideoProcessor.__init__: min_pixels / max_pixels override the size
            size = dict(values["size"])
            size["shortest_edge"] = settings.get("min_pixels") or size["shortest_edge"]
            size["longest_edge"] = settings.get("max_pixels") or size["longest_edge"]
            values["size"] = size
        for key, value in values.items():
            setattr(self, key, value)

    def __call__(self, videos, **kwargs) -> BatchFeature:
        """VideoProcessorMixin.preprocess: unset kwargs take the processor's values, frames are sampled when
        do_sample_frames, decoded from files with PyAV otherwise sampled while loading."""
        for name in ("do_sample_frames", "fps", "num_frames", "video_metadata"):
            kwargs.setdefault(name, getattr(self, name, None))
        do_sample = kwargs["do_sample_frames"]
        videos = make_batched_videos(videos)
        sample = (lambda metadata, **_: self.sample_frames(metadata, kwargs["num_frames"], kwargs["fps"])) \
            if do_sample else None
        if isinstance(videos[0], str):
            loaded = [load_video(v, backend="pyav", sample_indices_fn=sample) for v in videos]
            videos, metadata = [v for v, _ in loaded], [m for _, m in loaded]
        else:
            metadata = make_batched_metadata(videos, kwargs["video_metadata"])
            if do_sample:
                for i, (video, meta) in enumerate(zip(videos, metadata)):
                    meta.frames_indices = sample(meta)
                    videos[i] = video[meta.frames_indices]
        videos = [torch.from_numpy(np.ascontiguousarray(v)).permute(0, 3, 1, 2).contiguous() for v in videos]
        data = self.preprocess_internvl(videos) if self.style == "internvl" else self.preprocess_qwen(videos)
        if kwargs.get("return_metadata"):
            data["video_metadata"] = metadata
        return BatchFeature(data, tensor_type=kwargs.get("return_tensors"),
                            skip_tensor_conversion=["video_metadata"])

    # -- sampling --------------------------------------------------------------------------------

    def sample_frames(self, metadata: VideoMetadata, num_frames=None, fps=None):
        if self.style == "qwen3":
            return Qwen3VLVideoProcessor.sample_frames(self, metadata, num_frames=num_frames, fps=fps)
        return (self.sample_qwen2 if self.style == "qwen2" else self.sample_internvl)(metadata, num_frames, fps)

    def sample_qwen2(self, metadata: VideoMetadata, num_frames, fps):
        """Qwen2VLVideoProcessor.sample_frames."""
        if fps is not None and num_frames is not None:
            raise ValueError("`num_frames` and `fps` are mutually exclusive arguments, please use only one!")
        tps, total = self.temporal_patch_size, metadata.total_num_frames
        if num_frames is not None:
            num_frames = round(num_frames / tps) * tps
        elif fps is not None:
            max_frames = math.floor(min(self.max_frames, total) / tps) * tps
            num_frames = total / metadata.fps * fps
            num_frames = min(max(num_frames, self.min_frames), max_frames, total)
            num_frames = math.floor(num_frames / tps) * tps
        if num_frames > total:
            raise ValueError("Video can't be sampled.")
        return torch.arange(0, total, total / num_frames).int() if num_frames is not None else torch.arange(0, total)

    def sample_internvl(self, metadata: VideoMetadata, num_frames, fps):
        """InternVLVideoProcessor.sample_frames."""
        num_frames = num_frames if num_frames is not None else self.num_frames
        total = metadata.total_num_frames
        if num_frames is None and fps is not None:
            num_frames = int(total / metadata.fps * fps)
        shift = total / num_frames / 2 if self.initial_shift is True else self.initial_shift
        return torch.arange(shift, total, total / num_frames).int()

    # -- pixels ----------------------------------------------------------------------------------

    def preprocess_qwen(self, videos: list[torch.Tensor]) -> dict:
        """Qwen2VLVideoProcessor / Qwen3VLVideoProcessor._preprocess, one video at a time."""
        patches, grids = [], []
        factor = self.patch_size * self.merge_size
        for video in videos:
            num_frames, (height, width) = video.shape[0], video.shape[-2:]
            low, high = self.size["shortest_edge"], self.size["longest_edge"]
            if self.style == "qwen3":
                if self.cap_pixels_per_frame:
                    per_frame = max(min(self.max_video_tokens * factor * factor, high // num_frames), int(low * 1.05))
                    high = per_frame * num_frames
                size = qwen3_smart_resize(num_frames, height, width, self.temporal_patch_size, factor, low, high)
            else:
                if self.cap_pixels_per_frame:
                    total = int(self.max_video_tokens * factor * factor * 0.9)
                    high = max(min(high, total * self.temporal_patch_size // num_frames), int(low * 1.05))
                size = qwen2_smart_resize(height, width, factor, low, high)
            video = tv_resize(video[None], size, self.resample)
            video = rescale_and_normalize(video, self.rescale_factor, self.image_mean, self.image_std)
            flat, t, h, w = Qwen3VLVideoProcessor.patchify(None, video, self.patch_size, self.merge_size,
                                                           self.temporal_patch_size)
            patches.append(flat[0])
            grids.append([t, h, w])
        return {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids)}

    def preprocess_internvl(self, videos: list[torch.Tensor]) -> dict:
        """BaseVideoProcessor._preprocess as InternVLVideoProcessor runs it: resize to size, normalize."""
        size = (self.size["height"], self.size["width"])
        out = [rescale_and_normalize(tv_resize(v, size, self.resample), self.rescale_factor, self.image_mean,
                                     self.image_std) for v in videos]
        return {"pixel_values_videos": torch.stack(out)}


def attach(processor, style: str, settings: dict):
    """transformers' processor `processor` with the reference video processor in its place."""
    processor.video_processor = ReferenceVideoProcessor(style, settings)
    return processor


def frames_metadata(num_frames: int, fps: float | None) -> dict:
    """transformers' metadata for frames already sampled at `fps`."""
    return {"total_num_frames": num_frames, "fps": fps, "frames_indices": list(range(num_frames))}
