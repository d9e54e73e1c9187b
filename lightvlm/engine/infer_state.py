"""The tensors of one step, and attention over the token-indexed KV cache.

A step's tokens (every scheduled request's new tokens, flattened to T rows) arrive as a StepInput;
`ModelRunner.prepare` turns it into an InferState. Decoder layers call `state.attention(layer, q, k, v)`,
which writes this step's K/V into the cache at the step's slots and attends each request's queries
over its whole context gathered from the cache.

Two shapes of request share a step: decode rows (one query each) are attended together by
`token_decode_attention`; prefill chunks (several queries) by `context_attention`, causally, offset
by the context already cached (the prefix cache's part and earlier chunks). Both read the context
where it lies in the cache, through the slot table. Each op is a Triton kernel on CUDA and its torch
twin on the CPU, as triton_kernels/ops.py selects.

The buffer is head-major, `[kv_heads, slots, head_dim]` per layer, so that gathering a batch's
context gives `[kv_heads, B, L, D]`, contiguous, which the decode matmuls take without a copy.
"""

from dataclasses import dataclass

import torch

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
class PrefillBatch:
    """The step's prefill chunks (requests with more than one new token), as `context_attention` takes
    them: chunk i has the step's rows q_starts[i] .. + num_new[i], its context in the slot table's row
    table_rows[i], prefix_lens[i] tokens of it cached before this step."""

    table_rows: torch.Tensor  # [P]
    q_starts: torch.Tensor  # [P]
    num_new: torch.Tensor  # [P]
    prefix_lens: torch.Tensor  # [P]
    max_num_new: int  # the largest num_new (sizes the kernel's grid without a device sync)


@dataclass
class InferState:
    input_ids: torch.Tensor  # [T] ids for the embedding table (image rows hold 0, overwritten)
    positions: torch.Tensor  # [T]
    out_slots: torch.Tensor  # [T] where each row's K/V is written
    kv: KVCache
    slot_table: torch.Tensor  # [max_reqs, max_len] each request's context slots (the runner's req_to_slots)
    logit_rows: torch.Tensor  # [S] rows whose next-token logits are sampled
    decode_rows: torch.Tensor | slice | None = None  # [B] rows of single-query requests (a slice when contiguous)
    decode_slots: torch.Tensor | None = None  # [B, Lmax] their context slots (padding past each length)
    decode_lengths: torch.Tensor | None = None  # [B]
    prefill: PrefillBatch | None = None
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
            if self.prefill is None and decoded.shape[0] == q.shape[0]:  # a decode-only step: no copy
                return decoded.reshape(decoded.shape[0], -1)
            out[self.decode_rows] = decoded
        if self.prefill is not None:
            p = self.prefill
            ops.context_attention(q, k_cache, v_cache, self.slot_table, p.table_rows, p.q_starts, p.num_new,
                                  p.prefix_lens, p.max_num_new, out=out)
        return out.reshape(out.shape[0], -1)
