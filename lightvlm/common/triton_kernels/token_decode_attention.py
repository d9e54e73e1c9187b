"""Decode attention over the token-indexed KV buffer (LightLLM's TokenAttention, one query per request).

    out = token_decode_attention(q, k_cache, v_cache, slot_table, lengths)

q: [B, heads, D]; k_cache, v_cache: [kv_heads, slots, D]; slot_table: [B, Lmax] (row b's first
lengths[b] entries are its context's slots); returns [B, heads, D]. Heads share KV heads in groups
(GQA). The kernel reads the KV rows in place through the slot table (no gathered copy), one program
per (request, head), with an online softmax over blocks of the context; it computes in fp32. When
that grid would leave most of a GPU idle on long contexts (`uses_split`: fewer programs than twice
the GPU's multiprocessors, slot tables of at least SPLIT_MIN_LEN columns), it runs the split-K variant
(token_decode_attention_split.py) instead: same result, the context cut into pieces.
"""

from functools import cache

import torch

from lightvlm.common.triton_kernels.copy_kv import gather_kv

SPLIT_MIN_LEN = 1024  # slot-table columns (the longest context; a CUDA graph's full width) worth splitting
NUM_SPLITS = 8

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch twin is all they use
    triton = None


def token_decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 slot_table: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The torch twin: gather the batch's contexts once, then two batched matmuls."""
    batch, heads, dim = q.shape
    kv_heads, longest = k_cache.shape[0], slot_table.shape[1]
    slots = slot_table.flatten()
    k = gather_kv(k_cache, slots).view(kv_heads, batch, longest, dim)  # [kv_heads, B, L, D]
    v = gather_kv(v_cache, slots).view(kv_heads, batch, longest, dim)
    is_real = torch.arange(longest, device=q.device)[None, :] < lengths[:, None]
    bias = torch.zeros(is_real.shape, device=q.device).masked_fill_(~is_real, float("-inf"))
    q = q.view(batch, kv_heads, heads // kv_heads, dim).transpose(0, 1)  # [kv_heads, B, group, D]
    # matmuls in the cache's dtype (they accumulate in fp32), softmax in fp32, as transformers' eager
    # attention does: upcasting K and V instead would copy the whole gathered context twice per layer
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * dim**-0.5  # [kv_heads, B, group, L]
    probs = (scores + bias[None, :, None, :]).softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v).transpose(0, 1).reshape(batch, heads, dim)


if triton is not None:

    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, slots_ptr, lengths_ptr, out_ptr, scale,
                       stride_qb, stride_qh, stride_kh, stride_ks, stride_vh, stride_vs, stride_sb,
                       stride_ob, stride_oh, GROUP: tl.constexpr, BLOCK: tl.constexpr, DIM: tl.constexpr,
                       DIM_POW2: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        kv_head = h // GROUP
        length = tl.load(lengths_ptr + b)
        d = tl.arange(0, DIM_POW2)  # tl.arange needs a power of two: the tail past DIM is masked
        in_dim = d < DIM
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d, mask=in_dim, other=0.0).to(tl.float32)
        running_max = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
        denominator = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
        acc = tl.zeros([DIM_POW2], tl.float32)
        for start in range(0, length, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            valid = offsets < length
            slots = tl.load(slots_ptr + b * stride_sb + offsets, mask=valid, other=0)
            k = tl.load(k_ptr + kv_head * stride_kh + slots[:, None] * stride_ks + d[None, :],
                        mask=valid[:, None] & in_dim[None, :], other=0.0).to(tl.float32)
            scores = tl.sum(k * q[None, :], axis=1) * scale
            scores = tl.where(valid, scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=0))
            p = tl.exp(scores - new_max)
            correction = tl.exp(running_max - new_max)
            v = tl.load(v_ptr + kv_head * stride_vh + slots[:, None] * stride_vs + d[None, :],
                        mask=valid[:, None] & in_dim[None, :], other=0.0).to(tl.float32)
            acc = acc * correction + tl.sum(p[:, None] * v, axis=0)
            denominator = denominator * correction + tl.sum(p, axis=0)
            running_max = new_max
        out = acc / denominator
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=in_dim)


def uses_split(batch: int, heads: int, table_width: int, num_multiprocessors: int) -> bool:
    """Whether a decode batch runs split-K: its one-program-per-(request, head) grid would not fill the
    GPU twice over, and its contexts may be long. Decided on shapes only, so a captured graph keeps it."""
    return table_width >= SPLIT_MIN_LEN and batch * heads < 2 * num_multiprocessors


@cache
def multiprocessor_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def token_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           slot_table: torch.Tensor, lengths: torch.Tensor, block: int = 64) -> torch.Tensor:
    """The Triton kernel (CUDA, or the CPU under TRITON_INTERPRET=1, which never splits)."""
    batch, heads, dim = q.shape
    if uses_split(batch, heads, slot_table.shape[1], multiprocessor_count(q.device)):
        # imported here: the split module imports this one (for its twin)
        from lightvlm.common.triton_kernels.token_decode_attention_split import token_decode_attention_split
        return token_decode_attention_split(q, k_cache, v_cache, slot_table, lengths, num_splits=NUM_SPLITS)
    out = torch.empty_like(q)
    assert k_cache.stride(2) == 1 and v_cache.stride(2) == 1 and q.stride(2) == 1
    _decode_kernel[(batch, heads)](
        q, k_cache, v_cache, slot_table, lengths, out, dim**-0.5,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        slot_table.stride(0), out.stride(0), out.stride(1),
        GROUP=heads // k_cache.shape[0], BLOCK=block, DIM=dim, DIM_POW2=triton.next_power_of_2(dim))
    return out
