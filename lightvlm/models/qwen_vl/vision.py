"""The Qwen-VL vision tower: patch embedding, ViT blocks with 2-D rotary, patch merger (and DeepStack).

The images of a batch are packed into one sequence of patches, each merge x merge block of patches
consecutive (the processor lays them out so); attention runs within segments of that sequence: one
per image (Qwen2-VL, Qwen3-VL), or, in Qwen2.5-VL's window blocks, one per window of
window_size x window_size pixels. Read top to bottom: where each patch sits (rotary angles, windows,
interpolated learned positions), then the layers, then the tower.

Shapes: N patches of all images, C the ViT width, D its head dim, M = N / merge^2 merged rows,
O the language model's hidden size.
"""

import itertools
import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from lightvlm.common.distributed import SINGLE, TPGroup
from lightvlm.models.layers.activation import get_activation
from lightvlm.models.layers.linear import (
    ColumnParallelLinear,
    FusedQKVParallelLinear,
    MergedColumnParallelLinear,
    RowParallelLinear,
    copy_full,
)
from lightvlm.models.layers.norm import make_norm
from lightvlm.models.layers.rotary import rotate_half
from lightvlm.models.qwen_vl.config import QwenVisionConfig

Grid = tuple[int, int, int]  # (t, h, w) patches


# -- where each patch sits ----------------------------------------------------------------------

def patch_coordinates(grid: Grid, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every patch of one image in the packed order: merge x merge blocks row-major,
    row-major inside each block, frame after frame."""
    t, h, w = grid
    rows = torch.arange(h)[:, None].expand(h, w)
    cols = torch.arange(w)[None, :].expand(h, w)
    block = (h // merge, merge, w // merge, merge)
    return (rows.reshape(block).transpose(1, 2).flatten().repeat(t),
            cols.reshape(block).transpose(1, 2).flatten().repeat(t))


def rotary_angles(grids: list[Grid], merge: int, head_dim: int, theta: float) -> torch.Tensor:
    """[N, D] rotary angles: a quarter of the frequencies for the row, a quarter for the column, twice."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float) / (head_dim // 2)))
    coordinates = [patch_coordinates(g, merge) for g in grids]
    rows = torch.cat([r for r, _ in coordinates]).float()
    cols = torch.cat([c for _, c in coordinates]).float()
    freqs = torch.cat((rows[:, None] * inv_freq, cols[:, None] * inv_freq), dim=-1)
    return torch.cat((freqs, freqs), dim=-1)


def image_segments(grids: list[Grid]) -> list[int]:
    """Patches per attention segment when each frame attends to itself."""
    return [h * w for t, h, w in grids for _ in range(t)]


def window_order(grids: list[Grid], merge: int, window_units: int) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL's windows: the permutation of merged units that makes every window of
    window_units x window_units units consecutive (windows row-major, image after image), and the
    number of patches in each window (edge windows are smaller)."""
    order, lengths, base = [], [], 0
    for t, h, w in grids:
        lh, lw = h // merge, w // merge
        units = torch.arange(t * lh * lw).reshape(t, lh, lw) + base
        for frame in units:
            for top in range(0, lh, window_units):
                for left in range(0, lw, window_units):
                    window = frame[top:top + window_units, left:left + window_units].flatten()
                    order.append(window)
                    lengths.append(len(window) * merge * merge)
        base += t * lh * lw
    return torch.cat(order), lengths


def interpolated_positions(grids: list[Grid], merge: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-VL's learned positions form a side x side table, resampled bilinearly (corners aligned) to
    each image's grid: per patch, the 4 table rows to mix and their weights ([N, 4] each)."""
    indices, weights = [], []
    for grid in grids:
        _, h, w = grid
        rows, cols = patch_coordinates(grid, merge)
        taps = []
        for coordinate, size in ((rows, h), (cols, w)):
            source = coordinate.float() * (side - 1) / max(size - 1, 1)
            low = source.floor()
            frac = source - low
            taps.append((low.long().clamp(0, side - 1), (low.long() + 1).clamp(0, side - 1), 1 - frac, frac))
        (r0, r1, rw0, rw1), (c0, c1, cw0, cw1) = taps
        indices.append(torch.stack((r0 * side + c0, r0 * side + c1, r1 * side + c0, r1 * side + c1), dim=-1))
        weights.append(torch.stack((rw0 * cw0, rw0 * cw1, rw1 * cw0, rw1 * cw1), dim=-1))
    return torch.cat(indices), torch.cat(weights)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Bidirectional attention within each segment of consecutive rows. q, k, v: [N, heads, D] -> same.
    Segments of equal length run as one batch."""
    if len(lengths) == 1:
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
        return out.transpose(0, 1)
    starts = [0, *itertools.accumulate(lengths)][:-1]
    by_length: dict[int, list[int]] = defaultdict(list)
    for start, n in zip(starts, lengths):
        if n:
            by_length[n].append(start)
    out = torch.empty_like(q)
    heads, dim = q.shape[1:]
    for n, group in by_length.items():
        rows = (torch.tensor(group, device=q.device)[:, None] + torch.arange(n, device=q.device)).flatten()
        qs, ks, vs = (x[rows].view(len(group), n, heads, dim).transpose(1, 2) for x in (q, k, v))
        out[rows] = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).reshape(-1, heads, dim)
    return out


# -- layers -------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """The Conv3d over temporal x patch x patch cubes, as the matmul it is (kernel = stride)."""

    def __init__(self, config: QwenVisionConfig):
        super().__init__()
        in_features = config.in_channels * config.temporal_patch_size * config.patch_size**2
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.empty(config.hidden_size, in_features))
        self.proj.weight.weight_loader = self._load
        self.proj.register_parameter("bias", None)
        if config.kind.patch_bias:
            self.proj.bias = nn.Parameter(torch.empty(config.hidden_size))
            self.proj.bias.weight_loader = copy_full

    @staticmethod
    def _load(param: nn.Parameter, tensor: torch.Tensor, shard_id=None) -> None:
        copy_full(param, tensor.reshape(tensor.shape[0], -1))  # [C, in, t, p, p] -> [C, in * t * p * p]

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return F.linear(patches.to(self.proj.weight.dtype), self.proj.weight, self.proj.bias)  # [N, C]


class VisionAttention(nn.Module):
    """Multi-head attention within segments, split by heads over `tp`; q and k rotated by position."""

    def __init__(self, config: QwenVisionConfig, tp: TPGroup):
        super().__init__()
        self.head_dim = config.head_dim
        self.qkv = FusedQKVParallelLinear(config.hidden_size, self.head_dim, config.num_heads, config.num_heads,
                                          True, tp)
        self.proj = RowParallelLinear(config.hidden_size, config.hidden_size, True, tp)

    def forward(self, x: torch.Tensor, angles: tuple[torch.Tensor, torch.Tensor], lengths: list[int]) -> torch.Tensor:
        q, k, v = self.qkv(x).split(self.qkv.sizes, dim=-1)
        q, k, v = (t.reshape(t.shape[0], -1, self.head_dim) for t in (q, k, v))  # [N, heads, D]
        cos, sin = angles
        dtype = q.dtype  # rotated in fp32, as transformers does
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(dtype)
        out = segment_attention(q, k, v, lengths)
        return self.proj(out.reshape(out.shape[0], -1))


class VisionMLP(nn.Module):
    def __init__(self, config: QwenVisionConfig, tp: TPGroup):
        super().__init__()
        self.act = get_activation(config.hidden_act)
        self.fc1 = ColumnParallelLinear(config.hidden_size, config.intermediate_size, True, tp)
        self.fc2 = RowParallelLinear(config.intermediate_size, config.hidden_size, True, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedVisionMLP(nn.Module):
    """Qwen2.5-VL: act(gate) * up, then down, all with biases."""

    def __init__(self, config: QwenVisionConfig, tp: TPGroup):
        super().__init__()
        self.act = get_activation(config.hidden_act)
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, True, tp)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, True, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


VISION_MLPS = {"plain": VisionMLP, "gated": GatedVisionMLP}


class VisionBlock(nn.Module):
    def __init__(self, config: QwenVisionConfig, tp: TPGroup):
        super().__init__()
        self.norm1 = make_norm(config.kind.vision_norm, config.hidden_size, 1e-6)
        self.attn = VisionAttention(config, tp)
        self.norm2 = make_norm(config.kind.vision_norm, config.hidden_size, 1e-6)
        self.mlp = VISION_MLPS[config.kind.vision_mlp](config, tp)

    def forward(self, x: torch.Tensor, angles, lengths: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), angles, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Each merge x merge block of patches -> one row of the language model: norm, concat, MLP.
    DeepStack's mergers normalize after the concat (`after_concat`)."""

    def __init__(self, config: QwenVisionConfig, tp: TPGroup, after_concat: bool = False):
        super().__init__()
        self.width = config.hidden_size * config.merge_unit
        self.after_concat = after_concat
        self.norm = make_norm(config.kind.vision_norm, self.width if after_concat else config.hidden_size, 1e-6)
        self.fc1 = ColumnParallelLinear(self.width, self.width, True, tp)
        self.fc2 = RowParallelLinear(self.width, config.out_hidden_size, True, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C] -> [M, O]"""
        x = self.norm(x.reshape(-1, self.width)) if self.after_concat else self.norm(x).reshape(-1, self.width)
        return self.fc2(F.gelu(self.fc1(x)))


class QwenVisionTower(nn.Module):
    """`visual` in HF checkpoints: packed patches of several images -> their merged rows, each row
    followed by its DeepStack features when the model has them ([M, O * (1 + k)])."""

    def __init__(self, config: QwenVisionConfig, tp: TPGroup = SINGLE):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        if config.num_position_embeddings:
            self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
            self.pos_embed.weight.weight_loader = copy_full
            self.side = math.isqrt(config.num_position_embeddings)
        self.blocks = nn.ModuleList(VisionBlock(config, tp) for _ in range(config.depth))
        self.merger = PatchMerger(config, tp)
        self.deepstack_mergers = nn.ModuleList(PatchMerger(config, tp, after_concat=True)
                                               for _ in config.deepstack_visual_indexes)

    def forward(self, patches: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        config, merge = self.config, self.config.spatial_merge_size
        x = self.patch_embed(patches)  # [N, C]
        if config.num_position_embeddings:
            indices, weights = interpolated_positions(grids, merge, self.side)
            x = x + (self.pos_embed(indices.to(x.device)) * weights.to(x.device)[:, :, None]).sum(1).to(x.dtype)
        angles = rotary_angles(grids, merge, config.head_dim, config.rope_theta).to(x.device)
        full = image_segments(grids)
        order, windows = None, full
        if config.has_windows:
            order, windows = window_order(grids, merge, config.window_size // merge // config.patch_size)
            order = order.to(x.device)
            x, angles = (self._permute(t, order) for t in (x, angles))
        cos_sin = (angles.cos()[:, None], angles.sin()[:, None])  # [N, 1, D]
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos_sin, windows if config.has_windows and i not in config.fullatt_block_indexes else full)
            if i in config.deepstack_visual_indexes:
                deepstack.append(self.deepstack_mergers[config.deepstack_visual_indexes.index(i)](x))
        rows = self.merger(x)  # [M, O]
        if order is not None:
            rows = rows[torch.argsort(order)]
        return torch.cat((rows, *deepstack), dim=-1) if deepstack else rows

    def _permute(self, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Reorder the patches unit by unit (merge x merge patches stay together)."""
        unit = self.config.merge_unit
        return x.reshape(-1, unit, x.shape[-1])[order].reshape(-1, x.shape[-1])
