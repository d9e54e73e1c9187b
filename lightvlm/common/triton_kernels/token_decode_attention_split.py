"""Split-K decode attention (flash decoding) over the token-indexed KV buffer, for long contexts.

    out = token_decode_attention_split(q, k_cache, v_cache, slot_table, lengths, num_splits=8)

Same shapes and result as `token_decode_attention`: q: [B, heads, D]; k_cache, v_cache:
[kv_heads, slots, D]; slot_table: [B, Lmax] (row b's first lengths[b] entries are its context's
slots; lengths[b] >= 1); returns [B, heads, D] in q's dtype. GQA: heads share KV heads in groups.

The one-program-per-(request, head) kernel walks a whole context in one program, so a small batch
with long contexts leaves most of a GPU idle. Here each request's context is cut into `num_splits`
pieces of ceil(length / num_splits) tokens (rounded up to the block), one program per (request,
KV head, piece) attends all heads of the KV head's group at once (each K/V row read once per group),
and a second kernel merges the pieces' partial outputs by their log-sum-exp. The grid depends on
num_splits, not on the lengths, so a CUDA graph can capture it.
"""

import torch

from lightvlm.common.triton_kernels.context_attention import dot_precision
from lightvlm.common.triton_kernels.token_decode_attention import token_decode_attention_torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch twin is all they use
    triton = None


def token_decode_attention_split_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                       slot_table: torch.Tensor, lengths: torch.Tensor,
                                       num_splits: int = 8) -> torch.Tensor:
    """The torch twin. Splitting changes only the order of the softmax's sums, so the twin is the
    unsplit decode attention (num_splits is accepted for the same call signature, and unused)."""
    return token_decode_attention_torch(q, k_cache, v_cache, slot_table, lengths)


if triton is not None:

    @triton.jit
    def _split_kernel(q_ptr, k_ptr, v_ptr, slots_ptr, lengths_ptr, part_out_ptr, part_lse_ptr, scale,
                      stride_qb, stride_qh, stride_kh, stride_ks, stride_vh, stride_vs, stride_sb,
                      stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, GROUP: tl.constexpr,
                      GROUP_POW2: tl.constexpr, DIM: tl.constexpr, DIM_POW2: tl.constexpr,
                      BLOCK: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr):
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(lengths_ptr + b)
        split_len = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK) * BLOCK
        start = split * split_len
        end = tl.minimum(start + split_len, length)
        g = tl.arange(0, GROUP_POW2)  # the group's heads, padded: tl.dot needs at least 16 rows
        heads = kv_head * GROUP + g
        is_head = g < GROUP
        d = tl.arange(0, DIM_POW2)
        in_dim = d < DIM
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=is_head[:, None] & in_dim[None, :], other=0.0).to(tl.float32)  # [G, D]
        running_max = tl.full([GROUP_POW2], -1e30, tl.float32)
        denominator = tl.zeros([GROUP_POW2], tl.float32)
        acc = tl.zeros([GROUP_POW2, DIM_POW2], tl.float32)
        for block_start in range(start, end, BLOCK):
            n = block_start + tl.arange(0, BLOCK)
            is_key = n < end
            slots = tl.load(slots_ptr + b * stride_sb + n, mask=is_key, other=0)
            k = tl.load(k_ptr + kv_head * stride_kh + slots[None, :] * stride_ks + d[:, None],
                        mask=is_key[None, :] & in_dim[:, None], other=0.0).to(tl.float32)  # [D, N]
            scores = tl.dot(q, k, input_precision=PRECISION) * scale
            scores = tl.where(is_key[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            p = tl.exp(scores - new_max[:, None])
            correction = tl.exp(running_max - new_max)
            v = tl.load(v_ptr + kv_head * stride_vh + slots[:, None] * stride_vs + d[None, :],
                        mask=is_key[:, None] & in_dim[None, :], other=0.0).to(tl.float32)  # [N, D]
            acc = acc * correction[:, None] + tl.dot(p, v, input_precision=PRECISION)
            denominator = denominator * correction + tl.sum(p, axis=1)
            running_max = new_max
        is_empty = denominator == 0  # a piece past a short context: weight 0 in the merge
        part = acc / tl.where(is_empty, 1.0, denominator)[:, None]
        lse = tl.where(is_empty, float("-inf"), running_max + tl.log(tl.where(is_empty, 1.0, denominator)))
        tl.store(part_out_ptr + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps + d[None, :],
                 part, mask=is_head[:, None] & in_dim[None, :])
        tl.store(part_lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=is_head)

    @triton.jit
    def _merge_kernel(part_out_ptr, part_lse_ptr, out_ptr, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
                      stride_ob, stride_oh, DIM: tl.constexpr, DIM_POW2: tl.constexpr,
                      NUM_SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, SPLITS_POW2)
        d = tl.arange(0, DIM_POW2)
        in_dim = d < DIM
        lse = tl.load(part_lse_ptr + b * stride_lb + h * stride_lh + s, mask=s < NUM_SPLITS, other=float("-inf"))
        weights = tl.exp(lse - tl.max(lse, axis=0))  # the first piece is never empty: the max is finite
        parts = tl.load(part_out_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
                        mask=(s < NUM_SPLITS)[:, None] & in_dim[None, :], other=0.0)
        out = tl.sum(weights[:, None] * parts, axis=0) / tl.sum(weights, axis=0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=in_dim)


def token_decode_attention_split(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 slot_table: torch.Tensor, lengths: torch.Tensor, num_splits: int = 8,
                                 block: int = 32) -> torch.Tensor:
    """The Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1); fp32 inside."""
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[0]
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride(2) == 1 and slot_table.stride(1) == 1
    assert heads % kv_heads == 0
    group, dim_pow2 = heads // kv_heads, triton.next_power_of_2(dim)
    part_out = torch.empty(batch, heads, num_splits, dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, heads, num_splits, dtype=torch.float32, device=q.device)
    _split_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, slot_table, lengths, part_out, part_lse, dim**-0.5,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        slot_table.stride(0), part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        GROUP=group, GROUP_POW2=max(16, triton.next_power_of_2(group)), DIM=dim, DIM_POW2=dim_pow2,
        BLOCK=block, NUM_SPLITS=num_splits, PRECISION=dot_precision(k_cache.dtype))
    out = torch.empty_like(q)
    _merge_kernel[(batch, heads)](
        part_out, part_lse, out, part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1), out.stride(0), out.stride(1),
        DIM=dim, DIM_POW2=dim_pow2, NUM_SPLITS=num_splits, SPLITS_POW2=triton.next_power_of_2(num_splits))
    return out
