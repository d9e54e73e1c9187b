"""InternVL: InternViT vision tower, pixel-shuffle + MLP projector, and the shared decoder (Qwen2, Llama, InternLM2).

Read top to bottom: patch embedding, vision attention, vision layer, vision tower, projector, then the
two halves the engine loads separately (the visual half runs in the visualserver's encoder workers,
the language half in the model workers).

Shapes: N tiles, P = (image_size / patch_size)^2 patches per tile, C the vision width,
t = P / shuffle_factor^2 tokens per tile, H the language model's hidden size.
"""

import torch
import torch.nn.functional as F
from torch import nn

from lightvlm.common.distributed import SINGLE, TPGroup
from lightvlm.models.internvl.config import InternVisionConfig, InternVLConfig
from lightvlm.models.layers.activation import get_activation
from lightvlm.models.layers.decoder import CausalLM
from lightvlm.models.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    copy_full,
)
from lightvlm.models.layers.norm import LayerNorm, ShardedRMSNorm, make_norm


class PatchEmbeddings(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, config.patch_size)
        self.projection.weight.weight_loader = copy_full
        self.projection.bias.weight_loader = copy_full

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.projection(pixel_values.to(self.projection.weight.dtype))  # [N, C, side, side]
        return x.flatten(2).transpose(1, 2)  # [N, P, C]


class VisionEmbeddings(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        num_positions = config.patches_per_side**2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_positions, config.hidden_size))
        self.cls_token.weight_loader = copy_full
        self.position_embeddings.weight_loader = copy_full
        self.patch_embeddings = PatchEmbeddings(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embeddings(pixel_values)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat((cls, patches), dim=1) + self.position_embeddings  # [N, P + 1, C]


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention over one tile's tokens, split by heads over `tp`."""

    def __init__(self, config: InternVisionConfig, tp: TPGroup):
        super().__init__()
        self.head_dim = config.hidden_size // config.num_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_heads, config.num_heads,
                                          config.qkv_bias, tp)
        self.use_qk_norm = config.use_qk_norm
        if self.use_qk_norm:  # normalizes across all heads, so under TP the norm is sharded too
            self.q_norm = ShardedRMSNorm(config.hidden_size, config.qk_norm_eps, tp)
            self.k_norm = ShardedRMSNorm(config.hidden_size, config.qk_norm_eps, tp)
        self.projection_layer = RowParallelLinear(config.hidden_size, config.hidden_size, True, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.sizes, dim=-1)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(n, length, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # [N, heads, L, D]
        return self.projection_layer(out.transpose(1, 2).reshape(n, length, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: InternVisionConfig, tp: TPGroup):
        super().__init__()
        self.act = get_activation(config.hidden_act)
        self.fc1 = ColumnParallelLinear(config.hidden_size, config.intermediate_size, True, tp)
        self.fc2 = RowParallelLinear(config.intermediate_size, config.hidden_size, True, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    """Pre-norm transformer block with layer scale (lambda_1, lambda_2) on both residual branches."""

    def __init__(self, config: InternVisionConfig, tp: TPGroup):
        super().__init__()
        self.layernorm_before = make_norm(config.norm_type, config.hidden_size, config.layer_norm_eps)
        self.attention = VisionAttention(config, tp)
        self.layernorm_after = make_norm(config.norm_type, config.hidden_size, config.layer_norm_eps)
        self.mlp = VisionMLP(config, tp)
        self.lambda_1 = nn.Parameter(torch.ones(config.hidden_size))
        self.lambda_2 = nn.Parameter(torch.ones(config.hidden_size))
        self.lambda_1.weight_loader = copy_full
        self.lambda_2.weight_loader = copy_full

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.lambda_1 * self.attention(self.layernorm_before(x))
        return x + self.lambda_2 * self.mlp(self.layernorm_after(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: InternVisionConfig, num_layers: int, tp: TPGroup):
        super().__init__()
        self.layer = nn.ModuleList(VisionLayer(config, tp) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class InternVisionModel(nn.Module):
    """`vision_tower` in HF checkpoints. Runs only as many layers as the selected feature layer needs."""

    def __init__(self, config: InternVisionConfig, feature_layer: int, tp: TPGroup):
        super().__init__()
        # hidden_states[i] is the output of i layers (0 = embeddings); -1 means the last layer's.
        num_layers = feature_layer % (config.num_layers + 1)
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config, num_layers, tp)
        # The final norm only applies to the last layer's output, and only without mean pooling.
        self.layernorm = None
        if feature_layer == -1 and not config.use_mean_pooling:
            self.layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.embeddings(pixel_values))
        return self.layernorm(x) if self.layernorm is not None else x  # [N, P + 1, C]


def pixel_shuffle(x: torch.Tensor, factor: int, version: str = "v2") -> torch.Tensor:
    """[N, side, side, C] -> [N, side/f, side/f, C*f*f], merging each f x f block of patches.

    The channel order matches InternVL's: the inner f patches of a row are folded first (with the
    two spatial axes swapped in between), then the f rows. "v2" swaps the axes back (row-major
    tokens, transformers' only form); "v1", the original code's default, leaves them swapped.
    """
    n, side, _, channels = x.shape
    x = x.reshape(n, side, side // factor, channels * factor)
    x = x.permute(0, 2, 1, 3).reshape(n, side // factor, side // factor, channels * factor * factor)
    return x.permute(0, 2, 1, 3).contiguous() if version == "v2" else x.contiguous()


class Projector(nn.Module):
    """`multi_modal_projector`: LayerNorm -> Linear -> act -> Linear, into the LLM's hidden size."""

    def __init__(self, config: InternVLConfig):
        super().__init__()
        width = config.vision.hidden_size * config.shuffle_factor**2
        self.layer_norm = LayerNorm(width, eps=1e-5)
        self.linear_1 = ReplicatedLinear(width, config.text.hidden_size)
        self.act = get_activation(config.projector_hidden_act)
        self.linear_2 = ReplicatedLinear(config.text.hidden_size, config.text.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))


class InternVLVisual(nn.Module):
    """The visual half: each image's tiles [n, 3, S, S] -> its embedding rows [n * t, H]. Tiles of all
    images are batched together, at most `max_tiles_per_forward` per forward."""

    max_tiles_per_forward = 16

    def __init__(self, config: InternVLConfig, tp: TPGroup = SINGLE):
        super().__init__()
        if config.vision_feature_select_strategy != "default":
            raise ValueError("only vision_feature_select_strategy='default' (drop the CLS token) is supported")
        self.config = config
        self.vision_tower = InternVisionModel(config.vision, config.vision_feature_layer, tp)
        self.multi_modal_projector = Projector(config)

    def forward(self, pixels: list[torch.Tensor], grids: list[tuple[int, ...]]) -> list[torch.Tensor]:
        tiles = torch.cat(pixels)
        step = self.max_tiles_per_forward
        embeds = torch.cat([self.embed_tiles(tiles[i:i + step]) for i in range(0, len(tiles), step)])  # [N, t, H]
        return [rows.reshape(-1, rows.shape[-1]) for rows in embeds.split([len(p) for p in pixels])]

    def embed_tiles(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N, t, H]"""
        features = self.vision_tower(pixel_values)[:, 1:]  # drop CLS: [N, P, C]
        side = self.config.vision.patches_per_side
        features = features.reshape(features.shape[0], side, side, -1)
        features = pixel_shuffle(features, self.config.shuffle_factor, self.config.ps_version)
        features = features.reshape(features.shape[0], -1, features.shape[-1])  # [N, t, C*f*f]
        return self.multi_modal_projector(features)


class InternVLLanguage(CausalLM):
    """The language half: the decoder and LM head (`language_model`, `lm_head` in HF checkpoints)."""

    def __init__(self, config: InternVLConfig, tp: TPGroup = SINGLE):
        super().__init__(config.text, tp)
