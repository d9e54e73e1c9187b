"""The tensors of one step, and attention over the token-indexed KV cache.

A step's tokens (every scheduled request's new tokens, flattened to T rows) arrive as a StepInput;
`ModelRunner.prepare` turns it into an InferState. Decoder layers call `state.attention(layer, q, k, v)`,
which writes this step's K/V into the cache at the step's slots and attends each request's queries
over its whole context gathered from the cache.

Two shapes of request share a step: decode rows (one query each) are attended together by
`token_decode_attention` (a Triton kernel on CUDA, its torch twin on the CPU, as
triton_kernels/ops.py selects); prefill chunks
(several queries) are attended one request at a time, causally, offset by the context already cached.

The buffer is head-major, `[kv_heads, slots, head_dim]` per layer, so that gathering a batch's
context gives `[kv_heads, B, L, D]`, contiguous, which the decode matmuls take without a copy.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lightvlm.common.triton_kernels.copy_kv import gather_kv
from lightvlm.common.triton_kernels.ops import ops_for


@dataclass
class KVCache:
    """[layers] x [kv_heads, slots, head_dim] for K and for V. Owned by the model runner."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def allocate(cls, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> "KVCache":
        shape = (num_kv_heads, num_slots, head_dim)
        return cls(k=[torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)],
                   v=[torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)])

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class PrefillChunk:
    row: int  # first row of this request's queries in the step
    num_tokens: int
    context_slots: torch.Tensor  # [L] slots of the whole context, this chunk's included
    start: int  # tokens already cached before this chunk


@dataclass
class InferState:
    input_ids: torch.Tensor  # [T] ids for the embedding table (image rows hold 0, overwritten)
    positions: torch.Tensor  # [T]
    out_slots: torch.Tensor  # [T] where each row's K/V is written
    kv: KVCache
    logit_rows: torch.Tensor  # [S] rows whose next-token logits are sampled
    decode_rows: torch.Tensor | slice | None = None  # [B] rows of single-query requests (a slice when contiguous)
    decode_slots: torch.Tensor | None = None  # [B, Lmax] their context slots (padding past each length)
    decode_lengths: torch.Tensor | None = None  # [B]
    prefills: list[PrefillChunk] = field(default_factory=list)
    image_rows: torch.Tensor | None = None  # [R] rows replaced by image embeddings
    image_embeds: torch.Tensor | None = None  # [R, H]

    def attention(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, heads, D]; k, v: [T, kv_heads, D] -> [T, heads * D]."""
        k_cache, v_cache = self.kv.k[layer_id], self.kv.v[layer_id]
        ops = ops_for(q.device)
        ops.copy_kv(k, v, k_cache, v_cache, self.out_slots)
        out = torch.empty_like(q)
        if self.decode_rows is not None:
            decoded = ops.token_decode_attention(q[self.decode_rows], k_cache, v_cache, self.decode_slots,
                                                 self.decode_lengths)
            if not self.prefills and decoded.shape[0] == q.shape[0]:  # a decode-only step: no copy
                return decoded.reshape(decoded.shape[0], -1)
            out[self.decode_rows] = decoded
        for chunk in self.prefills:
            rows = slice(chunk.row, chunk.row + chunk.num_tokens)
            if chunk.start == 0:  # nothing cached before: attend over this step's own K/V
                out[rows] = prefill_attention(q[rows], k[rows].transpose(0, 1), v[rows].transpose(0, 1), 0)
            else:
                slots = chunk.context_slots
                out[rows] = prefill_attention(q[rows], gather_kv(k_cache, slots), gather_kv(v_cache, slots),
                                              chunk.start)
        return out.reshape(out.shape[0], -1)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of n queries at positions start..start+n-1 over L = start + n keys.

    q: [n, heads, D]; k, v: [kv_heads, L, D] -> [n, heads, D].
    """
    n, length = q.shape[0], k.shape[1]
    q, k, v = q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    if start == 0:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        query_pos = torch.arange(start, start + n, device=q.device)[:, None]
        mask = torch.arange(length, device=q.device)[None, :] <= query_pos
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)
