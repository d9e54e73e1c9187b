"""Run by test_triton_kernels.py in a fresh interpreter with TRITON_INTERPRET=1 (Triton reads the
variable once, when it is first imported): compares each kernel with its torch twin, prints JSON."""

import json
import sys

import torch

from lightvlm.common.triton_kernels.token_decode_attention import token_decode_attention, token_decode_attention_torch


def decode_attention_error(heads: int, kv_heads: int, dim: int, dtype: torch.dtype) -> float:
    generator = torch.Generator().manual_seed(heads * dim)
    batch, num_slots = 3, 400
    lengths = torch.tensor([1, 70, 130])
    k_cache = torch.randn(kv_heads, num_slots, dim, generator=generator).to(dtype)
    v_cache = torch.randn(kv_heads, num_slots, dim, generator=generator).to(dtype)
    slot_table = torch.zeros(batch, int(lengths.max()), dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):  # scattered slots, as the allocator hands them out
        slot_table[b, :n] = torch.randperm(num_slots, generator=generator)[:n]
    q = torch.randn(batch, heads, dim, generator=generator).to(dtype)
    expected = token_decode_attention_torch(q.float(), k_cache.float(), v_cache.float(), slot_table, lengths)
    out = token_decode_attention(q, k_cache, v_cache, slot_table, lengths, block=32)
    return float((out.float() - expected).abs().max())


if __name__ == "__main__":
    heads, kv_heads, dim, dtype = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), getattr(torch, sys.argv[4])
    print(json.dumps({"max_error": decode_attention_error(heads, kv_heads, dim, dtype)}))
