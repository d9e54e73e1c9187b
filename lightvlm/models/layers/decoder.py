"""The decoder-only language model shared by every family (Qwen2 and Llama style backbones).

The model never sees the KV cache. Each attention layer projects q, k, v for the step's tokens and
hands them to `state.attention(layer_id, q, k, v)`; the engine's InferState writes k, v into the
token-indexed KV buffer and attends over each request's context there. The layers' small ops (RMSNorm
with the residual add, rotary, SiLU-and-mul, the image splice) go through `ops_for(device)`: Triton
kernels on CUDA, their torch twins on the CPU (common/triton_kernels/ops.py).

Shapes: T is the number of tokens in the step (all requests flattened), H the hidden size.
"""

from typing import Protocol

import torch
from torch import nn

from lightvlm.common.distributed import SINGLE, TPGroup, divide
from lightvlm.common.triton_kernels.ops import ops_for
from lightvlm.models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from lightvlm.models.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from lightvlm.models.layers.norm import RMSNorm
from lightvlm.models.layers.positions import LinearPositions
from lightvlm.models.layers.rotary import POSITION_DIMS, Angles, make_rotary
from lightvlm.models.text_config import TextConfig


class AttentionBackend(Protocol):
    """What the model asks of the step: its tokens, the image rows to splice in, positions for rotary,
    and attention over the KV cache."""

    input_ids: torch.Tensor  # [T] (image rows hold 0, overwritten by the splice)
    image_rows: torch.Tensor | None  # [R] rows replaced by image embedding rows
    image_embeds: torch.Tensor | None  # [R, width]
    logit_rows: torch.Tensor  # [S] rows whose next-token logits are wanted
    positions: torch.Tensor  # [T], or [3, T] for M-RoPE

    def attention(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, heads, D], k/v: [T, kv_heads, D] -> [T, heads * D]; stores k, v for later steps."""
        ...


class DecoderAttention(nn.Module):
    def __init__(self, config: TextConfig, layer_id: int, tp: TPGroup):
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, config.head_dim, config.num_heads,
                                          config.num_kv_heads, config.qkv_bias, tp)
        self.o_proj = RowParallelLinear(config.num_heads * config.head_dim, config.hidden_size, config.o_bias, tp)
        self.has_qk_norm = config.qk_norm
        if config.qk_norm:  # per head, so tensor parallelism needs nothing special
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, state: AttentionBackend, angles: Angles) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.sizes, dim=-1)
        q = q.view(q.shape[0], -1, self.head_dim)  # [T, heads, D]
        k = k.view(k.shape[0], -1, self.head_dim)  # [T, kv_heads, D]
        v = v.view(v.shape[0], -1, self.head_dim)
        if self.has_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = ops_for(q.device).rotary(q, k, *angles)
        return self.o_proj(state.attention(self.layer_id, q, k, v))


class GatedMLP(nn.Module):
    def __init__(self, config: TextConfig, tp: TPGroup):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"the gated MLP supports hidden_act='silu', got {config.hidden_act!r}")
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, config.mlp_bias, tp)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, config.mlp_bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops_for(x.device).silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_id: int, tp: TPGroup):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DecoderAttention(config, layer_id, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config, tp)

    def forward(self, x: torch.Tensor, state: AttentionBackend, angles: Angles) -> torch.Tensor:
        attended = self.self_attn(self.input_layernorm(x), state, angles)
        normed, x = self.post_attention_layernorm.add_and_norm(attended, x)  # x: the residual stream
        return x + self.mlp(normed)


class DecoderModel(nn.Module):
    """Embedding table, decoder layers and final norm: `language_model` in HF checkpoints."""

    def __init__(self, config: TextConfig, tp: TPGroup = SINGLE):
        super().__init__()
        divide(config.num_heads, tp.size, "number of attention heads")
        rotary = make_rotary(config.rope_form, config.head_dim, config.max_position_embeddings, config.rope_theta,
                             config.rope_scaling, config.mrope_section)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(config, i, tp) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = rotary  # its angles are computed once per step and shared by the layers

    def forward(self, embeds: torch.Tensor, state: AttentionBackend, rows: torch.Tensor,
                injections: tuple[torch.Tensor, ...] = (), injection_rows: torch.Tensor | None = None) -> torch.Tensor:
        """embeds: [T, H] -> the final-norm hidden states of `rows` only: [len(rows), H].
        `injections[i]` ([len(injection_rows), H]) is added to layer i's output at `injection_rows`
        (DeepStack feeds visual features into the first layers this way)."""
        x = embeds
        angles = self.rotary.angles(state.positions)
        for i, layer in enumerate(self.layers):
            x = layer(x, state, angles)
            if i < len(injections):
                x[injection_rows] += injections[i].to(x.dtype)
        return self.norm(x[rows])


class CausalLM(nn.Module):
    """A decoder plus its LM head. Families subclass it to splice their image rows differently or to
    place tokens other than 1-D (`plan_positions`)."""

    def __init__(self, config: TextConfig, tp: TPGroup = SINGLE):
        super().__init__()
        self.config = config
        self.position_dims = POSITION_DIMS[config.rope_form]
        self.language_model = DecoderModel(config, tp)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight

    def plan_positions(self, num_prompt_tokens: int, images: tuple) -> LinearPositions:
        """How a request's tokens are placed (called once per request, with its ImageItems)."""
        return LinearPositions()

    def embed(self, state: AttentionBackend) -> torch.Tensor:
        """Token embeddings with the image rows written over their placeholders: [T, H]."""
        embeds = self.language_model.embed_tokens(state.input_ids)
        if state.image_rows is not None:
            ops_for(embeds.device).embed_splice(embeds, state.image_rows, state.image_embeds)
        return embeds

    def forward(self, state: AttentionBackend) -> torch.Tensor:
        """Runs the decoder over the step's T rows; returns logits [len(state.logit_rows), vocab] in fp32."""
        hidden = self.language_model(self.embed(state), state, state.logit_rows)
        return self.lm_head.compute_logits(hidden).float()
