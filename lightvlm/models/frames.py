"""A video part's frames -> the pixel values its family's vision tower takes, where the encoder runs.

transformers' video processors resize and normalize frames with torchvision, on the CPU by default;
this is what torchvision does there, with torch alone (torchvision is not a dependency): a uint8 frame
is resized by torch's own uint8 interpolation (antialiased, as torchvision's `resize` calls it for
bicubic, and for bilinear where the CPU has AVX2; elsewhere it goes through float32 and rounds), then
mean and std are folded with the rescale factor and applied in float32 (`rescale_and_normalize`). The
same torch calls on the same CPU give the same pixels as transformers; the family then lays them out
(`patchify_frames`).
"""

import numpy as np
import torch
import torch.nn.functional as F

from lightvlm.models.video import FrameSettings


def resize_frames(frames: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """uint8 [k, 3, H, W] -> uint8 [k, 3, h, w] as torchvision's resize (antialias on) gives it on the CPU."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    native = mode == "bicubic" or (mode == "bilinear" and "AVX2" in torch.backends.cpu.get_cpu_capability())
    if native:
        return F.interpolate(frames, size=list(size), mode=mode, align_corners=False, antialias=True)
    out = F.interpolate(frames.float(), size=list(size), mode=mode, align_corners=False, antialias=True)
    return out.round_().to(torch.uint8)


def normalize_frames(frames: torch.Tensor, settings: FrameSettings) -> torch.Tensor:
    """uint8 [k, 3, h, w] -> float32, (x - mean / scale) / (std / scale), as transformers fuses it."""
    mean = torch.tensor(settings.mean) * (1.0 / settings.rescale_factor)
    std = torch.tensor(settings.std) * (1.0 / settings.rescale_factor)
    return frames.to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


def frame_pixels(processor, frames: np.ndarray, grid: tuple[int, ...]) -> np.ndarray:
    """A part's frames (uint8 [k, H, W, 3], RGB, as decoded) -> its pixel values for `grid`."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()  # [k, 3, H, W]
    settings = processor.frame_settings
    video = resize_frames(video, processor.frame_size(grid), settings.mode)
    return processor.patchify_frames(normalize_frames(video, settings).numpy(), grid)
