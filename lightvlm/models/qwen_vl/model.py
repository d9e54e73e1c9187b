"""The Qwen-VL line's two halves: the visual half (the vision tower over each image's patches) and the
language half (the shared decoder with M-RoPE positions, and DeepStack for Qwen3-VL).

M-RoPE places each token at a (temporal, height, width) position (transformers' `get_rope_index`):
text tokens count on one by one on all three axes; an image's rows sit on its grid of merged patches
(t, row, column), offset by the position the image starts at, and the text after it continues from
that start + max(rows, columns). Past the prompt every output token is one further on all three axes
(the decode position delta is therefore the prompt's last position + 1 - its length). A video's
temporal patches count on one by one on the temporal axis; Qwen2.5-VL spaces them by time instead:
patch i at int(i * tokens_per_second * seconds_per_step), in float32 as transformers computes it.
Qwen3-VL writes each temporal patch as a span of its own, so its videos need nothing more.
"""

import torch
from torch import nn

from lightvlm.common.distributed import SINGLE, TPGroup
from lightvlm.common.triton_kernels.ops import ops_for
from lightvlm.models.layers.decoder import CausalLM
from lightvlm.models.layers.positions import TablePositions
from lightvlm.models.qwen_vl.config import QwenVLConfig
from lightvlm.models.qwen_vl.vision import QwenVisionTower


class QwenVLVisual(nn.Module):
    """Each image's patches [h * w, C * t * p * p] and grid -> its rows [h * w / merge^2, width]. Images are
    packed into one sequence (attention keeps them apart), at most `max_patches_per_forward` at a time."""

    max_patches_per_forward = 16384

    def __init__(self, config: QwenVLConfig, tp: TPGroup = SINGLE):
        super().__init__()
        self.tower = QwenVisionTower(config.vision, tp)

    def forward(self, pixels: list[torch.Tensor], grids: list[tuple[int, ...]]) -> list[torch.Tensor]:
        out, batch, size = [], [], 0
        for patches, grid in zip(pixels, grids):
            if batch and size + len(patches) > self.max_patches_per_forward:
                out += self._run(batch)
                batch, size = [], 0
            batch.append((patches, tuple(grid)))
            size += len(patches)
        return out + self._run(batch)

    def _run(self, batch: list) -> list[torch.Tensor]:
        if not batch:
            return []
        merge_unit = self.tower.config.merge_unit
        rows = self.tower(torch.cat([p for p, _ in batch]), [g for _, g in batch])
        return list(rows.split([len(p) // merge_unit for p, _ in batch]))


def temporal_positions(t: int, seconds_per_step: float | None, tokens_per_second: int | None) -> torch.Tensor:
    if seconds_per_step is None or tokens_per_second is None:
        return torch.arange(t)
    interval = torch.tensor(seconds_per_step, dtype=torch.float32) * tokens_per_second
    return (torch.arange(t) * interval).long()


def mrope_positions(num_tokens: int, images: tuple, merge: int, tokens_per_second: int | None = None) -> TablePositions:
    """The prompt's [3, num_tokens] positions and where output tokens continue (see the module doc)."""
    pieces, position, cursor = [], 0, 0
    for image in sorted(images, key=lambda item: item.offset):
        text = image.offset - cursor
        pieces.append(torch.arange(position, position + text).expand(3, -1))
        position += text
        t, h, w = image.grid
        rows, cols = h // merge, w // merge
        steps = temporal_positions(t, image.seconds_per_step, tokens_per_second)
        grid = torch.stack(torch.meshgrid(steps, torch.arange(rows), torch.arange(cols), indexing="ij"))
        pieces.append(grid.reshape(3, -1) + position)
        position += max(rows, cols)
        cursor = image.offset + image.num_rows
    pieces.append(torch.arange(position, position + num_tokens - cursor).expand(3, -1))
    table = torch.cat(pieces, dim=1)
    return TablePositions(table, int(table.max()) + 1 if table.numel() else 0)


class QwenVLLanguage(CausalLM):
    """The language half (`language_model`, `lm_head`). Image rows arrive as [H * (1 + k)]: the
    embedding, then one DeepStack feature for each of the first k decoder layers (k = 0 before Qwen3-VL)."""

    def __init__(self, config: QwenVLConfig, tp: TPGroup = SINGLE):
        super().__init__(config.text, tp)
        self.merge = config.vision.spatial_merge_size
        self.num_deepstack = config.num_deepstack
        self.tokens_per_second = config.vision.tokens_per_second

    def plan_positions(self, num_prompt_tokens: int, images: tuple) -> TablePositions:
        return mrope_positions(num_prompt_tokens, images, self.merge, self.tokens_per_second)

    def embed(self, state) -> torch.Tensor:
        embeds = self.language_model.embed_tokens(state.input_ids)
        if state.image_rows is not None:
            ops_for(embeds.device).embed_splice(embeds, state.image_rows, state.image_embeds[:, :embeds.shape[-1]])
        return embeds

    def forward(self, state) -> torch.Tensor:
        injections = ()
        if self.num_deepstack and state.image_rows is not None:
            hidden = self.config.hidden_size
            features = state.image_embeds[:, hidden:]
            injections = tuple(features[:, hidden * i:hidden * (i + 1)] for i in range(self.num_deepstack))
        out = self.language_model(self.embed(state), state, state.logit_rows, injections, state.image_rows)
        return self.lm_head.compute_logits(out).float()
