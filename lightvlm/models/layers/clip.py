"""The CLIP vision tower (transformers' CLIPVisionModel), for any family that reads its hidden states.

Read top to bottom: embeddings (CLS + patches + learned positions), attention, MLP, encoder layer,
tower. Parameter names are transformers' (`embeddings.patch_embedding`, `pre_layrnorm` with its
spelling, `encoder.layers.N.self_attn.q_proj`, ...), so a family's weight map only strips prefixes.
Attention heads and the MLP are split over `tp` through the parallel linears.

Shapes: N crops of S x S pixels, P = (S / patch_size)^2 patches, C the tower's width.
"""

import torch
import torch.nn.functional as F
from torch import nn

from lightvlm.common.distributed import SINGLE, TPGroup
from lightvlm.models.clip_config import CLIPVisionConfig
from lightvlm.models.layers.activation import get_activation
from lightvlm.models.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear, copy_full
from lightvlm.models.layers.norm import LayerNorm


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.class_embedding.weight_loader = copy_full
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                         config.patch_size, bias=False)
        self.patch_embedding.weight.weight_loader = copy_full
        self.position_embedding = nn.Embedding(config.num_positions, config.hidden_size)
        self.position_embedding.weight.weight_loader = copy_full

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [N, C, side, side]
        patches = patches.flatten(2).transpose(1, 2)  # [N, P, C]
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat((cls, patches), dim=1) + self.position_embedding.weight  # [N, P + 1, C]


class CLIPAttention(nn.Module):
    """Bidirectional multi-head attention over one crop's tokens, split by heads over `tp`."""

    def __init__(self, config: CLIPVisionConfig, tp: TPGroup):
        super().__init__()
        self.head_dim = config.hidden_size // config.num_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_heads, config.num_heads,
                                          True, tp)
        self.out_proj = RowParallelLinear(config.hidden_size, config.hidden_size, True, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        q, k, v = (t.reshape(n, length, -1, self.head_dim).transpose(1, 2)
                   for t in self.qkv_proj(x).split(self.qkv_proj.sizes, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v)  # [N, heads, L, D], scale head_dim^-0.5 as in CLIP
        return self.out_proj(out.transpose(1, 2).reshape(n, length, -1))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPVisionConfig, tp: TPGroup):
        super().__init__()
        self.act = get_activation(config.hidden_act)
        self.fc1 = ColumnParallelLinear(config.hidden_size, config.intermediate_size, True, tp)
        self.fc2 = RowParallelLinear(config.intermediate_size, config.hidden_size, True, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPVisionConfig, tp: TPGroup):
        super().__init__()
        self.layer_norm1 = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.self_attn = CLIPAttention(config, tp)
        self.layer_norm2 = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.mlp = CLIPMLP(config, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPVisionConfig, num_layers: int, tp: TPGroup):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config, tp) for _ in range(num_layers))


class CLIPVisionTower(nn.Module):
    """Hidden states of a CLIP tower: index 0 is the (pre-normed) embeddings, index i the output of
    layer i, as transformers numbers them. Only the layers up to the deepest index asked for are
    built; the pooled head (`post_layernorm`) is never used by the families that read hidden states."""

    def __init__(self, config: CLIPVisionConfig, hidden_states: tuple[int, ...], tp: TPGroup = SINGLE):
        super().__init__()
        self.hidden_states = tuple(config.hidden_state_index(i) for i in hidden_states)
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.encoder = CLIPEncoder(config, max(self.hidden_states), tp)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> the selected hidden states side by side: [N, P + 1, C * len(hidden_states)]"""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        kept = {0: x}  # only the states asked for: a real tower's 24 layers of them do not fit in memory
        for index, layer in enumerate(self.encoder.layers, start=1):
            x = layer(x)
            if index in self.hidden_states:
                kept[index] = x
        return torch.cat([kept[i] for i in self.hidden_states], dim=-1)
