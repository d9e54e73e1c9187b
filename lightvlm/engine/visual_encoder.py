"""Batched image encoding over a family's visual half (vision tower + projector).

Knows nothing of requests or KV: pixel tiles in, embedding rows out, `max_batch_tiles` tiles per
forward so memory stays bounded however many images arrive at once.
"""

import numpy as np
import torch

from lightvlm.common import shm
from lightvlm.common.distributed import SINGLE, TPGroup
from lightvlm.models.registry import LoadedCheckpoint
from lightvlm.models.weight_loader import build_part


class VisualEncoder:
    def __init__(self, ckpt: LoadedCheckpoint, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 tp: TPGroup = SINGLE, max_batch_tiles: int = 16, load_workers: int = 1,
                 show_progress: bool = True):
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_batch_tiles = max_batch_tiles
        self.model = build_part("visual", lambda: ckpt.family.visual_module(ckpt.config, tp), ckpt.model_dir,
                                ckpt.family.rename, dtype, device, load_workers, show_progress)

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


def write_embeddings(buf, embeds: torch.Tensor) -> None:
    """Embedding rows into a shared-memory buffer, raw with a header (bfloat16 travels as uint16 bits)."""
    array = embeds.view(torch.uint16).numpy() if embeds.dtype == torch.bfloat16 else embeds.numpy()
    shm.write_array_header(buf, array.shape, array.dtype)[...] = array


def embeddings_nbytes(embeds: torch.Tensor) -> int:
    return shm.HEADER.size + embeds.numel() * embeds.element_size()


def read_embeddings(buf) -> torch.Tensor:
    """A zero-copy tensor over the rows `write_embeddings` stored."""
    array = shm.read_array(buf)
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if array.dtype == np.uint16 else tensor
