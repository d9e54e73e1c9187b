"""Batched image encoding over a family's visual half (vision tower + projector).

Knows nothing of requests or KV: pixel tiles in, embedding rows out, `max_batch_tiles` tiles per
forward so memory stays bounded however many images arrive at once.
"""

import numpy as np
import torch

from lightvlm.common.distributed import SINGLE, TPGroup
from lightvlm.models.registry import LoadedCheckpoint
from lightvlm.models.weight_loader import load_weights


class VisualEncoder:
    def __init__(self, ckpt: LoadedCheckpoint, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 tp: TPGroup = SINGLE, max_batch_tiles: int = 16, load_workers: int = 1,
                 show_progress: bool = True):
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_batch_tiles = max_batch_tiles
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = ckpt.family.visual_module(ckpt.config, tp)
        finally:
            torch.set_default_dtype(previous)
        load_weights({"visual": model}, ckpt.model_dir, ckpt.family.rename, load_workers, show_progress)
        self.model = model.eval()

    @torch.inference_mode()
    def encode(self, images: list[np.ndarray | torch.Tensor]) -> list[torch.Tensor]:
        """Each image's tiles [n, 3, S, S] -> its embedding rows [n * tokens_per_tile, H] (on CPU)."""
        if not images:
            return []
        tiles = torch.cat([torch.as_tensor(p) for p in images]).to(self.device, self.dtype)
        outputs = [self.model(tiles[i:i + self.max_batch_tiles]) for i in range(0, len(tiles), self.max_batch_tiles)]
        embeds = torch.cat(outputs)  # [N, t, H]
        counts = [len(p) for p in images]
        return [chunk.reshape(-1, chunk.shape[-1]).cpu() for chunk in embeds.split(counts)]


def to_storage(embeds: torch.Tensor) -> np.ndarray:
    """Embedding rows as a numpy array for shared memory (bfloat16 travels as its uint16 bits)."""
    if embeds.dtype == torch.bfloat16:
        return embeds.view(torch.uint16).numpy()
    return embeds.numpy()
