"""LLaVA and LLaVA-NeXT: a CLIP vision tower, an MLP projector, and a Llama/Qwen2 decoder.

Read top to bottom: the projector, the visual halves (LLaVA: one crop per image; NeXT: the base crop
and the anyres crops, packed into one feature map with a learned `image_newline` at each row's end),
then the language half, which is the shared decoder with the default 1-D positions and splice.

Shapes: N crops, P = (image_size / patch_size)^2 patches per crop, C the tower's width, L the number
of feature layers, t the rows per crop (P, or P + 1 with the CLS row under 'full'), H the LM's width.
"""

import torch
from torch import nn

from lightvlm.common.distributed import SINGLE, TPGroup
from lightvlm.models.layers.activation import get_activation
from lightvlm.models.layers.clip import CLIPVisionTower
from lightvlm.models.layers.decoder import CausalLM
from lightvlm.models.layers.linear import ReplicatedLinear, copy_full
from lightvlm.models.llava.config import LlavaConfig, LlavaNextConfig


class Projector(nn.Module):
    """`multi_modal_projector`: Linear -> act -> Linear, from the concatenated feature layers to H."""

    def __init__(self, config: LlavaConfig):
        super().__init__()
        width = config.vision.hidden_size * len(config.feature_layers)
        self.linear_1 = ReplicatedLinear(width, config.text.hidden_size, config.projector_bias)
        self.act = get_activation(config.projector_hidden_act)
        self.linear_2 = ReplicatedLinear(config.text.hidden_size, config.text.hidden_size, config.projector_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaVisual(nn.Module):
    """The visual half: each image's crops [n, 3, S, S] -> its embedding rows. The crops of all images
    are batched together, at most `max_crops_per_forward` per forward."""

    max_crops_per_forward = 16

    def __init__(self, config: LlavaConfig, tp: TPGroup = SINGLE):
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVisionTower(config.vision, config.feature_layers, tp)
        self.multi_modal_projector = Projector(config)

    def embed_crops(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N, t, H]"""
        features = self.vision_tower(pixel_values)  # [N, P + 1, C * L]
        if self.config.select_strategy == "default":
            features = features[:, 1:]  # drop the CLS row
        return self.multi_modal_projector(features)

    def embed_all(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each image's crops -> its crops' rows [n, t, H]."""
        crops = torch.cat(pixels)
        step = self.max_crops_per_forward
        embeds = torch.cat([self.embed_crops(crops[i:i + step]) for i in range(0, len(crops), step)])
        return list(embeds.split([len(p) for p in pixels]))

    def forward(self, pixels: list[torch.Tensor], grids: list[tuple[int, ...]]) -> list[torch.Tensor]:
        return [rows.reshape(-1, rows.shape[-1]) for rows in self.embed_all(pixels)]


class LlavaNextVisual(LlavaVisual):
    """LLaVA-NeXT's visual half: per image, the base crop's rows, then the crops' feature maps joined
    into one map (row-major crops of p x p patches), unpadded to the grid's feature rows and columns,
    each row ending in `image_newline`."""

    def __init__(self, config: LlavaNextConfig, tp: TPGroup = SINGLE):
        super().__init__(config, tp)
        self.image_newline = nn.Parameter(torch.zeros(config.text.hidden_size))
        self.image_newline.weight_loader = copy_full

    def forward(self, pixels: list[torch.Tensor], grids: list[tuple[int, ...]]) -> list[torch.Tensor]:
        return [self.pack(rows, grid) for rows, grid in zip(self.embed_all(pixels), grids)]

    def pack(self, rows: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """[1 + r * c, p * p, H] -> [p * p + h * (w + 1), H] for grid (r, c, h, w)."""
        num_rows, num_columns, height, width = grid
        side = self.config.vision.patches_per_side
        hidden = rows.shape[-1]
        base, crops = rows[0], rows[1:]
        features = crops.view(num_rows, num_columns, side, side, hidden)
        features = features.permute(0, 2, 1, 3, 4).reshape(num_rows * side, num_columns * side, hidden)
        # unpad: the letterbox is centered, so the kept rows (or columns) are the middle ones
        top, left = (num_rows * side - height) // 2, (num_columns * side - width) // 2
        features = features[top:top + height, left:left + width]  # [h, w, H]
        newline = self.image_newline.to(features.dtype).expand(height, 1, hidden)
        return torch.cat((base, torch.cat((features, newline), dim=1).reshape(-1, hidden)))


class LlavaLanguage(CausalLM):
    """The language half: the decoder and LM head (`language_model`, `lm_head` in HF checkpoints)."""

    def __init__(self, config: LlavaConfig, tp: TPGroup = SINGLE):
        super().__init__(config.text, tp)
