"""Image encoding over a family's visual half (vision tower + projector).

Knows nothing of requests or KV: each image's pixel values and grid in, its embedding rows out. How
images of different sizes are batched for the vision tower is the family's business (its visual
module takes the whole list).
"""

import numpy as np
import torch

from lightvlm.common.distributed import SINGLE, TPGroup
from lightvlm.models.checkpoint import CheckpointError, LoadedCheckpoint
from lightvlm.models.weight_loader import build_part


class VisualEncoder:
    def __init__(self, ckpt: LoadedCheckpoint, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 tp: TPGroup = SINGLE, load_workers: int = 1, show_progress: bool = True):
        if not ckpt.is_multimodal:  # the visualserver's rooms are started only for --enable_multimodal
            architecture = (ckpt.hf_config.get("architectures") or ["?"])[0]
            raise CheckpointError(f"{ckpt.model_dir} is a text-only language model ({architecture}) and takes no "
                                  "images: start the server without --enable_multimodal")
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = build_part(ckpt, "visual", tp, dtype, device, load_workers, show_progress)

    @torch.inference_mode()
    def encode(self, pixels: list[np.ndarray | torch.Tensor], grids: list[tuple[int, ...]]) -> list[torch.Tensor]:
        """Each image's pixel values (the processor's `preprocess`) -> its embedding rows [rows, width] on the CPU."""
        if not pixels:
            return []
        inputs = [torch.as_tensor(p).to(self.device, self.dtype) for p in pixels]
        return [rows.cpu() for rows in self.model(inputs, list(grids))]
